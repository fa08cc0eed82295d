//! Raw QUIC connections that speak swarm's TLS but skip, forge or replay the token
//! proof: the attacker's side, for tests (this crate's and the end-to-end tests with
//! real tracker and agent processes). Built only for tests or with the `probe`
//! feature; the `swarm` binary never contains it.
//!
//! A [`raw_endpoint`] completes the TLS handshake with any swarm endpoint (the
//! client accepts any certificate, as swarm's does) and then leaves the proof to the
//! caller: [`client_proof`] computes an honest one for a session, [`send_proof`]
//! sends any bytes as the proof and returns the server's answer or how it closed the
//! connection, [`is_auth_failed`] tells a token-mismatch close.

use std::net::SocketAddr;
use std::sync::Arc;

pub use quinn::{Connection, ConnectionError, Endpoint as RawEndpoint};

use crate::auth::{CLIENT_ROLE, SERVER_ROLE};
use crate::{ClusterToken, EndpointConfig, NetError, codes, tls};

pub use crate::auth::{PROOF_LEN, session_secret};

/// A plain quinn endpoint on 127.0.0.1 (any port) with swarm's TLS and transport
/// configs but no token proof; with `server`, it also accepts connections.
pub fn raw_endpoint(server: bool) -> Result<quinn::Endpoint, NetError> {
    raw_endpoint_on(SocketAddr::from(([127, 0, 0, 1], 0)), server)
}

/// Like [`raw_endpoint`], bound to `addr`.
pub fn raw_endpoint_on(addr: SocketAddr, server: bool) -> Result<quinn::Endpoint, NetError> {
    let transport = tls::transport(&EndpointConfig::default())?;
    let server_config = if server {
        let mut s = quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(swarm_proto::PROTOCOL_VERSION)?));
        s.transport_config(transport.clone());
        Some(s)
    } else {
        None
    };
    let socket = std::net::UdpSocket::bind(addr).map_err(|source| NetError::Bind { addr, source })?;
    let runtime = quinn::default_runtime().ok_or(NetError::NoRuntime)?;
    let mut ep = quinn::Endpoint::new(quinn::EndpointConfig::default(), server_config, socket, runtime)
        .map_err(|source| NetError::Bind { addr, source })?;
    let mut client = quinn::ClientConfig::new(Arc::new(tls::client_crypto(swarm_proto::PROTOCOL_VERSION)?));
    client.transport_config(transport);
    ep.set_default_client_config(client);
    Ok(ep)
}

/// The QUIC/TLS handshake with `addr` and nothing else: no proof is sent.
pub async fn connect(ep: &quinn::Endpoint, addr: SocketAddr) -> Result<quinn::Connection, NetError> {
    let connecting = ep.connect(addr, tls::SERVER_NAME).map_err(|source| NetError::Connect { addr, source })?;
    connecting.await.map_err(|source| NetError::Handshake { addr, source })
}

/// The honest client proof of the session `ekm` (see [`session_secret`]).
pub fn client_proof(token: &ClusterToken, ekm: &[u8]) -> [u8; 32] {
    token.proof(CLIENT_ROLE, ekm)
}

/// Whether `proof` is the honest server proof of the session `ekm`.
pub fn is_server_proof(token: &ClusterToken, ekm: &[u8], proof: &[u8]) -> bool {
    token.verify(SERVER_ROLE, ekm, proof)
}

/// Sends `proof` as the client's token proof; returns the server's answer, or the
/// connection error if it closed the connection instead.
pub async fn send_proof(conn: &quinn::Connection, proof: &[u8]) -> Result<Vec<u8>, quinn::ConnectionError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    if let Err(e) = send.write_all(proof).await {
        return Err(match e {
            quinn::WriteError::ConnectionLost(e) => e,
            _ => conn.closed().await,
        });
    }
    let _ = send.finish();
    match recv.read_to_end(1024).await {
        Ok(answer) => Ok(answer),
        Err(_) => Err(conn.closed().await),
    }
}

/// Whether `e` is the server refusing the proof: closed with [`codes::AUTH_FAILED`]
/// and the reason `cluster token mismatch`.
pub fn is_auth_failed(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(close)
        if close.error_code == quinn::VarInt::from_u32(codes::AUTH_FAILED)
            && &close.reason[..] == crate::auth::MISMATCH_REASON)
}
