//! The one place where messages become bytes and back.
//!
//! Framing: every message is a 4-byte big-endian length followed by that many bytes of
//! bincode 2 (standard configuration: little-endian, variable-length integers). Raw piece
//! data is not framed: it follows a [`crate::msg::PeerMessage::Piece`] header.
//!
//! Every decode is bounded: a frame longer than the caller's limit is refused before
//! any allocation, and bincode itself is configured with the same limit so a length
//! field inside a frame cannot claim more memory than the frame holds.

use bincode::{Decode, Encode};

/// Largest frame of any kind (enough for the metainfo of a blob at the piece limit).
pub const MAX_FRAME_LEN: usize = 40 * 1024 * 1024;
/// Largest frame on a peer control or piece stream (a bitfield of the piece limit).
pub const MAX_PEER_FRAME_LEN: usize = 256 * 1024;

/// Errors from encoding or decoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLong { len: usize, limit: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{extra} trailing bytes after the message")]
    Trailing { extra: usize },
    #[error("cannot encode message: {0}")]
    Encode(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Encodes `msg` as a complete frame: length prefix plus body.
pub fn encode_frame<T: Encode>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![0u8; 4];
    bincode::encode_into_std_write(msg, &mut out, config()).map_err(|e| CodecError::Encode(e.to_string()))?;
    let body = out.len() - 4;
    if body > MAX_FRAME_LEN {
        return Err(CodecError::TooLong { len: body, limit: MAX_FRAME_LEN });
    }
    out[..4].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(out)
}

/// Reads a frame's length prefix and checks it against `limit`.
pub fn frame_len(header: [u8; 4], limit: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit.min(MAX_FRAME_LEN) {
        return Err(CodecError::TooLong { len, limit: limit.min(MAX_FRAME_LEN) });
    }
    Ok(len)
}

/// Decodes one frame body (without its length prefix). The body must hold exactly
/// one message.
pub fn decode_body<T: Decode<()>>(body: &[u8], limit: usize) -> Result<T, CodecError> {
    if body.len() > limit.min(MAX_FRAME_LEN) {
        return Err(CodecError::TooLong { len: body.len(), limit: limit.min(MAX_FRAME_LEN) });
    }
    let (msg, used) = bincode::decode_from_slice(body, config()).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::Trailing { extra: body.len() - used });
    }
    Ok(msg)
}

/// Decodes a complete frame (length prefix plus body) held in memory.
pub fn decode_frame<T: Decode<()>>(frame: &[u8], limit: usize) -> Result<T, CodecError> {
    let header: [u8; 4] = frame
        .get(..4)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| CodecError::Malformed("frame shorter than its length prefix".into()))?;
    let len = frame_len(header, limit)?;
    let body = &frame[4..];
    if body.len() < len {
        return Err(CodecError::Malformed(format!("frame announces {len} bytes but holds {}", body.len())));
    }
    if body.len() > len {
        return Err(CodecError::Trailing { extra: body.len() - len });
    }
    decode_body(body, limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::*;
    use crate::{Bitfield, Digest, Metainfo, PeerId};
    use proptest::prelude::*;

    fn sample_messages() -> (Vec<TrackerRequest>, Vec<TrackerResponse>, Vec<PeerMessage>) {
        let blob = Digest::of(b"blob");
        let peer_id = PeerId([7; 16]);
        let metainfo = Metainfo {
            digest: blob,
            length: 600_000,
            piece_length: 1 << 18,
            piece_hashes: vec![[1; 32], [2; 32], [3; 32]],
        };
        let mut bits = Bitfield::new(3);
        bits.set(1, true);
        let announce = Announce {
            peer_id,
            blob,
            listen_port: 7000,
            advertise: Some("198.18.0.2:7000".parse().expect("addr")),
            zone: "rack-a".into(),
            have: 1,
            complete: false,
            num_want: 50,
        };
        (
            vec![
                TrackerRequest::Register { metainfo: metainfo.clone() },
                TrackerRequest::GetMetainfo { blob },
                TrackerRequest::Announce(announce),
                TrackerRequest::Leave { peer_id, blob },
                TrackerRequest::AcquireLease { peer_id, blob },
                TrackerRequest::PublishHashes {
                    peer_id,
                    layout: crate::Layout { digest: blob, length: 600_000, piece_length: 1 << 18 },
                    first: 1,
                    hashes: vec![[4; 32]],
                },
                TrackerRequest::ReleaseLease { peer_id, blob, failed: Some("upstream said 401".into()) },
                TrackerRequest::GetHashes { blob, first: 0 },
            ],
            vec![
                TrackerResponse::Registered,
                TrackerResponse::Metainfo(metainfo),
                TrackerResponse::Peers {
                    peers: vec![PeerInfo {
                        peer_id,
                        addr: "[::1]:9".parse().expect("addr"),
                        zone: String::new(),
                        have: 3,
                        complete: true,
                    }],
                    interval_secs: 30,
                },
                TrackerResponse::Left,
                TrackerResponse::Error { code: TrackerErrorCode::UnknownBlob, message: "no".into() },
                TrackerResponse::Lease(LeaseReply::Granted { ttl_secs: 10, resume_from: 3 }),
                TrackerResponse::Lease(LeaseReply::HeldBy { holder: peer_id }),
                TrackerResponse::Lease(LeaseReply::NotNeeded),
                TrackerResponse::Lease(LeaseReply::Failed { reason: "401".into() }),
                TrackerResponse::Hashes {
                    layout: crate::Layout { digest: blob, length: 600_000, piece_length: 1 << 18 },
                    first: 0,
                    hashes: vec![[1; 32], [2; 32]],
                    complete: false,
                },
            ],
            vec![
                PeerMessage::Handshake { version: crate::PROTOCOL_VERSION, peer_id, blob },
                PeerMessage::Bitfield(bits),
                PeerMessage::Have { piece: 2 },
                PeerMessage::Request { piece: 0 },
                PeerMessage::Piece { piece: 0, length: 1 << 18 },
                PeerMessage::Reject { piece: 1, reason: RejectReason::Busy },
                PeerMessage::Hashes {
                    layout: crate::Layout { digest: blob, length: 600_000, piece_length: 1 << 18 },
                    first: 1,
                    hashes: vec![[3; 32]],
                },
                PeerMessage::Peers {
                    peers: vec![PeerInfo {
                        peer_id,
                        addr: "198.18.0.2:7001".parse().expect("addr"),
                        zone: "a".into(),
                        have: 3,
                        complete: false,
                    }],
                },
            ],
        )
    }

    #[test]
    fn the_largest_version_2_peer_messages_fit_a_peer_frame() {
        let blob = Digest([9; 32]);
        let hashes = PeerMessage::Hashes {
            layout: crate::Layout { digest: blob, length: u64::MAX, piece_length: u32::MAX },
            first: u32::MAX,
            hashes: vec![[0xff; 32]; crate::msg::MAX_HASHES_PER_MESSAGE],
        };
        let peer = PeerInfo {
            peer_id: PeerId([0xff; 16]),
            addr: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().expect("addr"),
            zone: "z".repeat(crate::msg::MAX_ZONE_LEN),
            have: u32::MAX,
            complete: true,
        };
        let peers = PeerMessage::Peers { peers: vec![peer; crate::msg::MAX_PEX_PEERS] };
        for m in [hashes, peers] {
            let f = encode_frame(&m).expect("encode");
            assert!(f.len() <= MAX_PEER_FRAME_LEN, "{} bytes", f.len());
            assert_eq!(decode_frame::<PeerMessage>(&f, MAX_PEER_FRAME_LEN).expect("decode"), m);
        }
    }

    const V1_HANDSHAKE: &str = "00000032 00 01 07070707070707070707070707070707 \
        0909090909090909090909090909090909090909090909090909090909090909";
    const V1_BITFIELD: &str = "00000005 01 0a 02 2000";

    /// Frames of every version-1 peer message, recorded from the release that spoke
    /// only version 1: this build must encode them byte for byte the same, so a node
    /// of the previous release still understands what it is sent on a `swarm/1`
    /// connection.
    #[test]
    fn version_1_peer_frames_are_unchanged() {
        let peer_id = PeerId([7; 16]);
        let blob = Digest([9; 32]);
        let mut bits = crate::Bitfield::new(10);
        bits.set(2, true);
        let recorded: [(PeerMessage, &str); 6] = [
            (PeerMessage::Handshake { version: 1, peer_id, blob }, V1_HANDSHAKE),
            (PeerMessage::Bitfield(bits), V1_BITFIELD),
            (PeerMessage::Have { piece: 2 }, "0000000202 02"),
            (PeerMessage::Request { piece: 700 }, "0000000403 fbbc02"),
            (PeerMessage::Piece { piece: 0, length: 1 << 18 }, "00000007 04 00 fc00000400"),
            (PeerMessage::Reject { piece: 1, reason: RejectReason::Busy }, "0000000305 0100"),
        ];
        for (m, hex) in recorded {
            let hex: String = hex.split_whitespace().collect();
            let f = encode_frame(&m).expect("encode");
            let got: String = f.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(got, hex, "{m:?}");
            assert_eq!(decode_frame::<PeerMessage>(&f, MAX_PEER_FRAME_LEN).expect("decode"), m);
        }
    }

    #[test]
    fn every_message_round_trips() {
        let (reqs, resps, peers) = sample_messages();
        for m in reqs {
            let f = encode_frame(&m).expect("encode");
            assert_eq!(decode_frame::<TrackerRequest>(&f, MAX_FRAME_LEN).expect("decode"), m);
        }
        for m in resps {
            let f = encode_frame(&m).expect("encode");
            assert_eq!(decode_frame::<TrackerResponse>(&f, MAX_FRAME_LEN).expect("decode"), m);
        }
        for m in peers {
            let f = encode_frame(&m).expect("encode");
            assert_eq!(decode_frame::<PeerMessage>(&f, MAX_PEER_FRAME_LEN).expect("decode"), m);
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_decoding() {
        assert!(matches!(frame_len(u32::MAX.to_be_bytes(), MAX_PEER_FRAME_LEN), Err(CodecError::TooLong { .. })));
        let big = TrackerRequest::Register {
            metainfo: Metainfo {
                digest: Digest([0; 32]),
                length: 1,
                piece_length: 1,
                piece_hashes: vec![[0; 32]; 10_000],
            },
        };
        let f = encode_frame(&big).expect("encode");
        assert!(matches!(decode_frame::<TrackerRequest>(&f, 1024), Err(CodecError::TooLong { .. })));
    }

    #[test]
    fn a_length_field_cannot_claim_more_than_the_limit() {
        // A Register whose hash vector claims 2^40 entries in a tiny frame.
        let mut body = vec![0u8]; // variant 0
        body.extend_from_slice(&[0u8; 32]); // digest
        body.push(1); // length
        body.push(1); // piece_length
        body.push(253); // u64 varint marker
        body.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode_body::<TrackerRequest>(&body, MAX_FRAME_LEN).is_err());
    }

    proptest! {
        #[test]
        fn truncated_frames_never_panic(cut in 0usize..200, which in 0usize..24) {
            let (reqs, resps, peers) = sample_messages();
            let frames: Vec<Vec<u8>> = reqs.iter().map(|m| encode_frame(m).expect("e"))
                .chain(resps.iter().map(|m| encode_frame(m).expect("e")))
                .chain(peers.iter().map(|m| encode_frame(m).expect("e")))
                .collect();
            let f = &frames[which % frames.len()];
            let cut = cut.min(f.len().saturating_sub(1));
            let truncated = &f[..cut];
            prop_assert!(decode_frame::<TrackerRequest>(truncated, MAX_FRAME_LEN).is_err());
            prop_assert!(decode_frame::<TrackerResponse>(truncated, MAX_FRAME_LEN).is_err());
            prop_assert!(decode_frame::<PeerMessage>(truncated, MAX_PEER_FRAME_LEN).is_err());
        }

        #[test]
        fn bit_flipped_frames_never_panic(which in 0usize..24, flips in proptest::collection::vec((0usize..400, 0u8..8), 1..6)) {
            let (reqs, resps, peers) = sample_messages();
            let frames: Vec<Vec<u8>> = reqs.iter().map(|m| encode_frame(m).expect("e"))
                .chain(resps.iter().map(|m| encode_frame(m).expect("e")))
                .chain(peers.iter().map(|m| encode_frame(m).expect("e")))
                .collect();
            let mut f = frames[which % frames.len()].clone();
            for (pos, bit) in flips {
                let n = f.len();
                f[pos % n] ^= 1 << bit;
            }
            let _ = decode_frame::<TrackerRequest>(&f, MAX_FRAME_LEN);
            let _ = decode_frame::<TrackerResponse>(&f, MAX_FRAME_LEN);
            let _ = decode_frame::<PeerMessage>(&f, MAX_PEER_FRAME_LEN);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_body::<TrackerRequest>(&bytes, MAX_FRAME_LEN);
            let _ = decode_body::<TrackerResponse>(&bytes, MAX_FRAME_LEN);
            let _ = decode_body::<PeerMessage>(&bytes, MAX_PEER_FRAME_LEN);
        }
    }
}
