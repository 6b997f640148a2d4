//! A minimal simple-query client over a `BackendConn`, for pgtenant's own tools (`doctor`): text
//! rows only, one statement at a time.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::connect::{BackendConn, ConnectError};
use crate::protocol::frame::read_frame;
use crate::protocol::{build, peek};

pub type Row = Vec<Option<String>>;

/// Runs `sql` and returns its rows as text.
pub async fn simple_query(conn: &mut BackendConn, sql: &str) -> Result<Vec<Row>, ConnectError> {
    let io = |e| ConnectError::Io("query".into(), e);
    let mut out = BytesMut::new();
    build::query(&mut out, sql);
    conn.stream.write_all(&out).await.map_err(io)?;
    let mut buf = BytesMut::new();
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let f = read_frame(&mut conn.stream, &mut buf, 1 << 30)
            .await
            .map_err(io)?
            .ok_or_else(|| ConnectError::Protocol("server closed the connection".into()))?;
        match f.tag {
            b'D' => rows.push(data_row(f.body()).ok_or_else(|| ConnectError::Protocol("bad DataRow".into()))?),
            b'E' => {
                let code = peek::error_code(f.body()).map(|c| String::from_utf8_lossy(c).into_owned()).unwrap_or_default();
                let message = f
                    .body()
                    .split(|&b| b == 0)
                    .find(|field| field.first() == Some(&b'M'))
                    .map(|m| String::from_utf8_lossy(&m[1..]).into_owned())
                    .unwrap_or_default();
                error = Some(ConnectError::Server { code, message });
            }
            b'Z' => return error.map_or(Ok(rows), Err),
            _ => {}
        }
    }
}

pub(crate) fn data_row(body: &[u8]) -> Option<Row> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?) as usize;
    let mut rest = &body[2..];
    let mut row = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if len < 0 {
            row.push(None);
        } else {
            let (v, r) = rest.split_at_checked(len as usize)?;
            row.push(Some(String::from_utf8_lossy(v).into_owned()));
            rest = r;
        }
    }
    Some(row)
}
