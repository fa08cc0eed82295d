//! The node's connections to peers across all its swarms: how many it holds to each
//! remote address and in total, and whether one more may open.
//!
//! A connection carries one blob's swarm, so two nodes trading several blobs at once
//! hold one connection per blob. Both bounds count connections being set up as well
//! as established ones, incoming and outgoing alike:
//!
//! | bound | number | what it protects |
//! |---|---|---|
//! | [`MAX_CONNECTIONS_PER_ADDRESS`] | 8 | one remote endpoint (an IP and port: an agent dials from the UDP socket it listens on) cannot take the node's connections for itself |
//! | [`MAX_CONNECTIONS`] | 1,024 | the node's memory and tasks: a flood of handshakes from many ports stops here (the simulator's busiest node holds 607 at 10,000 nodes) |
//!
//! At a bound the node refuses: an incoming attempt is refused before its TLS
//! handshake (no task, no state kept); a dial the node would make fails at once, and
//! the swarm treats it like a failed dial (that address waits
//! [`crate::node::CONNECT_BACKOFF`]; other peers are dialled meanwhile). A connection
//! that closes frees its place at once.
//!
//! [`SharedConnections`] is the same table behind a mutex, handing out a [`Permit`]
//! that frees its place when dropped (the tracker's accept loop uses it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Connections to one remote address (all blobs, both directions).
pub const MAX_CONNECTIONS_PER_ADDRESS: u16 = 8;
/// Connections in total (all blobs, both directions).
pub const MAX_CONNECTIONS: usize = 1024;

/// Why one more connection may not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AtBound {
    #[error("already {MAX_CONNECTIONS_PER_ADDRESS} connections to this address")]
    Address,
    #[error("already {MAX_CONNECTIONS} connections in total")]
    Total,
}

/// Counts a node's connections; see the module docs.
#[derive(Debug)]
pub struct Connections {
    by_addr: HashMap<SocketAddr, u16>,
    total: usize,
    per_address: u16,
    max: usize,
}

impl Default for Connections {
    fn default() -> Self {
        Self::with_limits(MAX_CONNECTIONS_PER_ADDRESS, MAX_CONNECTIONS)
    }
}

impl Connections {
    /// A table with other bounds (tests).
    pub fn with_limits(per_address: u16, max: usize) -> Self {
        Self { by_addr: HashMap::new(), total: 0, per_address, max }
    }

    /// One more connection to `addr`, if both bounds allow it; pair with
    /// [`Connections::closed`].
    pub fn open(&mut self, addr: SocketAddr) -> Result<(), AtBound> {
        if self.total >= self.max {
            return Err(AtBound::Total);
        }
        let n = self.by_addr.entry(addr).or_insert(0);
        if *n >= self.per_address {
            return Err(AtBound::Address);
        }
        *n += 1;
        self.total += 1;
        Ok(())
    }

    /// A connection to `addr` counted by [`Connections::open`] is gone.
    pub fn closed(&mut self, addr: SocketAddr) {
        if let Some(n) = self.by_addr.get_mut(&addr) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.by_addr.remove(&addr);
            }
        }
    }

    /// Connections held in total.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Connections held to `addr`.
    pub fn to(&self, addr: SocketAddr) -> u16 {
        self.by_addr.get(&addr).copied().unwrap_or(0)
    }
}

/// A [`Connections`] table shared between tasks; each open connection holds a
/// [`Permit`].
#[derive(Clone, Debug, Default)]
pub struct SharedConnections {
    table: Arc<Mutex<Connections>>,
}

/// One connection's place in a [`SharedConnections`]; freed when dropped.
#[derive(Debug)]
pub struct Permit {
    table: Arc<Mutex<Connections>>,
    addr: SocketAddr,
}

impl SharedConnections {
    /// A shared table with other bounds (the tracker's total, tests).
    pub fn with_limits(per_address: u16, max: usize) -> Self {
        Self { table: Arc::new(Mutex::new(Connections::with_limits(per_address, max))) }
    }

    /// A place for one more connection to `addr`, if both bounds allow it.
    pub fn open(&self, addr: SocketAddr) -> Result<Permit, AtBound> {
        self.lock().open(addr)?;
        Ok(Permit { table: self.table.clone(), addr })
    }

    /// Connections held in total.
    pub fn total(&self) -> usize {
        self.lock().total()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        // The table stays consistent across a panic (no update is half done).
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.table.lock().unwrap_or_else(PoisonError::into_inner).closed(self.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, ip], port))
    }

    #[test]
    fn both_bounds_hold_and_a_close_frees_its_place() {
        let mut c = Connections::default();
        for _ in 0..MAX_CONNECTIONS_PER_ADDRESS {
            c.open(addr(1, 7001)).expect("under the per-address bound");
        }
        assert_eq!(c.open(addr(1, 7001)), Err(AtBound::Address));
        // Another port of the same host is another endpoint.
        c.open(addr(1, 7002)).expect("another address");
        c.closed(addr(1, 7001));
        c.open(addr(1, 7001)).expect("a place was freed");
        assert_eq!(c.to(addr(1, 7001)), MAX_CONNECTIONS_PER_ADDRESS);

        // Fill the total from many ports (a handshake flood).
        let mut port = 10_000;
        while c.total() < MAX_CONNECTIONS {
            c.open(addr(2, port)).expect("under the total");
            port += 1;
        }
        assert_eq!(c.open(addr(3, 1)), Err(AtBound::Total));
        c.closed(addr(2, 10_000));
        c.open(addr(3, 1)).expect("a place was freed");
        assert_eq!(c.total(), MAX_CONNECTIONS);
        // Closing what was never opened changes nothing.
        c.closed(addr(9, 9));
        assert_eq!(c.total(), MAX_CONNECTIONS);
        // Memory follows the connections: empty addresses are forgotten.
        for p in 10_001..port {
            c.closed(addr(2, p));
        }
        assert_eq!(c.by_addr.len(), 3);
    }

    #[test]
    fn a_shared_permit_frees_its_place_when_dropped() {
        let shared = SharedConnections::with_limits(2, 3);
        let a = shared.open(addr(1, 1)).expect("first");
        let _b = shared.open(addr(1, 1)).expect("second");
        assert_eq!(shared.open(addr(1, 1)).err(), Some(AtBound::Address));
        let _c = shared.open(addr(2, 1)).expect("another address");
        assert_eq!(shared.open(addr(3, 1)).err(), Some(AtBound::Total));
        drop(a);
        assert_eq!(shared.total(), 2);
        shared.open(addr(1, 1)).expect("a place was freed");
    }
}
