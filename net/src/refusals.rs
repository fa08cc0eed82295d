//! [`RefusalLog`]: decides which refusals are worth a log line, so that a flood of
//! bad connection attempts becomes a few lines instead of one per packet.
//!
//! Sans-IO: the caller passes `now` and does the logging. A refusal is logged the
//! first time its (source IP, kind) pair is seen, then at most once per
//! [`RefusalLog::every`] (60 s by default); the line that ends a quiet period says
//! how many refusals of that pair it stood for. A source is the remote *IP address*,
//! not its port: a flood from many ports of one host is one source.
//!
//! Memory is bounded whatever the remote sends: at most [`MAX_SOURCES`] pairs are
//! remembered. When the table is full, pairs quiet for a whole period are forgotten;
//! if none is, the refusal falls into one shared "other sources" entry, itself
//! logged at most once a period.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How often one (source, kind) pair is logged at most.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// Pairs remembered at most (about 64 bytes each).
pub const MAX_SOURCES: usize = 1024;

/// Why a connection attempt or a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The client's token proof was wrong or cut short.
    TokenMismatch,
    /// No token proof arrived in time.
    ProofTimeout,
    /// The QUIC/TLS handshake failed (garbage, a client that went away).
    HandshakeFailed,
    /// The handshake was abandoned to make room for a newer one (too many at once).
    HandshakeEvicted,
    /// A connection bound (per address or in total) was reached.
    AtBound,
}

impl Refusal {
    /// A short name for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TokenMismatch => "cluster token mismatch",
            Refusal::ProofTimeout => "no token proof in time",
            Refusal::HandshakeFailed => "handshake failed",
            Refusal::HandshakeEvicted => "too many handshakes at once",
            Refusal::AtBound => "at a connection bound",
        }
    }
}

/// What to do with one refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` earlier refusals of the same pair went unlogged since the
    /// last line. `other_sources` is set when the table was full and the refusal was
    /// counted under the shared "other sources" entry.
    Log { suppressed: u64, other_sources: bool },
    /// Count it, do not log it.
    Quiet,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    logged: Instant,
    suppressed: u64,
}

/// Per-source log limiter; see the module docs.
#[derive(Debug)]
pub struct RefusalLog {
    every: Duration,
    max: usize,
    pairs: HashMap<(IpAddr, Refusal), Entry>,
    /// The shared entry of sources that found the table full.
    others: Option<Entry>,
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self::new(REFUSAL_LOG_EVERY, MAX_SOURCES)
    }
}

impl RefusalLog {
    /// A limiter logging each pair at most once per `every`, remembering at most
    /// `max` pairs.
    pub fn new(every: Duration, max: usize) -> Self {
        Self { every, max: max.max(1), pairs: HashMap::new(), others: None }
    }

    /// The period of one pair.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Pairs remembered now (never more than the bound given to [`RefusalLog::new`]).
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether no pair is remembered.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// One refusal of `kind` from `source` at `now`: log it or not.
    pub fn refused(&mut self, source: IpAddr, kind: Refusal, now: Instant) -> Verdict {
        let every = self.every;
        let due = |e: &Entry| now.saturating_duration_since(e.logged) >= every;
        let key = (source, kind);
        if !self.pairs.contains_key(&key) && self.pairs.len() >= self.max {
            self.pairs.retain(|_, e| !due(e));
        }
        if let Some(e) = self.pairs.get_mut(&key) {
            return if due(e) {
                let suppressed = std::mem::take(&mut e.suppressed);
                e.logged = now;
                Verdict::Log { suppressed, other_sources: false }
            } else {
                e.suppressed += 1;
                Verdict::Quiet
            };
        }
        if self.pairs.len() < self.max {
            self.pairs.insert(key, Entry { logged: now, suppressed: 0 });
            return Verdict::Log { suppressed: 0, other_sources: false };
        }
        match &mut self.others {
            Some(e) if !due(e) => {
                e.suppressed += 1;
                Verdict::Quiet
            }
            Some(e) => {
                let suppressed = std::mem::take(&mut e.suppressed);
                e.logged = now;
                Verdict::Log { suppressed, other_sources: true }
            }
            None => {
                self.others = Some(Entry { logged: now, suppressed: 0 });
                Verdict::Log { suppressed: 0, other_sources: true }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0xC612_0000 + n))
    }

    #[test]
    fn one_line_per_source_and_kind_per_period_with_the_count_it_stood_for() {
        let t0 = Instant::now();
        let mut log = RefusalLog::default();
        assert_eq!(
            log.refused(ip(1), Refusal::TokenMismatch, t0),
            Verdict::Log { suppressed: 0, other_sources: false }
        );
        for i in 1..=1000 {
            let at = t0 + Duration::from_millis(i);
            assert_eq!(log.refused(ip(1), Refusal::TokenMismatch, at), Verdict::Quiet);
        }
        // Another kind and another source each get their own first line.
        assert!(matches!(log.refused(ip(1), Refusal::AtBound, t0), Verdict::Log { .. }));
        assert!(matches!(log.refused(ip(2), Refusal::TokenMismatch, t0), Verdict::Log { .. }));
        // A period later the next refusal is logged with what was held back.
        let later = t0 + REFUSAL_LOG_EVERY;
        assert_eq!(
            log.refused(ip(1), Refusal::TokenMismatch, later),
            Verdict::Log { suppressed: 1000, other_sources: false }
        );
        assert_eq!(log.refused(ip(1), Refusal::TokenMismatch, later), Verdict::Quiet);
    }

    #[test]
    fn a_flood_from_many_sources_stays_within_the_bound() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(REFUSAL_LOG_EVERY, 16);
        let mut lines = 0;
        for n in 0..100_000 {
            if log.refused(ip(n), Refusal::HandshakeFailed, t0) != Verdict::Quiet {
                lines += 1;
            }
            assert!(log.len() <= 16);
        }
        // 16 sources with a line each, then one line for all the others.
        assert_eq!(lines, 17);
        // Once a period has passed, quiet pairs are forgotten to make room.
        let later = t0 + REFUSAL_LOG_EVERY;
        assert_eq!(
            log.refused(ip(200_000), Refusal::HandshakeFailed, later),
            Verdict::Log { suppressed: 0, other_sources: false }
        );
        assert_eq!(log.len(), 1);
    }
}
