//! Where a config field is in its file: byte offsets to `line:column`, an error's byte span to
//! the dotted field it falls in (`routes[0].upstream`), and a dotted field back to its line.
//!
//! Only errors take these paths, so the file is parsed again on demand (`toml_edit` keeps the
//! spans `toml`'s deserializer throws away) instead of carrying spans on every config value.

use std::fmt;
use std::ops::Range;
use toml_edit::{ImDocument, Item};

/// A 1-based line and column (in characters) in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineCol {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for LineCol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// The line and column of byte `offset` in `text` (clamped to the end of the text).
pub fn line_col(text: &str, offset: usize) -> LineCol {
    let mut end = offset.min(text.len());
    // An offset inside a multi-byte character counts as that character.
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    LineCol {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// One step of a dotted field path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `routes[0].upstream` → `routes`, `0`, `upstream`; None for a path that does not parse
/// (then the error simply carries no line).
fn segments(field: &str) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    for part in field.split('.') {
        let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        if name.is_empty() {
            return None;
        }
        out.push(Segment::Key(name.to_owned()));
        while !rest.is_empty() {
            let (index, after) = rest.split_once(']')?;
            out.push(Segment::Index(index.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    Some(out)
}

fn render(path: &[Segment]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Segment::Key(k) if s.is_empty() => s.push_str(k),
            Segment::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Segment::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Where `field` is written in `text`: its value (or its table header), else its key. None when
/// the file does not set it (a default) or does not parse.
pub fn field_line(text: &str, field: &str) -> Option<LineCol> {
    let doc = ImDocument::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut key_span = None;
    for seg in segments(field)? {
        item = match seg {
            Segment::Key(k) => {
                let (key, next) = item.as_table_like()?.get_key_value(&k)?;
                key_span = key.span();
                next
            }
            Segment::Index(i) => item.get(i)?,
        };
    }
    let span = item.span().or(key_span)?;
    Some(line_col(text, span.start))
}

/// The deepest field of `text` whose key or value covers byte `offset`: what a deserialization
/// error at that offset is about. None outside any field (or when the text does not parse).
pub fn field_at(text: &str, offset: usize) -> Option<String> {
    let doc = ImDocument::parse(text).ok()?;
    let mut best = None;
    let mut path = Vec::new();
    deepest(doc.as_item(), offset, &mut path, &mut best);
    best.map(|p: Vec<Segment>| render(&p))
}

/// Depth-first over every key and array element; tables are visited whether or not their span
/// covers the offset, since a table's keys live after its header, outside the header's span.
fn deepest(item: &Item, offset: usize, path: &mut Vec<Segment>, best: &mut Option<Vec<Segment>>) {
    let covers = |span: Option<Range<usize>>| {
        span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
    };
    let visit = |seg: Segment,
                 key: Option<Range<usize>>,
                 child: &Item,
                 path: &mut Vec<Segment>,
                 best: &mut Option<Vec<Segment>>| {
        path.push(seg);
        if (covers(key) || covers(child.span()))
            && best.as_ref().is_none_or(|b| b.len() <= path.len())
        {
            *best = Some(path.clone());
        }
        deepest(child, offset, path, best);
        path.pop();
    };
    if let Some(table) = item.as_table_like() {
        for (name, child) in table.iter() {
            let key = table.get_key_value(name).and_then(|(k, _)| k.span());
            visit(Segment::Key(name.to_owned()), key, child, path, best);
        }
    } else {
        let len = match item {
            Item::ArrayOfTables(a) => a.len(),
            Item::Value(toml_edit::Value::Array(a)) => a.len(),
            _ => 0,
        };
        for i in 0..len {
            if let Some(child) = item.get(i) {
                visit(Segment::Index(i), None, child, path, best);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[keys]\nrotate_grace = \"soon\"\n\n[[routes]]\nname = \"a\"\n\n[[routes]]\nname = \"b\"\nupstream = \"nope\"\nlimits = { rate = \"x\" }\n";

    #[test]
    fn offsets_become_lines_and_columns() {
        assert_eq!(line_col("ab\ncd", 0), LineCol { line: 1, column: 1 });
        assert_eq!(line_col("ab\ncd", 4), LineCol { line: 2, column: 2 });
        assert_eq!(line_col("é\nx", 1), LineCol { line: 1, column: 1 });
        assert_eq!(line_col("ab", 99), LineCol { line: 1, column: 3 });
    }

    #[test]
    fn fields_are_found_by_path() {
        assert_eq!(
            field_line(TEXT, "keys.rotate_grace").map(|l| l.line),
            Some(2)
        );
        assert_eq!(
            field_line(TEXT, "routes[1].upstream").map(|l| l.line),
            Some(9)
        );
        assert_eq!(
            field_line(TEXT, "routes[1].limits.rate").map(|l| l.line),
            Some(10)
        );
        assert_eq!(field_line(TEXT, "routes[1]").map(|l| l.line), Some(7));
        assert_eq!(
            field_line(TEXT, "keys.store"),
            None,
            "a default has no line"
        );
        assert_eq!(field_line(TEXT, "routes[x]"), None);
    }

    #[test]
    fn offsets_name_the_deepest_field() {
        let at = |needle: &str| field_at(TEXT, TEXT.find(needle).unwrap());
        assert_eq!(at("\"soon\"").as_deref(), Some("keys.rotate_grace"));
        assert_eq!(at("\"nope\"").as_deref(), Some("routes[1].upstream"));
        assert_eq!(at("\"x\"").as_deref(), Some("routes[1].limits.rate"));
        assert_eq!(at("upstream").as_deref(), Some("routes[1].upstream"));
        assert_eq!(field_at(TEXT, TEXT.len() + 5), None);
    }
}
