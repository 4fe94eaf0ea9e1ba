//! The API key wire format: `<prefix>_<env>_<secret><check>`, and for publishable keys
//! (browser-safe, see README "Publishable keys") `<prefix>_pub_<env>_<secret><check>`: the
//! marker lets people and secret scanners tell the two apart at a glance.
//!
//! `secret` is 32 bytes from the OS CSPRNG written as 43 base62 characters (256 bits, well above
//! RFC 6749 §10.10's 2^-160 guessing bound); `check` is the CRC32 of everything before it, as 6
//! base62 characters. The checksum lets the gateway reject garbage before spending an HMAC on
//! it, and lets secret scanners match our keys without false positives (the GitHub token
//! design). `parse` is pure, bounded and never panics: it runs on hostile input.

use thiserror::Error;

/// Hard bound on anything we treat as a key, checked before any other work (THREATS §2.5).
pub const MAX_KEY_LEN: usize = 256;
/// Characters of the random part: ceil(256 / log2(62)).
pub const SECRET_LEN: usize = 43;
/// Characters of the checksum: 62^6 > 2^32.
pub const CHECK_LEN: usize = 6;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a string is not a key of ours. Callers map all of these to the same 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("key longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    #[error("key does not start with the configured prefix")]
    WrongPrefix,
    #[error("key names an unknown environment")]
    UnknownEnv,
    #[error("key has the wrong length")]
    WrongLength,
    #[error("key contains a character outside base62")]
    BadCharacter,
    #[error("key checksum does not match")]
    BadChecksum,
}

/// What a successful parse tells us, borrowed from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub env: &'a str,
    /// The key carries the publishable marker.
    pub publishable: bool,
}

/// The marker of publishable keys, between the prefix and the env. `pub` is refused as an env
/// name (`keys.envs`) so the two can never be confused.
pub const PUBLISHABLE_MARKER: &str = "pub";

/// The configured shape of keys: a prefix and the environments it may carry.
#[derive(Debug, Clone)]
pub struct KeyFormat {
    prefix: String,
    envs: Vec<String>,
}

impl KeyFormat {
    /// `prefix` and `envs` are validated by the config layer (lowercase alphanumerics).
    pub fn new(prefix: &str, envs: &[String]) -> Self {
        Self {
            prefix: prefix.to_owned(),
            envs: envs.to_vec(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn envs(&self) -> &[String] {
        &self.envs
    }

    /// True if `key` claims to be one of ours (starts with `<prefix>_`). Keys imported from
    /// another gateway do not, and skip the format check (but never the length bound).
    pub fn claims(&self, key: &str) -> bool {
        let n = self.prefix.len();
        key.len() > n
            && key.as_bytes()[n] == b'_'
            && same(&key.as_bytes()[..n], self.prefix.as_bytes())
    }

    /// Mint a new key for `env` from the OS CSPRNG.
    pub fn generate(&self, env: &str) -> Result<String, getrandom::Error> {
        self.mint(env, false)
    }

    /// Mint a new publishable key (`<prefix>_pub_<env>_…`) for `env`.
    pub fn generate_publishable(&self, env: &str) -> Result<String, getrandom::Error> {
        self.mint(env, true)
    }

    fn mint(&self, env: &str, publishable: bool) -> Result<String, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        let mut key =
            String::with_capacity(self.prefix.len() + env.len() + 6 + SECRET_LEN + CHECK_LEN);
        key.push_str(&self.prefix);
        key.push('_');
        if publishable {
            key.push_str(PUBLISHABLE_MARKER);
            key.push('_');
        }
        key.push_str(env);
        key.push('_');
        key.push_str(&base62_fixed(&bytes, SECRET_LEN));
        let check = check_chars(crc32fast::hash(key.as_bytes()));
        key.extend(check.iter().map(|&c| char::from(c)));
        Ok(key)
    }

    /// What every key of ours starts with (`<prefix>_`): the needle secret scanners search
    /// for before [`KeyFormat::key_at`] decides.
    pub fn needle(&self) -> String {
        format!("{}_", self.prefix)
    }

    /// The length of the valid key (checksum included) that starts at `text[0]`, if one does.
    /// The layout is the one `mint` writes and `parse` checks, and `parse` has the last word,
    /// so a scanner built on this reports only real keys (a random 49-character tail matches
    /// the CRC32 with probability 2^-32). Bytes after the key do not matter.
    pub fn key_at(&self, text: &[u8]) -> Option<usize> {
        let mut at = self.prefix.len() + 1;
        if !text.starts_with(self.prefix.as_bytes()) || text.get(at - 1) != Some(&b'_') {
            return None;
        }
        let marker = PUBLISHABLE_MARKER.as_bytes();
        if text[at..].starts_with(marker) && text.get(at + marker.len()) == Some(&b'_') {
            at += marker.len() + 1;
        }
        let env = self.envs.iter().find(|e| {
            text[at..].starts_with(e.as_bytes()) && text.get(at + e.len()) == Some(&b'_')
        })?;
        let len = at + env.len() + 1 + SECRET_LEN + CHECK_LEN;
        let candidate = std::str::from_utf8(text.get(..len)?).ok()?;
        self.parse(candidate).ok().map(|_| len)
    }

    /// Validate `key` without hashing it. Length first, so oversized input costs nothing.
    ///
    /// This runs for every presented key, so it compares bytes in place (no `memcmp` call
    /// for a few bytes, no character search), checks the body's characters without an early
    /// exit (the loop vectorises) and compares the checksum by value: the six presented
    /// digits are read as a base-62 number while the CRC is computed, instead of the CRC
    /// being written out as digits after it (`check_chars`, six dependent divisions).
    pub fn parse<'a>(&self, key: &'a str) -> Result<Parsed<'a>, FormatError> {
        if key.len() > MAX_KEY_LEN {
            return Err(FormatError::TooLong);
        }
        if !self.claims(key) {
            return Err(FormatError::WrongPrefix);
        }
        let after_prefix = self.prefix.len() + 1;
        let rest = &key.as_bytes()[after_prefix..];
        let marker = PUBLISHABLE_MARKER.as_bytes();
        let publishable = rest.len() > marker.len()
            && same(&rest[..marker.len()], marker)
            && rest[marker.len()] == b'_';
        let env_at = after_prefix + if publishable { marker.len() + 1 } else { 0 };
        let rest = &key.as_bytes()[env_at..];
        // Env names are lowercase alphanumerics (config), so the first `_` ends the env.
        let env_len = self
            .envs
            .iter()
            .map(String::as_bytes)
            .find(|e| rest.len() > e.len() && rest[e.len()] == b'_' && same(&rest[..e.len()], e))
            .ok_or(FormatError::UnknownEnv)?
            .len();
        let body = &rest[env_len + 1..];
        if body.len() != SECRET_LEN + CHECK_LEN {
            return Err(FormatError::WrongLength);
        }
        let alphanumeric = body
            .iter()
            .fold(true, |ok, &b| ok & b.is_ascii_alphanumeric());
        if !alphanumeric {
            return Err(FormatError::BadCharacter);
        }
        let split = key.len() - CHECK_LEN;
        let presented = base62_value(&key.as_bytes()[split..]);
        if u64::from(crc32fast::hash(&key.as_bytes()[..split])) != presented {
            return Err(FormatError::BadChecksum);
        }
        Ok(Parsed {
            env: &key[env_at..env_at + env_len],
            publishable,
        })
    }
}

/// `a == b` for the few bytes of a prefix, marker or env, compared in place (slice equality
/// calls `memcmp`, which costs more than these comparisons).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(true, |ok, (x, y)| ok & (x == y))
}

/// The value of base-62 digits (`ALPHABET`'s order) already checked to be alphanumeric.
/// Six digits are below 62^6 < 2^36, so the CRC32 they encode matches exactly when the
/// values are equal (`check_chars` is this number's fixed-width encoding).
fn base62_value(digits: &[u8]) -> u64 {
    digits.iter().fold(0, |n, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'Z' => c - b'A' + 10,
            _ => c.wrapping_sub(b'a').wrapping_add(36),
        };
        n * 62 + u64::from(d)
    })
}

/// The shortest key `keys import` accepts. A hint shows no character of a shorter string: four
/// characters of it would be a quarter or more of the key.
pub const MIN_IMPORTED_KEY_LEN: usize = 16;

/// The form of a key that logs, audit records and CLI output may show: `kg_live_…a1B2`.
/// Never more than the public prefix/env and the last four characters (DESIGN §3).
///
/// The head is shown only for a key in our format, checksum included ([`public_head`]):
/// anything else (an imported key, any visible ASCII) gets [`imported_hint`]. Finding the head
/// by counting underscores instead showed `abcdefghij_kl_` of the imported key
/// `abcdefghij_kl_mn`, which with the last four was the whole key (review 134).
pub fn hint(key: &str) -> String {
    match public_head(key) {
        Some(head) => format!("{head}…{}", last_four(key)),
        None => imported_hint(key),
    }
}

/// The hint of a key that is not in our format (imported keys, DESIGN §3: "nothing secret"):
/// its last four characters, and nothing for a string shorter than any importable key.
pub fn imported_hint(key: &str) -> String {
    if key.len() < MIN_IMPORTED_KEY_LEN {
        return "…".to_owned();
    }
    format!("…{}", last_four(key))
}

/// A hint stored for an imported key as it may be shown: what follows its `…`, at most four
/// characters. Hints are stored in records (and covered by their MACs, so they are not
/// rewritten in place); versions before review 134 stored heads of imported keys that were
/// secret, and every place that shows a record's hint reads it through here
/// (`KeyRecord::shown_hint`).
pub fn imported_hint_of_stored(stored: &str) -> String {
    let tail = stored.rsplit('…').next().unwrap_or_default();
    let from = tail.char_indices().rev().nth(3).map_or(0, |(i, _)| i);
    format!("…{}", &tail[from..])
}

fn last_four(key: &str) -> &str {
    key.get(key.len().saturating_sub(4)..).unwrap_or_default()
}

/// `<prefix>_<env>_` (`<prefix>_pub_<env>_`) when `key` has our layout: a prefix and env as
/// the config allows them (lowercase letters and digits, 1-16; lowercase letters), then
/// exactly the secret and checksum in base62, the checksum matching. Without the configured
/// prefix and envs (callers may not have them), the checksum is what tells our keys apart: a
/// string of this layout that is not one of ours matches it with probability 2^-32, and one
/// that does is a key in our format, whose head is public by design.
fn public_head(key: &str) -> Option<&str> {
    let body = SECRET_LEN + CHECK_LEN;
    if key.len() > MAX_KEY_LEN || key.len() <= body {
        return None;
    }
    let head = key.get(..key.len() - body)?;
    let lower = |s: &str, digits: bool| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || (digits && b.is_ascii_digit()))
    };
    let mut parts = head.strip_suffix('_')?.split('_');
    let prefix_ok = parts
        .next()
        .is_some_and(|p| p.len() <= 16 && lower(p, true));
    let env_ok = match (parts.next(), parts.next(), parts.next()) {
        (Some(env), None, _) => lower(env, false),
        (Some(PUBLISHABLE_MARKER), Some(env), None) => lower(env, false),
        _ => false,
    };
    let bytes = key.as_bytes();
    let split = bytes.len() - CHECK_LEN;
    let ours = prefix_ok
        && env_ok
        && bytes[head.len()..].iter().all(u8::is_ascii_alphanumeric)
        && u64::from(crc32fast::hash(&bytes[..split])) == base62_value(&bytes[split..]);
    ours.then_some(head)
}

/// The checksum as 6 base62 digits, as `mint` writes it (`parse` compares by value:
/// `base62_value`).
fn check_chars(crc: u32) -> [u8; CHECK_LEN] {
    let mut out = [b'0'; CHECK_LEN];
    let mut n = crc;
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Big-endian bytes as exactly `width` base62 digits (left-padded with '0').
fn base62_fixed(bytes: &[u8], width: usize) -> String {
    let mut num = bytes.to_vec();
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        let mut rem: u32 = 0;
        for byte in num.iter_mut() {
            let acc = (rem << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            rem = acc % 62;
        }
        *slot = ALPHABET[rem as usize];
    }
    // ALPHABET is ASCII, so this is valid UTF-8.
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn fmt() -> KeyFormat {
        KeyFormat::new("kg", &["live".to_owned(), "test".to_owned()])
    }

    #[test]
    fn generated_keys_are_unique_parse_and_detect_one_char_changes() {
        let f = fmt();
        let mut seen = HashSet::new();
        for i in 0..100_000 {
            let env = if i % 2 == 0 { "live" } else { "test" };
            let key = f.generate(env).unwrap();
            assert_eq!(
                f.parse(&key),
                Ok(Parsed {
                    env,
                    publishable: false
                })
            );
            // Flip one character of the secret or checksum to another base62 char.
            let pos = key.len() - 1 - (i % (SECRET_LEN + CHECK_LEN));
            let mut bytes = key.clone().into_bytes();
            bytes[pos] = if bytes[pos] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(bytes).unwrap();
            assert_eq!(f.parse(&changed), Err(FormatError::BadChecksum), "{i}");
            assert!(seen.insert(key));
        }
    }

    #[test]
    fn publishable_keys_carry_the_marker_parse_and_hint() {
        let f = fmt();
        let key = f.generate_publishable("live").unwrap();
        assert!(key.starts_with("kg_pub_live_"), "{key}");
        assert_eq!(
            f.parse(&key),
            Ok(Parsed {
                env: "live",
                publishable: true
            })
        );
        assert_eq!(
            hint(&key),
            format!("kg_pub_live_…{}", &key[key.len() - 4..])
        );
        assert!(hint(&f.generate("test").unwrap()).starts_with("kg_test_…"));
        // The marker is covered by the checksum: dropping it breaks the key.
        assert_eq!(
            f.parse(&key.replacen("kg_pub_", "kg_", 1)),
            Err(FormatError::BadChecksum)
        );
        assert_eq!(
            f.parse(&key.replacen("_pub_", "_pbu_", 1)),
            Err(FormatError::UnknownEnv)
        );
    }

    /// `key` with the character at byte `pos` replaced by `c` (ASCII keys only).
    fn at(key: &str, pos: usize, c: char) -> String {
        let mut out = key.to_owned();
        out.replace_range(pos..=pos, c.encode_utf8(&mut [0; 4]));
        out
    }

    #[test]
    fn parse_rejects_each_kind_of_garbage() {
        let f = fmt();
        let good = f.generate("live").unwrap();
        let cases: Vec<(String, FormatError)> = vec![
            ("x".repeat(MAX_KEY_LEN + 1), FormatError::TooLong),
            (
                format!("kg_live_{}", "a".repeat(10_000)),
                FormatError::TooLong,
            ),
            (good.replacen("kg_", "gk_", 1), FormatError::WrongPrefix),
            (good.replacen("kg_", "kg", 1), FormatError::WrongPrefix),
            (good.replacen("live", "prod", 1), FormatError::UnknownEnv),
            ("kg_live".to_owned(), FormatError::UnknownEnv),
            ("kg_livenounderscore".to_owned(), FormatError::UnknownEnv),
            (good[..good.len() - 1].to_owned(), FormatError::WrongLength),
            (format!("{good}0"), FormatError::WrongLength),
            // By position, never by search: the character at index 10 may also occur in
            // `kg_live_`, and replacing its first occurrence would damage the prefix instead.
            (at(&good, 10, '-'), FormatError::BadCharacter),
            (at(&good, good.len() - 1, '+'), FormatError::BadCharacter),
            ("".to_owned(), FormatError::WrongPrefix),
        ];
        for (input, want) in cases {
            assert_eq!(f.parse(&input), Err(want), "{input:?}");
        }
    }

    #[test]
    fn key_at_finds_exactly_valid_keys_in_surrounding_text() {
        let f = fmt();
        let key = f.generate("live").unwrap();
        let publishable = f.generate_publishable("test").unwrap();
        assert_eq!(f.needle(), "kg_");
        assert_eq!(f.key_at(format!("{key}\"rest").as_bytes()), Some(key.len()));
        assert_eq!(f.key_at(publishable.as_bytes()), Some(publishable.len()));
        let broken = at(
            &key,
            key.len() - 1,
            if key.ends_with('a') { 'b' } else { 'a' },
        );
        assert_eq!(f.key_at(broken.as_bytes()), None, "bad checksum");
        assert_eq!(
            f.key_at(&key.as_bytes()[..key.len() - 1]),
            None,
            "cut short"
        );
        assert_eq!(f.key_at(key.replacen("live", "prod", 1).as_bytes()), None);
        assert_eq!(f.key_at(b"kg_"), None);
        assert_eq!(f.key_at(b"kg_pub_"), None);
        assert_eq!(f.key_at("kg_live_\u{e9}".as_bytes()), None);
    }

    #[test]
    fn hint_shows_only_prefix_and_last_four() {
        assert_eq!(hint("legacy-key-1234567890"), "…7890");
    }

    /// Review 134 defect 2: an imported key (any visible ASCII, 16–256 characters) whose
    /// second `_` fell in its first 28 bytes had that head shown as if it were our public
    /// prefix; `abcdefghij_kl_mn` was shown whole. A hint of a key that is not ours shows at
    /// most its last four characters, and nothing of a key shorter than an importable one.
    #[test]
    fn hints_of_keys_not_ours_show_at_most_the_last_four() {
        for (key, want) in [
            ("abcdefghij_kl_mn", "…l_mn"),
            ("a_b_cdefghijklmnopqrstu", "…rstu"),
            ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "…p7dc"),
            ("ghp_abc_0123456789abcdefghij", "…ghij"),
            // Our prefix and env, but not our format (length, checksum): not ours.
            ("kg_live_abcdefghijklmnopXYZ1", "…XYZ1"),
            ("kg_pub_live_abcdefghijklmnop", "…mnop"),
        ] {
            assert_eq!(hint(key), want, "{key}");
        }
        // Shorter than any key import accepts: four characters would be a quarter or more.
        for short in ["", "ab", "abcd", "a_b_c", "abcdefghij_kl_m"] {
            assert_eq!(hint(short), "…", "{short:?}");
        }
    }

    /// The other half of defect 2's fix: keys in our format keep the hint they always had,
    /// `<prefix>_<env>_…last4` (`<prefix>_pub_<env>_…last4`).
    #[test]
    fn hints_of_our_keys_are_unchanged() {
        let f = fmt();
        for env in ["live", "test"] {
            for _ in 0..200 {
                let key = f.generate(env).unwrap();
                let tail = &key[key.len() - 4..];
                assert_eq!(hint(&key), format!("kg_{env}_…{tail}"));
                let key = f.generate_publishable(env).unwrap();
                let tail = &key[key.len() - 4..];
                assert_eq!(hint(&key), format!("kg_pub_{env}_…{tail}"));
            }
        }
        // A fixed key of ours (secret of 43 `a`, its checksum), and the hint stored for it.
        let body = format!("kg_live_{}", "a".repeat(SECRET_LEN));
        let check = check_chars(crc32fast::hash(body.as_bytes()));
        let key = format!("{body}{}", std::str::from_utf8(&check).unwrap());
        assert!(f.parse(&key).is_ok());
        assert_eq!(hint(&key), format!("kg_live_…{}", &key[key.len() - 4..]));
    }

    #[test]
    fn checksum_digits_match_the_big_number_encoding() {
        for crc in [0u32, 1, 61, 62, 3843, 0xdead_beef, u32::MAX] {
            assert_eq!(
                check_chars(crc).to_vec(),
                base62_fixed(&crc.to_be_bytes(), CHECK_LEN).into_bytes()
            );
        }
    }

    #[test]
    fn checksum_digits_read_back_as_the_crc_they_encode() {
        let mut crcs = vec![0, 1, 61, 62, u32::MAX, u32::MAX - 1];
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            crcs.push(x);
        }
        for crc in crcs {
            assert_eq!(base62_value(&check_chars(crc)), u64::from(crc), "{crc}");
        }
        assert_eq!(base62_value(b"zzzzzz"), 62u64.pow(6) - 1);
        assert_eq!(base62_value(b"000010"), 62);
    }

    #[test]
    fn base62_is_fixed_width_and_ordered() {
        assert_eq!(base62_fixed(&[0, 0, 0, 0], 6), "000000");
        assert_eq!(base62_fixed(&[0, 0, 0, 61], 6), "00000z");
        assert_eq!(base62_fixed(&[0, 0, 0, 62], 6), "000010");
        assert_eq!(base62_fixed(&[0xff; 32], SECRET_LEN).len(), SECRET_LEN);
    }
}
