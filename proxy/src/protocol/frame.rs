//! Splitting a byte stream into whole Postgres messages.
//!
//! Every regular message is `tag:u8 len:i32 body`, where `len` counts itself but not the tag. We
//! read the 5-byte header, wait until the whole message is buffered and split it off as a `Frame`
//! that shares the receive buffer's allocation (no copy, no decode). Startup-phase packets have no
//! tag and are read by `read_startup_packet`.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// One complete message: the raw bytes including tag and length.
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: u8,
    pub bytes: Bytes,
}

impl Frame {
    /// The message body (after tag and length).
    #[inline]
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The declared length is below the minimum of 4.
    BadLength(i32),
    /// The declared length is above the configured limit.
    TooLarge { len: usize, max: usize },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadLength(l) => write!(f, "invalid message length {l}"),
            FrameError::TooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the limit of {max} bytes")
            }
        }
    }
}

/// Length of the message at the front of `buf` if its header is complete.
#[inline]
pub fn peek_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len));
    }
    let total = len as usize + 1;
    if total > max {
        return Err(FrameError::TooLarge { len: total, max });
    }
    Ok(Some(total))
}

/// Splits one complete message off the front of `buf`, or returns `None` if more bytes are needed.
/// Reserves room for the rest of a partially received message so the next read can complete it.
#[inline]
pub fn try_split(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    match complete_len(buf, max)? {
        Some(total) => {
            let tag = buf[0];
            Ok(Some(Frame { tag, bytes: buf.split_to(total).freeze() }))
        }
        None => Ok(None),
    }
}

/// The length of the message at the front of `buf` once all of it is buffered, for a reader that
/// handles it in place and then advances past it (no `Frame` split off: the backend side relays
/// every message of every transaction). Like [`try_split`], reserves room for the rest of a
/// partially received message.
#[inline]
pub fn complete_len(buf: &mut BytesMut, max: usize) -> Result<Option<usize>, FrameError> {
    match peek_len(buf, max)? {
        Some(total) if buf.len() >= total => Ok(Some(total)),
        Some(total) => {
            buf.reserve(total - buf.len());
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Largest startup-phase packet accepted (same limit as the Postgres server).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Reads one untagged startup-phase packet (`len:i32 body`) and returns its body.
pub async fn read_startup_packet<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Bytes>> {
    let mut len_buf = [0u8; 4];
    match r.read_exact(&mut len_buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = i32::from_be_bytes(len_buf);
    if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("invalid startup packet length {len}"),
        ));
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    r.read_exact(&mut body).await?;
    Ok(Some(body.freeze()))
}

/// Reads a whole tagged message from `r` into `buf` (used during authentication, before the
/// session's buffered loop takes over).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<Option<Frame>> {
    loop {
        match try_split(buf, max) {
            Ok(Some(f)) => return Ok(Some(f)),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())),
        }
        if r.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Skips a message body in place (used by tests and fuzzing helpers).
pub fn skip(buf: &mut BytesMut, n: usize) {
    buf.advance(n.min(buf.len()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_whole_messages_only() {
        let mut b = BytesMut::from(&b"Q\0\0\0\x09abcd\0S\0\0"[..]);
        let f = try_split(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(), b"abcd\0");
        assert!(try_split(&mut b, 1 << 20).unwrap().is_none());
        b.extend_from_slice(b"\0\x04");
        let f = try_split(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag, b'S');
        assert!(b.is_empty());
    }

    #[test]
    fn rejects_bad_and_huge_lengths() {
        let mut b = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert!(matches!(try_split(&mut b, 100), Err(FrameError::BadLength(-1))));
        let mut b = BytesMut::from(&b"Q\x40\0\0\0"[..]);
        assert!(matches!(try_split(&mut b, 1 << 20), Err(FrameError::TooLarge { .. })));
    }
}
