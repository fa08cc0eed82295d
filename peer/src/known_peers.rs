//! The peers a node has talked to, kept in its data directory across restarts, so
//! that with no tracker answering it still knows whom to ask for a blob (see
//! `Node::fetch_from_peers` and the agent's start-up).
//!
//! The list holds at most [`MAX_KNOWN_PEERS`] addresses, most recently connected
//! first, in the file `peers` of the data directory: one socket address per line,
//! written whole (to a temporary file, then renamed) at most every [`SAVE_EVERY`]
//! and when the node shuts down. A missing or unreadable file is an empty list;
//! lines that do not parse are skipped.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Most addresses remembered.
pub const MAX_KNOWN_PEERS: usize = 64;
/// The list is written at most this often while it changes.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);

/// The known peers of a node. See the module docs.
#[derive(Debug)]
pub struct KnownPeers {
    path: PathBuf,
    addrs: VecDeque<SocketAddr>,
    dirty: bool,
    saved_at: Option<Instant>,
}

impl KnownPeers {
    /// The list kept in `data_dir`, as last saved.
    pub fn load(data_dir: &Path) -> Self {
        let path = data_dir.join("peers");
        let addrs = std::fs::read_to_string(&path)
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).take(MAX_KNOWN_PEERS).collect())
            .unwrap_or_default();
        Self { path, addrs, dirty: false, saved_at: None }
    }

    /// A connection with the peer at `addr` succeeded.
    pub fn remember(&mut self, addr: SocketAddr) {
        if self.addrs.front() == Some(&addr) {
            return;
        }
        self.addrs.retain(|a| *a != addr);
        self.addrs.push_front(addr);
        self.addrs.truncate(MAX_KNOWN_PEERS);
        self.dirty = true;
    }

    /// The addresses, most recent first.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.addrs.iter().copied().collect()
    }

    /// What to write now, if the list changed and the last write is old enough (or
    /// `force`): the file's path and contents. Marks the list saved.
    pub fn to_save(&mut self, now: Instant, force: bool) -> Option<(PathBuf, String)> {
        let due = force || self.saved_at.is_none_or(|t| now.saturating_duration_since(t) >= SAVE_EVERY);
        if !self.dirty || !due {
            return None;
        }
        self.dirty = false;
        self.saved_at = Some(now);
        let text: String = self.addrs.iter().map(|a| format!("{a}\n")).collect();
        Some((self.path.clone(), text))
    }
}

/// Writes `text` to `path` whole: a temporary file, then a rename.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_recent_peers_are_kept_first_bounded_and_survive_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut k = KnownPeers::load(dir.path());
        assert!(k.addrs().is_empty());
        let addr = |i: u16| SocketAddr::from(([198, 18, 0, 1], 7000 + i));
        for i in 0..100 {
            k.remember(addr(i));
        }
        k.remember(addr(50));
        let addrs = k.addrs();
        assert_eq!(addrs.len(), MAX_KNOWN_PEERS);
        assert_eq!(addrs[0], addr(50));
        assert_eq!(addrs[1], addr(99));
        let t = Instant::now();
        let (path, text) = k.to_save(t, false).expect("dirty");
        write_atomically(&path, &format!("{text}not an address\n")).expect("write");
        assert_eq!(k.to_save(t, false), None, "nothing changed");
        k.remember(addr(1));
        assert_eq!(k.to_save(t + Duration::from_secs(1), false), None, "too soon");
        assert!(k.to_save(t + Duration::from_secs(1), true).is_some(), "forced");
        let again = KnownPeers::load(dir.path());
        assert_eq!(again.addrs(), addrs, "the saved list, the bad line skipped");
    }
}
