//! Wire types and pure data shared by every swarm component.
//!
//! This crate does no I/O and knows nothing of tokio or QUIC. It owns:
//!
//! - [`Digest`] and [`PeerId`]: the identifiers (`sha256:<hex>` in the OCI form).
//! - [`Metainfo`]: a blob's length, piece length and per-piece sha256 hashes, plus the
//!   piece-length policy ([`piece_length_for`]) and the incremental [`PieceHasher`].
//! - [`Bitfield`]: which pieces a peer holds.
//! - [`msg`]: one message enum per direction (peer→tracker, tracker→peer, peer↔peer).
//! - [`units`]: human rates and sizes (`50Mbit/s`, `64MiB`), the one parser of them.
//! - [`codec`]: the only place where bytes become messages and back, with a size cap
//!   on every decode.
//! - `fuzzing` (hidden): the bodies of the fuzz targets for these decoders, shared by
//!   `fuzz/` and the corpus replay test.
//!
//! The protocol is specified in `docs/protocol.md`; [`PROTOCOL_VERSION`] and [`ALPN`]
//! change together whenever a message changes incompatibly.

pub mod bitfield;
pub mod codec;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod metainfo;
pub mod msg;
pub mod units;

pub use bitfield::Bitfield;
pub use ids::{Digest, PeerId};
pub use metainfo::{Layout, Metainfo, PieceHasher, piece_length_for};

/// Version of the wire protocol this build speaks best, sent in every handshake.
/// Version 2 added [`msg::PeerMessage::Hashes`] and [`msg::PeerMessage::Peers`].
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest version this build still speaks (to nodes of the previous release
/// during a rolling upgrade).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// ALPN token of this build's protocol version.
pub const ALPN: &[u8] = b"swarm/2";

/// Every ALPN token this build accepts, best first: a TLS handshake settles on the
/// best version both sides speak (the server's preference order wins).
pub const ALPNS: [&[u8]; 2] = [b"swarm/2", b"swarm/1"];

/// The protocol version an ALPN token stands for, if this build speaks it.
pub fn alpn_version(alpn: &[u8]) -> Option<u32> {
    match alpn {
        b"swarm/2" => Some(2),
        b"swarm/1" => Some(1),
        _ => None,
    }
}

/// Errors from parsing or validating protocol data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest { input: String, reason: &'static str },
    #[error("invalid metainfo: {0}")]
    InvalidMetainfo(String),
    #[error("invalid bitfield: {len} bits do not fit in {bytes} bytes")]
    InvalidBitfield { len: u32, bytes: usize },
    #[error("piece {piece} out of range (blob has {count} pieces)")]
    PieceOutOfRange { piece: u32, count: u32 },
}
