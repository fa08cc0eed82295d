//! [`NetError`]: everything that can go wrong in the transport, with the address or
//! path involved and, for operator mistakes, the fix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use swarm_proto::codec::CodecError;

use crate::codes;

/// Errors from the transport: tokens, endpoints, the authentication handshake and
/// framed streams.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The cluster token is too short to be a secret.
    #[error(
        "the cluster token is {len} bytes; at least {min} are required \
         (create one with `swarm token > token-file`, then pass --token-file or SWARM_TOKEN)"
    )]
    TokenTooShort { len: usize, min: usize },
    /// The cluster token file could not be read.
    #[error(
        "cannot read the cluster token file {path}: {source} \
         (create it on the master with `swarm token > {path}` and copy it to every node, or set SWARM_TOKEN)"
    )]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The cluster token file holds too short a token.
    #[error(
        "the cluster token in {path} is {len} bytes; at least {min} are required \
         (regenerate it with `swarm token > {path}` and copy it to every node)"
    )]
    TokenFileTooShort { path: PathBuf, len: usize, min: usize },
    /// Binding the UDP socket failed (port in use, address not local, ...).
    #[error("cannot bind a QUIC endpoint to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// [`crate::Endpoint::bind`] was called outside a tokio runtime.
    #[error("a QUIC endpoint needs a tokio runtime; bind it from inside one")]
    NoRuntime,
    /// The endpoint's TLS or transport configuration could not be built.
    #[error("invalid endpoint configuration: {reason}")]
    Config { reason: String },
    /// The local address of the endpoint's socket is unavailable.
    #[error("cannot read the endpoint's local address: {source}")]
    LocalAddr {
        #[source]
        source: std::io::Error,
    },
    /// A connection attempt could not even start (endpoint closed, bad address).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    /// The QUIC/TLS handshake with `addr` failed.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    /// The handshake or the token proof with `addr` did not finish in time.
    #[error("handshake with {addr} did not finish within {after:?} (is a swarm endpoint listening there?)")]
    HandshakeTimeout { addr: SocketAddr, after: Duration },
    /// An incoming handshake was abandoned to make room for newer ones (more than
    /// [`crate::endpoint::MAX_HANDSHAKES`] at once: a flood of connection attempts).
    #[error("handshake with {addr} abandoned: too many handshakes at once")]
    HandshakeEvicted { addr: SocketAddr },
    /// The remote closed the connection because our token proof was wrong: the two
    /// sides hold different cluster tokens.
    #[error(
        "refused by {addr}: cluster token mismatch \
         (every node and the tracker must use the same token file or SWARM_TOKEN)"
    )]
    AuthRejected { addr: SocketAddr },
    /// The remote's token proof was wrong (or missing): it does not hold our cluster
    /// token, so we closed the connection.
    #[error("{addr} failed the cluster token check: it does not hold our cluster token")]
    AuthFailed { addr: SocketAddr },
    /// The connection is gone (closed by either side, reset, timed out).
    #[error("connection lost: {source}")]
    ConnectionLost {
        #[source]
        source: quinn::ConnectionError,
    },
    /// A frame could not be encoded or decoded (oversized, malformed, trailing bytes).
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    /// Reading from a stream failed (for example, the remote reset it).
    #[error("stream read failed: {source}")]
    Read {
        #[source]
        source: quinn::ReadError,
    },
    /// Writing to a stream failed (for example, the remote stopped it).
    #[error("stream write failed: {source}")]
    Write {
        #[source]
        source: quinn::WriteError,
    },
}

impl NetError {
    /// Whether the error means the whole connection is dead (as opposed to one
    /// stream or one message being bad): a caller holding a cached connection
    /// should reconnect.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, NetError::ConnectionLost { .. })
    }

    /// The application error code of a stream reset or stop, or of a connection
    /// closed by the remote, if the error carries one (see [`codes`]).
    pub fn remote_code(&self) -> Option<u32> {
        let code = match self {
            NetError::Read { source: quinn::ReadError::Reset(code) } => *code,
            NetError::Write { source: quinn::WriteError::Stopped(code) } => *code,
            NetError::ConnectionLost { source: quinn::ConnectionError::ApplicationClosed(close) } => close.error_code,
            NetError::Handshake { source: quinn::ConnectionError::ApplicationClosed(close), .. } => close.error_code,
            _ => return None,
        };
        u32::try_from(code.into_inner()).ok()
    }
}

/// Maps a stream read error, telling a dead connection apart from a bad stream.
pub(crate) fn read_error(e: quinn::ReadError) -> NetError {
    match e {
        quinn::ReadError::ConnectionLost(source) => NetError::ConnectionLost { source },
        source => NetError::Read { source },
    }
}

/// Maps a stream write error, telling a dead connection apart from a bad stream.
pub(crate) fn write_error(e: quinn::WriteError) -> NetError {
    match e {
        quinn::WriteError::ConnectionLost(source) => NetError::ConnectionLost { source },
        source => NetError::Write { source },
    }
}

/// Whether a connection error is the remote refusing our token proof.
pub(crate) fn is_auth_rejection(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(close)
        if close.error_code == quinn::VarInt::from_u32(codes::AUTH_FAILED))
}
