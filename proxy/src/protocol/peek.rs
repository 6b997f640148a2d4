//! Reading the handful of fields the session state machine needs straight from raw message bytes,
//! without allocating: statement and portal names, query text, transaction status, SQLSTATE.

/// Splits a NUL-terminated string off the front of `b`: (string, rest).
#[inline]
pub fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = memchr(b)?;
    Some((&b[..nul], &b[nul + 1..]))
}

/// The first NUL of `b`, found a word at a time (`CStr` searches with the standard library's
/// memchr; a byte loop cost four instructions a byte of every query text, and looking at the
/// first few bytes one by one before it, for short names, cost more than it saved: +170
/// instructions per extended transaction, measured 2026-12-03).
#[inline]
fn memchr(b: &[u8]) -> Option<usize> {
    std::ffi::CStr::from_bytes_until_nul(b).ok().map(|s| s.to_bytes().len())
}

/// Parse ('P'): statement name and query text.
pub fn parse_msg(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (name, rest) = cstr(body)?;
    let (query, _) = cstr(rest)?;
    Some((name, query))
}

/// Bind ('B'): portal name and statement name.
pub fn bind_msg(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (portal, rest) = cstr(body)?;
    let (stmt, _) = cstr(rest)?;
    Some((portal, stmt))
}

/// Bind ('B'): how many parameter format codes and parameter values it carries, read as the
/// server reads them (unsigned 16-bit counts).
pub fn bind_counts(body: &[u8]) -> Option<(u16, u16)> {
    let (_, rest) = cstr(body)?;
    let (_, rest) = cstr(rest)?;
    let u16_at = |at: usize| Some(u16::from_be_bytes(rest.get(at..at + 2)?.try_into().ok()?));
    let nf = u16_at(0)?;
    Some((nf, u16_at(2 + 2 * usize::from(nf))?))
}

/// Parse ('P'): the parameter types (OIDs) the client declared; 0 means unspecified.
pub fn parse_param_types(body: &[u8]) -> Option<Vec<u32>> {
    let (name, query) = parse_msg(body)?;
    param_types_after(body, name, query)
}

/// [`parse_param_types`] for a caller that has read the Parse's `name` and `query` (from
/// [`parse_msg`]) already: the types are read where the query text ends, without scanning it again.
pub fn param_types_after(body: &[u8], name: &[u8], query: &[u8]) -> Option<Vec<u32>> {
    let rest = body.get(name.len() + query.len() + 2..)?;
    let n = usize::try_from(i16::from_be_bytes(rest.get(..2)?.try_into().ok()?)).ok()?;
    let oids = rest.get(2..2 + 4 * n)?;
    Some(oids.chunks_exact(4).map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes"))).collect())
}

/// The parameters of a Bind message: format codes and values (None for NULL), as sent.
#[derive(Debug, PartialEq, Eq)]
pub struct BindParams<'a> {
    formats: Vec<i16>,
    values: Vec<Option<&'a [u8]>>,
}

impl<'a> BindParams<'a> {
    /// Parameter `n` (1-based) with its format code, by the protocol's rule: no codes means all
    /// text, one code applies to every parameter, otherwise one code per parameter. None when the
    /// message has no such parameter or its codes do not fit (the server rejects such a Bind).
    pub fn get(&self, n: usize) -> Option<(i16, Option<&'a [u8]>)> {
        let value = *self.values.get(n.checked_sub(1)?)?;
        let format = match self.formats.len() {
            0 => 0,
            1 => self.formats[0],
            k if k == self.values.len() => self.formats[n - 1],
            _ => return None,
        };
        Some((format, value))
    }
}

/// Bind ('B'): the parameter format codes and values.
pub fn bind_params(body: &[u8]) -> Option<BindParams<'_>> {
    fn i16_at(b: &[u8], at: usize) -> Option<i16> {
        Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }
    let (_, rest) = cstr(body)?;
    let (_, rest) = cstr(rest)?;
    let nf = usize::try_from(i16_at(rest, 0)?).ok()?;
    let formats = (0..nf).map(|i| i16_at(rest, 2 + 2 * i)).collect::<Option<Vec<i16>>>()?;
    let mut at = 2 + 2 * nf;
    let np = usize::try_from(i16_at(rest, at)?).ok()?;
    at += 2;
    let mut values = Vec::with_capacity(np);
    for _ in 0..np {
        let len = i32::from_be_bytes(rest.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len == -1 {
            values.push(None);
            continue;
        }
        let len = usize::try_from(len).ok()?;
        values.push(Some(rest.get(at..at + len)?));
        at += len;
    }
    Some(BindParams { formats, values })
}

/// Execute ('E'), Describe ('D') and Close ('C') name fields. Describe/Close start with a kind
/// byte ('S' statement or 'P' portal).
pub fn execute_msg(body: &[u8]) -> Option<&[u8]> {
    cstr(body).map(|(p, _)| p)
}

/// FunctionCall ('F'): the OID of the function to call.
pub fn function_call_oid(body: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(body.get(..4)?.try_into().ok()?))
}

pub fn target_msg(body: &[u8]) -> Option<(u8, &[u8])> {
    let (&kind, rest) = body.split_first()?;
    let (name, _) = cstr(rest)?;
    Some((kind, name))
}

/// Query ('Q'): the SQL text.
pub fn query_msg(body: &[u8]) -> Option<&[u8]> {
    cstr(body).map(|(q, _)| q)
}

/// The SQLSTATE ('C' field) of an ErrorResponse / NoticeResponse body.
pub fn error_code(body: &[u8]) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&field, r)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let (val, r) = cstr(r)?;
        if field == b'C' {
            return Some(val);
        }
        rest = r;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_nul_at_any_length() {
        for len in 0..40 {
            let none = vec![b'x'; len];
            assert_eq!(memchr(&none), None, "len {len}");
            for at in 0..len {
                let mut b = none.clone();
                b[at] = 0;
                if at + 1 < len {
                    b[len - 1] = 0; // a later NUL does not count
                }
                assert_eq!(memchr(&b), Some(at), "len {len}, at {at}");
            }
        }
    }

    #[test]
    fn reads_fields() {
        assert_eq!(parse_msg(b"s1\0select 1\0\0\0"), Some((&b"s1"[..], &b"select 1"[..])));
        assert_eq!(bind_msg(b"p\0s1\0\0\0"), Some((&b"p"[..], &b"s1"[..])));
        assert_eq!(target_msg(b"Sx\0"), Some((b'S', &b"x"[..])));
        assert_eq!(error_code(b"SERROR\0C42501\0Mno\0\0"), Some(&b"42501"[..]));
        assert_eq!(parse_msg(b"unterminated"), None);
    }

    #[test]
    fn reads_parameters() {
        assert_eq!(parse_param_types(b"s\0select $1\0\0\x02\0\0\0\x19\0\0\0\0"), Some(vec![25, 0]));
        assert_eq!(parse_param_types(b"s\0select 1\0\0\0"), Some(vec![]));
        assert_eq!(parse_param_types(b"s\0select $1\0\0\x01\0\0"), None);
        // portal, statement, 2 format codes (text, binary), 3 values: 'ab', NULL, '' — codes do not fit
        let b = b"p\0s\0\0\x02\0\0\0\x01\0\x03\0\0\0\x02ab\xff\xff\xff\xff\0\0\0\0\0\0";
        let p = bind_params(b).unwrap();
        assert_eq!(p.get(1), None);
        // one code for all
        let b = b"p\0s\0\0\x01\0\x01\0\x02\0\0\0\x02ab\xff\xff\xff\xff\0\0";
        let p = bind_params(b).unwrap();
        assert_eq!((p.get(1), p.get(2), p.get(3), p.get(0)), (Some((1, Some(&b"ab"[..]))), Some((1, None)), None, None));
        // no codes: text
        let p = bind_params(b"\0\0\0\0\0\x01\0\0\0\x01x\0\0").unwrap();
        assert_eq!(p.get(1), Some((0, Some(&b"x"[..]))));
        // per parameter
        let p = bind_params(b"\0\0\0\x02\0\x01\0\0\0\x02\0\0\0\x01x\0\0\0\x01y\0\0").unwrap();
        assert_eq!((p.get(1), p.get(2)), (Some((1, Some(&b"x"[..]))), Some((0, Some(&b"y"[..])))));
        // a value running past the end, a negative length other than -1
        assert_eq!(bind_params(b"\0\0\0\0\0\x01\0\0\0\x09x"), None);
        assert_eq!(bind_params(b"\0\0\0\0\0\x01\xff\xff\xff\xfe"), None);
    }
}
