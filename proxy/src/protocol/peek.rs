//! Reading the handful of fields the session state machine needs straight from raw message bytes,
//! without allocating: statement and portal names, query text, transaction status, SQLSTATE.

/// Splits a NUL-terminated string off the front of `b`: (string, rest).
#[inline]
pub fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = memchr(b)?;
    Some((&b[..nul], &b[nul + 1..]))
}

#[inline]
fn memchr(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == 0)
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
    fn reads_fields() {
        assert_eq!(parse_msg(b"s1\0select 1\0\0\0"), Some((&b"s1"[..], &b"select 1"[..])));
        assert_eq!(bind_msg(b"p\0s1\0\0\0"), Some((&b"p"[..], &b"s1"[..])));
        assert_eq!(target_msg(b"Sx\0"), Some((b'S', &b"x"[..])));
        assert_eq!(error_code(b"SERROR\0C42501\0Mno\0\0"), Some(&b"42501"[..]));
        assert_eq!(parse_msg(b"unterminated"), None);
    }
}
