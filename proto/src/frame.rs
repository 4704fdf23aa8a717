//! Framing: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! The length is checked against [`MAX_FRAME_LEN`] before anything is allocated, so a peer
//! cannot make the supervisor reserve memory by announcing a huge frame. Blocking helpers serve
//! `tenctl`; the `tokio` feature adds async ones for the daemons.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest frame either side accepts: 1 MiB. Route snapshots are sent in chunks below it.
pub const MAX_FRAME_LEN: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes is over the {MAX_FRAME_LEN} byte limit")]
    TooLarge { len: usize },
    #[error("undecodable message: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Encodes one message with its length prefix.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, message).map_err(FrameError::Decode)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len })?;
    buf[..4].copy_from_slice(&prefix.to_be_bytes());
    Ok(buf)
}

/// Decodes a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Decode)
}

fn checked_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

/// Whether a length prefix is whole after a read.
enum PrefixRead {
    Partial,
    Done,
}

/// Accounts for one read of `n` bytes into the length prefix. The stream ending before the
/// first byte is a clean close between frames (`Closed`); ending after 1 to 3 bytes is a
/// truncated frame, an `UnexpectedEof` I/O error, so a peer cut off mid-header does not look
/// like an orderly close.
fn advance_prefix(filled: &mut usize, n: usize) -> Result<PrefixRead, FrameError> {
    if n == 0 {
        if *filled == 0 {
            return Err(FrameError::Closed);
        }
        return Err(FrameError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "connection closed inside a frame's length prefix ({filled} of 4 bytes)",
                filled = *filled
            ),
        )));
    }
    *filled += n;
    Ok(if *filled == 4 {
        PrefixRead::Done
    } else {
        PrefixRead::Partial
    })
}

/// Names the frame when the stream ends inside its body.
fn truncated_body(len: usize) -> impl FnOnce(io::Error) -> FrameError {
    move |e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed inside a frame of {len} bytes"),
            ))
        } else {
            FrameError::Io(e)
        }
    }
}

/// Writes one message (blocking).
pub fn write_message<W: Write, T: Serialize>(w: &mut W, message: &T) -> Result<(), FrameError> {
    w.write_all(&encode(message)?)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame body (blocking). `Closed` on a clean end of stream between frames; a
/// stream ending inside a frame (its prefix or its body) is an `UnexpectedEof` I/O error.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut filled = 0;
    loop {
        let n = match r.read(&mut prefix[filled..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if let PrefixRead::Done = advance_prefix(&mut filled, n)? {
            break;
        }
    }
    let len = checked_len(prefix)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(truncated_body(len))?;
    Ok(body)
}

/// Reads and decodes one message (blocking).
pub fn read_message<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    decode(&read_frame(r)?)
}

#[cfg(feature = "tokio")]
mod async_io {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Writes one message.
    pub async fn write_message_async<W: AsyncWrite + Unpin, T: Serialize>(
        w: &mut W,
        message: &T,
    ) -> Result<(), FrameError> {
        w.write_all(&encode(message)?).await?;
        w.flush().await?;
        Ok(())
    }

    /// Reads one frame body. `Closed` on a clean end of stream between frames; a stream
    /// ending inside a frame (its prefix or its body) is an `UnexpectedEof` I/O error.
    /// Cancel-safe only between frames: drop a half-read stream, do not resume it.
    pub async fn read_frame_async<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameError> {
        let mut prefix = [0u8; 4];
        let mut filled = 0;
        loop {
            let n = match r.read(&mut prefix[filled..]).await {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if let PrefixRead::Done = advance_prefix(&mut filled, n)? {
                break;
            }
        }
        let len = checked_len(prefix)?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await.map_err(truncated_body(len))?;
        Ok(body)
    }

    /// Reads and decodes one message.
    pub async fn read_message_async<R: AsyncRead + Unpin, T: DeserializeOwned>(
        r: &mut R,
    ) -> Result<T, FrameError> {
        decode(&read_frame_async(r).await?)
    }
}

#[cfg(feature = "tokio")]
pub use async_io::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{Request, Response};

    #[test]
    fn oversized_prefix_is_refused_before_allocation() {
        let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        match read_frame(&mut input) {
            Err(FrameError::TooLarge { len }) => assert_eq!(len, u32::MAX as usize),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn clean_eof_between_frames_is_closed_and_truncation_is_io() {
        let mut empty: &[u8] = &[];
        assert!(matches!(read_frame(&mut empty), Err(FrameError::Closed)));
        let mut truncated: &[u8] = &[0, 0, 0, 10, b'{'];
        assert!(matches!(read_frame(&mut truncated), Err(FrameError::Io(_))));
    }

    #[test]
    fn round_trip() {
        let req = Request::List {
            query: Default::default(),
        };
        let bytes = encode(&req).expect("encode");
        let mut r: &[u8] = &bytes;
        let back: Request = read_message(&mut r).expect("decode");
        assert_eq!(back, req);
        let resp = Response::Ok;
        let bytes = encode(&resp).expect("encode");
        let mut r: &[u8] = &bytes;
        let back: Response = read_message(&mut r).expect("decode");
        assert_eq!(back, resp);
    }
}
