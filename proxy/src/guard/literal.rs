//! Decoding SQL literals and identifiers the way the server does, so the guard compares the name a
//! statement really refers to: `'app.tenant_id'`, `E'app\.tenant_id'`, `U&'app\002etenant_id'`,
//! `$$app.tenant_id$$`, `"App.Tenant_Id"` and `U&"\0061pp"` all become plain text.

use crate::sql::lexer::{Kind, Token};

/// The text of a string-literal token; None for kinds we cannot decode (bit strings...).
pub fn string_value(t: &Token<'_>) -> Option<String> {
    if t.kind != Kind::String {
        return None;
    }
    let s = t.text;
    let first = s[0].to_ascii_lowercase();
    if s[0] == b'\'' {
        return Some(unquote(&s[1..s.len() - 1], b'\''));
    }
    if s[0] == b'$' {
        let tag_end = s[1..].iter().position(|&c| c == b'$')? + 2;
        return Some(String::from_utf8_lossy(&s[tag_end..s.len() - tag_end]).into_owned());
    }
    match first {
        b'e' => Some(unescape_c(&s[2..s.len() - 1])),
        b'n' => Some(unquote(&s[2..s.len() - 1], b'\'')),
        b'u' => Some(unescape_unicode(&unquote(&s[3..s.len() - 1], b'\''))),
        _ => None,
    }
}

/// The name an identifier token denotes: unquoted words fold to lower case.
pub fn ident_value(t: &Token<'_>) -> Option<String> {
    match t.kind {
        Kind::Word => Some(String::from_utf8_lossy(t.text).to_lowercase()),
        Kind::QuotedIdent if t.text[0] == b'"' => Some(unquote(&t.text[1..t.text.len() - 1], b'"')),
        Kind::QuotedIdent => Some(unescape_unicode(&unquote(&t.text[3..t.text.len() - 1], b'"'))),
        _ => None,
    }
}

fn unquote(body: &[u8], q: u8) -> String {
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        out.push(body[i]);
        if body[i] == q && body.get(i + 1) == Some(&q) {
            i += 1;
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `E''` escapes: `\n`, `\t`, octal `\ooo`, hex `\xhh`, `\uXXXX`, `\UXXXXXXXX`, `\\`, `\'`, `''`.
fn unescape_c(body: &[u8]) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    let mut i = 0;
    let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok();
    while i < body.len() {
        let c = body[i];
        if c == b'\'' && body.get(i + 1) == Some(&b'\'') {
            out.push(b'\'');
            i += 2;
            continue;
        }
        if c != b'\\' || i + 1 >= body.len() {
            out.push(c);
            i += 1;
            continue;
        }
        let n = body[i + 1];
        i += 2;
        match n {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'0'..=b'7' => {
                let mut v = (n - b'0') as u32;
                let mut k = 0;
                while k < 2 && i < body.len() && (b'0'..=b'7').contains(&body[i]) {
                    v = v * 8 + (body[i] - b'0') as u32;
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut end = i;
                while end < body.len() && end < i + 2 && body[end].is_ascii_hexdigit() {
                    end += 1;
                }
                if let Some(v) = hex(&body[i..end]) {
                    out.push(v as u8);
                }
                i = end;
            }
            b'u' | b'U' => {
                let len = if n == b'u' { 4 } else { 8 };
                let end = (i + len).min(body.len());
                if let Some(ch) = hex(&body[i..end]).and_then(char::from_u32) {
                    out.extend_from_slice(ch.to_string().as_bytes());
                }
                i = end;
            }
            other => out.push(other),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `U&` escapes with the default escape character: `\XXXX`, `\+XXXXXX`, `\\`.
fn unescape_unicode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            if b[i + 1] == b'\\' {
                out.push('\\');
                i += 2;
                continue;
            }
            let (start, len) = if b[i + 1] == b'+' { (i + 2, 6) } else { (i + 1, 4) };
            if let Some(ch) = s
                .get(start..start + len)
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(char::from_u32)
            {
                out.push(ch);
                i = start + len;
                continue;
            }
        }
        let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::lexer::Lexer;

    fn lit(s: &str) -> String {
        string_value(&Lexer::new(s.as_bytes()).next().unwrap()).unwrap()
    }

    #[test]
    fn decodes_every_spelling() {
        for s in [
            "'app.tenant_id'",
            "E'app\\.tenant_id'",
            "e'app\\056tenant_id'",
            "E'app\\x2etenant_id'",
            "E'\\u0061pp.tenant_id'",
            "U&'app\\002etenant_id'",
            "u&'\\+000061pp.tenant_id'",
            "$$app.tenant_id$$",
            "$x$app.tenant_id$x$",
            "N'app.tenant_id'",
        ] {
            assert_eq!(lit(s), "app.tenant_id", "{s}");
        }
        assert_eq!(lit("'it''s'"), "it's");
        let id = |s: &str| ident_value(&Lexer::new(s.as_bytes()).next().unwrap()).unwrap();
        assert_eq!(id("SET_CONFIG"), "set_config");
        assert_eq!(id("\"set_config\""), "set_config");
        assert_eq!(id("U&\"\\0073et_config\""), "set_config");
    }
}
