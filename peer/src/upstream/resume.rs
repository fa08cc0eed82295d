//! Resuming blob streams: what makes an unreliable uplink cost time, not the blob.
//!
//! [`UpstreamClient::blob`] opens a blob once (any failure of that first request is
//! returned as is) and hands back a stream that survives the connection failing
//! midway. When the body breaks (a reset, a read timeout, an early end), or a
//! reconnection is answered with a 5xx, 429 or 408, or cannot connect at all, the
//! stream waits and asks again for the rest with `Range: bytes=<received>-`:
//!
//! - Waits grow from [`ResumePolicy::first_delay`] (0.5 s) doubling to
//!   [`ResumePolicy::max_delay`] (8 s), each drawn between half and all of that
//!   (jitter, so nodes behind one uplink do not retry in step). A `Retry-After` in
//!   seconds on a 429/5xx is honoured up to [`ResumePolicy::max_retry_after`] (30 s).
//!   The wait starts again from the first delay once bytes flow again.
//! - The stream gives up ([`UpstreamError::GaveUp`]) when no byte arrived for
//!   [`ResumePolicy::give_up`] ([`RESUME_GIVE_UP`], 100 s by default): long enough to
//!   ride out a 60 s outage plus the read timeout that notices it, and shorter than the
//!   120 s a mirror response may go without a new piece before the agent aborts it.
//!   Every attempt is bounded by that same deadline, so a reconnection that hangs
//!   cannot stretch it.
//! - A definite refusal fails at once, with no retry: 401/403 (credentials), 404 (the
//!   blob or repository is gone), 416 or a `Content-Range` that does not fit the blob,
//!   a different total length on the resumed response, any other 4xx, and anything
//!   else [`UpstreamError::is_transient`] calls final.
//! - A 206 must start exactly at the requested byte and carry the blob's total length.
//!   A registry that ignores `Range` and answers 200 restarts from byte 0: the bytes up
//!   to the offset are read and dropped here (they cost uplink traffic, but such a
//!   registry offers nothing better), and count as progress while they arrive.
//!
//! Every chunk is passed through the stream's rate limiters (the agent's download
//! rate, a lease holder's share of the uplink cap) as it comes off the wire, before
//! the bytes to skip are dropped: what is limited is what crossed the uplink. While a
//! limiter has a rate the blob is asked for in ranges ([`segment_len`]), each paid to
//! the limiters before it is asked for (and admitted by their window guards, which
//! count its bytes as they arrive: answers that bunch up cannot push a 1 s window
//! over the rate); up to [`RANGES_AHEAD`] ranges after the one being read are paid
//! for and asked for in order, so a slow answer to one request does not idle the
//! rate; a range read to its end is followed by the next at once (no wait, no retry
//! counted).
//!
//! Each retry logs one warning with the reason, the byte offset and the attempt
//! number; the first bytes after a retry log one info line.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::stream::{BoxStream, StreamExt};
use rand::Rng;
use swarm_proto::Digest;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{UpstreamBlob, UpstreamClient, UpstreamError};
use crate::rate::{Limiter, RangeTicket};

/// How long a blob stream keeps retrying without receiving a single byte before it
/// fails. Rides out a 60 s outage noticed by a 30 s read timeout; below the agent's
/// 120 s mirror stall limit.
pub const RESUME_GIVE_UP: Duration = Duration::from_secs(100);
/// The first wait before reconnecting.
pub const RESUME_FIRST_DELAY: Duration = Duration::from_millis(500);
/// The longest wait between two reconnections (before jitter).
pub const RESUME_MAX_DELAY: Duration = Duration::from_secs(8);
/// The longest `Retry-After` honoured; a longer one is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// When and for how long a blob stream retries. [`Default`] is the documented
/// constants; tests use shorter bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumePolicy {
    /// Give up after this long without receiving a byte.
    pub give_up: Duration,
    /// The first wait before reconnecting; doubles on each failure in a row.
    pub first_delay: Duration,
    /// The cap of the doubling wait.
    pub max_delay: Duration,
    /// The cap of a registry's `Retry-After`.
    pub max_retry_after: Duration,
}

impl Default for ResumePolicy {
    fn default() -> Self {
        Self {
            give_up: RESUME_GIVE_UP,
            first_delay: RESUME_FIRST_DELAY,
            max_delay: RESUME_MAX_DELAY,
            max_retry_after: MAX_RETRY_AFTER,
        }
    }
}

impl ResumePolicy {
    /// The wait before attempt `attempt` (1 for the first retry): the doubling
    /// backoff, drawn between half and all of it, or the registry's `Retry-After`
    /// (capped) when that is longer.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let doubled = self.first_delay.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let base = doubled.min(self.max_delay);
        let jittered = base.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        match retry_after {
            Some(after) => jittered.max(after.min(self.max_retry_after)),
            None => jittered,
        }
    }
}

/// A freshly opened response: the blob's total length, the bytes to drop before the
/// requested offset (a 200 answer to a range request), and the body.
pub(super) struct Opened {
    pub total: u64,
    pub skip: u64,
    /// Where the body ends when it is a range short of the blob's end (then the next
    /// range is asked for once it is read).
    pub end: Option<u64>,
    /// The limiters' tickets when it is a range paid for before it was asked for
    /// (empty otherwise): its bytes are counted on them as they arrive, not paid again.
    pub tickets: Vec<RangeTicket>,
    pub stream: BoxStream<'static, Result<Bytes, UpstreamError>>,
}

/// The blob `digest` from `offset` on, starting with the response `first` and
/// reconnecting with ranges as described in the module docs.
pub(super) fn resuming(
    client: UpstreamClient,
    registry: &str,
    repository: &str,
    digest: Digest,
    offset: u64,
    first: Opened,
    limits: Vec<Limiter>,
) -> UpstreamBlob {
    let total_length = first.total;
    let state = Resuming {
        limits,
        segment_end: first.end,
        tickets: first.tickets,
        ahead: VecDeque::new(),
        last_paid: None,
        policy: client.inner.resume,
        client,
        registry: registry.to_string(),
        repository: repository.to_string(),
        digest,
        total: first.total,
        position: offset,
        skip: first.skip,
        body: Some(first.stream),
        last_progress: Instant::now(),
        attempt: 0,
        done: false,
    };
    // The state lives in the stream, not in the future of one `next()`: a caller that
    // drops a pending `next()` (a timeout) loses nothing.
    let mut state = state;
    state.prefetch();
    let stream = futures_util::stream::unfold(state, |mut st| async move { st.next().await.map(|item| (item, st)) });
    UpstreamBlob { total_length, stream: stream.boxed() }
}

/// One resuming blob stream's state.
struct Resuming {
    client: UpstreamClient,
    policy: ResumePolicy,
    registry: String,
    repository: String,
    digest: Digest,
    total: u64,
    /// The next byte of the blob to hand out.
    position: u64,
    /// Bytes still to drop from `body` before `position` (a 200 that restarted at 0).
    skip: u64,
    body: Option<BoxStream<'static, Result<Bytes, UpstreamError>>>,
    /// When a byte last arrived (or the stream started).
    last_progress: Instant,
    /// Failures since the last byte arrived.
    attempt: u32,
    /// A final error was returned, or the blob is complete.
    done: bool,
    /// Every chunk off the wire passes through these before it is handed out.
    limits: Vec<Limiter>,
    /// Where the current body ends, when it is a range short of the blob's end.
    segment_end: Option<u64>,
    /// The limiters' tickets for the current body when it is a range paid for when it
    /// was asked for (its bytes then pass without being paid again); else empty.
    tickets: Vec<RangeTicket>,
    /// The ranges after the current one (at most [`RANGES_AHEAD`]), in blob order,
    /// each paid for and asked for in the background, one after the other.
    ahead: VecDeque<Ahead>,
    /// Fires when the last range of `ahead` is paid for: the next one pays after it.
    last_paid: Option<oneshot::Receiver<()>>,
}

/// A range requested ahead of the one being read.
struct Ahead {
    /// Its first byte.
    start: u64,
    /// Just past its last byte.
    end: u64,
    task: tokio::task::JoinHandle<Result<Opened, UpstreamError>>,
}

/// How many ranges after the one being read are paid for and asked for ahead: four,
/// so the rate is kept while the answer to a request takes up to 100 ms (four ranges'
/// time, [`SEGMENT_TIME`] each).
pub const RANGES_AHEAD: usize = 4;

impl Drop for Resuming {
    fn drop(&mut self) {
        self.drop_prefetch();
    }
}

/// Opens the blob from `offset`: in one request when no limiter has a rate (its bytes
/// are then counted as they arrive), else a range of [`segment_len`] bytes, paid to
/// every limiter (waiting for them) before it is asked for, so that what crosses the
/// uplink follows the limiters' rates.
pub(super) async fn open_paid(
    client: &UpstreamClient,
    registry: &str,
    repository: &str,
    digest: &Digest,
    offset: u64,
    limits: &[Limiter],
) -> Result<Opened, UpstreamError> {
    let segment = segment_len(limits);
    let tickets = pay(limits, segment).await;
    open_segment(client, registry, repository, digest, offset, segment, tickets).await
}

/// Pays `segment` bytes (if any) to every limiter, waiting for each to admit them.
async fn pay(limits: &[Limiter], segment: Option<u64>) -> Vec<RangeTicket> {
    let mut tickets = Vec::new();
    if let Some(len) = segment {
        for limiter in limits {
            tickets.push(limiter.request(len).await);
        }
    }
    tickets
}

/// Asks for `segment` bytes from `offset` (the rest of the blob when `None`),
/// already paid for when it is a range.
async fn open_segment(
    client: &UpstreamClient,
    registry: &str,
    repository: &str,
    digest: &Digest,
    offset: u64,
    segment: Option<u64>,
    tickets: Vec<RangeTicket>,
) -> Result<Opened, UpstreamError> {
    let asked = Instant::now();
    let mut opened = client.open_range(registry, repository, digest, offset, segment).await?;
    for ticket in &tickets {
        ticket.answered(asked.elapsed());
    }
    opened.tickets = tickets;
    Ok(opened)
}

/// How much of a limiter's rate one range asks for (see [`segment_len`]): 25 ms. Each
/// range crosses the uplink as a short burst at the link's speed, so a 1 s window can
/// hold one more range than the rate pays for when the answers' delays vary; the
/// shorter the ranges, the less that adds (2.5 % here; it was 5 % at 50 ms, which a
/// loaded CI machine pushed past the 5 % the cap allows).
pub const SEGMENT_TIME: Duration = Duration::from_millis(25);
/// The shortest range asked for while a rate is set.
pub const MIN_SEGMENT: u64 = 64 * 1024;

/// The length of the ranges a stream limited by `limits` asks for: [`SEGMENT_TIME`]
/// worth of the lowest rate among them (at least [`MIN_SEGMENT`]); `None` (one
/// open-ended request) when none has a rate.
pub fn segment_len(limits: &[Limiter]) -> Option<u64> {
    let rate = limits.iter().filter_map(Limiter::rate).min()?;
    Some(((rate as f64 * SEGMENT_TIME.as_secs_f64()) as u64).max(MIN_SEGMENT))
}

/// Why the current attempt ended, when it is worth another.
struct Interruption {
    reason: String,
    retry_after: Option<Duration>,
}

impl Resuming {
    async fn next(&mut self) -> Option<Result<Bytes, UpstreamError>> {
        loop {
            if self.done {
                return None;
            }
            let deadline = self.last_progress + self.policy.give_up;
            let interruption = match self.body.as_mut() {
                None if self.position >= self.total => {
                    self.done = true;
                    return None;
                }
                None => match tokio::time::timeout_at(deadline, self.reopen()).await {
                    Ok(Ok(opened)) => {
                        self.skip = opened.skip;
                        self.segment_end = opened.end;
                        self.tickets = opened.tickets;
                        self.body = Some(opened.stream);
                        self.prefetch();
                        continue;
                    }
                    Ok(Err(e)) if !e.is_transient() => return self.fail(e),
                    Ok(Err(e)) => Interruption { retry_after: e.retry_after(), reason: e.to_string() },
                    Err(_) => Interruption { reason: "no answer to the range request".into(), retry_after: None },
                },
                Some(body) => match tokio::time::timeout_at(deadline, body.next()).await {
                    Ok(Some(Ok(chunk))) => match self.throttled(chunk).await {
                        Ok(Some(chunk)) => return Some(Ok(chunk)),
                        Ok(None) => continue,
                        Err(e) => return self.fail(e),
                    },
                    Ok(Some(Err(e))) if !e.is_transient() => return self.fail(e),
                    Ok(Some(Err(e))) => Interruption { retry_after: None, reason: e.to_string() },
                    Ok(None) if self.position >= self.total => {
                        self.done = true;
                        return None;
                    }
                    Ok(None) if self.segment_end.is_some_and(|end| self.position >= end) => {
                        // A range read to its end: ask for the next one.
                        self.body = None;
                        self.tickets.clear();
                        continue;
                    }
                    Ok(None) => Interruption {
                        reason: format!("the body ended {} bytes early", self.total - self.position),
                        retry_after: None,
                    },
                    Err(_) => Interruption { reason: "no byte before the give-up deadline".into(), retry_after: None },
                },
            };
            self.body = None;
            self.tickets.clear();
            self.drop_prefetch();
            self.attempt += 1;
            let delay = self.policy.delay(self.attempt, interruption.retry_after);
            let now = Instant::now();
            if now + delay >= deadline {
                let waited = now.duration_since(self.last_progress);
                return self.fail(UpstreamError::GaveUp {
                    digest: self.digest,
                    offset: self.position,
                    attempts: self.attempt,
                    waited,
                    last: interruption.reason,
                });
            }
            warn!(
                registry = %self.registry,
                repository = %self.repository,
                digest = %self.digest,
                offset = self.position,
                attempt = self.attempt,
                delay = ?delay,
                reason = %interruption.reason,
                "upstream blob interrupted; resuming with a range request"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Passes a chunk off the wire through the stream's limiters (waiting while any is
    /// in debt), then [`Resuming::received`].
    async fn throttled(&mut self, chunk: Bytes) -> Result<Option<Bytes>, UpstreamError> {
        if !self.tickets.is_empty() {
            for ticket in &mut self.tickets {
                ticket.arrived(chunk.len() as u64);
            }
        } else {
            for limiter in &self.limits {
                limiter.consume(chunk.len()).await;
            }
        }
        self.received(chunk)
    }

    /// Accounts for a chunk off the wire: drops what precedes `position`, refuses
    /// bytes past the end. `None` when the whole chunk was skipped.
    fn received(&mut self, mut chunk: Bytes) -> Result<Option<Bytes>, UpstreamError> {
        if chunk.is_empty() {
            return Ok(None);
        }
        self.last_progress = Instant::now();
        if self.attempt > 0 {
            info!(digest = %self.digest, offset = self.position, attempts = self.attempt, "upstream blob resumed");
            self.attempt = 0;
        }
        if self.skip > 0 {
            let k = self.skip.min(chunk.len() as u64);
            chunk.advance(k as usize);
            self.skip -= k;
            if chunk.is_empty() {
                return Ok(None);
            }
        }
        let len = chunk.len() as u64;
        if self.position + len > self.total {
            return Err(UpstreamError::Invalid {
                url: self.digest.to_string(),
                reason: format!("more bytes than the {}-byte blob", self.total),
            });
        }
        self.position += len;
        Ok(Some(chunk))
    }

    /// Requests ranges after the current one until [`RANGES_AHEAD`] are under way, if
    /// the current body is a range short of the blob's end. Each is paid for after the
    /// one before it, so they go out in blob order at the limiters' rate.
    fn prefetch(&mut self) {
        while self.ahead.len() < RANGES_AHEAD {
            let from = match self.ahead.back() {
                Some(last) => last.end,
                None => match self.segment_end {
                    Some(end) => end,
                    None => return,
                },
            };
            // A rate lifted meanwhile: the rest in one request, paid for by nobody.
            let segment = segment_len(&self.limits);
            if from >= self.total {
                return;
            }
            let end = segment.map_or(self.total, |len| (from + len).min(self.total));
            let (client, registry, repository, digest) =
                (self.client.clone(), self.registry.clone(), self.repository.clone(), self.digest);
            let limits = self.limits.clone();
            let after = self.last_paid.take();
            let (paid, last_paid) = oneshot::channel();
            self.last_paid = Some(last_paid);
            let task = tokio::spawn(async move {
                if let Some(after) = after {
                    // An error: the range before was dropped; pay now.
                    let _ = after.await;
                }
                let tickets = pay(&limits, segment).await;
                let _ = paid.send(());
                open_segment(&client, &registry, &repository, &digest, from, segment, tickets).await
            });
            self.ahead.push_back(Ahead { start: from, end, task });
            if segment.is_none() {
                return;
            }
        }
    }

    fn drop_prefetch(&mut self) {
        for ahead in self.ahead.drain(..) {
            ahead.task.abort();
        }
        self.last_paid = None;
    }

    /// Asks for the rest of the blob (or takes the range requested ahead, when the
    /// current range was read to its end); the answer must be about the same blob.
    async fn reopen(&mut self) -> Result<Opened, UpstreamError> {
        let ahead = match self.ahead.pop_front() {
            Some(next) if next.start == self.position => Some(next.task),
            Some(next) => {
                next.task.abort();
                self.drop_prefetch();
                None
            }
            None => None,
        };
        let opened = match ahead {
            Some(next) => match next.await {
                Ok(opened) => opened?,
                Err(e) => return Err(UpstreamError::Invalid { url: self.digest.to_string(), reason: e.to_string() }),
            },
            None => {
                open_paid(&self.client, &self.registry, &self.repository, &self.digest, self.position, &self.limits)
                    .await?
            }
        };
        if opened.total != self.total {
            return Err(UpstreamError::Invalid {
                url: self.digest.to_string(),
                reason: format!("resumed response says the blob has {} bytes, not {}", opened.total, self.total),
            });
        }
        Ok(opened)
    }

    fn fail(&mut self, err: UpstreamError) -> Option<Result<Bytes, UpstreamError>> {
        self.done = true;
        self.body = None;
        self.tickets.clear();
        debug!(digest = %self.digest, offset = self.position, error = %err, "upstream blob failed");
        Some(Err(err))
    }
}
