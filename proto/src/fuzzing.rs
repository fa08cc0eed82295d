//! Fuzz target bodies for every decoder of this crate.
//!
//! Each function takes arbitrary bytes, feeds them to the decoder the daemon uses
//! (the codec's frame and body decoding, [`Bitfield::from_bytes`], [`Digest`]'s
//! `FromStr`, [`crate::alpn_version`]) and panics when a property that must hold for
//! every input does not: a decoded message re-encodes to at most as many bytes and
//! decodes back to the same value, a metainfo that validates describes pieces that
//! tile the blob, a parsed digest prints back as its input.
//!
//! The same functions are called by the cargo-fuzz targets in `fuzz/fuzz_targets/`
//! and by the replay test `tests/fuzz_corpus.rs`, which runs every committed corpus
//! file through them. Not part of the protocol API.

use bincode::{Decode, Encode};

use crate::codec::{self, MAX_FRAME_LEN, MAX_PEER_FRAME_LEN};
use crate::msg::{PeerMessage, TrackerRequest, TrackerResponse};
use crate::{Bitfield, Digest, Layout, Metainfo};

/// Decodes `data` both as a frame body and as a whole frame (length prefix
/// included) with `limit`, and checks that whatever decodes re-encodes to a frame
/// no longer than its input that decodes to the same value.
fn round_trip<T>(data: &[u8], limit: usize) -> Option<T>
where
    T: Decode<()> + Encode + PartialEq + std::fmt::Debug,
{
    if let Ok(framed) = codec::decode_frame::<T>(data, limit) {
        check_re_encodes(&framed, data.len().saturating_sub(4), limit);
    }
    let msg = codec::decode_body::<T>(data, limit).ok()?;
    check_re_encodes(&msg, data.len(), limit);
    Some(msg)
}

fn check_re_encodes<T>(msg: &T, body_len: usize, limit: usize)
where
    T: Decode<()> + Encode + PartialEq + std::fmt::Debug,
{
    let frame = match codec::encode_frame(msg) {
        Ok(frame) => frame,
        Err(e) => panic!("decoded {msg:?} does not encode: {e}"),
    };
    // Bincode's integers re-encode in their shortest form: never longer than read.
    assert!(frame.len() - 4 <= body_len, "{msg:?} re-encodes to {} bytes from {body_len}", frame.len() - 4);
    match codec::decode_frame::<T>(&frame, limit) {
        Ok(again) => assert_eq!(&again, msg, "re-encoded message decodes to another value"),
        Err(e) => panic!("re-encoded {msg:?} does not decode: {e}"),
    }
}

/// Checks what the daemon relies on once a metainfo or layout passed `validate`.
fn check_layout(layout: &Layout) {
    if layout.validate().is_err() {
        return;
    }
    let count = layout.piece_count();
    assert!((1..=crate::metainfo::MAX_PIECES).contains(&count), "{layout:?} has {count} pieces");
    let last = count - 1;
    assert_eq!(layout.piece_offset(last) + u64::from(layout.piece_len(last)), layout.length, "{layout:?}");
    assert!(layout.piece_len(last) >= 1 && layout.piece_len(last) <= layout.piece_length, "{layout:?}");
    if last > 0 {
        assert_eq!(layout.piece_len(0), layout.piece_length, "{layout:?}");
    }
    assert_eq!(layout.piece_len(count), 0, "{layout:?}: a piece past the end has bytes");
    assert_eq!(layout.piece_at(layout.piece_offset(last)), last, "{layout:?}");
    assert_eq!(layout.piece_at(layout.length - 1), last, "{layout:?}");
}

fn check_metainfo(m: &Metainfo) {
    check_layout(&m.layout());
    if m.validate().is_ok() {
        assert_eq!(m.piece_hashes.len() as u64, u64::from(m.piece_count()), "{m:?}");
        assert!(!m.verify_piece(m.piece_count(), &[]), "a piece past the end verified");
    }
}

fn check_bitfield(b: &Bitfield) {
    assert!(b.count() <= b.len(), "{b:?}");
    assert_eq!(b.as_bytes().len(), (b.len() as usize).div_ceil(8), "{b:?}");
    assert_eq!(b.ones().count() as u32, b.count(), "{b:?}");
    assert_eq!(b.zeros().count() as u32, b.len() - b.count(), "{b:?}");
    assert!(!b.get(b.len()), "{b:?}: a bit past the end is set");
    match Bitfield::from_bytes(b.len(), b.as_bytes()) {
        Ok(again) => assert_eq!(&again, b, "bitfield bytes read back differently"),
        Err(e) => panic!("{b:?} does not read back from its own bytes: {e}"),
    }
}

/// Peer ↔ peer messages, with the peer-stream limit.
pub fn peer_message(data: &[u8]) {
    match round_trip::<PeerMessage>(data, MAX_PEER_FRAME_LEN) {
        Some(PeerMessage::Bitfield(b)) => check_bitfield(&b),
        Some(PeerMessage::Hashes { layout, .. }) => check_layout(&layout),
        _ => {}
    }
}

/// Peer → tracker requests, with the tracker's frame limit.
pub fn tracker_request(data: &[u8]) {
    match round_trip::<TrackerRequest>(data, MAX_FRAME_LEN) {
        Some(TrackerRequest::Register { metainfo }) => check_metainfo(&metainfo),
        Some(TrackerRequest::PublishHashes { layout, .. }) => check_layout(&layout),
        Some(TrackerRequest::AnnounceStore(store)) => store.metainfo.iter().for_each(check_metainfo),
        _ => {}
    }
}

/// Tracker → peer responses, with the client's frame limit.
pub fn tracker_response(data: &[u8]) {
    match round_trip::<TrackerResponse>(data, MAX_FRAME_LEN) {
        Some(TrackerResponse::Metainfo(m)) => check_metainfo(&m),
        Some(TrackerResponse::Hashes { layout, .. }) => check_layout(&layout),
        _ => {}
    }
}

/// [`Metainfo`] and [`Layout`] bodies (the store's layout file is a [`Layout`] frame
/// read with the peer-stream limit), then their validation.
pub fn metainfo(data: &[u8]) {
    if let Some(m) = round_trip::<Metainfo>(data, MAX_FRAME_LEN) {
        check_metainfo(&m);
    }
    if let Some(layout) = round_trip::<Layout>(data, MAX_PEER_FRAME_LEN) {
        check_layout(&layout);
    }
}

/// [`Bitfield::from_bytes`] (bit count from the first 4 bytes, the rest as the
/// bitfield's bytes) and a bitfield's own bincode decoding.
pub fn bitfield(data: &[u8]) {
    if let Some((len, bytes)) = data.split_first_chunk::<4>()
        && let Ok(b) = Bitfield::from_bytes(u32::from_le_bytes(*len), bytes)
    {
        check_bitfield(&b);
    }
    if let Some(b) = round_trip::<Bitfield>(data, MAX_PEER_FRAME_LEN) {
        check_bitfield(&b);
    }
}

/// The text identifiers: [`Digest`]'s `sha256:<hex>` form and the ALPN tokens.
pub fn digest(data: &[u8]) {
    if let Some(version) = crate::alpn_version(data) {
        assert!((crate::MIN_PROTOCOL_VERSION..=crate::PROTOCOL_VERSION).contains(&version), "{data:?}");
        assert!(crate::ALPNS.contains(&data), "{data:?} is not an advertised ALPN");
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = text.parse::<Digest>() {
        assert_eq!(d.to_string(), text, "a digest does not print as the text it was read from");
        assert_eq!(d.hex(), text["sha256:".len()..], "{text}");
    }
}

/// A fuzz target: the name of its cargo-fuzz target and corpus directory, and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target of this crate.
pub const TARGETS: &[Target] = &[
    ("peer_message", peer_message),
    ("tracker_request", tracker_request),
    ("tracker_response", tracker_response),
    ("metainfo", metainfo),
    ("bitfield", bitfield),
    ("digest", digest),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::RejectReason;

    #[test]
    fn targets_accept_valid_and_garbage_input() {
        let reject =
            codec::encode_frame(&PeerMessage::Reject { piece: 3, reason: RejectReason::Missing }).expect("encode");
        peer_message(&reject);
        peer_message(&reject[4..]);
        let text = Digest::of(b"x").to_string();
        digest(text.as_bytes());
        digest(b"swarm/2");
        for (_, target) in TARGETS {
            target(&[]);
            target(&[0xff; 64]);
        }
    }
}
