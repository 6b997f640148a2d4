//! Decoding SQL literals and identifiers the way the server does, so the guard (and every other
//! reader of client SQL) compares the name a statement really refers to: `'app.tenant_id'`, `E'app\.tenant_id'`, `U&'app\002etenant_id'`,
//! `U&'app!002etenant_id' UESCAPE '!'`, `$$app.tenant_id$$`, `"App.Tenant_Id"` and `U&"\0061pp"`
//! all become plain text.
//!
//! Decoding is strict: where the server would reject a literal (an invalid Unicode or escape
//! sequence, a bad `UESCAPE` character), the decoders return `None`, and the guard treats a name it
//! cannot decode as one it must refuse. `sql::split` merges a `U&…` token with its `UESCAPE '…'`
//! clause into one token, so the clause always travels with the text it changes.

use std::borrow::Cow;

use super::lexer::{Kind, Lexer, Token};

/// The text of a string-literal token; None for kinds we cannot decode (bit strings...) and for
/// text the server would reject. A constant continued across newlines (`'app.'` newline
/// `'tenant_id'`) is one token: its parts are decoded and joined as the server does.
pub fn string_value(t: &Token<'_>) -> Option<String> {
    if t.kind != Kind::String {
        return None;
    }
    let s = t.text;
    let parts: Vec<&[u8]> = t.string_parts().collect();
    let last = parts.last()?;
    if s[0] == b'$' {
        return Some(String::from_utf8_lossy(last).into_owned());
    }
    // what follows the closing quote of the last part: nothing, or (U&) a UESCAPE clause
    let end = last.as_ptr() as usize - s.as_ptr() as usize + last.len() + 1;
    let rest = s.get(end..)?;
    let joined = |decode: &dyn Fn(&[u8]) -> Option<String>| -> Option<String> {
        parts.iter().map(|p| decode(p)).collect::<Option<Vec<String>>>().map(|v| v.concat())
    };
    match s[0].to_ascii_lowercase() {
        b'\'' | b'n' if rest.is_empty() => joined(&|p| Some(unquote(p, b'\''))),
        // escapes never span two parts (`E'\1'` newline `'23'` is \1 then 23)
        b'e' if rest.is_empty() => joined(&unescape_c),
        // U& escapes apply to the joined text, with the UESCAPE character if one follows
        b'u' => {
            let body = joined(&|p| Some(unquote(p, b'\'')))?;
            let escape = uescape_clause(rest)?.unwrap_or(b'\\');
            unescape_unicode(&body, escape)
        }
        _ => None,
    }
}

/// The longest identifier the server keeps (`NAMEDATALEN - 1` bytes): the scanner truncates
/// longer ones, quoted or not.
const MAX_IDENT_BYTES: usize = 63;

/// The name an identifier token denotes, as the server's scanner makes it: an unquoted word has its
/// ASCII letters folded to lower case and nothing else (`downcase_identifier` in a multibyte
/// encoding: `ÄPP` stays `ÄPP`), and every identifier is cut to 63 bytes on a character boundary
/// (`truncate_identifier`). Borrowed from the query text when nothing changes, which is nearly
/// always: the hot path allocates nothing for a lower-case word.
pub fn ident_value<'a>(t: &Token<'a>) -> Option<Cow<'a, str>> {
    let name = match t.kind {
        Kind::Word => fold_word(t.text),
        Kind::QuotedIdent if t.text[0] == b'"' => Cow::Owned(unquote(&t.text[1..t.text.len() - 1], b'"')),
        Kind::QuotedIdent => Cow::Owned(unicode_literal(t.text, b'"')?),
        _ => return None,
    };
    Some(truncate_ident(name))
}

/// Which of `names` (lower-case ASCII) an identifier token denotes, if any. An unquoted word is
/// compared in place with ASCII case folded, which is what the server's folding gives for these
/// names, so nothing is decoded or allocated; a quoted identifier is decoded first.
///
/// Inlined: the guard and the pooling check ask this of every token of every statement, and the
/// call itself cost more than the comparison (a call per token and list was about half of what
/// the guard spent on a one-line SELECT).
#[inline]
pub fn ident_among(t: &Token<'_>, names: &[&'static str]) -> Option<&'static str> {
    match t.kind {
        Kind::Word if t.text.len() <= MAX_IDENT_BYTES => {
            names.iter().copied().find(|n| n.len() == t.text.len() && t.text.eq_ignore_ascii_case(n.as_bytes()))
        }
        Kind::Word | Kind::QuotedIdent => decoded_among(t, names),
        _ => None,
    }
}

/// [`ident_among`] for a quoted identifier or an overlong word: decoded first (rare, kept out of line).
#[inline(never)]
fn decoded_among(t: &Token<'_>, names: &[&'static str]) -> Option<&'static str> {
    let v = ident_value(t)?;
    names.iter().copied().find(|n| *n == v)
}

/// The longest keyword [`keyword`] holds.
const KEYWORD_MAX: usize = 16;

/// An unquoted word folded as the server folds it (ASCII letters only), held on the stack, for
/// comparing with keywords: see [`keyword`].
#[derive(Clone, Copy)]
pub struct Keyword {
    buf: [u8; KEYWORD_MAX],
    len: u8,
}

impl std::ops::Deref for Keyword {
    type Target = str;

    fn deref(&self) -> &str {
        // only ASCII is ever stored (see `keyword`)
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or_default()
    }
}

/// A word token as a keyword to compare with lower-case ASCII keywords, without allocating:
/// `None` for other tokens; an empty `Keyword` (equal to no keyword) for a word longer than
/// any keyword or holding non-ASCII bytes. For the name a word denotes, use [`ident_value`].
pub fn keyword(t: &Token<'_>) -> Option<Keyword> {
    if t.kind != Kind::Word {
        return None;
    }
    let mut k = Keyword { buf: [0; KEYWORD_MAX], len: 0 };
    if t.text.len() <= KEYWORD_MAX && t.text.is_ascii() {
        k.buf[..t.text.len()].copy_from_slice(t.text);
        k.buf.make_ascii_lowercase();
        k.len = t.text.len() as u8;
    }
    Some(k)
}

/// An unquoted word folded as the server folds it: ASCII `A`–`Z` only.
pub fn fold_word(text: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(text) {
        Ok(s) if !s.bytes().any(|b| b.is_ascii_uppercase()) => Cow::Borrowed(s),
        Ok(s) => Cow::Owned(s.to_ascii_lowercase()),
        // the server rejects query text that is not valid in its encoding before scanning it
        Err(_) => Cow::Owned(String::from_utf8_lossy(text).to_ascii_lowercase()),
    }
}

fn truncate_ident(name: Cow<'_, str>) -> Cow<'_, str> {
    if name.len() <= MAX_IDENT_BYTES {
        return name;
    }
    let mut end = MAX_IDENT_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    match name {
        Cow::Borrowed(s) => Cow::Borrowed(&s[..end]),
        Cow::Owned(mut s) => {
            s.truncate(end);
            Cow::Owned(s)
        }
    }
}

/// Whether a token is a `U&'…'` / `U&"…"` form (whose meaning depends on a `UESCAPE` clause).
pub fn is_unicode_form(t: &Token<'_>) -> bool {
    matches!(t.kind, Kind::String | Kind::QuotedIdent) && t.text.len() > 2 && t.text[0].eq_ignore_ascii_case(&b'u') && t.text[1] == b'&'
}

/// `U&'…'` or `U&"…"`, possibly followed (in the same token, see `sql::split`) by
/// `UESCAPE 'c'`. Returns the decoded text.
fn unicode_literal(text: &[u8], quote: u8) -> Option<String> {
    let end = closing_quote(text, 3, quote)?;
    let body = unquote(&text[3..end], quote);
    let escape = uescape_clause(&text[end + 1..])?.unwrap_or(b'\\');
    unescape_unicode(&body, escape)
}

/// Index of the quote that closes a quoted run starting at `start` (doubled quotes skipped).
fn closing_quote(text: &[u8], start: usize, quote: u8) -> Option<usize> {
    let mut i = start;
    while i < text.len() {
        if text[i] == quote {
            if text.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The text after a `U&` literal inside a merged token: nothing (`Some(None)`), or
/// `UESCAPE 'c'` with a valid escape character (`Some(Some(c))`); anything else is `None`.
fn uescape_clause(rest: &[u8]) -> Option<Option<u8>> {
    let mut toks = Lexer::new(rest);
    let Some(kw) = toks.next() else { return Some(None) };
    let lit = toks.next()?;
    if !kw.is_word("uescape") || lit.kind != Kind::String || lit.text[0] != b'\'' || toks.next().is_some() {
        return None;
    }
    let c = unquote(&lit.text[1..lit.text.len() - 1], b'\'');
    // the server: one character, not a hex digit, '+', a quote or white space
    match c.as_bytes() {
        [c] if !c.is_ascii_hexdigit() && !matches!(c, b'+' | b'\'' | b'"' | b' ' | b'\t' | b'\n' | b'\r' | b'\x0c') => Some(Some(*c)),
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

fn hex(s: &[u8]) -> Option<u32> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

/// Combines UTF-16 surrogate pairs the way the server does; a lone surrogate is invalid.
struct Utf16 {
    pending_high: Option<u32>,
}

impl Utf16 {
    fn push(&mut self, out: &mut Vec<u8>, cp: u32) -> Option<()> {
        let ch = match (self.pending_high.take(), cp) {
            (None, 0xD800..=0xDBFF) => {
                self.pending_high = Some(cp);
                return Some(());
            }
            (Some(hi), 0xDC00..=0xDFFF) => char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (cp - 0xDC00))?,
            (Some(_), _) | (None, 0xDC00..=0xDFFF) | (None, 0) => return None,
            (None, cp) => char::from_u32(cp)?,
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
        Some(())
    }

    fn plain(&self) -> Option<()> {
        if self.pending_high.is_some() { None } else { Some(()) }
    }
}

/// `E''` escapes: `\n`, `\t`, octal `\ooo`, hex `\xhh`, `\uXXXX`, `\UXXXXXXXX`, `\\`, `\'`, `''`.
fn unescape_c(body: &[u8]) -> Option<String> {
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    let mut utf16 = Utf16 { pending_high: None };
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c == b'\'' && body.get(i + 1) == Some(&b'\'') {
            utf16.plain()?;
            out.push(b'\'');
            i += 2;
            continue;
        }
        if c != b'\\' || i + 1 >= body.len() {
            utf16.plain()?;
            out.push(c);
            i += 1;
            continue;
        }
        let n = body[i + 1];
        i += 2;
        if !matches!(n, b'u' | b'U') {
            utf16.plain()?;
        }
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
                match hex(&body[i..end]) {
                    Some(v) => out.push(v as u8),
                    None => out.push(b'x'), // `\x` without digits is a plain x
                }
                i = end;
            }
            b'u' | b'U' => {
                let len = if n == b'u' { 4 } else { 8 };
                let cp = hex(body.get(i..i + len)?)?;
                utf16.push(&mut out, cp)?;
                i += len;
            }
            other => out.push(other),
        }
    }
    utf16.plain()?;
    String::from_utf8(out).ok()
}

/// `U&` escapes with escape character `e`: `eXXXX`, `e+XXXXXX`, `ee`; anything else after `e` is
/// an error on the server, and so `None` here.
fn unescape_unicode(s: &str, e: u8) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut utf16 = Utf16 { pending_high: None };
    let mut i = 0;
    while i < b.len() {
        if b[i] != e {
            utf16.plain()?;
            out.push(b[i]);
            i += 1;
            continue;
        }
        if b.get(i + 1) == Some(&e) {
            utf16.plain()?;
            out.push(e);
            i += 2;
            continue;
        }
        let (start, len) = if b.get(i + 1) == Some(&b'+') { (i + 2, 6) } else { (i + 1, 4) };
        let cp = hex(b.get(start..start + len)?)?;
        utf16.push(&mut out, cp)?;
        i = start + len;
    }
    utf16.plain()?;
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::split;

    fn lit(s: &str) -> String {
        string_value(&split(s.as_bytes())[0][0]).unwrap_or_else(|| panic!("{s}"))
    }

    fn id(s: &str) -> Option<String> {
        ident_value(&split(s.as_bytes())[0][0]).map(Cow::into_owned)
    }

    /// `keyword` (the guard's first words) agrees with `fold_word` on keywords, and a word that
    /// is no keyword compares equal to none.
    #[test]
    fn keywords_fold_like_words_and_match_nothing_else() {
        let kw = |sql: &str| Lexer::new(sql.as_bytes()).next().and_then(|t| keyword(&t).map(|k| k.to_string()));
        assert_eq!(kw("SELECT").as_deref(), Some("select"));
        assert_eq!(kw("Characteristics").as_deref(), Some("characteristics"));
        // longer than any keyword, or not ASCII: equal to no keyword
        assert_eq!(kw("characteristics_x").as_deref(), Some(""));
        assert_eq!(kw("\u{212A}ey").as_deref(), Some(""));
        assert_eq!(kw("\"select\""), None);
        assert_eq!(kw("'select'"), None);
    }

    /// Identifiers come out as the server's scanner makes them: only ASCII letters of unquoted
    /// words fold (`downcase_identifier` in UTF-8), and every identifier is cut to 63 bytes on a
    /// character boundary (`truncate_identifier`). The cases were checked with the server:
    /// `SELECT 1 AS ÄPP` names its column `Äpp`, and a 70-letter alias comes back with 63.
    #[test]
    fn identifiers_fold_and_truncate_like_the_server() {
        assert_eq!(id("App_Tenant").as_deref(), Some("app_tenant"));
        assert_eq!(id("ÄPP").as_deref(), Some("Äpp"));
        assert_eq!(id("\u{212A}elvin").as_deref(), Some("\u{212A}elvin")); // Unicode would fold it to "kelvin"
        assert_eq!(id("\"Set_Config\"").as_deref(), Some("Set_Config"));
        let long = "a".repeat(70);
        assert_eq!(id(&long).as_deref(), Some(&long[..63]));
        assert_eq!(id(&format!("\"{long}\"")).as_deref(), Some(&long[..63]));
        // a two-byte character across the 63rd byte is dropped whole
        let cut = format!("{}é{}", "a".repeat(62), "b".repeat(5));
        assert_eq!(id(&cut).as_deref(), Some(&cut[..62]));
        // ident_among: the same names, without decoding unquoted words
        let toks = split("SET_CONFIG \"set_config\" U&\"set\\005fconfig\" \"SET_CONFIG\" set_configx \u{212A}".as_bytes());
        let found: Vec<_> = toks[0].iter().map(|t| ident_among(t, &["set_config", "k"])).collect();
        assert_eq!(found, [Some("set_config"), Some("set_config"), Some("set_config"), None, None, None]);
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
            "U&'app!002etenant_id' UESCAPE '!'",
            "U&'app!002etenant_id' /* c */ uescape\n'!'",
            "U&'app#+00002etenant_id' UESCAPE '#'",
            "$$app.tenant_id$$",
            "$x$app.tenant_id$x$",
            "N'app.tenant_id'",
            "'app.'\n'tenant_id'",
            "'app'\r\t '.' -- c\n'tenant_id'",
            "E'app\\x2e'\n'tenant_id'",
            "U&'app!002e' \n 'tenant_id' UESCAPE '!'",
            "U&'app\\002'\n'etenant_id'",
        ] {
            assert_eq!(lit(s), "app.tenant_id", "{s}");
        }
        assert_eq!(lit("'it''s'"), "it's");
        assert_eq!(lit("E'\\1'\n'23'"), "\u{1}23");
        assert_eq!(lit("U&'a!!b' UESCAPE '!'"), "a!b");
        assert_eq!(lit("U&'a\\b' UESCAPE '!'"), "a\\b");
        assert_eq!(lit("U&'\\D83D\\DE00'"), "\u{1F600}");
        assert_eq!(lit("E'\\uD83D\\uDE00'"), "\u{1F600}");
        assert_eq!(id("SET_CONFIG").as_deref(), Some("set_config"));
        assert_eq!(id("\"set_config\"").as_deref(), Some("set_config"));
        assert_eq!(id("U&\"\\0073et_config\"").as_deref(), Some("set_config"));
        assert_eq!(id("U&\"set!005fconfig\" UESCAPE '!'").as_deref(), Some("set_config"));
        assert_eq!(id("u&\"set%005Fconfig\"UESCAPE'%'").as_deref(), Some("set_config"));
    }

    #[test]
    fn what_the_server_rejects_is_not_decoded() {
        for s in [
            "U&'a\\zzzz'",
            "U&'a\\12'",
            "U&'\\D83D'",
            "U&'\\DE00x'",
            "U&'a' UESCAPE 'ab'",
            "U&'a' UESCAPE 'a'",
            "U&'a' UESCAPE '+'",
            "U&'a' UESCAPE ' '",
            "E'\\u12'",
            "E'\\uD83Dx'",
            "U&'\\0000'",
        ] {
            let t = &split(s.as_bytes())[0][0];
            assert_eq!(string_value(t), None, "{s}");
        }
        assert_eq!(id("U&\"a!zz\" UESCAPE '!'"), None);
    }
}
