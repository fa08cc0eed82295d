//! [`Endpoint`] (one UDP socket acting as QUIC server and client), [`Incoming`]
//! connections waiting to be authenticated, and the [`EndpointConfig`] knobs.
//!
//! It also owns what keeps a flood of connection attempts cheap:
//!
//! - quinn buffers at most [`MAX_INCOMING`] attempts not yet handed to the
//!   application, with [`INCOMING_BUFFER`] bytes each and [`INCOMING_BUFFER_TOTAL`]
//!   in all (quinn's defaults are 65,536 attempts and 100 MiB);
//! - at most [`MAX_HANDSHAKES`] attempts are between [`Endpoint::accept`] and the end
//!   of their token proof at once. At the bound the *oldest* is abandoned (closed
//!   with [`codes::PROTOCOL_ERROR`]) to make room: a client that completes its
//!   handshake and then never proves anything holds a place only until newer
//!   attempts push it out, while an honest handshake, done in a few round trips, is
//!   never the oldest for long;
//! - quinn's state of a connection (about 37 KiB with its TLS session, event channel
//!   and sent-packet record) outlives the connection by three probe timeouts: a
//!   refused client is remembered while the close is repeated to it. The probe
//!   timeout follows the round-trip time the client shows, so a slow client
//!   (deliberately or not) keeps refused states alive for seconds: a flood of 10,000
//!   handshakes left 2,000-2,500 of them at once, 75-90 MiB. So at most
//!   [`MAX_UNPROVEN_STATES`] connections without a token proof, in their handshake or
//!   still closing after a refusal, exist at once; past it a new attempt is refused
//!   before its handshake, which costs no state (see [`Endpoint::accept`]). The
//!   places up to [`MAX_UNPROVEN_STATES_NEW_ADDRESS`] are kept for addresses with no
//!   such connection: a flood from a few addresses fills the first bound, and a peer
//!   that dials meanwhile (from its own address) still gets in. A flood from ever new
//!   addresses fills both, and then honest attempts are refused too until states
//!   close: memory stays bounded, connectivity during such a flood is not promised;
//! - until its token proof a client may open [`STREAMS_BEFORE_PROOF`] streams, not the
//!   configured number (quinn keeps state for every stream a connection may open);
//! - every refusal is logged through one [`RefusalLog`] per endpoint: once per
//!   source IP and kind per minute, whatever the rate of attempts.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::auth::{self, AUTH_TIMEOUT};
use crate::refusals::{Refusal, RefusalLog, Verdict};
use crate::token::ClusterToken;
use crate::{NetError, codes, tls};

/// Connection attempts quinn keeps before the application accepts them; past it
/// quinn refuses new ones at once.
pub const MAX_INCOMING: usize = 1024;
/// Bytes quinn buffers for one attempt not yet accepted (beyond its first packet).
pub const INCOMING_BUFFER: u64 = 64 * 1024;
/// Bytes quinn buffers for all attempts not yet accepted.
pub const INCOMING_BUFFER_TOTAL: u64 = 4 * 1024 * 1024;
/// Incoming connections between accept and the end of their token proof at once;
/// see the module docs.
pub const MAX_HANDSHAKES: usize = 64;
/// Bidirectional streams a client may open before its token proof is checked (the
/// proof's and the first message's); raised to the configured number after.
pub const STREAMS_BEFORE_PROOF: u32 = 4;
/// Connections without a token proof whose state quinn keeps at once: the handshakes
/// in flight plus the refused ones still closing (see the module docs), for an
/// attempt from an address (IP and port) that already has one of them.
pub const MAX_UNPROVEN_STATES: usize = 256;
/// The same bound for an attempt from an address with none: the places above
/// [`MAX_UNPROVEN_STATES`] are kept for new addresses, so that a peer dialling
/// during a flood from a few addresses still gets in. About 16 MiB of connection
/// state at this bound.
pub const MAX_UNPROVEN_STATES_NEW_ADDRESS: usize = 448;
/// How long a refused connection that never completed its handshake is counted as
/// closing: three probe timeouts at quinn's initial round-trip estimate (333 ms, and
/// half that as its variance), rounded up.
pub const CLOSING_BEFORE_HANDSHAKE: Duration = Duration::from_secs(3);

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
    guard: Arc<Guard>,
}

/// What an endpoint's incoming attempts share: the handshakes in flight and the
/// refusal log.
#[derive(Debug, Default)]
struct Guard {
    handshakes: Mutex<Handshakes>,
    refusals: Mutex<RefusalLog>,
    /// Bidirectional streams a client may open once it has proved the token.
    streams: u32,
}

impl Guard {
    fn refused(&self, addr: SocketAddr, kind: Refusal, detail: &dyn fmt::Display) {
        let verdict =
            self.refusals.lock().unwrap_or_else(PoisonError::into_inner).refused(addr.ip(), kind, Instant::now());
        if let Verdict::Log { suppressed, other_sources } = verdict {
            let what = kind.as_str();
            let scope = if other_sources { " (and other sources)" } else { "" };
            if suppressed > 0 {
                warn!(
                    %addr,
                    suppressed,
                    "refusing {addr}{scope}: {what}{detail} ({suppressed} more like it from {ip} since the last line; logged once a minute per source)",
                    ip = addr.ip()
                );
            } else {
                warn!(%addr, "refusing {addr}{scope}: {what}{detail} (logged once a minute per source)");
            }
        }
    }
}

/// The handshakes in flight, oldest first; at [`MAX_HANDSHAKES`] the oldest is told
/// to give up. Also the refused connections quinn still keeps while they close (by
/// when each is gone); both count as unproven states, in all and per remote
/// address, against [`MAX_UNPROVEN_STATES`] and [`MAX_UNPROVEN_STATES_NEW_ADDRESS`].
#[derive(Debug)]
struct Handshakes {
    next: u64,
    max: usize,
    live: BTreeMap<u64, Arc<Notify>>,
    /// Places taken by attempts not yet authenticated or refused (evicted ones
    /// included, until their task ends).
    held: usize,
    closing: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
    /// Unproven states (held or closing) per remote address.
    by_addr: HashMap<SocketAddr, usize>,
}

impl Default for Handshakes {
    fn default() -> Self {
        Self {
            next: 0,
            max: MAX_HANDSHAKES,
            live: BTreeMap::new(),
            held: 0,
            closing: BinaryHeap::new(),
            by_addr: HashMap::new(),
        }
    }
}

impl Handshakes {
    /// Connections without a proof quinn keeps at `now`: in their handshake or
    /// closing.
    fn unproven(&mut self, now: Instant) -> usize {
        while let Some(Reverse((gone, addr))) = self.closing.peek().copied() {
            if gone > now {
                break;
            }
            self.closing.pop();
            self.forget(addr);
        }
        self.held + self.closing.len()
    }

    /// Whether an attempt from `addr` may start at `now`, when quinn keeps `states`
    /// connections in all (proven or not): `Err` with the unproven count if not.
    /// An address with no unproven state yet may use the places between
    /// [`MAX_UNPROVEN_STATES`] and [`MAX_UNPROVEN_STATES_NEW_ADDRESS`]. The estimate
    /// of states still closing errs long, so quinn's own count (which can only be
    /// higher than the unproven ones) must be at the bound too.
    fn admit(&mut self, addr: SocketAddr, now: Instant, states: usize) -> Result<(), usize> {
        let unproven = self.unproven(now);
        let bound =
            if self.by_addr.contains_key(&addr) { MAX_UNPROVEN_STATES } else { MAX_UNPROVEN_STATES_NEW_ADDRESS };
        if unproven >= bound && states >= bound { Err(unproven) } else { Ok(()) }
    }

    fn forget(&mut self, addr: SocketAddr) {
        if let Some(n) = self.by_addr.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.by_addr.remove(&addr);
            }
        }
    }

    /// A place for one more handshake, from `addr`: its id and the signal that it
    /// was evicted.
    fn start(&mut self, addr: SocketAddr) -> (u64, Arc<Notify>) {
        while self.live.len() >= self.max {
            match self.live.pop_first() {
                // A stored permit: the evicted handshake sees it even if it is not
                // waiting yet.
                Some((_, oldest)) => oldest.notify_one(),
                None => break,
            }
        }
        let id = self.next;
        self.next += 1;
        let evicted = Arc::new(Notify::new());
        self.live.insert(id, evicted.clone());
        self.held += 1;
        *self.by_addr.entry(addr).or_default() += 1;
        (id, evicted)
    }

    /// Handshake `id` from `addr` is over: authenticated (`gone` is `None`), or
    /// refused and kept by quinn until `gone`.
    fn finish(&mut self, id: u64, addr: SocketAddr, gone: Option<Instant>) {
        self.live.remove(&id);
        self.held = self.held.saturating_sub(1);
        match gone {
            Some(gone) => self.closing.push(Reverse((gone, addr))),
            None => self.forget(addr),
        }
    }
}

/// One incoming attempt's place among the handshakes in flight; freed on drop, or
/// if `closing_until` is set, turned into a place among the closing connections
/// until then.
struct HandshakeSlot {
    guard: Arc<Guard>,
    id: u64,
    addr: SocketAddr,
    evicted: Arc<Notify>,
    closing_until: Option<Instant>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.guard.handshakes.lock().unwrap_or_else(PoisonError::into_inner).finish(
            self.id,
            self.addr,
            self.closing_until,
        );
    }
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
        // Until its token proof, a client may open only the streams the proof and the
        // first message need: quinn keeps state for every stream a connection may
        // open, and an unauthenticated one must cost little.
        let unproven = EndpointConfig { max_concurrent_bidi_streams: STREAMS_BEFORE_PROOF, ..config.clone() };
        server.transport_config(tls::transport(&unproven)?);
        server
            .max_incoming(MAX_INCOMING)
            .incoming_buffer_size(INCOMING_BUFFER)
            .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
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
        let guard = Arc::new(Guard { streams: config.max_concurrent_bidi_streams, ..Guard::default() });
        Ok(Self { inner, token: Arc::new(token), guard })
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
    /// It takes a place among the [`MAX_HANDSHAKES`] handshakes in flight (see the
    /// module docs), held until it is authenticated, refused or dropped. While
    /// [`MAX_UNPROVEN_STATES`] connections without a proof exist (or
    /// [`MAX_UNPROVEN_STATES_NEW_ADDRESS`], for an address that has none), attempts
    /// are refused here before their handshake (logged as [`Refusal::AtBound`]) and
    /// not returned.
    pub async fn accept(&self) -> Option<Incoming> {
        loop {
            let inner = self.inner.accept().await?;
            let addr = inner.remote_address();
            let states = self.inner.open_connections();
            let mut handshakes = self.guard.handshakes.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(unproven) = handshakes.admit(addr, Instant::now(), states) {
                drop(handshakes);
                inner.refuse();
                self.guard.refused(
                    addr,
                    Refusal::AtBound,
                    &format_args!(": {unproven} unauthenticated connections open or closing"),
                );
                continue;
            }
            let (id, evicted) = handshakes.start(addr);
            drop(handshakes);
            let slot = HandshakeSlot { guard: self.guard.clone(), id, addr, evicted, closing_until: None };
            return Some(Incoming { inner, token: self.token.clone(), slot });
        }
    }

    /// Logs that something from `addr` was refused, through the endpoint's
    /// [`RefusalLog`] (once per source IP and kind per minute); `detail` follows the
    /// kind in the line (`": already 8 connections to this address"`, say).
    pub fn log_refusal(&self, addr: SocketAddr, kind: Refusal, detail: &dyn fmt::Display) {
        self.guard.refused(addr, kind, detail);
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

/// How long quinn keeps a closed connection whose smoothed round-trip time is `rtt`:
/// three probe timeouts, a probe timeout being the round-trip time plus four times
/// its variance plus the peer's ACK delay (25 ms by default). The variance is not
/// exposed; this takes it as the round-trip time itself, which over-counts rather
/// than under-counts (a place held too long refuses an attempt early; one freed too
/// early lets states pile up).
fn closing_time(rtt: Duration) -> Duration {
    (rtt * 5 + Duration::from_millis(25)) * 3
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
    slot: HandshakeSlot,
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
    /// the client sees its connection refused at once, the node keeps no state. The
    /// refusal is logged through the endpoint's [`RefusalLog`] as [`Refusal::AtBound`]
    /// with `why` (`already 8 connections to this address`, say).
    pub fn refuse(self, why: &dyn fmt::Display) {
        let addr = self.inner.remote_address();
        self.inner.refuse();
        self.slot.guard.refused(addr, Refusal::AtBound, &format_args!(": {why}"));
    }

    /// Server side of the handshake: TLS, then the token proof. A client with the
    /// wrong token gets its connection closed with [`codes::AUTH_FAILED`] and this
    /// returns [`NetError::AuthFailed`]. Bounded by [`AUTH_TIMEOUT`]; a client too slow
    /// to prove itself, or pushed out by newer attempts ([`MAX_HANDSHAKES`]), is closed
    /// with [`codes::PROTOCOL_ERROR`]. Every failure is logged here (a warning naming
    /// the remote, once per source and kind per minute), so callers need not log it
    /// again above debug level.
    pub async fn authenticate(self) -> Result<quinn::Connection, NetError> {
        let Incoming { inner, token, mut slot } = self;
        let addr = inner.remote_address();
        let guard = slot.guard.clone();
        let evicted = slot.evicted.clone();
        // The connection once its handshake is done: on a failure, its round-trip
        // time says how long quinn keeps it while closing.
        let handshaken: Mutex<Option<quinn::Connection>> = Mutex::new(None);
        let attempt = async {
            let connecting = inner.accept().map_err(|source| NetError::Handshake { addr, source })?;
            let conn = connecting.await.map_err(|source| NetError::Handshake { addr, source })?;
            *handshaken.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
            match auth::server(&conn, &token).await {
                Ok(()) => {
                    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(guard.streams));
                    Ok(conn)
                }
                Err(e) => {
                    // Already closed with AUTH_FAILED on a mismatch (closing twice is a no-op).
                    conn.close(quinn::VarInt::from_u32(codes::PROTOCOL_ERROR), b"authentication failed");
                    Err(e)
                }
            }
        };
        let outcome = tokio::select! {
            biased;
            () = evicted.notified() => Err(NetError::HandshakeEvicted { addr }),
            r = tokio::time::timeout(AUTH_TIMEOUT, attempt) => {
                r.unwrap_or(Err(NetError::HandshakeTimeout { addr, after: AUTH_TIMEOUT }))
            }
        };
        match &outcome {
            // The place is free from here on.
            Ok(_) => drop(slot),
            Err(_) => {
                // Closed here if not yet (an attempt cut short by a timeout or an
                // eviction); quinn keeps it for three probe timeouts more.
                let conn = handshaken.into_inner().unwrap_or_else(PoisonError::into_inner);
                let closing = match &conn {
                    Some(conn) => {
                        conn.close(quinn::VarInt::from_u32(codes::PROTOCOL_ERROR), b"authentication failed");
                        closing_time(conn.rtt())
                    }
                    None => CLOSING_BEFORE_HANDSHAKE,
                };
                // The place stays taken while it closes.
                slot.closing_until = Some(Instant::now() + closing);
                drop(slot);
            }
        }
        match &outcome {
            Ok(_) => {}
            Err(NetError::AuthFailed { .. }) => guard.refused(addr, Refusal::TokenMismatch, &""),
            Err(NetError::HandshakeTimeout { .. }) => {
                guard.refused(addr, Refusal::ProofTimeout, &format_args!(" within {AUTH_TIMEOUT:?}"))
            }
            Err(NetError::HandshakeEvicted { .. }) => {
                guard.refused(addr, Refusal::HandshakeEvicted, &format_args!(" (over {MAX_HANDSHAKES})"))
            }
            Err(e) if e.is_connection_lost() => {
                debug!(%addr, error = %e, "client went away during authentication")
            }
            Err(e) => guard.refused(addr, Refusal::HandshakeFailed, &format_args!(": {e}")),
        }
        outcome
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn refused_handshakes_count_against_the_unproven_bound_until_they_are_closed() {
        let mut h = Handshakes::default();
        let t0 = Instant::now();
        let (a, _) = h.start(addr(1));
        let (b, _) = h.start(addr(2));
        let (c, _) = h.start(addr(2));
        assert_eq!(h.unproven(t0), 3);
        // An authenticated one leaves at once.
        h.finish(a, addr(1), None);
        assert_eq!(h.unproven(t0), 2);
        // Refused ones stay until quinn has dropped them.
        h.finish(b, addr(2), Some(t0 + Duration::from_secs(1)));
        h.finish(c, addr(2), Some(t0 + Duration::from_secs(3)));
        assert_eq!(h.unproven(t0), 2);
        assert_eq!(h.unproven(t0 + Duration::from_secs(1)), 1);
        assert_eq!(h.by_addr.get(&addr(2)), Some(&1));
        assert_eq!(h.unproven(t0 + Duration::from_secs(3)), 0);
        assert!(h.live.is_empty() && h.closing.is_empty() && h.by_addr.is_empty());
    }

    #[test]
    fn an_evicted_handshake_still_counts_until_it_has_closed() {
        let mut h = Handshakes { max: 2, ..Handshakes::default() };
        let t0 = Instant::now();
        let (first, _) = h.start(addr(1));
        h.start(addr(1));
        h.start(addr(1));
        // The first was pushed out of the handshakes in flight, but its state lives
        // on: while its task ends, then while it closes.
        assert_eq!(h.live.len(), 2);
        assert_eq!(h.unproven(t0), 3);
        h.finish(first, addr(1), Some(t0 + CLOSING_BEFORE_HANDSHAKE));
        assert_eq!(h.unproven(t0), 3);
        assert_eq!(h.unproven(t0 + CLOSING_BEFORE_HANDSHAKE), 2);
    }

    #[test]
    fn at_the_bound_only_new_addresses_get_in_and_only_up_to_the_second_bound() {
        let mut h = Handshakes { max: usize::MAX, ..Handshakes::default() };
        let now = Instant::now();
        // A flood from 4 addresses fills the first bound.
        for i in 0..MAX_UNPROVEN_STATES {
            let from = addr(1 + (i % 4) as u16);
            assert_eq!(h.admit(from, now, i), Ok(()));
            h.start(from);
        }
        let states = MAX_UNPROVEN_STATES_NEW_ADDRESS;
        assert_eq!(h.admit(addr(1), now, states), Err(MAX_UNPROVEN_STATES));
        // A peer dialling from its own address still gets in, until the second bound.
        for i in MAX_UNPROVEN_STATES..MAX_UNPROVEN_STATES_NEW_ADDRESS {
            let from = addr(1000 + i as u16);
            assert_eq!(h.admit(from, now, states), Ok(()));
            h.start(from);
        }
        assert_eq!(h.admit(addr(60000), now, states), Err(MAX_UNPROVEN_STATES_NEW_ADDRESS));
        // The estimate errs long: if quinn holds fewer connections, attempts pass.
        assert_eq!(h.admit(addr(1), now, MAX_UNPROVEN_STATES - 1), Ok(()));
    }

    #[test]
    fn closing_time_covers_three_probe_timeouts() {
        // quinn: 3 x (srtt + 4 x rttvar + 25 ms max ACK delay); rttvar is srtt / 2
        // after the first sample.
        for ms in [1, 10, 100, 1000] {
            let rtt = Duration::from_millis(ms);
            assert!(closing_time(rtt) >= (rtt + rtt * 2 + Duration::from_millis(25)) * 3);
        }
    }
}
