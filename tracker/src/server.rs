//! The tracker service: a QUIC accept loop around [`TrackerState`].
//!
//! Task layout: [`serve`] owns a `JoinSet` with one task per connection plus the
//! expiry task; each connection task owns a `JoinSet` with one task per request
//! stream. Dropping a set aborts its tasks, so stopping `serve` tears everything
//! down. The state sits behind a `std::sync::Mutex` locked only inside
//! `answer`, never across an `.await`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use swarm_net::{Endpoint, Incoming, NetError, codes, read_msg, write_msg};
use swarm_proto::codec::MAX_FRAME_LEN;
use swarm_proto::msg::{TrackerRequest, TrackerResponse};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{TrackerConfig, TrackerError, TrackerState};

/// How long a peer may take to send its request once it opened a stream.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `serve` waits for close frames to go out when it stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

type Shared = Arc<Mutex<TrackerState>>;

/// Runs the tracker on `endpoint` until `cancel` fires or the endpoint is closed.
/// On the way out it closes the endpoint (every peer sees a
/// [`codes::SHUTDOWN`] close and reconnects to the next tracker on its next request).
pub async fn serve(endpoint: Endpoint, config: TrackerConfig, cancel: CancellationToken) -> Result<(), TrackerError> {
    let local = endpoint.local_addr()?;
    info!(%local, interval = ?config.announce_interval, ttl = ?config.peer_ttl, "tracker listening");
    let expire_every = (config.peer_ttl / 3).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let state: Shared = Arc::new(Mutex::new(TrackerState::new(config, rand::random())));

    let mut tasks = JoinSet::new();
    tasks.spawn(expire_loop(state.clone(), expire_every, cancel.clone()).instrument(info_span!("expire")));
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    warn!(error = %e, "tracker task panicked");
                }
            }
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    let span = info_span!("conn", remote = %incoming.remote_address());
                    tasks.spawn(connection(incoming, state.clone(), cancel.clone()).instrument(span));
                }
                None => break,
            },
        }
    }
    info!(%local, "tracker stopping");
    endpoint.close();
    tasks.shutdown().await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, endpoint.wait_idle()).await;
    Ok(())
}

async fn expire_loop(state: Shared, every: Duration, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {
                let dropped = lock(&state).expire(Instant::now());
                if dropped > 0 {
                    info!(dropped, "expired silent peers");
                }
            }
        }
    }
}

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, TrackerState> {
    // A panic while holding the lock leaves at worst one half-applied request;
    // serving on beats taking the whole tracker down.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Authenticates one connection, then serves its request streams.
async fn connection(incoming: Incoming, state: Shared, cancel: CancellationToken) {
    let remote = incoming.remote_address();
    let conn = match incoming.authenticate().await {
        Ok(conn) => conn,
        // The mismatch itself is logged by swarm_net as "refusing <addr>: ...".
        Err(NetError::AuthFailed { .. }) => return,
        Err(e) => {
            info!(%remote, error = %e, "connection failed before authentication");
            return;
        }
    };
    debug!(%remote, "peer connected");
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    streams.spawn(request(send, recv, remote, state.clone()).in_current_span());
                }
                Err(e) => {
                    debug!(%remote, reason = %e, "peer disconnected");
                    return;
                }
            },
        }
    }
}

/// Serves one stream: one request in, one response out.
async fn request(mut send: quinn::SendStream, mut recv: quinn::RecvStream, remote: SocketAddr, state: Shared) {
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream| {
        let code = quinn::VarInt::from_u32(codes::PROTOCOL_ERROR);
        let _ = send.reset(code);
        let _ = recv.stop(code);
    };
    let req =
        match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_msg::<TrackerRequest>(&mut recv, MAX_FRAME_LEN)).await {
            Ok(Ok(Some(req))) => req,
            Ok(Ok(None)) => return, // opened and finished without a request: nothing to answer
            Ok(Err(e)) if e.is_connection_lost() => return,
            Ok(Err(e)) => {
                warn!(%remote, error = %e, "refusing a malformed tracker request");
                refuse(&mut send, &mut recv);
                return;
            }
            Err(_) => {
                warn!(%remote, "no tracker request within {REQUEST_READ_TIMEOUT:?}; resetting the stream");
                refuse(&mut send, &mut recv);
                return;
            }
        };
    let response = answer(&state, req, remote);
    if let Err(e) = write_msg(&mut send, &response).await {
        debug!(%remote, error = %e, "could not send the response");
        return;
    }
    let _ = send.finish();
}

/// Applies one request to the state and logs what deserves it. The lock is held only
/// here, never across an `.await`.
fn answer(state: &Shared, req: TrackerRequest, remote: SocketAddr) -> TrackerResponse {
    let what = describe(&req);
    let (response, first_announce, new_blob) = {
        let mut st = lock(state);
        let first_announce = match &req {
            TrackerRequest::Announce(a) => (!st.has_peer(&a.blob, &a.peer_id)).then_some((a.peer_id, a.blob)),
            _ => None,
        };
        let new_blob = match &req {
            TrackerRequest::Register { metainfo } => st.metainfo(&metainfo.digest).is_none().then_some(metainfo.digest),
            _ => None,
        };
        (st.handle(req, remote, Instant::now()), first_announce, new_blob)
    };
    match &response {
        TrackerResponse::Error { code, message } => match code {
            swarm_proto::msg::TrackerErrorCode::UnknownBlob => debug!(%remote, request = what, "{message}"),
            _ => warn!(%remote, request = what, ?code, "refused: {message}"),
        },
        TrackerResponse::Registered => {
            if let Some(blob) = new_blob {
                info!(%remote, %blob, "registered blob");
            }
        }
        TrackerResponse::Peers { peers, .. } => {
            if let Some((peer, blob)) = first_announce {
                info!(%remote, %peer, blob = %blob.short(), handed_out = peers.len(), "peer joined");
            }
        }
        TrackerResponse::Metainfo(_)
        | TrackerResponse::Left
        | TrackerResponse::Lease(_)
        | TrackerResponse::Hashes { .. } => {}
    }
    response
}

fn describe(req: &TrackerRequest) -> &'static str {
    match req {
        TrackerRequest::Register { .. } => "register",
        TrackerRequest::GetMetainfo { .. } => "get-metainfo",
        TrackerRequest::Announce(_) => "announce",
        TrackerRequest::Leave { .. } => "leave",
        TrackerRequest::AcquireLease { .. } => "acquire-lease",
        TrackerRequest::PublishHashes { .. } => "publish-hashes",
        TrackerRequest::ReleaseLease { .. } => "release-lease",
        TrackerRequest::GetHashes { .. } => "get-hashes",
    }
}
