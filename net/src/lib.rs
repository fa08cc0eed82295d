//! swarm's transport: QUIC endpoints whose every connection is authenticated with the
//! cluster token, and framed messages on QUIC streams.
//!
//! Modules:
//!
//! - `token`: [`ClusterToken`], the shared secret, and how it is loaded.
//! - `tls`: certificates, rustls and QUIC configuration.
//! - `auth`: the token proof exchanged on every new connection.
//! - `endpoint`: [`Endpoint`], [`Incoming`], [`EndpointConfig`].
//! - `framing`: [`write_msg`] and [`read_msg`] around `swarm_proto::codec`.
//! - [`refusals`]: [`refusals::RefusalLog`], the per-source limiter of refusal log lines.
//! - `probe` (feature `probe`, tests only): raw connections that skip or forge the
//!   token proof, for tests that play an attacker.
//! - `error`: [`NetError`]; [`codes`] holds the QUIC application error codes.
//!
//! # Security design
//!
//! Who may talk to whom is decided by one shared secret, the **cluster token**
//! (at least 16 bytes; `swarm token` makes 32 random ones). There is no CA and no
//! per-node identity: holding the token is what makes a node part of the cluster.
//!
//! **TLS.** Every connection is QUIC with TLS 1.3 only (ring provider). ALPN carries
//! the protocol version: both sides offer [`swarm_proto::ALPNS`] (`swarm/2`, then
//! `swarm/1`) and the handshake settles on the best one both speak, which
//! [`protocol_version`] reads back. Each [`Endpoint`] generates its own self-signed
//! ECDSA P-256 certificate when it binds (subject alternative name `swarm`). The
//! client accepts any end-entity certificate, since identity comes from the token, but
//! still verifies the TLS 1.3 `CertificateVerify` signature with the provider's
//! algorithms, so the handshake transcript is authentic. No client certificates.
//! 0-RTT is disabled: nothing may be sent before the token proof.
//!
//! **Token proof, bound to the session.** Right after the handshake both sides derive
//! `ekm` = 32 bytes of TLS keying material exported with label
//! `EXPORTER-swarm-auth/1` and an empty context (RFC 5705 / RFC 8446 section 7.5).
//! Then:
//!
//! 1. The client opens the connection's first bidirectional stream and writes
//!    `HMAC-SHA256(token, "swarm/1 client" || ekm)` (32 bytes), then finishes its side.
//! 2. The server reads 32 bytes (within 10 s, [`AUTH_TIMEOUT`]) and verifies them in
//!    constant time. On a mismatch (or a short proof) it logs
//!    `refusing <addr>: cluster token mismatch` (once per source IP per minute, see
//!    [`refusals`]) and closes the connection with
//!    [`codes::AUTH_FAILED`] and reason `cluster token mismatch`; the client reports
//!    [`NetError::AuthRejected`]. Too slow a proof closes with
//!    [`codes::PROTOCOL_ERROR`].
//! 3. On success the server writes `HMAC-SHA256(token, "swarm/1 server" || ekm)` and
//!    finishes the stream; the client verifies it the same way and, on a mismatch,
//!    closes with [`codes::AUTH_FAILED`] ([`NetError::AuthFailed`]).
//!
//! Only then do [`Endpoint::connect`] and [`Incoming::authenticate`] return the
//! connection; the auth stream is never used again. Properties:
//!
//! - A man in the middle without the token terminates two TLS sessions with two
//!   different exporter secrets and cannot compute a proof for either.
//! - The exporter secret differs per TLS session, so a proof recorded on one
//!   connection is worthless on another (no replay).
//! - The role labels differ, so a server cannot reflect the client's proof back (and
//!   vice versa).
//! - The token never crosses the wire, not even encrypted.
//! - The client proves first, so a server never reveals a proof to an
//!   unauthenticated client; a client does reveal one to any server it dials, which
//!   is harmless since a proof is only good for that one session.
//!
//! **Stateless resets survive restarts.** The QUIC stateless-reset key is derived
//! from the token and the endpoint's UDP port (`HMAC(token, "swarm/1 stateless reset"
//! || port)`) instead of being random. When a node or the tracker restarts on the same
//! port, packets its peers send on their old connections are answered with a reset
//! they recognise, so they notice at once and reconnect instead of waiting out the
//! idle timeout. (For the same reason connection IDs are plain random bytes that no
//! endpoint drops as "not mine".) The cost: the reset key is shared by every endpoint of the cluster
//! bound to the same port, so an on-path attacker who can redirect a connection's
//! packets to another node could get that connection reset; an attacker on the path
//! can drop the packets anyway, and nobody without the token can forge a reset.
//!
//! **Transport.** Flow-control windows, idle timeout, keep-alive and the stream
//! limit come from [`EndpointConfig`]. Only bidirectional streams are used; a peer may
//! open no unidirectional ones. Every frame read is size-checked before any
//! allocation ([`read_msg`]).

mod auth;
mod endpoint;
mod error;
mod framing;
#[cfg(any(test, feature = "probe"))]
pub mod probe;
pub mod refusals;
mod tls;
mod token;

pub use auth::AUTH_TIMEOUT;
pub use endpoint::{
    CLOSING_BEFORE_HANDSHAKE, Endpoint, EndpointConfig, INCOMING_BUFFER, INCOMING_BUFFER_TOTAL, Incoming,
    MAX_HANDSHAKES, MAX_INCOMING, MAX_UNPROVEN_STATES, MAX_UNPROVEN_STATES_NEW_ADDRESS, STREAMS_BEFORE_PROOF,
};
pub use error::NetError;
pub use framing::{read_msg, write_msg};
pub use token::{ClusterToken, MIN_TOKEN_LEN};

/// The protocol version a connection's TLS handshake settled on (its ALPN), or
/// [`swarm_proto::MIN_PROTOCOL_VERSION`] if it names none this build knows.
pub fn protocol_version(conn: &quinn::Connection) -> u32 {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol.as_deref().and_then(swarm_proto::alpn_version))
        .unwrap_or(swarm_proto::MIN_PROTOCOL_VERSION)
}

/// QUIC application error codes, used both to close connections and to reset or
/// stop streams. Values are part of the wire protocol: never renumber.
pub mod codes {
    /// Orderly shutdown (also what QUIC reports when a connection is simply dropped).
    pub const SHUTDOWN: u32 = 0;
    /// The remote's cluster token proof was wrong or missing.
    pub const AUTH_FAILED: u32 = 1;
    /// The remote broke the protocol (malformed or oversized frame, unexpected
    /// message, authentication timeout).
    pub const PROTOCOL_ERROR: u32 = 2;
    /// The remote sent too many pieces that failed verification.
    pub const BAD_PIECES: u32 = 3;
    /// The connection's handshake named a blob this side does not serve.
    pub const UNKNOWN_BLOB: u32 = 4;
}

#[cfg(test)]
mod tests;
