//! A PostgreSQL lexer: enough of `scan.l` to find token boundaries exactly as the server does.
//!
//! It knows every way SQL hides text from a naive scanner: `--` and nested `/* */` comments,
//! standard strings with `''`, `E''` strings with backslash escapes, `U&''` / `B''` / `X''` / `N''`
//! literals, dollar quotes (`$$`, `$tag$`), quoted identifiers (`""`, `U&""`) and `$n` parameters.
//! It never allocates; tokens borrow the input. Unterminated literals and comments produce an
//! `Unterminated` token so callers can refuse what they cannot see into.
//! Assumes `standard_conforming_strings = on` (the default since PostgreSQL 9.1).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Unquoted identifier or keyword.
    Word,
    /// `"..."` or `U&"..."`.
    QuotedIdent,
    /// Any string literal, including dollar-quoted ones.
    String,
    /// `$1`, `$2`, ...
    Param,
    Number,
    /// `;`
    Semicolon,
    /// Any other punctuation or operator (one token per operator run or punctuation char).
    Op,
    /// A literal, identifier or comment that runs to the end of the input.
    Unterminated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token<'a> {
    pub kind: Kind,
    /// The token's source text, quotes included.
    pub text: &'a [u8],
}

impl Token<'_> {
    /// Case-insensitive keyword comparison for unquoted words.
    pub fn is_word(&self, kw: &str) -> bool {
        self.kind == Kind::Word && self.text.eq_ignore_ascii_case(kw.as_bytes())
    }
}

pub struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(src: &'a [u8]) -> Self {
        Lexer { src, pos: 0 }
    }

    fn peek(&self, off: usize) -> u8 {
        *self.src.get(self.pos + off).unwrap_or(&0)
    }

    /// Skips whitespace and comments; returns false if a block comment is unterminated.
    fn skip_trivia(&mut self) -> bool {
        loop {
            let c = self.peek(0);
            if c.is_ascii_whitespace() && self.pos < self.src.len() {
                self.pos += 1;
            } else if c == b'-' && self.peek(1) == b'-' {
                while self.pos < self.src.len() && self.src[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else if c == b'/' && self.peek(1) == b'*' {
                let mut depth = 0usize;
                loop {
                    if self.pos + 1 >= self.src.len() {
                        self.pos = self.src.len();
                        return false;
                    }
                    if self.peek(0) == b'/' && self.peek(1) == b'*' {
                        depth += 1;
                        self.pos += 2;
                    } else if self.peek(0) == b'*' && self.peek(1) == b'/' {
                        depth -= 1;
                        self.pos += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        self.pos += 1;
                    }
                }
            } else {
                return true;
            }
        }
    }

    /// Scans a quoted run starting after the opening quote; `backslash` enables `\x` escapes.
    /// Returns false if unterminated.
    fn scan_quoted(&mut self, quote: u8, backslash: bool) -> bool {
        while self.pos < self.src.len() {
            let c = self.src[self.pos];
            if backslash && c == b'\\' {
                self.pos += 2;
                continue;
            }
            self.pos += 1;
            if c == quote {
                if self.peek(0) == quote {
                    self.pos += 1; // doubled quote
                    continue;
                }
                return true;
            }
        }
        self.pos = self.src.len();
        false
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
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

const OP_CHARS: &[u8] = b"+-*/<>=~!@#%^&|`?";

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let comment_ok = self.skip_trivia();
        let start = self.pos;
        if !comment_ok {
            return Some(Token { kind: Kind::Unterminated, text: &self.src[start..] });
        }
        if self.pos >= self.src.len() {
            return None;
        }
        let c = self.src[self.pos];
        let c1 = self.peek(1);
        let kind = match c {
            b';' => {
                self.pos += 1;
                Kind::Semicolon
            }
            b'\'' => {
                self.pos += 1;
                if self.scan_quoted(b'\'', false) { Kind::String } else { Kind::Unterminated }
            }
            b'"' => {
                self.pos += 1;
                if self.scan_quoted(b'"', false) { Kind::QuotedIdent } else { Kind::Unterminated }
            }
            b'e' | b'E' if c1 == b'\'' => {
                self.pos += 2;
                if self.scan_quoted(b'\'', true) { Kind::String } else { Kind::Unterminated }
            }
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if c1 == b'\'' => {
                self.pos += 2;
                if self.scan_quoted(b'\'', false) { Kind::String } else { Kind::Unterminated }
            }
            b'u' | b'U' if c1 == b'&' && (self.peek(2) == b'\'' || self.peek(2) == b'"') => {
                let q = self.peek(2);
                self.pos += 3;
                let done = self.scan_quoted(q, false);
                match (done, q) {
                    (false, _) => Kind::Unterminated,
                    (true, b'"') => Kind::QuotedIdent,
                    _ => Kind::String,
                }
            }
            b'$' if c1.is_ascii_digit() => {
                self.pos += 1;
                while self.peek(0).is_ascii_digit() {
                    self.pos += 1;
                }
                Kind::Param
            }
            b'$' => match self.dollar_tag() {
                Some(tag_len) => {
                    let tag = &self.src[self.pos..self.pos + tag_len];
                    self.pos += tag_len;
                    let body = &self.src[self.pos..];
                    match body.windows(tag_len).position(|w| w == tag) {
                        Some(end) => {
                            self.pos += end + tag_len;
                            Kind::String
                        }
                        None => {
                            self.pos = self.src.len();
                            Kind::Unterminated
                        }
                    }
                }
                None => {
                    self.pos += 1;
                    Kind::Op
                }
            },
            c if is_ident_start(c) => {
                while is_ident_cont(self.peek(0)) && self.pos < self.src.len() {
                    self.pos += 1;
                }
                Kind::Word
            }
            c if c.is_ascii_digit() || (c == b'.' && c1.is_ascii_digit()) => {
                while self.pos < self.src.len()
                    && (self.peek(0).is_ascii_alphanumeric() || self.peek(0) == b'.' || self.peek(0) == b'_')
                {
                    self.pos += 1;
                }
                Kind::Number
            }
            c if OP_CHARS.contains(&c) => {
                while self.pos < self.src.len() && OP_CHARS.contains(&self.peek(0)) {
                    // a comment start ends the operator
                    if (self.peek(0) == b'-' && self.peek(1) == b'-')
                        || (self.peek(0) == b'/' && self.peek(1) == b'*')
                    {
                        break;
                    }
                    self.pos += 1;
                }
                if self.pos == start {
                    self.pos += 1;
                }
                Kind::Op
            }
            _ => {
                self.pos += 1;
                Kind::Op
            }
        };
        Some(Token { kind, text: &self.src[start..self.pos] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<(Kind, String)> {
        Lexer::new(s.as_bytes())
            .map(|t| (t.kind, String::from_utf8_lossy(t.text).into_owned()))
            .collect()
    }

    #[test]
    fn hides_semicolons_inside_literals_and_comments() {
        let toks = kinds(
            "select 'a;b', E'it\\'s;', $$x;y$$, $f$ $$ ; $f$, \"q;\"\"\", U&'d;' /* a /* nested; */ ; */ -- c;\n;",
        );
        let semis = toks.iter().filter(|(k, _)| *k == Kind::Semicolon).count();
        assert_eq!(semis, 1, "{toks:?}");
        assert!(toks.iter().all(|(k, _)| *k != Kind::Unterminated));
    }

    #[test]
    fn params_words_and_unterminated() {
        let toks = kinds("SET app.x = $1");
        assert_eq!(toks[0], (Kind::Word, "SET".into()));
        assert_eq!(toks[3], (Kind::Word, "x".into()));
        assert_eq!(toks[5], (Kind::Param, "$1".into()));
        assert_eq!(kinds("select 'abc").last().unwrap().0, Kind::Unterminated);
        assert_eq!(kinds("select /* abc").last().unwrap().0, Kind::Unterminated);
        assert_eq!(kinds("select $a$ abc").last().unwrap().0, Kind::Unterminated);
    }
}
