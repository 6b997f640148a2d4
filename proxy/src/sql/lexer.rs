//! A PostgreSQL lexer: the token boundaries of the server's scanner (`src/backend/parser/scan.l`
//! of PostgreSQL 15), so that pgtenant splits a query string into the same statements and tokens
//! as the server does.
//!
//! It knows every way SQL hides text from a naive scanner: `--` comments (which end at `\n` *or*
//! `\r`), nested `/* */` comments, standard strings with `''`, `E''` strings with backslash
//! escapes, `U&''` / `B''` / `X''` / `N''` literals, string constants continued across whitespace
//! that holds a newline (`'a'` newline `'b'` is one constant, even with `--` comments in between),
//! dollar quotes (`$$`, `$tag$`), quoted identifiers (`""`, `U&""`) and `$n` parameters; and the
//! operator rules (a run of operator characters stops at `--` or `/*`, and loses a trailing `+`/`-`
//! unless it holds one of `~!@#^&|`?%`), numbers (`1.5e3`, `1..2`, `.5`) and `::`, `..`, `:=`.
//! It never allocates; tokens borrow the input.
//!
//! Where the server's scanner raises an error (an unterminated literal, quoted identifier or
//! comment, a zero-length quoted identifier, a malformed `\u` escape in an `E''` string, an
//! operator of 64 or more characters), the lexer yields one `Unterminated` token from the start of
//! the offending token to the end of the input and stops: the server runs nothing of such a query
//! string, and callers can refuse what they cannot see into. Errors that depend on the server
//! encoding (an `E'\xff'` escape that is not valid UTF-8) are left to the server.
//!
//! Deliberate differences from the PostgreSQL 15 scanner, each on the safe side (see
//! docs/reliability.md, "Fuzzing", target `lexer_diff`):
//! - a vertical tab (`\v`) is whitespace, as in later releases; PostgreSQL 15 makes it a
//!   one-character token that no grammar rule accepts, so a query holding one fails there anyway;
//! - a number followed by identifier characters (`123abc`, `0x1f`, `$1abc`) is a number (or
//!   parameter) and then a word, as in libpg_query and PostgreSQL 14; PostgreSQL 15 rejects it
//!   ("trailing junk after numeric literal"), later releases accept `0x1f` as one number;
//! - `N'...'` is one `String` token (the server returns the keyword `NCHAR` and then the string).
//!
//! Assumes `standard_conforming_strings = on` (the default since PostgreSQL 9.1).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Unquoted identifier or keyword.
    Word,
    /// `"..."` or `U&"..."`.
    QuotedIdent,
    /// Any string literal, including dollar-quoted ones. A constant continued across a newline
    /// (`'a'` newline `'b'`) is one token whose text spans all of its parts.
    String,
    /// `$1`, `$2`, ...
    Param,
    Number,
    /// `;`
    Semicolon,
    /// Any other punctuation or operator, one token per operator as the server reads it.
    Op,
    /// A literal, identifier or comment that runs to the end of the input, or any other token the
    /// server's scanner rejects: always the last token, running to the end of the input.
    Unterminated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token<'a> {
    pub kind: Kind,
    /// The token's source text, quotes included.
    pub text: &'a [u8],
}

impl<'a> Token<'a> {
    /// Case-insensitive keyword comparison for unquoted words.
    pub fn is_word(&self, kw: &str) -> bool {
        self.kind == Kind::Word && self.text.eq_ignore_ascii_case(kw.as_bytes())
    }

    /// The parts of a `String` token, each as written between its quotes (doubled quotes and
    /// backslash escapes left as they are): one for `'a'`, `E'a'`, `$$a$$`...; one per quoted
    /// part of a constant continued across newlines (`'a'` newline `'b'` gives `a` and `b`).
    /// The server decodes each part by the constant's rules (`E''` escapes included, which never
    /// span two parts) and joins them. Nothing for other kinds.
    pub fn string_parts(&self) -> StringParts<'a> {
        let text = self.text;
        let (prefix, mode) = match (self.kind, text.first().map(u8::to_ascii_lowercase)) {
            (Kind::String, Some(b'\'')) => (1, Some(Quoted::Standard)),
            (Kind::String, Some(b'e')) => (2, Some(Quoted::Escape)),
            (Kind::String, Some(b'n')) => (2, Some(Quoted::Standard)),
            (Kind::String, Some(b'b' | b'x')) => (2, Some(Quoted::Bits)),
            (Kind::String, Some(b'u')) => (3, Some(Quoted::Standard)),
            (Kind::String, Some(b'$')) => {
                let tag = text[1..].iter().position(|&c| c == b'$').map_or(text.len(), |i| i + 2);
                let body = text.get(tag..text.len().saturating_sub(tag)).unwrap_or_default();
                return StringParts { lexer: Lexer::new(body), mode: None, dollar: Some(body) };
            }
            _ => (0, None),
        };
        let mut lexer = Lexer::new(text);
        lexer.pos = prefix;
        StringParts { lexer, mode, dollar: None }
    }
}

/// Iterator over the parts of a string constant; see [`Token::string_parts`].
pub struct StringParts<'a> {
    lexer: Lexer<'a>,
    mode: Option<Quoted>,
    dollar: Option<&'a [u8]>,
}

impl<'a> Iterator for StringParts<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if let Some(body) = self.dollar.take() {
            return Some(body);
        }
        let mode = self.mode?;
        let lexer = &mut self.lexer;
        let start = lexer.pos;
        if lexer.scan_part(mode).is_err() {
            self.mode = None;
            return None;
        }
        let part = &lexer.src[start..lexer.pos - 1];
        match lexer.continuation(lexer.pos) {
            Some(quote) => lexer.pos = quote + 1,
            None => self.mode = None,
        }
        Some(part)
    }
}

pub struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
}

/// The server's scanner reported an error: the whole query string is rejected.
struct ScanError;

/// How the body of a `'...'` string is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoted {
    /// `'...'`, `N'...'`, `U&'...'`: `''` is a quote.
    Standard,
    /// `E'...'`: `''` and backslash escapes.
    Escape,
    /// `B'...'`, `X'...'`: the first quote ends it.
    Bits,
}

/// Longest operator name the server accepts (`NAMEDATALEN - 1`).
const MAX_OPERATOR_LEN: usize = 63;

/// scan.l `space` (plus `\v`, see the module docs).
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// scan.l `newline`.
fn is_newline(c: u8) -> bool {
    c == b'\n' || c == b'\r'
}

const fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

const fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// [`is_ident_cont`] of every byte: looked up for each character of every word.
const IDENT_CONT: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        table[c] = is_ident_cont(c as u8);
        c += 1;
    }
    table
};

/// scan.l `op_chars` (as a list for the tests; the lexer asks [`is_op_char`]).
#[cfg(test)]
const OP_CHARS: &[u8] = b"~!@#^&|`?+-*/%<>=";

/// Whether `c` is one of scan.l's `op_chars`, as a match: `contains` on a list searches it with
/// `memchr`, which cost the lexer more than anything else it does for a short query.
fn is_op_char(c: u8) -> bool {
    matches!(c, b'~' | b'!' | b'@' | b'#' | b'^' | b'&' | b'|' | b'`' | b'?' | b'+' | b'-' | b'*' | b'/' | b'%' | b'<' | b'>' | b'=')
}

/// Characters that let a multi-character operator end in `+` or `-`.
const NON_SQL_OP_CHARS: &[u8] = b"~!@#^&|`?%";

impl<'a> Lexer<'a> {
    pub fn new(src: &'a [u8]) -> Self {
        Lexer { src, pos: 0 }
    }

    fn peek(&self, off: usize) -> u8 {
        *self.src.get(self.pos + off).unwrap_or(&0)
    }

    fn at(&self, i: usize) -> u8 {
        *self.src.get(i).unwrap_or(&0)
    }

    /// Skips whitespace and comments; on an unterminated block comment returns its start.
    fn skip_trivia(&mut self) -> Result<(), usize> {
        loop {
            let c = self.peek(0);
            if self.pos >= self.src.len() {
                return Ok(());
            } else if is_space(c) {
                self.pos += 1;
            } else if c == b'-' && self.peek(1) == b'-' {
                self.pos = self.line_comment_end(self.pos);
            } else if c == b'/' && self.peek(1) == b'*' {
                let start = self.pos;
                self.pos = self.block_comment_end(start).ok_or(start)?;
            } else {
                return Ok(());
            }
        }
    }

    /// End of the `--` comment starting at `i`: the next `\n` or `\r` (not included) or the end.
    fn line_comment_end(&self, i: usize) -> usize {
        self.src[i..].iter().position(|&c| is_newline(c)).map_or(self.src.len(), |n| i + n)
    }

    /// End (exclusive) of the nested block comment starting at `i`, or None if unterminated.
    fn block_comment_end(&self, mut i: usize) -> Option<usize> {
        let mut depth = 0usize;
        i += 2;
        while i + 1 < self.src.len() {
            match (self.src[i], self.src[i + 1]) {
                (b'/', b'*') => {
                    depth += 1;
                    i += 2;
                }
                (b'*', b'/') => {
                    i += 2;
                    if depth == 0 {
                        return Some(i);
                    }
                    depth -= 1;
                }
                _ => i += 1,
            }
        }
        None
    }

    /// After a string's closing quote at `i - 1`: if whitespace holding a newline (and `--`
    /// comments) and then a quote follow, the constant continues; returns the index of that quote.
    fn continuation(&self, mut i: usize) -> Option<usize> {
        let mut newline = false;
        while i < self.src.len() {
            let c = self.src[i];
            if is_space(c) {
                newline |= is_newline(c);
                i += 1;
            } else if c == b'-' && self.at(i + 1) == b'-' {
                i = self.line_comment_end(i);
            } else {
                return (c == b'\'' && newline).then_some(i);
            }
        }
        None
    }

    /// Scans a `'...'` constant from just after its opening quote, with its continuations.
    fn scan_string(&mut self, mode: Quoted) -> Result<(), ScanError> {
        loop {
            self.scan_part(mode)?;
            match self.continuation(self.pos) {
                Some(quote) => self.pos = quote + 1,
                None => return Ok(()),
            }
        }
    }

    /// Scans one quoted part of a constant from just after its opening quote to just after its
    /// closing quote.
    fn scan_part(&mut self, mode: Quoted) -> Result<(), ScanError> {
        if mode == Quoted::Bits {
            let n = self.src[self.pos..].iter().position(|&c| c == b'\'').ok_or(ScanError)?;
            self.pos += n + 1;
            return Ok(());
        }
        loop {
            let c = *self.src.get(self.pos).ok_or(ScanError)?;
            if c == b'\\' && mode == Quoted::Escape {
                self.escape()?;
            } else if c == b'\'' {
                self.pos += 1;
                if self.peek(0) != b'\'' {
                    return Ok(());
                }
                self.pos += 1; // doubled quote
            } else {
                self.pos += 1;
            }
        }
    }

    /// A backslash escape in an `E''` string. Every escape but `\u`/`\U` consumes the backslash
    /// and the next character (octal and hex escapes consume more, but never a quote);
    /// `\uXXXX` / `\UXXXXXXXX` must be well formed, not zero, not above U+10FFFF, and a UTF-16
    /// high surrogate must be followed by an escaped low surrogate.
    fn escape(&mut self) -> Result<(), ScanError> {
        match self.unicode_escape()? {
            None => {
                self.pos = (self.pos + 2).min(self.src.len());
                Ok(())
            }
            Some(0xD800..=0xDBFF) => match self.unicode_escape()? {
                Some(0xDC00..=0xDFFF) => Ok(()),
                _ => Err(ScanError),
            },
            Some(c) if c == 0 || (0xDC00..=0xDFFF).contains(&c) || c > 0x10FFFF => Err(ScanError),
            Some(_) => Ok(()),
        }
    }

    /// At a backslash: `\uXXXX` or `\UXXXXXXXX` returns its value and steps past it; another
    /// escape returns None without moving; a malformed `\u` / `\U` is an error.
    fn unicode_escape(&mut self) -> Result<Option<u32>, ScanError> {
        if self.peek(0) != b'\\' {
            return Ok(None);
        }
        let digits = match self.peek(1) {
            b'u' => 4,
            b'U' => 8,
            _ => return Ok(None),
        };
        let hex = self.src.get(self.pos + 2..self.pos + 2 + digits).ok_or(ScanError)?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return Err(ScanError);
        }
        let value = hex.iter().fold(0u32, |v, &h| (v << 4) | (h as char).to_digit(16).unwrap_or(0));
        self.pos += 2 + digits;
        Ok(Some(value))
    }

    /// Scans a `"..."` identifier from just after its opening quote.
    fn scan_quoted_ident(&mut self) -> Result<(), ScanError> {
        let open = self.pos;
        loop {
            let n = self.src[self.pos..].iter().position(|&c| c == b'"').ok_or(ScanError)?;
            self.pos += n + 1;
            if self.peek(0) != b'"' {
                break;
            }
            self.pos += 1; // doubled quote
        }
        if self.pos == open + 1 {
            return Err(ScanError); // zero-length delimited identifier
        }
        Ok(())
    }

    /// At a `$`: a dollar-quote opener `$tag$` returns the tag length (incl. both `$`).
    fn dollar_tag(&self) -> Option<usize> {
        let rest = &self.src[self.pos + 1..];
        let mut i = 0;
        while i < rest.len() {
            let c = rest[i];
            if c == b'$' {
                return Some(i + 2);
            }
            let ok = if i == 0 { is_ident_start(c) } else { is_ident_cont(c) && c != b'$' };
            if !ok {
                return None;
            }
            i += 1;
        }
        None
    }

    /// A number: `{digit}+`, `{decimal}`, `{real}`; `1..2` is `1`, `..`, `2`; an exponent
    /// without digits (`1e`, `1e+`) is not part of the number.
    fn scan_number(&mut self) {
        let int_digits = self.digits();
        if self.peek(0) == b'.' && !(int_digits > 0 && self.peek(1) == b'.') {
            self.pos += 1;
            self.digits();
        }
        if matches!(self.peek(0), b'e' | b'E') {
            let sign = usize::from(matches!(self.peek(1), b'+' | b'-'));
            if self.peek(1 + sign).is_ascii_digit() {
                self.pos += 1 + sign;
                self.digits();
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek(0).is_ascii_digit() {
            self.pos += 1;
        }
        self.pos - start
    }

    /// An operator at `self.pos` (an op char that does not start a comment).
    fn scan_operator(&mut self) -> Result<(), ScanError> {
        let start = self.pos;
        let run = self.src[start..].iter().take_while(|&&c| is_op_char(c)).count();
        let op = &self.src[start..start + run];
        // a comment start inside the run ends the operator
        let mut n = op
            .windows(2)
            .position(|w| w == b"/*" || w == b"--")
            .unwrap_or(run);
        // `+` / `-` cannot end a multi-character operator made of SQL operator characters only
        while n > 1 && matches!(op[n - 1], b'+' | b'-') {
            if op[..n - 1].iter().any(|c| NON_SQL_OP_CHARS.contains(c)) {
                break;
            }
            n -= 1;
        }
        if n > MAX_OPERATOR_LEN {
            return Err(ScanError); // "operator too long"
        }
        self.pos = start + n;
        Ok(())
    }

    /// Scans the token starting at `self.pos` (not trivia, not the end) and returns its kind.
    fn scan_token(&mut self) -> Result<Kind, ScanError> {
        let c = self.peek(0);
        let c1 = self.peek(1);
        let kind = match c {
            b';' => {
                self.pos += 1;
                Kind::Semicolon
            }
            b'\'' => {
                self.pos += 1;
                self.scan_string(Quoted::Standard)?;
                Kind::String
            }
            b'"' => {
                self.pos += 1;
                self.scan_quoted_ident()?;
                Kind::QuotedIdent
            }
            b'e' | b'E' if c1 == b'\'' => {
                self.pos += 2;
                self.scan_string(Quoted::Escape)?;
                Kind::String
            }
            b'b' | b'B' | b'x' | b'X' if c1 == b'\'' => {
                self.pos += 2;
                self.scan_string(Quoted::Bits)?;
                Kind::String
            }
            b'n' | b'N' if c1 == b'\'' => {
                self.pos += 2;
                self.scan_string(Quoted::Standard)?;
                Kind::String
            }
            b'u' | b'U' if c1 == b'&' && self.peek(2) == b'\'' => {
                self.pos += 3;
                self.scan_string(Quoted::Standard)?;
                Kind::String
            }
            b'u' | b'U' if c1 == b'&' && self.peek(2) == b'"' => {
                self.pos += 3;
                self.scan_quoted_ident()?;
                Kind::QuotedIdent
            }
            b'$' if c1.is_ascii_digit() => {
                self.pos += 1;
                self.digits();
                Kind::Param
            }
            b'$' => match self.dollar_tag() {
                Some(tag_len) => {
                    let tag = &self.src[self.pos..self.pos + tag_len];
                    self.pos += tag_len;
                    let end = self.src[self.pos..].windows(tag_len).position(|w| w == tag).ok_or(ScanError)?;
                    self.pos += end + tag_len;
                    Kind::String
                }
                None => {
                    self.pos += 1;
                    Kind::Op
                }
            },
            c if is_ident_start(c) => {
                self.pos += self.src[self.pos..].iter().take_while(|&&c| IDENT_CONT[c as usize]).count();
                Kind::Word
            }
            c if c.is_ascii_digit() || (c == b'.' && c1.is_ascii_digit()) => {
                self.scan_number();
                Kind::Number
            }
            b'.' if c1 == b'.' => {
                self.pos += 2;
                Kind::Op
            }
            b':' if c1 == b':' || c1 == b'=' => {
                self.pos += 2;
                Kind::Op
            }
            c if is_op_char(c) => {
                self.scan_operator()?;
                Kind::Op
            }
            _ => {
                self.pos += 1;
                Kind::Op
            }
        };
        Ok(kind)
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let end = self.src.len();
        if let Err(start) = self.skip_trivia() {
            self.pos = end;
            return Some(Token { kind: Kind::Unterminated, text: &self.src[start..] });
        }
        if self.pos >= end {
            return None;
        }
        let start = self.pos;
        let kind = self.scan_token().unwrap_or_else(|ScanError| {
            self.pos = end;
            Kind::Unterminated
        });
        Some(Token { kind, text: &self.src[start..self.pos] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_chars_are_scan_l_op_chars() {
        for c in 0..=255u8 {
            assert_eq!(is_op_char(c), OP_CHARS.contains(&c), "{c}");
        }
    }
    use Kind::{Number, Op, Param, QuotedIdent, Semicolon, Unterminated, Word};

    fn kinds(s: &str) -> Vec<(Kind, String)> {
        lex(s.as_bytes())
    }

    fn lex(s: &[u8]) -> Vec<(Kind, String)> {
        Lexer::new(s).map(|t| (t.kind, String::from_utf8_lossy(t.text).into_owned())).collect()
    }

    /// The token texts, with a leading `|` for `Unterminated`.
    fn texts(s: &str) -> Vec<String> {
        Lexer::new(s.as_bytes())
            .map(|t| {
                let text = String::from_utf8_lossy(t.text).into_owned();
                if t.kind == Unterminated { format!("|{text}") } else { text }
            })
            .collect()
    }

    #[test]
    fn hides_semicolons_inside_literals_and_comments() {
        let toks = kinds(
            "select 'a;b', E'it\\'s;', $$x;y$$, $f$ $$ ; $f$, \"q;\"\"\", U&'d;' /* a /* nested; */ ; */ -- c;\n;",
        );
        let semis = toks.iter().filter(|(k, _)| *k == Semicolon).count();
        assert_eq!(semis, 1, "{toks:?}");
        assert!(toks.iter().all(|(k, _)| *k != Unterminated));
    }

    #[test]
    fn params_words_and_unterminated() {
        let toks = kinds("SET app.x = $1");
        assert_eq!(toks[0], (Word, "SET".into()));
        assert_eq!(toks[3], (Word, "x".into()));
        assert_eq!(toks[5], (Param, "$1".into()));
        assert_eq!(kinds("select 'abc").last().unwrap().0, Unterminated);
        assert_eq!(kinds("select /* abc").last().unwrap().0, Unterminated);
        assert_eq!(kinds("select $a$ abc").last().unwrap().0, Unterminated);
    }

    #[test]
    fn line_comments_end_at_cr_too() {
        // scan.l: non_newline [^\n\r]; this once hid the second statement from the guard
        let toks = kinds("select 1; --\rselect set_config('app.tenant_id','2',true)");
        assert_eq!(toks.iter().filter(|(k, _)| *k == Semicolon).count(), 1);
        assert_eq!(toks[3], (Word, "select".into()));
        assert_eq!(toks[4], (Word, "set_config".into()));
        assert_eq!(texts("a -- x\r\nb --y\rc"), ["a", "b", "c"]);
    }

    #[test]
    fn whitespace_is_scan_l_space_and_vertical_tab() {
        assert_eq!(texts("a\t\n\r\x0cb\x0bc"), ["a", "b", "c"]);
        assert_eq!(texts("a\x01b"), ["a", "\x01", "b"]);
    }

    #[test]
    fn block_comments_nest() {
        assert_eq!(texts("a /* x /* y */ z */ b"), ["a", "b"]);
        assert_eq!(texts("a /*/ x */ b"), ["a", "b"]);
        assert_eq!(texts("a /**/ b /***/ c"), ["a", "b", "c"]);
        assert_eq!(texts("a */* x */ b"), ["a", "*", "b"]);
        assert_eq!(texts("a /* x /* y */ b; c"), ["a", "|/* x /* y */ b; c"]);
    }

    #[test]
    fn operators_follow_scan_l() {
        // a comment start ends an operator
        assert_eq!(texts("a +-- c\n b"), ["a", "+", "b"]);
        assert_eq!(texts("a +/* c */ b"), ["a", "+", "b"]);
        assert_eq!(texts("a */* c */ b"), ["a", "*", "b"]);
        // `+` / `-` may end a multi-character operator only if it holds one of ~!@#^&|`?%
        assert_eq!(texts("1+-2"), ["1", "+", "-", "2"]);
        assert_eq!(texts("1=-2"), ["1", "=", "-", "2"]);
        assert_eq!(texts("a *-+ b"), ["a", "*", "-", "+", "b"]);
        assert_eq!(texts("a @- b ?-+ c %- d"), ["a", "@-", "b", "?-+", "c", "%-", "d"]);
        assert_eq!(
            texts("a <=> b != c <> d >= e <= f => g"),
            ["a", "<=>", "b", "!=", "c", "<>", "d", ">=", "e", "<=", "f", "=>", "g"]
        );
        // `::`, `..`, `:=` are tokens; `:` and `.` are not operator characters
        assert_eq!(
            texts("x::int a.b 1..2 a := 1 a ::= b ..."),
            ["x", "::", "int", "a", ".", "b", "1", "..", "2", "a", ":=", "1", "a", "::", "=", "b", "..", "."]
        );
        assert_eq!(texts(":=> $ \\ {"), [":=", ">", "$", "\\", "{"]);
        // the server rejects operators of 64 characters or more
        let long = format!("select 1 {} 2; select 3", "<".repeat(64));
        assert_eq!(kinds(&long)[2].0, Unterminated);
        assert_eq!(kinds(&format!("1 {} 2", "<".repeat(63)))[1].0, Op);
    }

    #[test]
    fn numbers_follow_scan_l() {
        assert_eq!(texts("1 1.5 .5 5. 1e5 1.5e-3 .5E+3 1.e5"), ["1", "1.5", ".5", "5.", "1e5", "1.5e-3", ".5E+3", "1.e5"]);
        assert_eq!(texts("1.2.3"), ["1.2", ".3"]);
        assert_eq!(texts("1..10"), ["1", "..", "10"]);
        assert_eq!(texts("1e5e5"), ["1e5", "e5"]);
        assert_eq!(texts("1e 1e+ 1ea"), ["1", "e", "1", "e", "+", "1", "ea"]);
        // trailing junk: a number, then a word (as libpg_query and PostgreSQL 14 read it)
        assert_eq!(
            kinds("123abc 0x1f $1abc"),
            [
                (Number, "123".into()),
                (Word, "abc".into()),
                (Number, "0".into()),
                (Word, "x1f".into()),
                (Param, "$1".into()),
                (Word, "abc".into()),
            ]
        );
    }

    #[test]
    fn string_constants_continue_across_newlines() {
        // SQL: string constants separated by whitespace holding a newline are one constant
        assert_eq!(texts("select 'a'\n'b', 'a' \t\r  'b'"), ["select", "'a'\n'b'", ",", "'a' \t\r  'b'"]);
        assert_eq!(texts("'a' 'b'"), ["'a'", "'b'"]);
        // `--` comments may stand in the gap (not `/* */` ones); libpg_query differs here
        assert_eq!(texts("'a' -- c\n'b'"), ["'a' -- c\n'b'"]);
        assert_eq!(texts("'a'\n-- c\n  'b'"), ["'a'\n-- c\n  'b'"]);
        assert_eq!(texts("'a' /* c */\n'b'"), ["'a'", "'b'"]);
        assert_eq!(texts("'a'\n/* c */'b'"), ["'a'", "'b'"]);
        assert_eq!(texts("'a' --c 'b'"), ["'a'"]);
        // the continued part keeps the escaping rules of the first: here `\'` is a quote, and so
        // the statement after `;` is read by the server, not hidden in a string
        assert_eq!(
            texts("select E'a' --x\n'\\'' ; select set_config('app.tenant_id','2',true) --'"),
            ["select", "E'a' --x\n'\\''", ";", "select", "set_config", "(", "'app.tenant_id'", ",", "'2'", ",", "true", ")"]
        );
        // ... and a standard string part stays standard
        assert_eq!(texts("'a'\n'\\' ; b"), ["'a'\n'\\'", ";", "b"]);
        assert_eq!(texts("'a'\n''"), ["'a'\n''"]);
        assert_eq!(texts("'a'\n'''"), ["|'a'\n'''"]);
        assert_eq!(
            texts("N'a'\n'b' U&'a'\n'b' B'1'\n'0' X'f'\r'0'"),
            ["N'a'\n'b'", "U&'a'\n'b'", "B'1'\n'0'", "X'f'\r'0'"]
        );
        assert_eq!(texts("$$a$$\n'b'"), ["$$a$$", "'b'"]);
    }

    #[test]
    fn string_parts() {
        let parts = |s: &str| {
            let t = Lexer::new(s.as_bytes()).next().unwrap();
            t.string_parts().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>()
        };
        assert_eq!(parts("'app.' -- x\n 'tenant''s'"), ["app.", "tenant''s"]);
        assert_eq!(parts("E'a\\'' \n'\\n'"), ["a\\'", "\\n"]);
        assert_eq!(parts("U&'\\0061'\n'b'"), ["\\0061", "b"]);
        assert_eq!(parts("n'x'"), ["x"]);
        assert_eq!(parts("B'10'"), ["10"]);
        assert_eq!(parts("$t$ a'b $t$"), [" a'b "]);
        assert_eq!(parts("$$$$"), [""]);
        assert_eq!(parts("abc"), Vec::<String>::new());
    }

    #[test]
    fn bit_strings_have_no_doubled_quotes() {
        assert_eq!(texts("B'10''01'"), ["B'10'", "'01'"]);
        assert_eq!(texts("x'1f''"), ["x'1f'", "|'"]);
    }

    #[test]
    fn escape_strings() {
        assert_eq!(texts("E'it\\'s' e'\\\\' E'\\x41\\101\\n'"), ["E'it\\'s'", "e'\\\\'", "E'\\x41\\101\\n'"]);
        assert_eq!(texts("E'\\u0061\\U00000062\\uD83D\\uDE00'"), ["E'\\u0061\\U00000062\\uD83D\\uDE00'"]);
        // a trailing backslash escapes the closing quote
        assert_eq!(texts("select e'abc\\'"), ["select", "|e'abc\\'"]);
        assert_eq!(texts("select e'abc\\"), ["select", "|e'abc\\"]);
        // malformed Unicode escapes are scanner errors
        for bad in [
            "E'\\u12'",
            "E'\\uzzzz'",
            "E'\\U0011'",
            "E'\\uD800'",
            "E'\\uD800x'",
            "E'\\uD800\\u0061'",
            "E'\\uDC00'",
            "E'\\U00110000'",
            "E'\\u0000'",
        ] {
            assert_eq!(texts(&format!("select {bad}; select 2")), ["select".to_string(), format!("|{bad}; select 2")], "{bad}");
        }
        // backslashes are ordinary in standard strings and U& strings
        assert_eq!(texts("'a\\' U&'\\' ;"), ["'a\\'", "U&'\\'", ";"]);
    }

    #[test]
    fn quoted_identifiers() {
        assert_eq!(
            kinds("\"a;b\" \"q\"\"x\" U&\"\\0073et\" u&\"x\"\"y\""),
            [
                (QuotedIdent, "\"a;b\"".into()),
                (QuotedIdent, "\"q\"\"x\"".into()),
                (QuotedIdent, "U&\"\\0073et\"".into()),
                (QuotedIdent, "u&\"x\"\"y\"".into()),
            ]
        );
        // zero-length quoted identifiers are scanner errors
        assert_eq!(texts("select \"\"; select 1"), ["select", "|\"\"; select 1"]);
        assert_eq!(texts("select U&\"\"; select 1"), ["select", "|U&\"\"; select 1"]);
        assert_eq!(texts("select \"\"\"\""), ["select", "\"\"\"\""]);
        // `U&` not followed by a quote is the word `U` and an operator
        assert_eq!(texts("U&x u &'a'"), ["U", "&", "x", "u", "&", "'a'"]);
        assert_eq!(kinds("U&\"set!005fconfig\" UESCAPE '!'")[1], (Word, "UESCAPE".into()));
    }

    #[test]
    fn dollar_quotes_and_params() {
        assert_eq!(texts("$a$ $ab$ $a$ x"), ["$a$ $ab$ $a$", "x"]);
        assert_eq!(texts("$_1$x$_1$ a$b$c $ab"), ["$_1$x$_1$", "a$b$c", "$", "ab"]);
        assert_eq!(texts("$1$$q$$ $12a"), ["$1", "$$q$$", "$12", "a"]);
        assert_eq!(texts("$a$ x $A$"), ["|$a$ x $A$"]);
        assert_eq!(texts("$\u{e9}$x$\u{e9}$"), ["$\u{e9}$x$\u{e9}$"]);
    }

    #[test]
    fn national_strings_are_one_token() {
        assert_eq!(kinds("N'abc' n'x'"), [(Kind::String, "N'abc'".into()), (Kind::String, "n'x'".into())]);
    }

    #[test]
    fn bytes_that_are_not_ascii() {
        // every byte >= 0x80 is an identifier character, valid UTF-8 or not
        assert_eq!(
            lex(b"caf\xc3\xa9 \xff\xfe x\x80'a' e\xff'x'"),
            [
                (Word, "caf\u{e9}".into()),
                (Word, "\u{fffd}\u{fffd}".into()),
                (Word, "x\u{fffd}".into()),
                (Kind::String, "'a'".into()),
                (Word, "e\u{fffd}".into()),
                (Kind::String, "'x'".into()),
            ]
        );
        // a NUL is a one-byte token (the server never reads past one)
        assert_eq!(lex(b"a\0b"), [(Word, "a".into()), (Op, "\0".into()), (Word, "b".into())]);
    }

    /// Inputs kept in proxy/fuzz/regressions/lexer_diff/ (the `orig-*` ones are covered by the
    /// tests above; these are the rest).
    #[test]
    fn fuzz_regressions() {
        // orig-continuation-e: the server runs the second statement
        assert_eq!(
            texts("select E'a'\n'\\'' ; select set_config('app.tenant_id','2',true) --'")[1..4],
            ["E'a'\n'\\''", ";", "select"]
        );
        // harness-e-continuation-across-comment-then-error
        assert_eq!(
            texts("select /* a /* b */ c */ select E'a' --x\n'\\'' ; select set_c1; /*o/"),
            ["select", "select", "E'a' --x\n'\\''", ";", "select", "set_c1", ";", "|/*o/"]
        );
        // harness-quote-inside-comment-after-string: a quote inside a `--` comment after a
        // string does not continue it
        let toks = texts("select 'a'\n-- c '*/'b', B'I', 'a'\n-- c4'\n?'0',\"U&'a'\n'b'");
        assert_eq!(toks, ["select", "'a'", "?", "'0'", ",", "|\"U&'a'\n'b'"]);
        // harness-escaped-high-byte-invalid-utf8: a backslash before a byte >= 0x80 in an E''
        // string escapes that byte
        let toks = lex(b"E'\\u0061\\''\n'\\\xd9\xd8\xdf set_con', e'x'");
        assert_eq!(toks.len(), 3, "{toks:?}");
        assert_eq!(toks[0].0, Kind::String);
        assert_eq!(toks[2], (Kind::String, "e'x'".into()));
    }
}
