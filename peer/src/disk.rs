//! The node's disk: what the agent's store may use and what it gives back.
//!
//! - **Budget.** The store may hold [`Disk::budget`] bytes (`--cache-size`; default
//!   [`DEFAULT_SHARE_PERCENT`] % of the size of the data directory's filesystem). Use is
//!   the allocated size of each blob's files in the data directory; bytes served from
//!   containerd's content store cost nothing here.
//! - **Eviction.** Least recently used blobs go first ([`plan_evictions`], a pure
//!   function), never one being downloaded, served to the local containerd, or pinned.
//!   An evicted blob's swarm stops, its files are removed and the tracker is told
//!   (`Leave`), so no peer asks this node for it again.
//! - **Admission.** A blob that cannot fit even after evicting everything evictable is
//!   refused before anything is fetched ([`Disk::admit`]); the mirror answers 503 and
//!   containerd goes to the registry itself.
//! - **Pins.** [`Pins`]: a blob pinned until a time is never evicted and keeps its own
//!   copy (the kubelet may garbage-collect containerd's): it is not moved onto
//!   containerd's file, and one moved before the pin gets its own copy back.
//!   Persisted under `pins/`.
//! - **One copy with containerd.** Where containerd's content store is readable
//!   (`--containerd-root`), a complete blob containerd also holds (same digest, same
//!   length) is served from containerd's file and the agent's own copy is deleted
//!   ([`crate::store::BlobFile::serve_from`]). When containerd deletes its file, the
//!   node forgets the blob. Checked every [`CHECK_EVERY`].
//! - **Filesystem.** [`filesystem_warning`]: a data directory on tmpfs or an overlay
//!   lives in memory or in a layer that does not survive a Kairos upgrade.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use swarm_proto::Digest;
use tracing::{debug, info, warn};

use crate::node::{DownloadState, Node};

/// The default budget: this share (in %) of the data directory's filesystem size.
pub const DEFAULT_SHARE_PERCENT: u64 = 25;
/// How often the disk is checked (containerd's copies, deletions, the budget).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// k3s's containerd root, looked for first when `--containerd-root` is not given.
pub const K3S_CONTAINERD_ROOT: &str = "/var/lib/rancher/k3s/agent/containerd";
/// Plain containerd's root, looked for second.
pub const CONTAINERD_ROOT: &str = "/var/lib/containerd";
/// Where a containerd root keeps its blobs.
const CONTENT_BLOBS: &str = "io.containerd.content.v1.content/blobs/sha256";

/// `statfs` magic numbers of the filesystems the agent warns about.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const OVERLAYFS_MAGIC: i64 = 0x794c_7630;

/// One blob as the eviction policy sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub digest: Digest,
    /// Bytes it takes in the data directory.
    pub size: u64,
    pub last_use: SystemTime,
    /// Being downloaded or served to containerd.
    pub busy: bool,
    pub pinned: bool,
}

/// Why a blob cannot be admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "a {need}-byte blob cannot fit the cache budget of {budget} bytes: {kept} bytes are in use by blobs being \
     downloaded, served or pinned (raise --cache-size)"
)]
pub struct NoRoom {
    pub need: u64,
    pub budget: u64,
    pub kept: u64,
}

/// The blobs to evict, least recently used first, so that `incoming` more bytes fit
/// the budget. Busy and pinned blobs are never chosen; when even evicting every other
/// blob leaves too little room, [`NoRoom`]. With `incoming == 0` this brings use back
/// under the budget as far as it can (never an error).
pub fn plan_evictions(candidates: &[Candidate], budget: u64, incoming: u64) -> Result<Vec<Digest>, NoRoom> {
    let kept: u64 = candidates.iter().filter(|c| c.busy || c.pinned).map(|c| c.size).sum();
    if incoming > 0 && kept.saturating_add(incoming) > budget {
        return Err(NoRoom { need: incoming, budget, kept });
    }
    let mut used: u64 = candidates.iter().map(|c| c.size).sum::<u64>().saturating_add(incoming);
    let mut evictable: Vec<&Candidate> = candidates.iter().filter(|c| !c.busy && !c.pinned).collect();
    evictable.sort_by_key(|c| (c.last_use, c.digest));
    let mut out = Vec::new();
    for c in evictable {
        if used <= budget {
            break;
        }
        used -= c.size;
        out.push(c.digest);
    }
    Ok(out)
}

/// Errors of the pin records.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct PinError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Blobs pinned until a time: `pins/<64 hex>` in the data directory holds the end of
/// the pin in seconds since the Unix epoch. The staging issue drives them.
#[derive(Clone, Debug)]
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join("pins") }
    }

    /// Pins `digest` until `until` (replacing an earlier pin).
    pub fn pin(&self, digest: &Digest, until: SystemTime) -> Result<(), PinError> {
        fn err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PinError + 'a {
            move |source| PinError { action, path: path.to_path_buf(), source }
        }
        std::fs::create_dir_all(&self.dir).map_err(err("cannot create", &self.dir))?;
        let secs = until.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let path = self.dir.join(digest.hex());
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, secs.to_string()).map_err(err("cannot write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(err("cannot rename", &tmp))
    }

    /// Removes `digest`'s pin, if any.
    pub fn unpin(&self, digest: &Digest) -> Result<(), PinError> {
        let path = self.dir.join(digest.hex());
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(PinError { action: "cannot remove", path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Whether `digest` is pinned at `now`. An unreadable pin counts as pinned.
    pub fn is_pinned(&self, digest: &Digest, now: SystemTime) -> bool {
        let Ok(text) = std::fs::read_to_string(self.dir.join(digest.hex())) else { return false };
        let Ok(secs) = text.trim().parse::<u64>() else { return true };
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) > now
    }
}

/// The containerd root to read blobs from: `configured` if given (`none` or empty:
/// off), else k3s's root if it exists, else plain containerd's, else none.
pub fn containerd_root(configured: Option<&Path>) -> Option<PathBuf> {
    match configured {
        Some(p) if p.as_os_str().is_empty() || p == Path::new("none") => None,
        Some(p) => Some(p.to_path_buf()),
        None => [K3S_CONTAINERD_ROOT, CONTAINERD_ROOT].iter().map(PathBuf::from).find(|p| p.is_dir()),
    }
}

/// The size in bytes of the filesystem holding `path`.
pub fn filesystem_size(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_blocks.saturating_mul(s.f_frsize))
}

/// What is wrong with keeping the data directory at `path`, if anything: tmpfs (in
/// memory, lost on reboot) or an overlay (on Kairos `/var` is one unless
/// bind-mounted: its blobs live in RAM or do not survive an upgrade).
pub fn filesystem_warning(path: &Path) -> Option<String> {
    let s = rustix::fs::statfs(path).ok()?;
    #[allow(clippy::unnecessary_cast)]
    let kind = match s.f_type as i64 {
        TMPFS_MAGIC => "tmpfs (memory: the cache costs RAM and is lost on reboot)",
        OVERLAYFS_MAGIC => {
            "an overlay (on Kairos /var is one unless bind-mounted to a persistent partition: the cache may live \
             in RAM and is lost on reboot or upgrade)"
        }
        _ => return None,
    };
    Some(format!("data directory {} is on {kind}; put --data-dir on a persistent disk", path.display()))
}

/// The node's disk manager. See the module docs. Cheap to share (`Arc`).
pub struct Disk {
    node: Node,
    budget: u64,
    /// containerd's `.../content/blobs/sha256` directory, when dedup is on.
    containerd_blobs: Option<PathBuf>,
    pins: Pins,
    /// Mirror responses in flight per blob.
    serving: Mutex<HashMap<Digest, usize>>,
    /// Admission and the periodic check take turns.
    turn: tokio::sync::Mutex<()>,
}

/// Held while the mirror streams a blob: the blob counts as busy.
pub struct ServingGuard {
    disk: Arc<Disk>,
    digest: Digest,
}

impl Drop for ServingGuard {
    fn drop(&mut self) {
        let mut serving = self.disk.serving.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = serving.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                serving.remove(&self.digest);
            }
        }
    }
}

impl Disk {
    /// A manager of `node`'s store with a budget of `budget` bytes, reading containerd's
    /// blobs under `containerd_root` when given.
    pub fn new(node: Node, budget: u64, containerd_root: Option<&Path>) -> Arc<Self> {
        let pins = Pins::new(node.store().root());
        Arc::new(Self {
            containerd_blobs: containerd_root.map(|r| r.join(CONTENT_BLOBS)),
            node,
            budget,
            pins,
            serving: Mutex::default(),
            turn: tokio::sync::Mutex::new(()),
        })
    }

    /// The byte budget of the store.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The pins of this node's blobs.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Bytes of the store that a new stage cannot count on: blobs pinned, being
    /// downloaded or served, other than `except` (the stage's own blobs).
    pub fn kept_bytes(&self, except: &[Digest]) -> u64 {
        let candidates = self.candidates(None);
        candidates.iter().filter(|c| (c.busy || c.pinned) && !except.contains(&c.digest)).map(|c| c.size).sum()
    }

    /// Records a use of `digest` (LRU order) and marks it busy until the guard drops.
    pub fn serving(self: &Arc<Self>, digest: Digest) -> ServingGuard {
        self.node.store().touch(&digest);
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()).entry(digest).or_default() += 1;
        ServingGuard { disk: self.clone(), digest }
    }

    /// Makes room for a new blob of `length` bytes, evicting least recently used
    /// blobs; [`NoRoom`] when it cannot fit even after evicting all it may.
    pub async fn admit(&self, digest: &Digest, length: u64) -> Result<(), NoRoom> {
        let _turn = self.turn.lock().await;
        let candidates = self.candidates(Some(digest));
        let evict = plan_evictions(&candidates, self.budget, length)?;
        for d in evict {
            self.forget(&d, "evicted to make room (least recently used)").await;
        }
        Ok(())
    }

    /// Runs the periodic check every [`CHECK_EVERY`] until the node shuts down.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.node.cancelled() => return,
                () = tokio::time::sleep(CHECK_EVERY) => {}
            }
            self.check().await;
        }
    }

    /// One check: moves complete blobs onto containerd's copies, forgets blobs whose
    /// containerd copy is gone or broken, and evicts down to the budget.
    pub async fn check(&self) {
        let _turn = self.turn.lock().await;
        let Ok(digests) = self.node.store().blobs() else { return };
        for digest in digests {
            let live = self.node.download(&digest);
            if live.as_ref().is_some_and(|d| d.blob().is_broken()) {
                self.forget(&digest, "containerd's copy failed its piece hashes").await;
                continue;
            }
            if let Some(source) = self.node.store().source(&digest) {
                if !source.exists() {
                    self.forget(&digest, "containerd deleted its copy").await;
                } else if self.pins.is_pinned(&digest, SystemTime::now()) {
                    self.own_copy(&digest, live.as_ref().map(|d| d.blob().clone())).await;
                }
                continue;
            }
            self.dedup(&digest, live.as_ref().map(|d| d.blob().clone())).await;
        }
        let candidates = self.candidates(None);
        if let Ok(evict) = plan_evictions(&candidates, self.budget, 0) {
            for d in evict {
                self.forget(&d, "evicted: the cache is over its budget (least recently used)").await;
            }
        }
    }

    /// Serves a complete, unpinned blob from containerd's copy when there is one.
    async fn dedup(&self, digest: &Digest, live: Option<Arc<crate::store::BlobFile>>) {
        let Some(blobs) = &self.containerd_blobs else { return };
        let theirs = blobs.join(digest.hex());
        if !theirs.is_file() || self.pins.is_pinned(digest, SystemTime::now()) {
            return;
        }
        let store = self.node.store().clone();
        let d = *digest;
        let moved = tokio::task::spawn_blocking(move || {
            let blob = match live {
                Some(b) => b,
                None => match store.metainfo(&d)? {
                    Some(m) if store.complete_blobs()?.contains(&d) => Arc::new(store.open_blob(&m)?),
                    _ => return Ok(false),
                },
            };
            blob.serve_from(&theirs)
        })
        .await;
        match moved {
            Ok(Ok(true)) => info!(%digest, "served from containerd's content store; own copy deleted"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(%digest, error = %e, "cannot serve from containerd's copy"),
            Err(e) => warn!(%digest, error = %e, "containerd copy check failed"),
        }
    }

    /// Gives a pinned blob served from containerd's file its own copy back.
    async fn own_copy(&self, digest: &Digest, live: Option<Arc<crate::store::BlobFile>>) {
        let store = self.node.store().clone();
        let d = *digest;
        let taken = tokio::task::spawn_blocking(move || {
            let blob = match live {
                Some(b) => b,
                None => match store.metainfo(&d)? {
                    Some(m) => Arc::new(store.open_blob(&m)?),
                    None => return Ok(false),
                },
            };
            blob.take_own_copy()
        })
        .await;
        match taken {
            Ok(Ok(true)) => info!(%digest, "pinned: own copy taken back from containerd's content store"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(%digest, error = %e, "cannot take a pinned blob's own copy back"),
            Err(e) => warn!(%digest, error = %e, "own copy task failed"),
        }
    }

    /// Every blob in the store as the policy sees it (`except` left out).
    fn candidates(&self, except: Option<&Digest>) -> Vec<Candidate> {
        let store = self.node.store();
        let now = SystemTime::now();
        let serving = self.serving.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Ok(digests) = store.blobs() else { return Vec::new() };
        digests
            .into_iter()
            .filter(|d| Some(d) != except)
            .map(|digest| {
                let running =
                    self.node.download(&digest).is_some_and(|d| d.progress().borrow().state == DownloadState::Running);
                Candidate {
                    digest,
                    size: store.disk_usage(&digest),
                    last_use: store.last_use(&digest).unwrap_or(SystemTime::UNIX_EPOCH),
                    busy: running || serving.contains_key(&digest),
                    pinned: self.pins.is_pinned(&digest, now),
                }
            })
            .collect()
    }

    /// Stops serving `digest`, removes it from the store and tells the tracker.
    async fn forget(&self, digest: &Digest, why: &str) {
        info!(%digest, why, "dropping blob");
        if self.node.download(digest).is_some() {
            self.node.abandon(digest, why.to_string()).await;
        }
        if let Err(e) = self.node.store().remove(digest) {
            warn!(%digest, error = %e, "cannot remove the blob's files");
        }
        if let Err(e) = self.node.tracker().leave(self.node.peer_id(), *digest).await {
            debug!(%digest, error = %e, "cannot tell the tracker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8, size: u64, age: u64, busy: bool, pinned: bool) -> Candidate {
        Candidate {
            digest: Digest([n; 32]),
            size,
            last_use: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 - age),
            busy,
            pinned,
        }
    }

    #[test]
    fn the_least_recently_used_go_first_and_only_as_many_as_needed() {
        let blobs = [c(1, 40, 10, false, false), c(2, 40, 30, false, false), c(3, 40, 20, false, false)];
        assert_eq!(plan_evictions(&blobs, 200, 0), Ok(vec![]));
        assert_eq!(plan_evictions(&blobs, 100, 0), Ok(vec![Digest([2; 32])]));
        assert_eq!(plan_evictions(&blobs, 100, 50), Ok(vec![Digest([2; 32]), Digest([3; 32])]));
        assert_eq!(plan_evictions(&blobs, 100, 100), Ok(vec![Digest([2; 32]), Digest([3; 32]), Digest([1; 32])]));
    }

    #[test]
    fn busy_and_pinned_blobs_are_never_evicted_and_a_blob_that_cannot_fit_is_refused() {
        let blobs = [c(1, 40, 90, true, false), c(2, 40, 80, false, true), c(3, 40, 10, false, false)];
        assert_eq!(plan_evictions(&blobs, 60, 0), Ok(vec![Digest([3; 32])]), "over budget: only the free one goes");
        assert_eq!(plan_evictions(&blobs, 100, 20), Ok(vec![Digest([3; 32])]));
        assert_eq!(plan_evictions(&blobs, 100, 21), Err(NoRoom { need: 21, budget: 100, kept: 80 }));
        assert_eq!(plan_evictions(&[], 100, 101), Err(NoRoom { need: 101, budget: 100, kept: 0 }));
    }

    #[test]
    fn pins_last_until_their_time_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Digest([5; 32]);
        let now = SystemTime::now();
        let pins = Pins::new(dir.path());
        assert!(!pins.is_pinned(&d, now));
        pins.pin(&d, now + Duration::from_secs(60)).expect("pin");
        assert!(Pins::new(dir.path()).is_pinned(&d, now), "read back from disk");
        assert!(!pins.is_pinned(&d, now + Duration::from_secs(61)), "expired");
        pins.unpin(&d).expect("unpin");
        assert!(!pins.is_pinned(&d, now));
        pins.unpin(&d).expect("unpinning twice is fine");
    }

    #[test]
    fn the_containerd_root_is_off_when_asked() {
        assert_eq!(containerd_root(Some(Path::new("none"))), None);
        assert_eq!(containerd_root(Some(Path::new("/x"))), Some(PathBuf::from("/x")));
    }

    #[test]
    fn a_tmpfs_data_directory_is_reported() {
        // /dev/shm is a tmpfs on Linux.
        let warning = filesystem_warning(Path::new("/dev/shm")).expect("/dev/shm is tmpfs");
        assert!(warning.contains("tmpfs"), "{warning}");
        assert!(filesystem_size(Path::new("/")).expect("statvfs") > 0);
    }
}
