//! Finding keys in a buffer: a SIMD substring search for the key prefix (`memchr::memmem`),
//! then `KeyFormat::key_at` (the key format's own parser, checksum included) at each hit, so
//! only real keys are reported. Lines and columns are counted lazily, only up to a hit: text
//! without hits costs one pass of the substring search and nothing else.

use crate::keys::format::KeyFormat;
use memchr::memmem::Finder;

/// One key found in a buffer. `key` stays in memory for `--check` and `--revoke`; nothing
/// prints it (see `Finding`).
#[derive(Clone, PartialEq, Eq)]
pub struct Hit {
    /// 1-based line.
    pub line: u64,
    /// 1-based column in Unicode code points (SARIF's default `columnKind`).
    pub column: u64,
    pub key: String,
}

impl std::fmt::Debug for Hit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Hit({}:{} {})",
            self.line,
            self.column,
            crate::keys::format::hint(&self.key)
        )
    }
}

/// A reusable matcher for one key format.
pub struct Matcher {
    format: KeyFormat,
    finder: Finder<'static>,
}

impl Matcher {
    pub fn new(format: KeyFormat) -> Matcher {
        let finder = Finder::new(format.needle().as_bytes()).into_owned();
        Matcher { format, finder }
    }

    /// Every valid key in `text`, in order.
    pub fn find(&self, text: &[u8]) -> Vec<Hit> {
        let mut hits = Vec::new();
        let mut lines = Lines::default();
        let mut from = 0;
        while let Some(rel) = self.finder.find(&text[from..]) {
            let at = from + rel;
            match self.format.key_at(&text[at..]) {
                Some(len) => {
                    let (line, column) = lines.position(text, at);
                    // key_at validated these bytes as ASCII.
                    let key = String::from_utf8_lossy(&text[at..at + len]).into_owned();
                    hits.push(Hit { line, column, key });
                    from = at + len;
                }
                None => from = at + 1,
            }
        }
        hits
    }
}

/// Incremental line counting: newlines are counted only between the previous hit and the next.
#[derive(Default)]
struct Lines {
    /// Bytes before this offset are counted.
    counted: usize,
    /// Newlines before `counted`.
    newlines: u64,
    /// Offset where the line holding `counted` starts.
    line_start: usize,
}

impl Lines {
    fn position(&mut self, text: &[u8], at: usize) -> (u64, u64) {
        let span = &text[self.counted..at];
        self.newlines += memchr::memchr_iter(b'\n', span).count() as u64;
        if let Some(nl) = memchr::memrchr(b'\n', span) {
            self.line_start = self.counted + nl + 1;
        }
        self.counted = at;
        // UTF-8 continuation bytes (10xxxxxx) do not start a code point.
        let column = text[self.line_start..at]
            .iter()
            .filter(|b| (**b & 0xC0) != 0x80)
            .count() as u64;
        (self.newlines + 1, column + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher() -> (Matcher, KeyFormat) {
        let f = KeyFormat::new("kg", &["live".into(), "test".into()]);
        (Matcher::new(f.clone()), f)
    }

    #[test]
    fn finds_keys_with_lines_and_code_point_columns() {
        let (m, f) = matcher();
        let a = f.generate("live").unwrap();
        let b = f.generate_publishable("test").unwrap();
        let mut bad = a.clone();
        bad.replace_range(20..21, if &a[20..21] == "x" { "y" } else { "x" });
        let text =
            format!("first kg_ line kg_live_nope\n\u{e9}t\u{e9} = \"{a}\"\n\n{bad}\nx{b}{a}\n");
        let hits = m.find(text.as_bytes());
        let got: Vec<(u64, u64, &str)> = hits
            .iter()
            .map(|h| (h.line, h.column, h.key.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, 8, a.as_str()),
                (5, 2, b.as_str()),
                (5, 2 + b.len() as u64, a.as_str())
            ]
        );
        assert!(!format!("{hits:?}").contains(&a));
        assert!(m.find(b"").is_empty());
        assert!(m.find(b"kg_").is_empty());
    }
}
