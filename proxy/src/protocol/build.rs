//! Messages pgtenant writes itself, encoded with pgwire's message types.
//!
//! Client-bound: authentication requests, ParameterStatus, BackendKeyData, ReadyForQuery, and the
//! result rows of pgtenant's own answers (the admin console): RowDescription, DataRow (text),
//! CommandComplete, EmptyQueryResponse.
//! Backend-bound: the context statement (Parse/Bind/Execute/Close) and Sync.

use bytes::{Bytes, BytesMut};
use pgwire::messages::extendedquery::{Bind, Close, Execute, Flush, Parse, Sync};
use pgwire::messages::response::{ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::Message;

// Encoding into a BytesMut only fails for messages above pgwire's size limits; everything built
// here is small or bounded by the caller, so failures are ignored deliberately.

pub fn auth_cleartext(buf: &mut BytesMut) {
    let _ = Authentication::CleartextPassword.encode(buf);
}

pub fn auth_ok(buf: &mut BytesMut) {
    let _ = Authentication::Ok.encode(buf);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let _ = ParameterStatus::new(name.to_string(), value.to_string()).encode(buf);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    let _ = BackendKeyData::new(pid, SecretKey::I32(secret)).encode(buf);
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    let _ = ReadyForQuery::new(status).encode(buf);
}

/// RowDescription of text-format columns, each `(name, type oid)`.
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, u32)]) {
    use pgwire::messages::data::{FieldDescription, RowDescription};
    let fields = columns
        .iter()
        .map(|&(name, oid)| FieldDescription::new(name.to_string(), 0, 0, oid, -1, -1, 0))
        .collect();
    let _ = RowDescription::new(fields).encode(buf);
}

/// DataRow of text values (`None` is NULL).
pub fn data_row(buf: &mut BytesMut, values: &[Option<String>]) {
    use bytes::BufMut;
    let mut data = BytesMut::new();
    for v in values {
        match v {
            Some(v) => {
                data.put_i32(v.len() as i32);
                data.put_slice(v.as_bytes());
            }
            None => data.put_i32(-1),
        }
    }
    let _ = pgwire::messages::data::DataRow::new(data, values.len() as i16).encode(buf);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    let _ = pgwire::messages::response::CommandComplete::new(tag.to_string()).encode(buf);
}

pub fn empty_query(buf: &mut BytesMut) {
    let _ = pgwire::messages::response::EmptyQueryResponse::new().encode(buf);
}

/// NegotiateProtocolVersion: we speak 3.0 and none of the requested `_pq_` options.
pub fn negotiate_protocol_version(buf: &mut BytesMut, unsupported: &[String]) {
    use bytes::BufMut;
    let mut body = BytesMut::new();
    body.put_i32(0); // newest minor version supported
    body.put_i32(unsupported.len() as i32);
    for o in unsupported {
        body.put_slice(o.as_bytes());
        body.put_u8(0);
    }
    buf.put_u8(b'v');
    buf.put_i32(body.len() as i32 + 4);
    buf.put_slice(&body);
}

pub fn query(buf: &mut BytesMut, sql: &str) {
    let _ = pgwire::messages::simplequery::Query::new(sql.to_string()).encode(buf);
}

pub fn sync(buf: &mut BytesMut) {
    let _ = Sync::new().encode(buf);
}

/// Flush: the server sends what it has buffered; no reply of its own.
pub fn flush(buf: &mut BytesMut) {
    let _ = Flush::new().encode(buf);
}

pub fn parse(buf: &mut BytesMut, name: &str, query: &str, type_oids: Vec<u32>) {
    let _ = Parse::new(Some(name.to_string()), query.to_string(), type_oids).encode(buf);
}

pub fn close_statement(buf: &mut BytesMut, name: &str) {
    let _ = Close::new(b'S', Some(name.to_string())).encode(buf);
}

pub fn close_portal(buf: &mut BytesMut, name: &str) {
    let _ = Close::new(b'P', Some(name.to_string())).encode(buf);
}

/// Bind with all parameters in text format and text results.
pub fn bind_text(buf: &mut BytesMut, portal: &str, statement: &str, params: &[String]) {
    let params = params.iter().map(|p| Some(Bytes::copy_from_slice(p.as_bytes()))).collect();
    let _ = Bind::new(Some(portal.to_string()), Some(statement.to_string()), vec![], params, vec![])
        .encode(buf);
}

/// Bind with all parameters in text format and all results in binary format.
pub fn bind_text_binary_results(buf: &mut BytesMut, portal: &str, statement: &str, params: &[String]) {
    let params = params.iter().map(|p| Some(Bytes::copy_from_slice(p.as_bytes()))).collect();
    let _ = Bind::new(Some(portal.to_string()), Some(statement.to_string()), vec![], params, vec![1])
        .encode(buf);
}

pub fn execute(buf: &mut BytesMut, portal: &str) {
    let _ = Execute::new(Some(portal.to_string()), 0).encode(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::try_split;

    #[test]
    fn built_messages_frame_correctly() {
        let mut b = BytesMut::new();
        parse(&mut b, "s", "select $1", vec![25]);
        bind_text(&mut b, "p", "s", &["it's \"x\"\n$$".into()]);
        execute(&mut b, "p");
        close_portal(&mut b, "p");
        sync(&mut b);
        ready_for_query(&mut b, b'T');
        let tags: Vec<u8> =
            std::iter::from_fn(|| try_split(&mut b, 1 << 20).unwrap()).map(|f| f.tag).collect();
        assert_eq!(tags, b"PBECSZ");
    }

    #[test]
    fn result_rows_frame_correctly() {
        let mut b = BytesMut::new();
        row_description(&mut b, &[("a", 25), ("b", 20)]);
        data_row(&mut b, &[Some("x".into()), None]);
        command_complete(&mut b, "SHOW");
        empty_query(&mut b);
        let frames: Vec<_> = std::iter::from_fn(|| try_split(&mut b, 1 << 20).unwrap()).collect();
        assert_eq!(frames.iter().map(|f| f.tag).collect::<Vec<u8>>(), b"TDCI");
        // two columns: "x" (length 1) and NULL (-1)
        assert_eq!(frames[1].body(), &[0, 2, 0, 0, 0, 1, b'x', 255, 255, 255, 255]);
    }
}
