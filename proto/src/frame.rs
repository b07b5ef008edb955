//! Data-plane framing: a big-endian u32 length, then that many bytes of a prost message. Raw chunk
//! bytes follow some frames; their length is in the header, never implied by the stream's end.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Headers are small; a peer announcing more is broken or hostile, so the length is checked before
/// anything is allocated for it.
pub const MAX_HEADER: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame header of {0} bytes exceeds the {MAX_HEADER}-byte limit")]
    TooLarge(u32),
    #[error("malformed frame header")]
    Decode(#[from] prost::DecodeError),
    #[error("{}", io_text(.0))]
    Io(#[from] std::io::Error),
}

/// What went wrong under a frame: the stream's early end, or the cause that ended it (a closed
/// or reset connection says so).
fn io_text(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "stream ended inside a frame".into()
    } else {
        format!("reading a frame: {e}")
    }
}

/// Encodes `msg` as one frame.
pub fn encode<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.put_u32(len as u32);
    msg.encode(&mut buf).expect("BytesMut grows as needed");
    buf.freeze()
}

/// Reads one frame from `r` and decodes it.
pub async fn read<M: Message + Default, R: AsyncRead + Unpin>(r: &mut R) -> Result<M, FrameError> {
    let len = r.read_u32().await?;
    if len > MAX_HEADER {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await?;
    Ok(M::decode(buf.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{chunk_request::Op, ChunkRequest, GetChunk};

    #[tokio::test]
    async fn round_trip_and_rejects_garbage() {
        let req = ChunkRequest {
            request_id: "r1".into(),
            op: Some(Op::Get(GetChunk { hash: vec![7; 32], offset: 5, length: 9, reader_checks: true })),
        };
        let bytes = encode(&req);
        let back: ChunkRequest = read(&mut &bytes[..]).await.unwrap();
        assert_eq!(back, req);

        let huge = (MAX_HEADER + 1).to_be_bytes();
        let err = read::<ChunkRequest, _>(&mut &huge[..]).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)));

        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(read::<ChunkRequest, _>(&mut &garbage[..]).await.is_err());

        let short = [0, 0, 0, 9, 1];
        let err = read::<ChunkRequest, _>(&mut &short[..]).await.unwrap_err();
        assert!(matches!(err, FrameError::Io(_)));
        assert_eq!(err.to_string(), "stream ended inside a frame");
    }
}
