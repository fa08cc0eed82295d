//! Health and readiness of the daemons, as HTTP endpoints for probes:
//!
//! - `GET /healthz`: 200 `ok` whenever the process answers (liveness).
//! - `GET /readyz`: 200 `ready` when the process can do its job, else 503 with the
//!   reason as text (readiness only: an agent whose tracker is away still serves
//!   pulls from the registry, so it must never be restarted for that).
//!
//! Warnings ([`Readiness::warn`], e.g. a data directory on tmpfs or an overlay) are
//! extra `warning: ...` lines in the `/readyz` body; they never fail readiness (the
//! agent works, it only costs RAM or loses its cache on reboot).
//!
//! For the agent, ready means its tracker answers and accepted the cluster token.
//! [`watch_tracker`] checks that every [`CHECK_EVERY`] with a cheap request (the
//! metainfo of a digest nobody registers) bounded by [`CHECK_TIMEOUT`], so `/readyz`
//! follows a tracker or token change within about 4 s, and logs one line at start and
//! one on every change.
//!
//! These routes are merged into the mirror's router ahead of its fallback, so probes
//! never count as mirror requests.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use swarm_net::NetError;
use swarm_proto::Digest;
use swarm_tracker::{TrackerClient, TrackerClientError};
use tokio_util::sync::CancellationToken;

use crate::STATUS;

/// How often the agent checks its tracker.
pub const CHECK_EVERY: Duration = Duration::from_millis(1500);
/// Bound on one check (connecting and the token exchange included).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the process is ready, and why not. Cheap to clone; clones share it.
#[derive(Clone, Debug)]
pub struct Readiness {
    state: Arc<RwLock<Result<(), String>>>,
    /// Conditions `/readyz` reports without failing (a data directory on tmpfs).
    warnings: Arc<RwLock<Vec<String>>>,
}

impl Readiness {
    /// Not ready, for `reason`, until [`Readiness::set`] says otherwise.
    pub fn new(reason: impl Into<String>) -> Self {
        Self { state: Arc::new(RwLock::new(Err(reason.into()))), warnings: Arc::default() }
    }

    /// Always ready (a process with nothing to wait for).
    pub fn ready() -> Self {
        Self { state: Arc::new(RwLock::new(Ok(()))), warnings: Arc::default() }
    }

    /// Adds a warning `/readyz` shows (as a `warning: ...` line) without failing.
    pub fn warn(&self, warning: impl Into<String>) {
        self.warnings.write().unwrap_or_else(std::sync::PoisonError::into_inner).push(warning.into());
    }

    /// The warnings added so far.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Records the outcome of a check; returns whether it differs from the last one.
    pub fn set(&self, now: Result<(), String>) -> bool {
        let mut state = self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *state != now;
        *state = now;
        changed
    }

    /// The last outcome.
    pub fn get(&self) -> Result<(), String> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// `/healthz` and `/readyz` over `readiness`.
pub fn router(readiness: Readiness) -> axum::Router {
    const TEXT: [(header::HeaderName, &str); 1] = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    axum::Router::new().route("/healthz", get(move || async move { (TEXT, "ok\n").into_response() })).route(
        "/readyz",
        get(move || {
            let now = readiness.get();
            let warnings: String = readiness.warnings().iter().map(|w| format!("warning: {w}\n")).collect();
            async move {
                match now {
                    Ok(()) => (StatusCode::OK, TEXT, format!("ready\n{warnings}")).into_response(),
                    Err(why) => {
                        (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("not ready: {why}\n{warnings}")).into_response()
                    }
                }
            }
        }),
    )
}

/// One check of the tracker behind `client`: `Ok` if it answered a request (the
/// token was accepted), else what is wrong, in words an operator can act on.
pub async fn check_tracker(client: &TrackerClient) -> Result<(), String> {
    let tracker = client.tracker();
    match client.get_metainfo(Digest([0; 32])).await {
        Ok(_) | Err(TrackerClientError::Refused { .. }) => Ok(()),
        Err(TrackerClientError::Net {
            source: NetError::AuthRejected { .. } | NetError::AuthFailed { .. }, ..
        }) => Err(format!(
            "tracker {tracker} refused this node's cluster token: the agent and the tracker hold different \
                 tokens (check --token-file / SWARM_TOKEN_FILE on both)"
        )),
        Err(TrackerClientError::Timeout { .. }) => Err(format!(
            "tracker {tracker} unreachable: no answer within {CHECK_TIMEOUT:?} (is it running, and is UDP open to it?)"
        )),
        Err(e) => Err(format!("tracker {tracker} unreachable: {e}")),
    }
}

/// Checks the tracker every [`CHECK_EVERY`] until `cancel` fires, storing each outcome
/// in `readiness`. Logs the first outcome (the start-up check) and every change.
pub async fn watch_tracker(client: TrackerClient, readiness: Readiness, cancel: CancellationToken) {
    let tracker = client.tracker();
    let mut first = true;
    loop {
        let outcome = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            outcome = check_tracker(&client) => outcome,
        };
        let changed = readiness.set(outcome.clone());
        if first || changed {
            match &outcome {
                Ok(()) => {
                    tracing::info!(target: STATUS, %tracker, "tracker {tracker} reachable, cluster token accepted: ready")
                }
                Err(why) => tracing::warn!(
                    target: STATUS, %tracker,
                    "{why}; not ready: pulls go straight to the registries until this is fixed"
                ),
            }
        }
        first = false;
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reports_changes_only() {
        let r = Readiness::new("starting");
        assert_eq!(r.get(), Err("starting".to_string()));
        assert!(r.set(Ok(())));
        assert!(!r.set(Ok(())));
        assert!(r.set(Err("down".into())));
        assert_eq!(r.clone().get(), Err("down".to_string()));
        assert_eq!(Readiness::ready().get(), Ok(()));
    }
}
