//! Statement fingerprints for the audit log: the statement's shape without its values.
//!
//! Literals (strings, dollar quotes, numbers) become `?`, comments and extra whitespace go, words
//! are lower-cased; the result is cut at 1,000 characters. The fingerprint is a 64-bit FNV-1a hash of
//! the whole normalized text, so the same statement with other values gets the same fingerprint and
//! no literal value, token or secret a client typed ever reaches the log.

use super::lexer::{Kind, Lexer};

/// Longest normalized text kept.
const MAX_TEXT: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// The normalized statement (literals replaced by `?`).
    pub text: String,
    /// 16 hex digits identifying `text`.
    pub hash: String,
}

pub fn fingerprint(sql: &[u8]) -> Fingerprint {
    let mut text = String::new();
    let mut glue = true; // no space before the next token
    let mut after_word = false;
    for tok in Lexer::new(sql) {
        let piece: std::borrow::Cow<'_, str> = match tok.kind {
            Kind::String | Kind::Number | Kind::Unterminated => "?".into(),
            Kind::Word => String::from_utf8_lossy(tok.text).to_lowercase().into(),
            _ => String::from_utf8_lossy(tok.text),
        };
        let call = after_word && &*piece == "(";
        let tight_before = call || matches!(&*piece, "," | ")" | ";" | "." | ":" | "::" | "]");
        after_word = matches!(tok.kind, Kind::Word | Kind::QuotedIdent);
        if !glue && !tight_before {
            text.push(' ');
        }
        text.push_str(&piece);
        glue = matches!(&*piece, "(" | "." | ":" | "::" | "[");
        if tok.kind == Kind::Unterminated {
            break;
        }
    }
    let hash = format!("{:016x}", fnv1a(text.as_bytes()));
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    Fingerprint { text, hash }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_never_survive() {
        let f = fingerprint(b"SELECT set_config('app.tenant_id', '2', true) /* hi */ -- x\n, $$secret$$, 42, E'a\\'b'");
        assert_eq!(f.text, "select set_config(?, ?, true), ?, ?, ?");
        for secret in ["app.tenant_id", "secret", "42", "hi", "'"] {
            assert!(!f.text.contains(secret), "{secret} in {}", f.text);
        }
    }

    #[test]
    fn same_shape_same_fingerprint() {
        let a = fingerprint(b"update orders set status = 'paid' where id = 7");
        let b = fingerprint(b"UPDATE  orders SET status='shipped' WHERE id=12345");
        assert_eq!(a, b);
        assert_eq!(a.hash.len(), 16);
        assert_ne!(a.hash, fingerprint(b"delete from orders where id = 7").hash);
        assert_eq!(fingerprint(b"select t.a::int from t where x = $1").text, "select t.a::int from t where x = $1");
    }

    #[test]
    fn long_and_unterminated_input_is_bounded() {
        let long = format!("select {}", "a, ".repeat(2000));
        assert!(fingerprint(long.as_bytes()).text.chars().count() <= MAX_TEXT + 1);
        assert_eq!(fingerprint(b"select 'unterminated secret").text, "select ?");
        assert_eq!(fingerprint("select 'ü', ü".as_bytes()).text, "select ?, ü");
    }
}
