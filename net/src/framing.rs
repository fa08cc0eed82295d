//! Async reading and writing of length-prefixed frames on QUIC streams. The byte
//! format is `swarm_proto::codec`'s; this module only moves the bytes.

use bincode::{Decode, Encode};
use swarm_proto::codec;

use crate::NetError;
use crate::error::{read_error, write_error};

/// Most bytes of a frame body allocated before they have arrived, so a length prefix
/// near the limit costs memory only as the data really comes in.
const PREALLOC_LIMIT: usize = 64 * 1024;

/// Encodes `msg` as one frame and writes it. Does not finish the stream.
pub async fn write_msg<T: Encode>(send: &mut quinn::SendStream, msg: &T) -> Result<(), NetError> {
    let frame = codec::encode_frame(msg)?;
    send.write_all(&frame).await.map_err(write_error)
}

/// Reads one frame of at most `limit` body bytes and decodes it.
///
/// Returns `Ok(None)` on a clean end of stream before any byte of a frame; a stream
/// that ends inside a frame is [`NetError::Truncated`]. The length prefix is checked
/// against `limit` before anything is allocated.
pub async fn read_msg<T: Decode<()>>(recv: &mut quinn::RecvStream, limit: usize) -> Result<Option<T>, NetError> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    while filled < header.len() {
        match recv.read(&mut header[filled..]).await.map_err(read_error)? {
            Some(n) => filled += n,
            None if filled == 0 => return Ok(None),
            None => return Err(NetError::Truncated { expected: header.len(), got: filled }),
        }
    }
    let len = codec::frame_len(header, limit)?;
    let mut body = Vec::with_capacity(len.min(PREALLOC_LIMIT));
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await.map_err(read_error)? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => return Err(NetError::Truncated { expected: len, got: body.len() }),
        }
    }
    Ok(Some(codec::decode_body(&body, limit)?))
}
