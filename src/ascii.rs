//! Numbers and IPv4 addresses written as text into a stack buffer, for the header values the
//! request path builds (`X-Forwarded-For`, `RateLimit-Policy`).
//!
//! Why not `write!`: `core::fmt` costs about a thousand instructions per call on the request
//! path (callgrind, docs/performance.md), for text these functions write in a few dozen. IPv6
//! addresses, rarer and with compression rules to get right, still go through `fmt`.
//!
//! Also the header values of small numbers (`number_value`), made once.

use http::HeaderValue;
use std::net::IpAddr;
use std::sync::OnceLock;

/// Text of at most `N` bytes, built in place.
pub struct Text<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Text<N> {
    fn default() -> Self {
        Text {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Text<N> {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Append `s`; what does not fit is cut off (callers size `N` for their longest text).
    pub fn push(&mut self, s: &[u8]) -> &mut Self {
        let n = s.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
        self
    }

    /// Append `n` in decimal.
    pub fn decimal(&mut self, mut n: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[at..])
    }

    /// Append `ip` as `Display` writes it.
    pub fn ip(&mut self, ip: IpAddr) -> &mut Self {
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b".");
                    }
                    self.decimal(u64::from(octet));
                }
                self
            }
            IpAddr::V6(_) => {
                let mut w = &mut self.buf[self.len..];
                let room = w.len();
                // An IPv6 address is at most 45 characters; callers give room for it.
                let _ = std::io::Write::write_fmt(&mut w, format_args!("{ip}"));
                self.len += room - w.len();
                self
            }
        }
    }
}

/// Room for any IP address as text (45 characters for the longest IPv6 form).
pub type IpText = Text<48>;

/// Numbers below this have their header value made once (`number_value`).
const SMALL_NUMBERS: u64 = 1024;

/// `n` as a header value. A number below `SMALL_NUMBERS` (a `RateLimit-*` value on nearly
/// every response: remaining tokens, seconds to reset, a burst) is a clone of a value made
/// once over static text, which copies three words; `HeaderValue::from(n)` formats into a new
/// allocation each time (~200 instructions, and a free when the response is written).
pub fn number_value(n: u64) -> HeaderValue {
    static SMALL: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    if n >= SMALL_NUMBERS {
        return HeaderValue::from(n);
    }
    let small = SMALL.get_or_init(|| {
        // One string for all of them, kept for the life of the process (4 KiB), and where
        // each one ends in it.
        let mut text = String::new();
        let ends: Vec<usize> = (0..SMALL_NUMBERS)
            .map(|i| {
                text.push_str(&i.to_string());
                text.len()
            })
            .collect();
        let text: &'static str = text.leak();
        let starts = std::iter::once(0).chain(ends.iter().copied());
        starts
            .zip(&ends)
            .map(|(start, &end)| HeaderValue::from_static(&text[start..end]))
            .collect()
    });
    small[n as usize].clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_addresses_read_as_display_writes_them() {
        for n in [0u64, 7, 10, 99, 100, 65_535, 1_000_000, u64::MAX] {
            assert_eq!(
                Text::<20>::default().decimal(n).as_bytes(),
                n.to_string().as_bytes()
            );
        }
        let mut t = Text::<48>::default();
        t.decimal(100).push(b";w=").decimal(60);
        assert_eq!(t.as_bytes(), b"100;w=60");
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(
                IpText::default().ip(ip).as_bytes(),
                ip.to_string().as_bytes()
            );
        }
        assert_eq!(Text::<3>::default().push(b"abcd").as_bytes(), b"abc");
    }

    #[test]
    fn number_values_read_as_the_number_on_both_sides_of_the_table() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            999,
            1000,
            SMALL_NUMBERS - 1,
            SMALL_NUMBERS,
            u64::MAX,
        ] {
            assert_eq!(number_value(n).as_bytes(), n.to_string().as_bytes(), "{n}");
        }
    }
}
