//! The cluster-token proof run on every new connection right after the TLS
//! handshake, bound to that TLS session through its exporter secret. The exchange is
//! specified in the crate docs.

use std::net::SocketAddr;
use std::time::Duration;

use tracing::{debug, warn};

use crate::error::{is_auth_rejection, read_error, write_error};
use crate::token::ClusterToken;
use crate::{NetError, codes};

/// Label of the TLS exporter secret the proofs are bound to.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-swarm-auth/1";
/// Role label of the client's proof.
pub(crate) const CLIENT_ROLE: &[u8] = b"swarm/1 client";
/// Role label of the server's proof.
pub(crate) const SERVER_ROLE: &[u8] = b"swarm/1 server";
/// Length of a proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// How long either side waits for the QUIC handshake plus the proof exchange.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Close reason sent with [`codes::AUTH_FAILED`].
pub(crate) const MISMATCH_REASON: &[u8] = b"cluster token mismatch";

/// The 32-byte secret both ends of this TLS session, and nobody else, can derive.
pub fn session_secret(conn: &quinn::Connection) -> Result<[u8; 32], NetError> {
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, EXPORTER_LABEL, b"")
        .map_err(|_| NetError::Config { reason: "the TLS session cannot export keying material".into() })?;
    Ok(ekm)
}

/// Maps an error seen while exchanging proofs: the remote closing with
/// [`codes::AUTH_FAILED`] means it refused our proof.
fn exchange_error(conn: &quinn::Connection, addr: SocketAddr, e: NetError) -> NetError {
    let rejected = match (&e, conn.close_reason()) {
        (NetError::ConnectionLost { source }, _) if is_auth_rejection(source) => true,
        (_, Some(reason)) => is_auth_rejection(&reason),
        _ => false,
    };
    if rejected { NetError::AuthRejected { addr } } else { e }
}

fn read_exact_error(e: quinn::ReadExactError) -> NetError {
    match e {
        quinn::ReadExactError::FinishedEarly(got) => NetError::Truncated { expected: PROOF_LEN, got },
        quinn::ReadExactError::ReadError(e) => read_error(e),
    }
}

/// Client side: send our proof on a new bidirectional stream, then check the
/// server's. On a bad server proof the connection is closed with
/// [`codes::AUTH_FAILED`].
pub(crate) async fn client(conn: &quinn::Connection, token: &ClusterToken) -> Result<(), NetError> {
    let addr = conn.remote_address();
    let ekm = session_secret(conn)?;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|source| NetError::ConnectionLost { source })?;
        send.write_all(&token.proof(CLIENT_ROLE, &ekm)).await.map_err(write_error)?;
        // The stream is already finished only if the connection is gone, which the
        // read below reports.
        let _ = send.finish();
        let mut theirs = [0u8; PROOF_LEN];
        recv.read_exact(&mut theirs).await.map_err(read_exact_error)?;
        Ok(theirs)
    };
    let theirs = exchange.await.map_err(|e| exchange_error(conn, addr, e))?;
    if !token.verify(SERVER_ROLE, &ekm, &theirs) {
        warn!(%addr, "refusing {addr}: cluster token mismatch (its proof is wrong)");
        conn.close(quinn::VarInt::from_u32(codes::AUTH_FAILED), MISMATCH_REASON);
        return Err(NetError::AuthFailed { addr });
    }
    debug!(%addr, "authenticated server");
    Ok(())
}

/// Server side: read the client's proof from its first bidirectional stream, check
/// it, answer with ours. On a bad or missing client proof the connection is closed
/// with [`codes::AUTH_FAILED`] (the caller logs the refusal).
pub(crate) async fn server(conn: &quinn::Connection, token: &ClusterToken) -> Result<(), NetError> {
    let addr = conn.remote_address();
    let ekm = session_secret(conn)?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|source| NetError::ConnectionLost { source })?;
    let mut theirs = [0u8; PROOF_LEN];
    let got = recv.read_exact(&mut theirs).await.map_err(read_exact_error);
    match got {
        Ok(()) if token.verify(CLIENT_ROLE, &ekm, &theirs) => {}
        Ok(()) | Err(NetError::Truncated { .. }) => {
            conn.close(quinn::VarInt::from_u32(codes::AUTH_FAILED), MISMATCH_REASON);
            return Err(NetError::AuthFailed { addr });
        }
        Err(e) => return Err(e),
    }
    send.write_all(&token.proof(SERVER_ROLE, &ekm)).await.map_err(write_error)?;
    let _ = send.finish();
    debug!(%addr, "authenticated client");
    Ok(())
}
