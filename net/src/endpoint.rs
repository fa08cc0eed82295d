//! [`Endpoint`] (one UDP socket acting as QUIC server and client), [`Incoming`]
//! connections waiting to be authenticated, and the [`EndpointConfig`] knobs.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::auth::{self, AUTH_TIMEOUT};
use crate::token::ClusterToken;
use crate::{NetError, codes, tls};

/// QUIC transport knobs, sized for bulk transfer on a LAN by default.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// A connection with no traffic for this long is dropped.
    pub idle_timeout: Duration,
    /// Interval of keep-alive pings on otherwise quiet connections (zero: none).
    pub keep_alive: Duration,
    /// Bytes a peer may send on one stream ahead of our reading it.
    pub stream_receive_window: u64,
    /// Bytes a peer may send on all streams of a connection ahead of our reading.
    pub receive_window: u64,
    /// Bytes we buffer unacknowledged per connection.
    pub send_window: u64,
    /// Bidirectional streams a peer may have open at once on one connection.
    pub max_concurrent_bidi_streams: u32,
    /// The newest protocol version offered in the TLS handshake (ALPN). Lower it to
    /// behave as a node of an older release (tests of mixed-version clusters do).
    pub max_protocol_version: u32,
}

impl Default for EndpointConfig {
    /// 30 s idle timeout, 5 s keep-alive, 8 MiB per stream, 64 MiB per connection
    /// each way, 512 streams: enough to keep a 1 Gbit/s link with 100 ms RTT full
    /// (12.5 MB in flight) with room for many parallel piece streams.
    fn default() -> Self {
        Self {
            idle_timeout: swarm_core::node::IDLE_TIMEOUT,
            keep_alive: Duration::from_secs(5),
            stream_receive_window: 8 * 1024 * 1024,
            receive_window: 64 * 1024 * 1024,
            send_window: 64 * 1024 * 1024,
            max_concurrent_bidi_streams: 512,
            max_protocol_version: swarm_proto::PROTOCOL_VERSION,
        }
    }
}

/// One UDP socket that both accepts and opens swarm connections. Cheap to clone:
/// clones share the socket.
#[derive(Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    token: Arc<ClusterToken>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint").field("local_addr", &self.inner.local_addr().ok()).finish_non_exhaustive()
    }
}

/// Socket buffer size asked for (the kernel caps it at `net.core.rmem_max` /
/// `wmem_max`). The default (about 200 KiB) overflows when a peer sends a burst of
/// GSO batches: the kernel drops datagrams, QUIC reads them as congestion and backs
/// off, and a loopback transfer crawls at a fraction of the link.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` with large send and receive buffers.
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER) {
        debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER) {
        debug!(error = %e, "cannot enlarge the UDP send buffer");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl Endpoint {
    /// Binds a UDP socket to `addr` and sets up a QUIC endpoint on it with a fresh
    /// self-signed certificate. Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr, token: ClusterToken, config: &EndpointConfig) -> Result<Self, NetError> {
        let runtime = quinn::default_runtime().ok_or(NetError::NoRuntime)?;
        let transport = tls::transport(config)?;

        let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(config.max_protocol_version)?));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(tls::client_crypto(config.max_protocol_version)?));
        client.transport_config(transport);

        let socket = bind_udp(addr).map_err(|source| NetError::Bind { addr, source })?;
        let port = socket.local_addr().map_err(|source| NetError::Bind { addr, source })?.port();
        let reset_key = Arc::new(tls::ResetKey::derive(&token, port));
        let mut endpoint_config = quinn::EndpointConfig::new(reset_key);
        endpoint_config.cid_generator(|| Box::new(tls::RandomCids));
        let mut inner = quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime)
            .map_err(|source| NetError::Bind { addr, source })?;
        inner.set_default_client_config(client);
        debug!(local = ?inner.local_addr().ok(), "bound QUIC endpoint");
        Ok(Self { inner, token: Arc::new(token) })
    }

    /// The address the socket is bound to (with the real port if bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.inner.local_addr().map_err(|source| NetError::LocalAddr { source })
    }

    /// Connects to `addr`: QUIC/TLS handshake, then the mutual token proof. Returns
    /// only once both sides have proved they hold the cluster token; a remote that
    /// refused our proof gives [`NetError::AuthRejected`]. Bounded by
    /// [`AUTH_TIMEOUT`].
    pub async fn connect(&self, addr: SocketAddr) -> Result<quinn::Connection, NetError> {
        let connecting =
            self.inner.connect(addr, tls::SERVER_NAME).map_err(|source| NetError::Connect { addr, source })?;
        let attempt = async {
            let conn = connecting.await.map_err(|source| handshake_error(addr, source))?;
            if let Err(e) = auth::client(&conn, &self.token).await {
                conn.close(quinn::VarInt::from_u32(codes::PROTOCOL_ERROR), b"authentication failed");
                return Err(e);
            }
            Ok(conn)
        };
        tokio::time::timeout(AUTH_TIMEOUT, attempt)
            .await
            .map_err(|_| NetError::HandshakeTimeout { addr, after: AUTH_TIMEOUT })?
    }

    /// The next incoming connection attempt, or `None` once the endpoint is closed.
    /// Call [`Incoming::authenticate`] on it, preferably in its own task.
    pub async fn accept(&self) -> Option<Incoming> {
        let inner = self.inner.accept().await?;
        Some(Incoming { inner, token: self.token.clone() })
    }

    /// Closes every connection with [`codes::SHUTDOWN`] and stops accepting.
    pub fn close(&self) {
        self.inner.close(quinn::VarInt::from_u32(codes::SHUTDOWN), b"shutdown");
    }

    /// Waits until every connection has finished closing (so the close frames went
    /// out).
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await;
    }
}

fn handshake_error(addr: SocketAddr, source: quinn::ConnectionError) -> NetError {
    if crate::error::is_auth_rejection(&source) {
        NetError::AuthRejected { addr }
    } else {
        NetError::Handshake { addr, source }
    }
}

/// A connection attempt that has not been authenticated yet.
pub struct Incoming {
    inner: quinn::Incoming,
    token: Arc<ClusterToken>,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming").field("remote", &self.inner.remote_address()).finish_non_exhaustive()
    }
}

impl Incoming {
    /// The address the attempt came from.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Refuses the attempt before any handshake (the node is at a connection bound):
    /// the client sees its connection refused at once, the node keeps no state.
    pub fn refuse(self) {
        self.inner.refuse();
    }

    /// Server side of the handshake: TLS, then the token proof. A client with the
    /// wrong token gets its connection closed with [`codes::AUTH_FAILED`] and this
    /// returns [`NetError::AuthFailed`] (after logging a warning naming the remote).
    /// Bounded by [`AUTH_TIMEOUT`]; a client too slow to prove itself is closed with
    /// [`codes::PROTOCOL_ERROR`].
    pub async fn authenticate(self) -> Result<quinn::Connection, NetError> {
        let addr = self.inner.remote_address();
        let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
        let timeout = || NetError::HandshakeTimeout { addr, after: AUTH_TIMEOUT };
        let connecting = self.inner.accept().map_err(|source| NetError::Handshake { addr, source })?;
        let conn = tokio::time::timeout_at(deadline, connecting)
            .await
            .map_err(|_| timeout())?
            .map_err(|source| NetError::Handshake { addr, source })?;
        match tokio::time::timeout_at(deadline, auth::server(&conn, &self.token)).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) => {
                // Already closed with AUTH_FAILED on a mismatch (closing twice is a no-op).
                conn.close(quinn::VarInt::from_u32(codes::PROTOCOL_ERROR), b"authentication failed");
                Err(e)
            }
            Err(_) => {
                warn!(%addr, "closing {addr}: no cluster token proof within {AUTH_TIMEOUT:?}");
                conn.close(quinn::VarInt::from_u32(codes::PROTOCOL_ERROR), b"authentication timed out");
                Err(timeout())
            }
        }
    }
}
