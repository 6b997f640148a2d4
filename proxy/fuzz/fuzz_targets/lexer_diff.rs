//! Differential fuzzing of pgtenant's SQL lexer (`pgtenant::sql::lexer`) against the real
//! PostgreSQL scanner: `pg_query_scan` of libpg_query 15-4.2.3 (the `pg_query` crate 0.8.2), which
//! runs `core_yylex` of PostgreSQL 15.1's `scan.l` and reports every token (comments included)
//! with its start and end offsets.
//!
//! Both token streams are mapped to (start, end, coarse kind): word (identifier or keyword), quoted
//! identifier, string constant (every spelling), parameter, number, `;`, operator/punctuation.
//! Comments are trivia on both sides.
//!
//! Properties (any violation panics with both token streams side by side):
//! - the server's scanner accepts the input => pgtenant yields exactly the same tokens, and no
//!   `Unterminated` one;
//! - the server's scanner rejects the input => pgtenant yields an `Unterminated` token at some
//!   offset `u`, it is the last token and runs to the end of the input; the input before `u`
//!   scans without error to exactly pgtenant's tokens before `u` (no string constant there
//!   continues at `u`); and the input from `u` on is rejected by itself.
//!
//! Why that is enough for the statement guard: the server parses a whole query string before it
//! runs any of it, so when its scanner accepts the input the guard splits it into the same
//! statements made of the same tokens (the first property), and when the scanner rejects it
//! nothing runs at all; the second property adds that pgtenant then sees only what the server
//! read before it stopped, never a statement boundary past that point.
//!
//! The reference is PostgreSQL 15 as a server runs it, modelled from libpg_query's scanner and
//! corrected for the differences between the two (each transformation keeps the server's token
//! boundaries):
//! - libpg_query returns `--` comments as tokens, and so no longer lets them stand between the
//!   parts of a continued string constant; the server does (`'a' -- c` newline `'b'` is one
//!   constant). Where a string token is followed by whitespace and `--` comments holding a newline
//!   and then a quote, the comments are blanked out (same length) and the input is scanned again;
//! - `\x..` and octal escapes are replaced by `\x11` / `\1..`, and a byte >= 0x80 after a
//!   backslash by `z`, so that no `E''` constant decodes to bytes that are invalid in the server
//!   encoding (an error that depends on the server's encoding, which pgtenant leaves to the
//!   server; outside `E''` constants the replaced bytes belong to the same token either way);
//! - a vertical tab is replaced by a space: pgtenant reads it as whitespace like later releases
//!   (PostgreSQL 15 makes it a one-character token no grammar rule accepts, so such a query
//!   fails there whatever pgtenant sees);
//! - the server's `NCHAR` keyword token for the `N` of `N'...'` and the string after it are one
//!   string token, as pgtenant reads them.
//!
//! libpg_query accepts `123abc` as a number and a word (PostgreSQL 14 does too; 15 rejects it as
//! "trailing junk"), and so does pgtenant: on a PostgreSQL 15 server such a query fails anyway.
//!
//! Input: bytes up to the first NUL (the server reads a query string as a C string; pgtenant's
//! protocol code does not hand it a NUL either). Invalid UTF-8 goes to the scanner as it is: the
//! scanner treats every byte >= 0x80 alike.

#![no_main]

use std::ffi::{c_char, c_int, CStr, CString};

use libfuzzer_sys::fuzz_target;
use pgtenant::sql::lexer::{Kind, Lexer};
use prost::Message;

// libpg_query's C API (pg_query.h), linked through the pg_query crate. Called directly rather
// than through `pg_query::scan(&str)` so that inputs that are not UTF-8 can be scanned too.
#[repr(C)]
struct PgQueryError {
    message: *mut c_char,
    funcname: *mut c_char,
    filename: *mut c_char,
    lineno: c_int,
    cursorpos: c_int,
    context: *mut c_char,
}

#[repr(C)]
struct PgQueryProtobuf {
    len: usize,
    data: *mut c_char,
}

#[repr(C)]
struct PgQueryScanResult {
    pbuf: PgQueryProtobuf,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

extern "C" {
    fn pg_query_scan(input: *const c_char) -> PgQueryScanResult;
    fn pg_query_free_scan_result(result: PgQueryScanResult);
}

use pg_query::protobuf::Token as T;

/// One token as the server's scanner reports it.
#[derive(Clone, Copy, Debug)]
struct PgToken {
    start: usize,
    end: usize,
    token: i32,
    keyword: bool,
}

/// Runs the server's scanner; Err(message) when it rejects the input.
fn server_scan(sql: &[u8]) -> Result<Vec<PgToken>, String> {
    let input = CString::new(sql).expect("no NUL in the input");
    let result = unsafe { pg_query_scan(input.as_ptr()) };
    let out: Result<Vec<PgToken>, String> = if !result.error.is_null() {
        let message = unsafe { CStr::from_ptr((*result.error).message) };
        Err(message.to_string_lossy().into_owned())
    } else {
        let data = unsafe { std::slice::from_raw_parts(result.pbuf.data as *const u8, result.pbuf.len) };
        let scan = pg_query::protobuf::ScanResult::decode(data).expect("scan result protobuf");
        Ok(scan
            .tokens
            .iter()
            .map(|t| PgToken {
                start: t.start as usize,
                end: t.end as usize,
                token: t.token,
                keyword: t.keyword_kind != 0,
            })
            .collect())
    };
    unsafe { pg_query_free_scan_result(result) };
    let mut toks = out?;
    // libpg_query reports no end for U&'...' and U&"..." (the flex match length of the quote or
    // lookahead that ended them): they end where the whitespace before the next token begins.
    for i in 0..toks.len() {
        if toks[i].token == T::Usconst as i32 || toks[i].token == T::Uident as i32 {
            let mut end = toks.get(i + 1).map_or(sql.len(), |n| n.start);
            while end > toks[i].start && is_space(sql[end - 1]) {
                end -= 1;
            }
            toks[i].end = end;
        }
    }
    for t in &toks {
        assert!(t.start < t.end && t.end <= sql.len(), "bad offsets from the server's scanner: {t:?}");
    }
    Ok(toks)
}

/// PostgreSQL 15 scan.l `space`.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0c)
}

fn is_comment(t: &PgToken) -> bool {
    t.token == T::SqlComment as i32 || t.token == T::CComment as i32
}

/// A string constant read by the quote rules (`'...'`, `E''`, `B''`, `X''`, `U&''`): the ones a
/// newline can continue. Dollar quotes cannot be continued.
fn is_quote_string(sql: &[u8], t: &PgToken) -> bool {
    let string = [T::Sconst, T::Usconst, T::Bconst, T::Xconst].iter().any(|k| *k as i32 == t.token);
    string && sql[t.start] != b'$'
}

/// scan.l `quotecontinue` (server version, comments allowed): after a string constant's closing
/// quote, whitespace and `--` comments holding a newline, then a quote. `comments` are the
/// comment tokens in the gap; returns whether the gap `sql[from..to]` continues the constant.
fn gap_continues(sql: &[u8], from: usize, to: usize, comments: &[PgToken]) -> bool {
    if sql.get(to) != Some(&b'\'') {
        return false;
    }
    let mut newline = false;
    let mut i = from;
    let mut c = comments.iter().peekable();
    while i < to {
        if let Some(t) = c.next_if(|t| t.start == i) {
            // only `--` comments stand there, each ended by a newline (a comment token that
            // ends elsewhere was cut short by scanning only a prefix of the input)
            if t.token != T::SqlComment as i32 || !matches!(sql.get(t.end), Some(b'\n' | b'\r')) {
                return false;
            }
            i = t.end;
        } else if is_space(sql[i]) {
            newline |= sql[i] == b'\n' || sql[i] == b'\r';
            i += 1;
        } else {
            return false;
        }
    }
    newline
}

/// The first string constant that the server continues across `--` comments and libpg_query
/// does not: the comment tokens to blank out.
fn comment_continuation(sql: &[u8], toks: &[PgToken]) -> Option<Vec<(usize, usize)>> {
    for (i, t) in toks.iter().enumerate() {
        if !is_quote_string(sql, t) {
            continue;
        }
        let comments: Vec<PgToken> = toks[i + 1..].iter().take_while(|n| is_comment(n)).copied().collect();
        if comments.is_empty() {
            continue;
        }
        let next = toks.get(i + 1 + comments.len());
        if let Some(n) = next {
            if n.token == T::Sconst as i32 && gap_continues(sql, t.end, n.start, &comments) {
                return Some(comments.iter().map(|c| (c.start, c.end)).collect());
            }
        }
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Coarse {
    Word,
    QuotedIdent,
    String,
    Param,
    Number,
    Semicolon,
    Op,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tok {
    start: usize,
    end: usize,
    kind: Coarse,
}

/// The server's tokens as (start, end, coarse kind), comments dropped, `N` + `'...'` merged.
fn server_tokens(sql: &[u8], toks: &[PgToken]) -> Vec<Tok> {
    let mut out: Vec<Tok> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        i += 1;
        if is_comment(&t) {
            continue;
        }
        if t.token == T::Nchar as i32 && t.end == t.start + 1 {
            if let Some(s) = toks.get(i).filter(|s| s.token == T::Sconst as i32 && s.start == t.end) {
                out.push(Tok { start: t.start, end: s.end, kind: Coarse::String });
                i += 1;
                continue;
            }
        }
        let tk = t.token;
        let kind = if t.keyword {
            Coarse::Word
        } else if tk == T::Ident as i32 {
            if sql[t.start] == b'"' { Coarse::QuotedIdent } else { Coarse::Word }
        } else if tk == T::Uident as i32 {
            Coarse::QuotedIdent
        } else if [T::Sconst, T::Usconst, T::Bconst, T::Xconst].iter().any(|k| *k as i32 == tk) {
            Coarse::String
        } else if tk == T::Iconst as i32 || tk == T::Fconst as i32 {
            Coarse::Number
        } else if tk == T::Param as i32 {
            Coarse::Param
        } else if tk == b';' as i32 {
            Coarse::Semicolon
        } else {
            Coarse::Op
        };
        out.push(Tok { start: t.start, end: t.end, kind });
    }
    out
}

/// pgtenant's tokens; the offset of its `Unterminated` token if any.
fn pgtenant_tokens(sql: &[u8]) -> (Vec<Tok>, Option<usize>) {
    let base = sql.as_ptr() as usize;
    let mut out = Vec::new();
    for t in Lexer::new(sql) {
        let start = t.text.as_ptr() as usize - base;
        let end = start + t.text.len();
        let kind = match t.kind {
            Kind::Word => Coarse::Word,
            Kind::QuotedIdent => Coarse::QuotedIdent,
            Kind::String => Coarse::String,
            Kind::Param => Coarse::Param,
            Kind::Number => Coarse::Number,
            Kind::Semicolon => Coarse::Semicolon,
            Kind::Op => Coarse::Op,
            Kind::Unterminated => {
                assert_eq!(end, sql.len(), "Unterminated token does not run to the end of the input");
                return (out, Some(start));
            }
        };
        assert!(start < end, "empty token at {start}");
        out.push(Tok { start, end, kind });
    }
    (out, None)
}

/// The input as the reference scanner gets it (see the module docs): same length, same token
/// boundaries under PostgreSQL 15's rules (with `\v` as whitespace).
fn reference_input(sql: &[u8]) -> Vec<u8> {
    let mut m = sql.to_vec();
    let mut i = 0;
    while i < m.len() {
        match m[i] {
            0x0b => m[i] = b' ',
            b'\\' if m.get(i + 1) == Some(&b'x') => {
                let mut j = i + 2;
                while j < m.len() && j < i + 4 && m[j].is_ascii_hexdigit() {
                    m[j] = b'1';
                    j += 1;
                }
            }
            // `\` + a byte >= 0x80 makes the scanner check the constant's encoding too
            b'\\' if m.get(i + 1).is_some_and(|&c| c >= 0x80) => m[i + 1] = b'z',
            b'\\' => {
                let mut j = i + 1;
                while j < m.len() && j < i + 4 && (b'0'..=b'7').contains(&m[j]) {
                    m[j] = b'1';
                    j += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    m
}

fn blank(m: &mut [u8], spans: &[(usize, usize)]) {
    for &(s, e) in spans {
        m[s..e].fill(b' ');
    }
}

/// When the whole input is rejected, a continuation across `--` comments may be what made
/// libpg_query fail (`E'a' -- c` newline `'\''` is one constant to the server, an unterminated
/// standard string to libpg_query). Looks for the first quote that continues a string constant
/// across comments, each time scanning the input before the quote: the comments to blank out.
fn continuation_before_error(m: &[u8]) -> Option<Vec<(usize, usize)>> {
    for p in (0..m.len()).filter(|&p| m[p] == b'\'') {
        // cheap filter: the last non-space text before the quote ends a line holding `--`
        let mut q = p;
        while q > 0 && is_space(m[q - 1]) {
            q -= 1;
        }
        let line = m[..q].iter().rposition(|&c| c == b'\n' || c == b'\r').map_or(0, |i| i + 1);
        if q == p || !m[line..q].windows(2).any(|w| w == b"--") {
            continue;
        }
        let Ok(toks) = server_scan(&m[..p]) else { continue };
        let Some(last) = toks.iter().rposition(|t| !is_comment(t)) else { continue };
        let comments = &toks[last + 1..];
        if !comments.is_empty() && is_quote_string(m, &toks[last]) && gap_continues(m, toks[last].end, p, comments) {
            return Some(comments.iter().map(|c| (c.start, c.end)).collect());
        }
    }
    None
}

/// Scans `m` with the server's scanner, blanking comments that the server reads inside a
/// continued string constant, until none is left.
fn reference_scan(m: &mut [u8]) -> Result<Vec<PgToken>, String> {
    loop {
        let result = server_scan(m);
        let spans = match &result {
            Ok(toks) => comment_continuation(m, toks),
            Err(_) => continuation_before_error(m),
        };
        match spans {
            Some(spans) => blank(m, &spans),
            None => return result,
        }
    }
}

fn show(sql: &[u8], toks: &[Tok]) -> String {
    toks.iter()
        .map(|t| format!("    {:>5}..{:<5} {:<11} {}\n", t.start, t.end, format!("{:?}", t.kind), sql[t.start..t.end].escape_ascii()))
        .collect()
}

fn fail(sql: &[u8], why: &str, ours: &[Tok], theirs: &[Tok]) -> ! {
    let first = ours.iter().zip(theirs).position(|(a, b)| a != b).unwrap_or(ours.len().min(theirs.len()));
    panic!(
        "lexer disagrees with the PostgreSQL scanner: {why}\n  input ({} bytes): \"{}\"\n  first difference at token #{first}\n  pgtenant:\n{}  server:\n{}",
        sql.len(),
        sql.escape_ascii(),
        show(sql, ours),
        show(sql, theirs)
    );
}

/// Checks one query string (no NUL) against the server's scanner.
fn check(sql: &[u8]) {
    let (ours, unterminated) = pgtenant_tokens(sql);
    let mut m = reference_input(sql);
    match reference_scan(&mut m) {
        Ok(toks) => {
            let theirs = server_tokens(&m, &toks);
            if let Some(u) = unterminated {
                fail(sql, &format!("pgtenant says Unterminated at {u}, the server's scanner accepts the input"), &ours, &theirs);
            }
            if ours != theirs {
                fail(sql, "different tokens", &ours, &theirs);
            }
        }
        Err(error) => {
            let Some(u) = unterminated else {
                fail(sql, &format!("the server's scanner rejects the input ({error}), pgtenant sees no error"), &ours, &[]);
            };
            let before = match server_scan(&m[..u]) {
                Ok(toks) => toks,
                Err(e) => fail(sql, &format!("the server's scanner stops before {u}, where pgtenant does: {e}"), &ours, &[]),
            };
            let theirs = server_tokens(&m[..u], &before);
            if ours != theirs {
                fail(sql, &format!("different tokens before pgtenant's Unterminated at {u}"), &ours, &theirs);
            }
            if let Some(last) = before.iter().rposition(|t| !is_comment(t)) {
                if is_quote_string(&m, &before[last]) && gap_continues(&m, before[last].end, u, &before[last + 1..]) {
                    fail(sql, &format!("the string constant before {u} continues there"), &ours, &theirs);
                }
            }
            if server_scan(&m[u..]).is_ok() {
                fail(sql, &format!("the server's scanner accepts the input from pgtenant's Unterminated at {u} on"), &ours, &theirs);
            }
        }
    }
}

/// Pieces of SQL that meet in tricky ways: the second input checked for each fuzzer input is
/// made of these, one per input byte, so that mutations combine them far more often than
/// random bytes would.
const FRAGMENTS: [&[u8]; 64] = [
    b" ", b"\n", b"\r", b"\t", b"\x0b", b"\x0c", b"'", b"''", //
    b"\"", b"E'", b"e'", b"U&'", b"u&\"", b"B'", b"X'", b"N'", //
    b"$$", b"$a$", b"$ab$", b"$1", b"$", b"--", b"/*", b"*/", //
    b"\\", b"\\'", b"\\\\", b"\\u", b"\\U", b"D800", b"DC00", b"0061", //
    b"00000062", b"\\x", b"ff", b"\\0", b";", b"::", b":", b"..", //
    b".", b"+", b"-", b"*", b"/", b"@", b"!", b"=", //
    b"<", b">", b"~", b"?", b"%", b"|", b"1", b"e", //
    b"x", b"a", b"\xc3\xa9", b"\xff", b"UESCAPE", b"select", b"(", b",", //
];

fuzz_target!(|data: &[u8]| {
    let _ = Lexer::new(data).count(); // any input: no panic
    check(&data[..data.iter().position(|&b| b == 0).unwrap_or(data.len())]);
    let generated: Vec<u8> = data.iter().take(512).flat_map(|&b| FRAGMENTS[usize::from(b) % FRAGMENTS.len()]).copied().collect();
    check(&generated);
});
