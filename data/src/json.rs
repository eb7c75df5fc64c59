//! A strict JSON (RFC 8259) parser for one JSONL line that keeps the byte
//! position of every value and key.
//!
//! serde_json reports where a syntax error is, but not where a *valid* value
//! sits, and the crate must say "line 3, column 27: unknown role" for a role
//! that parses fine. Objects keep their key order, which harmony relies on when
//! it renders tool parameter schemas.

/// A JSON value and the byte offset (within its line) where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Value {
    pub pos: usize,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Null,
    Bool(bool),
    /// The number as written; normalised only when printed back.
    Number(String),
    String(String),
    Array(Vec<Value>),
    Object(Vec<Member>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Member {
    pub key: String,
    pub key_pos: usize,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub pos: usize,
    pub message: String,
}

/// Deep enough for any real conversation, shallow enough that hostile input
/// cannot overflow the stack.
const MAX_DEPTH: usize = 128;

impl Value {
    pub fn get(&self, key: &str) -> Option<&Value> {
        match &self.kind {
            Kind::Object(members) => members.iter().find(|m| m.key == key).map(|m| &m.value),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Number(_) => "a number",
            Kind::String(_) => "a string",
            Kind::Array(_) => "an array",
            Kind::Object(_) => "an object",
        }
    }

    /// Compact JSON, formatted like serde_json (and Python's
    /// `json.dumps(separators=(",", ":"), ensure_ascii=False)`).
    pub fn to_compact(&self) -> String {
        let mut out = String::new();
        self.write_compact(&mut out);
        out
    }

    fn write_compact(&self, out: &mut String) {
        match &self.kind {
            Kind::Null => out.push_str("null"),
            Kind::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Kind::Number(n) => match n.parse::<serde_json::Number>() {
                Ok(num) => out.push_str(&num.to_string()),
                Err(_) => out.push_str(n),
            },
            Kind::String(s) => write_string(s, out),
            Kind::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_compact(out);
                }
                out.push(']');
            }
            Kind::Object(members) => {
                out.push('{');
                for (i, m) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_string(&m.key, out);
                    out.push(':');
                    m.value.write_compact(out);
                }
                out.push('}');
            }
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses one line holding exactly one JSON value (surrounding whitespace allowed).
pub(crate) fn parse_line(line: &str) -> Result<Value, SyntaxError> {
    let mut p = Parser { src: line.as_bytes(), text: line, pos: 0 };
    p.skip_ws();
    let value = p.value(0)?;
    p.skip_ws();
    if p.pos < p.src.len() {
        return Err(p.error(format!(
            "unexpected {} after the end of the JSON value; each line must hold exactly one JSON object",
            p.describe_here()
        )));
    }
    Ok(value)
}

struct Parser<'a> {
    src: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, message: String) -> SyntaxError {
        SyntaxError { pos: self.pos, message }
    }

    fn describe_here(&self) -> String {
        match self.text[self.pos..].chars().next() {
            None => "end of line".to_string(),
            Some(c) if c.is_control() => format!("character U+{:04X}", c as u32),
            Some(c) => format!("`{c}`"),
        }
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\r' | b'\n') = self.src.get(self.pos) {
            self.pos += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error(format!("JSON nested deeper than {MAX_DEPTH} levels")));
        }
        let pos = self.pos;
        let kind = match self.src.get(self.pos) {
            Some(b'{') => self.object(depth)?,
            Some(b'[') => self.array(depth)?,
            Some(b'"') => Kind::String(self.string()?),
            Some(b'-' | b'0'..=b'9') => self.number()?,
            Some(b't') => self.literal("true", Kind::Bool(true))?,
            Some(b'f') => self.literal("false", Kind::Bool(false))?,
            Some(b'n') => self.literal("null", Kind::Null)?,
            _ => {
                let hint =
                    if self.src.get(self.pos) == Some(&b'\'') { " (JSON strings use double quotes)" } else { "" };
                return Err(self.error(format!("expected a JSON value, found {}{hint}", self.describe_here())));
            }
        };
        Ok(Value { pos, kind })
    }

    fn literal(&mut self, word: &str, kind: Kind) -> Result<Kind, SyntaxError> {
        if self.src[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(kind)
        } else {
            Err(self.error(format!("expected a JSON value, found {}", self.describe_here())))
        }
    }

    fn object(&mut self, depth: usize) -> Result<Kind, SyntaxError> {
        self.pos += 1;
        let mut members: Vec<Member> = Vec::new();
        self.skip_ws();
        if self.src.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(Kind::Object(members));
        }
        loop {
            self.skip_ws();
            if self.src.get(self.pos) != Some(&b'"') {
                let trailing = if members.is_empty() { "" } else { " (no trailing comma before `}` in JSON)" };
                return Err(self
                    .error(format!("expected a \"key\" in double quotes, found {}{trailing}", self.describe_here())));
            }
            let key_pos = self.pos;
            let key = self.string()?;
            if members.iter().any(|m| m.key == key) {
                self.pos = key_pos;
                return Err(self.error(format!("duplicate key \"{key}\" in the same object")));
            }
            self.skip_ws();
            if self.src.get(self.pos) != Some(&b':') {
                return Err(self.error(format!("expected `:` after the key \"{key}\", found {}", self.describe_here())));
            }
            self.pos += 1;
            self.skip_ws();
            let value = self.value(depth + 1)?;
            members.push(Member { key, key_pos, value });
            self.skip_ws();
            match self.src.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Kind::Object(members));
                }
                _ => {
                    return Err(self.error(format!(
                        "expected `,` or `}}` after the value of \"{}\", found {}",
                        members.last().map_or("", |m| m.key.as_str()),
                        self.describe_here()
                    )))
                }
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Kind, SyntaxError> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.src.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(Kind::Array(items));
        }
        loop {
            self.skip_ws();
            if self.src.get(self.pos) == Some(&b']') {
                return Err(self.error("expected a value after `,`, found `]` (no trailing comma in JSON)".to_string()));
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.src.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Kind::Array(items));
                }
                _ => {
                    return Err(self.error(format!("expected `,` or `]` in the array, found {}", self.describe_here())))
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, SyntaxError> {
        let digits = self.src.get(self.pos..self.pos + 4);
        let value = digits
            .filter(|d| d.iter().all(u8::is_ascii_hexdigit))
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u32::from_str_radix(d, 16).ok());
        match value {
            Some(v) => {
                self.pos += 4;
                Ok(v)
            }
            None => Err(self.error("expected 4 hex digits after `\\u`".to_string())),
        }
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let run_start = self.pos;
            while let Some(&b) = self.src.get(self.pos) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            // The line is a &str and we stop only at ASCII bytes, so this slice
            // lies on character boundaries.
            out.push_str(&self.text[run_start..self.pos]);
            match self.src.get(self.pos) {
                None => {
                    self.pos = start;
                    return Err(self.error(
                        "string is not closed before the end of the line (a newline inside a string must be written \\n)"
                            .to_string(),
                    ));
                }
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let esc = self.src.get(self.pos).copied();
                    self.pos += 1;
                    match esc {
                        Some(b'"') => out.push('"'),
                        Some(b'\\') => out.push('\\'),
                        Some(b'/') => out.push('/'),
                        Some(b'b') => out.push('\u{8}'),
                        Some(b'f') => out.push('\u{c}'),
                        Some(b'n') => out.push('\n'),
                        Some(b'r') => out.push('\r'),
                        Some(b't') => out.push('\t'),
                        Some(b'u') => {
                            let esc_pos = self.pos - 2;
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) {
                                let lo = if self.src[self.pos..].starts_with(b"\\u") {
                                    self.pos += 2;
                                    Some(self.hex4()?)
                                } else {
                                    None
                                };
                                match lo {
                                    Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                    }
                                    _ => {
                                        self.pos = esc_pos;
                                        return Err(self.error(format!(
                                            "\\u{hi:04X} is half of a surrogate pair with no low half; write the character itself"
                                        )));
                                    }
                                }
                            } else {
                                hi
                            };
                            match char::from_u32(code) {
                                Some(c) => out.push(c),
                                None => {
                                    self.pos = esc_pos;
                                    return Err(self.error(format!(
                                        "\\u{code:04X} is not a Unicode character (lone low surrogate)"
                                    )));
                                }
                            }
                        }
                        _ => {
                            self.pos -= 2;
                            return Err(self.error(
                                "invalid escape; valid ones are \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX".to_string(),
                            ));
                        }
                    }
                }
                Some(_) => {
                    return Err(self.error(format!(
                        "raw control character U+{:04X} inside a string; escape it (\\t, \\n, \\u00XX)",
                        self.src[self.pos]
                    )))
                }
            }
        }
    }

    fn number(&mut self) -> Result<Kind, SyntaxError> {
        let start = self.pos;
        let digits = |p: &mut Self| {
            let s = p.pos;
            while p.src.get(p.pos).is_some_and(u8::is_ascii_digit) {
                p.pos += 1;
            }
            p.pos - s
        };
        if self.src.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        match self.src.get(self.pos) {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(self.error("expected a digit after `-`".to_string())),
        }
        if self.src.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if digits(self) == 0 {
                return Err(self.error("expected a digit after the decimal point".to_string()));
            }
        }
        if let Some(b'e' | b'E') = self.src.get(self.pos) {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.src.get(self.pos) {
                self.pos += 1;
            }
            if digits(self) == 0 {
                return Err(self.error("expected a digit in the exponent".to_string()));
            }
        }
        Ok(Kind::Number(self.text[start..self.pos].to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: &str) -> SyntaxError {
        parse_line(line).unwrap_err()
    }

    #[test]
    fn seed_trailing_bracket_is_reported_at_the_bracket() {
        let line = r#"{"messages": [{"role": "user", "content": "a"}]]}"#;
        let e = err(line);
        assert_eq!(&line[e.pos..e.pos + 1], "]");
        assert_eq!(e.pos, 47);
        assert!(e.message.contains("expected `,` or `}`"), "{}", e.message);
    }

    #[test]
    fn values_keep_positions_and_key_order() {
        let v = parse_line(r#" {"b": [1, -2.5e3], "a": "x\u00e9\ud83d\ude00"} "#).unwrap();
        let Kind::Object(m) = &v.kind else { panic!() };
        assert_eq!(m[0].key, "b");
        assert_eq!(m[0].key_pos, 2);
        assert_eq!(m[1].value.as_str(), Some("xé😀"));
        assert_eq!(m[1].value.pos, 25);
        assert_eq!(v.to_compact(), r#"{"b":[1,-2500.0],"a":"xé😀"}"#);
    }

    #[test]
    fn compact_escapes_like_serde_json() {
        let v = parse_line(r#"["a\"b\\c\n\t\u0001/é"]"#).unwrap();
        let ours = v.to_compact();
        let theirs = serde_json::to_string(&serde_json::from_str::<serde_json::Value>(&ours).unwrap()).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn rejects_what_rfc_8259_rejects() {
        for bad in [
            "",
            "{",
            "{\"a\":1,}",
            "[1,]",
            "{'a': 1}",
            "01",
            "1.",
            "-",
            "1e",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"a\tb\"",
            "tru",
            "{\"a\" 1}",
            "{\"a\":1,\"a\":2}",
            "{} {}",
            "NaN",
        ] {
            assert!(parse_line(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = "[".repeat(100_000);
        assert!(err(&deep).message.contains("nested deeper"));
    }
}
