//! Blobs on disk.
//!
//! Layout under the data directory:
//!
//! ```text
//! blobs/<64 hex>/layout    the blob's Layout (length, piece length), in the proto codec's framing
//! blobs/<64 hex>/hashes    the piece hashes known so far: 32 bytes each, piece 0 first
//! blobs/<64 hex>/data      the blob bytes, written piece by piece at their offsets
//! blobs/<64 hex>/have      the persisted bitfield: one bit per piece, MSB first
//! blobs/<64 hex>/complete  present once every piece is in and the whole digest matched
//! blobs/<64 hex>/source    (optional) the path of another file holding the complete blob
//!                          (containerd's content store): `data` is then gone
//! blobs/<64 hex>/used      (optional) its modification time is the blob's last use
//! ```
//!
//! Every piece read to be served ([`BlobFile::read_piece_into`]: to a peer or to the
//! mirror) is checked against its sha256 first, whatever file it is read from: a disk
//! can rot, or someone can write into the file, after the piece was verified. The
//! cost is one sha256 per served piece. What a piece that does not verify leads to
//! depends on the file (the decision is `swarm_core::node::after_bad_read`):
//!
//! - the blob's own `data`: the piece is dropped ([`BlobFile::has_piece`] turns
//!   false, its bit is cleared in `have`, `complete` is removed), so the blob is
//!   incomplete again and its owner fetches that piece again;
//! - another program's file (below): the blob is marked broken
//!   ([`BlobFile::is_broken`]): it is no longer complete, and its owner should forget
//!   it;
//! - a seeded file served in place: the piece is dropped from the in-memory bitfield
//!   only (the node never writes into a file it was asked to seed).
//!
//! Either way the read fails with [`StoreError::PieceMismatch`], so no caller ever
//! gets the bad bytes.
//!
//! A complete blob may move its bytes out ([`BlobFile::serve_from`]): the node then
//! serves them from that file (containerd's copy), keeps only the layout and the piece
//! hashes. A restart reopens such a blob from its `source`; when that file is gone
//! (containerd deleted it) the blob is no longer held.
//!
//! Piece hashes may arrive after the layout: a blob streaming in from upstream has its
//! hashes published piece by piece by the node fetching it, so a [`BlobFile`] knows a
//! growing prefix of them ([`BlobFile::add_hashes`]) and refuses to store a piece whose
//! hash it does not know yet.
//!
//! A piece is hashed before it is written, and its bit is set in `have` only after
//! the write, so a process killed at any moment never claims a piece it did not
//! store. The `have` file is updated one byte at a time with positioned writes (no
//! rename per piece). Because a power loss could persist a bit before the data it
//! covers, the pieces an incomplete blob claims are hashed again when it is reopened;
//! a piece that no longer matches is simply fetched again. Complete blobs are synced
//! to disk when they complete and are not re-hashed on open.
//!
//! A seeded file is served where it lies ([`BlobFile::from_existing`]): no copy into
//! the data directory.
//!
//! All methods do blocking file I/O; async callers run them on the blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use sha2::{Digest as _, Sha256};
use swarm_proto::codec::{self, CodecError};
use swarm_proto::{Bitfield, Digest, Layout, Metainfo, PieceHasher, piece_length_for};

/// Errors from the piece store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("stored layout for {digest} is unreadable: {source}")]
    BadLayout {
        digest: Digest,
        #[source]
        source: CodecError,
    },
    #[error("piece {piece} of {digest} does not match its sha256")]
    PieceMismatch { digest: Digest, piece: u32 },
    #[error("the hash of piece {piece} of {digest} is not known yet")]
    HashUnknown { digest: Digest, piece: u32 },
    #[error("piece {piece} out of range for {digest}")]
    PieceOutOfRange { digest: Digest, piece: u32 },
    #[error("blob {expected} is incomplete: {have} of {count} pieces")]
    Incomplete { expected: Digest, have: u32, count: u32 },
    #[error("blob content hashes to {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("a different layout or piece hash is already stored for {digest}")]
    Conflict { digest: Digest },
    #[error("{path} is empty: there is nothing to share")]
    EmptyFile { path: PathBuf },
    #[error("the data directory {path} is in use by another swarm process; give each process its own --data-dir")]
    Locked { path: PathBuf },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { action, path: path.to_path_buf(), source }
}

/// The data directory: one subdirectory per blob. Held by one process at a time.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    _lock: std::sync::Arc<File>,
}

impl Store {
    /// Opens (creating if needed) a store rooted at `root`, and locks it against use
    /// by a second process.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let blobs = root.join("blobs");
        fs::create_dir_all(&blobs).map_err(io_err("cannot create", &blobs))?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("cannot open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Locked { path: root.to_path_buf() }),
            Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &lock_path)(e)),
        }
        Ok(Self { root: root.to_path_buf(), _lock: std::sync::Arc::new(lock) })
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_dir(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.hex())
    }

    /// Where the bytes of `digest` are (or would be) stored.
    pub fn data_path(&self, digest: &Digest) -> PathBuf {
        self.blob_dir(digest).join("data")
    }

    /// The layout stored for `digest`, if any.
    pub fn layout(&self, digest: &Digest) -> Result<Option<Layout>, StoreError> {
        let path = self.blob_dir(digest).join("layout");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot read", &path)(e)),
        };
        let layout: Layout = codec::decode_frame(&bytes, codec::MAX_PEER_FRAME_LEN)
            .map_err(|source| StoreError::BadLayout { digest: *digest, source })?;
        if layout.digest != *digest || layout.validate().is_err() {
            return Err(StoreError::BadLayout {
                digest: *digest,
                source: CodecError::Malformed("layout does not describe this blob".into()),
            });
        }
        Ok(Some(layout))
    }

    /// The full metainfo stored for `digest`, if its layout and every hash are known.
    pub fn metainfo(&self, digest: &Digest) -> Result<Option<Metainfo>, StoreError> {
        let Some(layout) = self.layout(digest)? else { return Ok(None) };
        let hashes = read_hashes(&self.blob_dir(digest).join("hashes"), layout.piece_count())?;
        if hashes.len() as u32 != layout.piece_count() {
            return Ok(None);
        }
        Ok(Some(Metainfo {
            digest: layout.digest,
            length: layout.length,
            piece_length: layout.piece_length,
            piece_hashes: hashes,
        }))
    }

    /// Opens the stored copy of a blob whose hashes are all known.
    pub fn open_blob(&self, metainfo: &Metainfo) -> Result<BlobFile, StoreError> {
        let blob = self.open_layout(metainfo.layout())?;
        blob.add_hashes(0, &metainfo.piece_hashes)?;
        Ok(blob)
    }

    /// Opens the stored copy of the blob laid out as `layout`, creating it empty if it
    /// is new. Hashes stored earlier are loaded; more may be added with
    /// [`BlobFile::add_hashes`]. An incomplete copy is resumed: the pieces its bitfield
    /// claims are re-hashed and kept when they match.
    pub fn open_layout(&self, layout: Layout) -> Result<BlobFile, StoreError> {
        let digest = layout.digest;
        let dir = self.blob_dir(&digest);
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        match self.layout(&digest) {
            Ok(Some(existing)) if existing != layout => {
                // An old copy with another layout: start over.
                for f in ["data", "have", "hashes", "complete", "source"] {
                    let _ = fs::remove_file(dir.join(f));
                }
                self.write_layout(&dir, &layout)?;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(StoreError::BadLayout { .. }) => self.write_layout(&dir, &layout)?,
            Err(e) => return Err(e),
        }
        let count = layout.piece_count();
        let hashes_path = dir.join("hashes");
        let hashes = read_hashes(&hashes_path, count)?;
        if let Some(source) = read_source(&dir) {
            let complete = dir.join("complete").exists() && hashes.len() as u32 == count;
            match File::open(&source) {
                Ok(file)
                    if complete && file.metadata().map_err(io_err("cannot stat", &source))?.len() == layout.length =>
                {
                    return Ok(BlobFile {
                        layout,
                        data_path: source.clone(),
                        file: std::sync::RwLock::new(DataFile { file, path: source, external: true }),
                        state: Mutex::new(BlobState { have: Bitfield::full(count), hashes, hashes_file: None }),
                        have_file: None,
                        dir: Some(dir),
                        verified: true.into(),
                        broken: false.into(),
                        prefix: Mutex::default(),
                    });
                }
                // The other copy is gone or changed: this node no longer holds the blob.
                _ => {
                    for f in ["source", "have", "complete", "data"] {
                        let _ = fs::remove_file(dir.join(f));
                    }
                }
            }
        }
        let hashes_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&hashes_path)
            .map_err(io_err("cannot open", &hashes_path))?;
        let data_path = dir.join("data");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io_err("cannot open", &data_path))?;
        let len = file.metadata().map_err(io_err("cannot stat", &data_path))?.len();
        if len != layout.length {
            file.set_len(layout.length).map_err(io_err("cannot size", &data_path))?;
        }
        let complete = dir.join("complete").exists() && len == layout.length && hashes.len() as u32 == count;
        let have_path = dir.join("have");
        let have_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&have_path)
            .map_err(io_err("cannot open", &have_path))?;
        let claimed = if complete {
            Bitfield::full(count)
        } else {
            let mut raw = Vec::new();
            (&have_file).read_to_end(&mut raw).map_err(io_err("cannot read", &have_path))?;
            raw.resize(count.div_ceil(8) as usize, 0);
            // Only bits of real pieces count; spare bits are ignored.
            let mut claimed = Bitfield::new(count);
            for i in 0..count {
                if raw[(i / 8) as usize] & (0x80 >> (i % 8)) != 0 {
                    claimed.set(i, true);
                }
            }
            claimed
        };
        let blob = BlobFile {
            layout,
            file: std::sync::RwLock::new(DataFile { file, path: data_path.clone(), external: false }),
            data_path,
            broken: false.into(),
            state: Mutex::new(BlobState { have: Bitfield::new(count), hashes, hashes_file: Some(hashes_file) }),
            have_file: Some(have_file),
            dir: Some(dir),
            verified: complete.into(),
            prefix: Mutex::default(),
        };
        let mut have = claimed;
        if !complete {
            // Re-check every claimed piece; rewrite the bitfield with what survived.
            let mut buf = Vec::new();
            for i in have.clone().ones() {
                blob.read_unchecked(i, &mut buf)?;
                if !blob.matches_hash(i, &buf) {
                    have.set(i, false);
                }
            }
            blob.rewrite_have(&have)?;
        }
        blob.state().have = have;
        Ok(blob)
    }

    fn write_layout(&self, dir: &Path, layout: &Layout) -> Result<(), StoreError> {
        let frame =
            codec::encode_frame(layout).map_err(|source| StoreError::BadLayout { digest: layout.digest, source })?;
        write_atomic(&dir.join("layout"), &frame)
    }

    /// Forgets a blob: removes its directory.
    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let dir = self.blob_dir(digest);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("cannot remove", &dir)(e)),
        }
    }

    /// Digests of every blob in the store, complete or not.
    pub fn blobs(&self) -> Result<Vec<Digest>, StoreError> {
        let blobs = self.root.join("blobs");
        let mut out = Vec::new();
        for entry in fs::read_dir(&blobs).map_err(io_err("cannot list", &blobs))? {
            let entry = entry.map_err(io_err("cannot list", &blobs))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            if let Ok(digest) = format!("sha256:{name}").parse::<Digest>() {
                out.push(digest);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The file a blob's bytes are served from instead of its own `data`, if any
    /// ([`BlobFile::serve_from`]).
    pub fn source(&self, digest: &Digest) -> Option<PathBuf> {
        read_source(&self.blob_dir(digest))
    }

    /// The disk space a blob takes in the data directory (allocated blocks, so a
    /// sparse partial download counts what it holds). Bytes served from another file
    /// are not counted.
    pub fn disk_usage(&self, digest: &Digest) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = fs::read_dir(self.blob_dir(digest)) else { return 0 };
        entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum()
    }

    /// Records that `digest` was used now (LRU order survives restarts: the time is a
    /// file's modification time).
    pub fn touch(&self, digest: &Digest) {
        let dir = self.blob_dir(digest);
        if dir.is_dir() {
            let path = dir.join("used");
            let _ = File::create(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        }
    }

    /// When `digest` was last used: its `used` mark, else when it completed, else when
    /// its directory last changed.
    pub fn last_use(&self, digest: &Digest) -> Option<std::time::SystemTime> {
        let dir = self.blob_dir(digest);
        ["used", "complete", ""].iter().find_map(|f| fs::metadata(dir.join(f)).and_then(|m| m.modified()).ok())
    }

    /// Digests of every complete blob in the store.
    pub fn complete_blobs(&self) -> Result<Vec<Digest>, StoreError> {
        let blobs = self.root.join("blobs");
        let mut out = Vec::new();
        for entry in fs::read_dir(&blobs).map_err(io_err("cannot list", &blobs))? {
            let entry = entry.map_err(io_err("cannot list", &blobs))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else { continue };
            if entry.path().join("complete").exists() {
                out.push(digest);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Completes the blobs a crash left with every piece stored but no `complete`
    /// marker (the process died between the last piece and the whole-blob check):
    /// their pieces are re-checked on open, the whole digest is checked, and the
    /// marker is written, so the node announces and serves them again instead of
    /// nobody ever finishing them. Returns the blobs completed. A piece that fails its
    /// hash is dropped and the blob stays incomplete; a whole digest that does not
    /// match drops every piece, as after a download.
    pub fn finish_interrupted(&self) -> Result<Vec<Digest>, StoreError> {
        let blobs = self.root.join("blobs");
        let mut done = Vec::new();
        for entry in fs::read_dir(&blobs).map_err(io_err("cannot list", &blobs))? {
            let entry = entry.map_err(io_err("cannot list", &blobs))?;
            let dir = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else { continue };
            if dir.join("complete").exists() || dir.join("source").exists() {
                continue;
            }
            let Ok(Some(layout)) = self.layout(&digest) else { continue };
            let count = layout.piece_count();
            // Cheap tests first: every hash known and every piece claimed.
            let hashes_len = fs::metadata(dir.join("hashes")).map(|m| m.len()).unwrap_or(0);
            if hashes_len < u64::from(count) * 32 {
                continue;
            }
            let claimed = fs::read(dir.join("have")).unwrap_or_default();
            let all_claimed =
                (0..count).all(|i| claimed.get((i / 8) as usize).is_some_and(|b| b & (0x80 >> (i % 8)) != 0));
            if !all_claimed {
                continue;
            }
            let blob = self.open_layout(layout)?;
            if blob.have().is_complete() && blob.verify().is_ok() {
                blob.persist()?;
                done.push(digest);
            }
        }
        done.sort();
        Ok(done)
    }
}

fn read_source(dir: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string(dir.join("source")).ok()?;
    let path = PathBuf::from(text.trim_end_matches('\n'));
    path.is_absolute().then_some(path)
}

fn read_hashes(path: &Path, count: u32) -> Result<Vec<[u8; 32]>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("cannot read", path)(e)),
    };
    // A torn last entry (crash mid-append) is dropped; it is simply learned again.
    Ok(bytes
        .chunks_exact(32)
        .take(count as usize)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect())
}

/// Hashes a whole file into its metainfo, calling `progress` with the bytes hashed so
/// far. The piece length follows [`piece_length_for`].
pub fn hash_file(path: &Path, mut progress: impl FnMut(u64)) -> Result<Metainfo, StoreError> {
    let mut file = File::open(path).map_err(io_err("cannot open", path))?;
    let len = file.metadata().map_err(io_err("cannot stat", path))?.len();
    if len == 0 {
        return Err(StoreError::EmptyFile { path: path.to_path_buf() });
    }
    let mut hasher = PieceHasher::new(piece_length_for(len));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress(hasher.length());
    }
    Ok(hasher.finish())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(io_err("cannot write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("cannot rename", &tmp))
}

/// Where a [`BlobFile`]'s bytes are read from.
struct DataFile {
    file: File,
    path: PathBuf,
    /// Another program's file (containerd's): read only, every piece verified on read.
    external: bool,
}

/// What a [`BlobFile`] knows and changes under its lock.
struct BlobState {
    have: Bitfield,
    /// Hashes of pieces `0..hashes.len()`.
    hashes: Vec<[u8; 32]>,
    /// Append-only record of `hashes`; `None` for a seeded file served in place.
    hashes_file: Option<File>,
}

/// One blob's bytes, its known piece hashes and the record of which pieces are
/// verified.
pub struct BlobFile {
    layout: Layout,
    data_path: PathBuf,
    /// The open bytes; replaced once by [`BlobFile::serve_from`].
    file: std::sync::RwLock<DataFile>,
    /// A piece read from another file did not verify (see the module docs).
    broken: std::sync::atomic::AtomicBool,
    state: Mutex<BlobState>,
    /// `None` for a seeded file served in place (always complete).
    have_file: Option<File>,
    /// `None` for a seeded file served in place.
    dir: Option<PathBuf>,
    /// Whether the whole blob is known to match its digest.
    verified: std::sync::atomic::AtomicBool,
    /// The whole-blob hash, advanced over the verified prefix as pieces arrive.
    prefix: Mutex<PrefixDigest>,
}

/// SHA-256 over pieces `0..next` of a blob. Pieces arrive roughly in order (rarest
/// first starts from the pieces the upstream stream delivered first), so hashing
/// the contiguous prefix as it grows leaves [`BlobFile::finish`] only the tail,
/// instead of a whole second pass over the blob at the moment every node completes
/// at once.
#[derive(Default)]
struct PrefixDigest {
    hasher: Sha256,
    next: u32,
}

impl BlobFile {
    /// Serves an existing, already hashed file in place (the seed case).
    pub fn from_existing(path: &Path, metainfo: Metainfo) -> Result<Self, StoreError> {
        let file = File::open(path).map_err(io_err("cannot open", path))?;
        let count = metainfo.piece_count();
        Ok(Self {
            layout: metainfo.layout(),
            data_path: path.to_path_buf(),
            file: std::sync::RwLock::new(DataFile { file, path: path.to_path_buf(), external: false }),
            broken: false.into(),
            state: Mutex::new(BlobState {
                have: Bitfield::full(count),
                hashes: metainfo.piece_hashes,
                hashes_file: None,
            }),
            have_file: None,
            dir: None,
            verified: true.into(),
            prefix: Mutex::default(),
        })
    }

    /// Digest, length and piece length.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The full metainfo, once every piece hash is known.
    pub fn metainfo(&self) -> Option<Metainfo> {
        let st = self.state();
        (st.hashes.len() as u32 == self.layout.piece_count()).then(|| Metainfo {
            digest: self.layout.digest,
            length: self.layout.length,
            piece_length: self.layout.piece_length,
            piece_hashes: st.hashes.clone(),
        })
    }

    /// Number of leading pieces whose hash is known.
    pub fn known_hashes(&self) -> u32 {
        self.state().hashes.len() as u32
    }

    /// The known hashes of pieces `first..first + count` (fewer if not all known).
    pub fn hashes(&self, first: u32, count: u32) -> Vec<[u8; 32]> {
        let st = self.state();
        let start = (first as usize).min(st.hashes.len());
        let end = (start + count as usize).min(st.hashes.len());
        st.hashes[start..end].to_vec()
    }

    /// Learns the hashes of pieces `first..first + hashes.len()`. Hashes already known
    /// must agree ([`StoreError::Conflict`] otherwise); a gap after the known prefix is
    /// refused the same way. Returns how many were new.
    pub fn add_hashes(&self, first: u32, hashes: &[[u8; 32]]) -> Result<u32, StoreError> {
        let count = self.layout.piece_count() as usize;
        let mut st = self.state();
        let known = st.hashes.len();
        let first = first as usize;
        if first > known || first + hashes.len() > count {
            return Err(StoreError::Conflict { digest: self.layout.digest });
        }
        let overlap = (known - first).min(hashes.len());
        if st.hashes[first..first + overlap] != hashes[..overlap] {
            return Err(StoreError::Conflict { digest: self.layout.digest });
        }
        let new = &hashes[overlap..];
        if new.is_empty() {
            return Ok(0);
        }
        if let Some(f) = &mut st.hashes_file {
            let bytes: Vec<u8> = new.iter().flatten().copied().collect();
            f.write_all(&bytes).map_err(io_err("cannot write", &self.data_path))?;
        }
        st.hashes.extend_from_slice(new);
        Ok(new.len() as u32)
    }

    /// Where the blob's bytes were opened from (its own `data`, a seeded file, or the
    /// `source` it was reopened from); see [`BlobFile::source`] after `serve_from`.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    fn state(&self) -> MutexGuard<'_, BlobState> {
        // Every update under this lock is a single bit flip or an append that is
        // complete before the guard drops, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the verified-pieces bitfield.
    pub fn have(&self) -> Bitfield {
        self.state().have.clone()
    }

    pub fn has_piece(&self, piece: u32) -> bool {
        self.state().have.get(piece)
    }

    pub fn is_complete(&self) -> bool {
        self.state().have.is_complete()
    }

    fn check_range(&self, piece: u32) -> Result<(), StoreError> {
        if piece >= self.layout.piece_count() {
            return Err(StoreError::PieceOutOfRange { digest: self.layout.digest, piece });
        }
        Ok(())
    }

    fn matches_hash(&self, piece: u32, data: &[u8]) -> bool {
        let expected = self.state().hashes.get(piece as usize).copied();
        expected.is_some_and(|h| data.len() == self.layout.piece_len(piece) as usize && Sha256::digest(data)[..] == h)
    }

    fn data(&self) -> std::sync::RwLockReadGuard<'_, DataFile> {
        // Replaced whole under the write lock: a poisoned lock still holds a valid file.
        self.file.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads piece `piece` into `buf` (resized to the piece's length) and checks it
    /// against its hash. A piece that does not match is dropped or marks the blob
    /// broken (see the module docs) and is [`StoreError::PieceMismatch`]: `buf` then
    /// holds bytes that must not be used.
    pub fn read_piece_into(&self, piece: u32, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        let external = self.read_unchecked(piece, buf)?;
        if !self.matches_hash(piece, buf) {
            self.drop_bad_piece(piece, external);
            return Err(StoreError::PieceMismatch { digest: self.layout.digest, piece });
        }
        Ok(())
    }

    /// Reads piece `piece` into `buf` without checking it; returns whether it came
    /// from another program's file.
    fn read_unchecked(&self, piece: u32, buf: &mut Vec<u8>) -> Result<bool, StoreError> {
        self.check_range(piece)?;
        buf.resize(self.layout.piece_len(piece) as usize, 0);
        let data = self.data();
        data.file.read_exact_at(buf, self.layout.piece_offset(piece)).map_err(io_err("cannot read", &data.path))?;
        Ok(data.external)
    }

    /// Reads `buf.len()` bytes at `offset` of the blob: whole pieces, each checked as
    /// [`BlobFile::read_piece_into`] does.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let mut piece_buf = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let piece = self.layout.piece_at(at);
            self.read_piece_into(piece, &mut piece_buf)?;
            let skip = (at - self.layout.piece_offset(piece)) as usize;
            let n = (piece_buf.len() - skip).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&piece_buf[skip..skip + n]);
            done += n;
        }
        Ok(())
    }

    /// A piece read to be served failed its hash: drop it (see the module docs).
    fn drop_bad_piece(&self, piece: u32, external: bool) {
        let digest = self.layout.digest;
        if external {
            tracing::warn!(%digest, piece, "a piece read from containerd's copy does not match its hash; dropping the blob");
            self.broken.store(true, std::sync::atomic::Ordering::Release);
        } else {
            tracing::warn!(%digest, piece, path = %self.data_path.display(), "a stored piece no longer matches its hash (the disk or someone changed it); dropping the piece");
        }
        self.verified.store(false, std::sync::atomic::Ordering::Release);
        let mut st = self.state();
        st.have.set(piece, false);
        if let Some(have_file) = &self.have_file {
            let byte_index = (piece / 8) as usize;
            let byte = st.have.as_bytes()[byte_index];
            if let Err(e) = have_file.write_all_at(&[byte], byte_index as u64) {
                tracing::warn!(%digest, piece, error = %e, "cannot record the dropped piece; a restart re-checks it");
            }
        }
        drop(st);
        if let Some(dir) = &self.dir {
            let _ = fs::remove_file(dir.join("complete"));
        }
    }

    /// What kind of file the bytes are read from, for `swarm_core::node::after_bad_read`.
    pub fn copy_kind(&self) -> swarm_core::node::CopyKind {
        use swarm_core::node::CopyKind;
        if self.dir.is_none() {
            CopyKind::Seeded
        } else if self.data().external {
            CopyKind::External
        } else {
            CopyKind::Own
        }
    }

    /// Whether a piece served from another file failed its hash (see the module docs).
    pub fn is_broken(&self) -> bool {
        self.broken.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The other program's file the bytes are served from, if they are.
    pub fn source(&self) -> Option<PathBuf> {
        let data = self.data();
        data.external.then(|| data.path.clone())
    }

    /// Takes the bytes back from the other file [`BlobFile::serve_from`] moved them to
    /// (a pinned blob keeps its own copy): copies every piece, verified, into the
    /// blob's own `data`, syncs it, switches reads to it and drops `source`. Returns
    /// `Ok(false)` when the bytes are already the blob's own.
    pub fn take_own_copy(&self) -> Result<bool, StoreError> {
        let Some(dir) = &self.dir else { return Ok(false) };
        if !self.data().external {
            return Ok(false);
        }
        let own = dir.join("data");
        let tmp = dir.join("data.tmp");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("cannot create", &tmp))?;
        let mut buf = Vec::new();
        for piece in 0..self.layout.piece_count() {
            self.read_piece_into(piece, &mut buf)?;
            file.write_all_at(&buf, self.layout.piece_offset(piece)).map_err(io_err("cannot write", &tmp))?;
        }
        file.sync_all().map_err(io_err("cannot sync", &tmp))?;
        fs::rename(&tmp, &own).map_err(io_err("cannot rename", &tmp))?;
        let mut data = self.file.write().unwrap_or_else(|e| e.into_inner());
        *data = DataFile { file, path: own, external: false };
        let source = dir.join("source");
        fs::remove_file(&source).map_err(io_err("cannot remove", &source))?;
        Ok(true)
    }

    /// Serves this complete, persisted blob from `path` (containerd's copy of the same
    /// blob) from now on: records it in `source`, switches reads to it (each piece
    /// verified on read) and deletes the blob's own `data`. The layout and hashes stay.
    /// Refused (returns `Ok(false)`) when the blob is not complete, is a seeded file,
    /// already served from elsewhere, or `path` has another length.
    pub fn serve_from(&self, path: &Path) -> Result<bool, StoreError> {
        let Some(dir) = &self.dir else { return Ok(false) };
        if !self.verified.load(std::sync::atomic::Ordering::Acquire) || !dir.join("complete").exists() {
            return Ok(false);
        }
        let mut data = self.file.write().unwrap_or_else(|e| e.into_inner());
        if data.external {
            return Ok(false);
        }
        let file = File::open(path).map_err(io_err("cannot open", path))?;
        if file.metadata().map_err(io_err("cannot stat", path))?.len() != self.layout.length {
            return Ok(false);
        }
        write_atomic(&dir.join("source"), path.as_os_str().as_encoded_bytes())?;
        *data = DataFile { file, path: path.to_path_buf(), external: true };
        let own = dir.join("data");
        fs::remove_file(&own).map_err(io_err("cannot remove", &own))?;
        Ok(true)
    }

    /// Verifies `data` against piece `piece`'s hash and, when it matches, stores it and
    /// marks it held. Returns `Ok(false)` when the piece was already held (nothing
    /// written), [`StoreError::PieceMismatch`] when the bytes are wrong and
    /// [`StoreError::HashUnknown`] when the piece's hash has not been learned yet.
    pub fn write_piece(&self, piece: u32, data: &[u8]) -> Result<bool, StoreError> {
        self.check_range(piece)?;
        let expected = self.state().hashes.get(piece as usize).copied();
        let Some(expected) = expected else {
            return Err(StoreError::HashUnknown { digest: self.layout.digest, piece });
        };
        if data.len() != self.layout.piece_len(piece) as usize || Sha256::digest(data)[..] != expected {
            return Err(StoreError::PieceMismatch { digest: self.layout.digest, piece });
        }
        self.store_checked(piece, data)
    }

    /// Stores piece `piece` from the blob's source (the upstream registry): hashes the
    /// bytes once, records that hash as the piece's hash (a different hash already
    /// known is [`StoreError::Conflict`]) and stores them. Returns the hash and
    /// whether the piece was new.
    pub fn write_source_piece(&self, piece: u32, data: &[u8]) -> Result<([u8; 32], bool), StoreError> {
        self.check_range(piece)?;
        if data.len() != self.layout.piece_len(piece) as usize {
            return Err(StoreError::PieceMismatch { digest: self.layout.digest, piece });
        }
        let hash: [u8; 32] = Sha256::digest(data).into();
        self.add_hashes(piece, &[hash])?;
        Ok((hash, self.store_checked(piece, data)?))
    }

    /// Writes bytes already checked against the piece's hash and marks them held.
    fn store_checked(&self, piece: u32, data: &[u8]) -> Result<bool, StoreError> {
        if self.has_piece(piece) {
            return Ok(false);
        }
        {
            let file = self.data();
            file.file
                .write_all_at(data, self.layout.piece_offset(piece))
                .map_err(io_err("cannot write", &file.path))?;
        }
        let mut st = self.state();
        if st.have.get(piece) {
            // A concurrent writer stored the same verified bytes first.
            return Ok(false);
        }
        st.have.set(piece, true);
        if let Some(have_file) = &self.have_file {
            let byte_index = (piece / 8) as usize;
            let byte = st.have.as_bytes()[byte_index];
            have_file.write_all_at(&[byte], byte_index as u64).map_err(io_err("cannot write", &self.data_path))?;
        }
        drop(st);
        // Never waits: if another writer is advancing the prefix, it will get here too.
        if let Ok(mut prefix) = self.prefix.try_lock() {
            self.advance_prefix(&mut prefix, Some((piece, data)))?;
        }
        Ok(true)
    }

    /// Hashes the held pieces that extend `prefix`, using `just` (a piece and its
    /// bytes, if at hand) instead of reading it back.
    fn advance_prefix(&self, prefix: &mut PrefixDigest, just: Option<(u32, &[u8])>) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        while prefix.next < self.layout.piece_count() && self.has_piece(prefix.next) {
            match just {
                Some((piece, data)) if piece == prefix.next => prefix.hasher.update(data),
                _ => {
                    // Unchecked: the whole digest this feeds checks these bytes.
                    self.read_unchecked(prefix.next, &mut buf)?;
                    prefix.hasher.update(&buf);
                }
            }
            prefix.next += 1;
        }
        Ok(())
    }

    fn rewrite_have(&self, have: &Bitfield) -> Result<(), StoreError> {
        if let Some(f) = &self.have_file {
            f.set_len(0).map_err(io_err("cannot truncate", &self.data_path))?;
            f.write_all_at(have.as_bytes(), 0).map_err(io_err("cannot write", &self.data_path))?;
        }
        Ok(())
    }

    /// Checks the whole blob against its digest once every piece is in. On a mismatch
    /// every piece is forgotten (the caller should drop the blob and tell the
    /// tracker). The blob may be served and used as soon as this succeeds.
    pub fn verify(&self) -> Result<(), StoreError> {
        if self.verified.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let have = self.have();
        if !have.is_complete() {
            return Err(StoreError::Incomplete { expected: self.layout.digest, have: have.count(), count: have.len() });
        }
        let actual = {
            let mut prefix = self.prefix.lock().unwrap_or_else(|e| e.into_inner());
            self.advance_prefix(&mut prefix, None)?;
            Digest(std::mem::take(&mut *prefix).hasher.finalize().into())
        };
        if actual != self.layout.digest {
            let empty = Bitfield::new(self.layout.piece_count());
            self.rewrite_have(&empty)?;
            self.state().have = empty;
            return Err(StoreError::DigestMismatch { expected: self.layout.digest, actual });
        }
        self.verified.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Makes a verified blob durable: syncs its bytes to disk, then writes the marker
    /// that lets a restart skip re-checking it. Until then a restart re-checks every
    /// piece, so a crash in between costs time, never correctness.
    pub fn persist(&self) -> Result<(), StoreError> {
        if !self.verified.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Incomplete {
                expected: self.layout.digest,
                have: self.have().count(),
                count: self.layout.piece_count(),
            });
        }
        if let Some(dir) = &self.dir {
            self.data().file.sync_all().map_err(io_err("cannot sync", &self.data_path))?;
            let marker = dir.join("complete");
            fs::write(&marker, b"").map_err(io_err("cannot write", &marker))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0]).collect()
    }

    fn meta_of(data: &[u8], piece_length: u32) -> Metainfo {
        let mut h = PieceHasher::new(piece_length);
        h.update(data);
        h.finish()
    }

    #[test]
    fn pieces_are_verified_stored_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let data = sample(1_000_000);
        let meta = meta_of(&data, 1 << 18);
        let blob = store.open_blob(&meta).expect("open");
        assert_eq!(blob.have().count(), 0);
        let piece = |i: u32| {
            let s = meta.piece_offset(i) as usize;
            &data[s..s + meta.piece_len(i) as usize]
        };
        assert!(blob.write_piece(1, piece(1)).expect("write"));
        assert!(!blob.write_piece(1, piece(1)).expect("rewrite is a no-op"));
        assert!(matches!(blob.write_piece(2, piece(1)), Err(StoreError::PieceMismatch { piece: 2, .. })));
        assert!(matches!(blob.write_piece(9, piece(1)), Err(StoreError::PieceOutOfRange { .. })));
        assert!(blob.write_piece(3, piece(3)).expect("write"));
        assert!(matches!(blob.verify(), Err(StoreError::Incomplete { have: 2, count: 4, .. })));
        assert!(matches!(blob.persist(), Err(StoreError::Incomplete { .. })), "only a verified blob is persisted");
        drop(blob);

        let blob = store.open_blob(&meta).expect("reopen");
        assert_eq!(blob.have().ones().collect::<Vec<_>>(), vec![1, 3]);
        let mut buf = Vec::new();
        blob.read_piece_into(3, &mut buf).expect("read");
        assert_eq!(buf, piece(3));
        blob.write_piece(0, piece(0)).expect("write");
        blob.write_piece(2, piece(2)).expect("write");
        blob.verify().expect("complete");
        blob.persist().expect("persisted");
        drop(blob);
        assert_eq!(store.complete_blobs().expect("list"), vec![meta.digest]);
        let blob = store.open_blob(&meta).expect("reopen complete");
        assert!(blob.is_complete());
        assert_eq!(fs::read(blob.data_path()).expect("read"), data);
    }

    #[test]
    fn the_whole_digest_follows_the_prefix_in_any_arrival_order_and_catches_a_lie() {
        let data = sample(1_300_000);
        let meta = meta_of(&data, 1 << 18);
        let piece = |i: u32| {
            let s = meta.piece_offset(i) as usize;
            &data[s..s + meta.piece_len(i) as usize]
        };
        for order in [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 0, 3, 4, 2], [2, 0, 4, 1, 3]] {
            let dir = tempfile::tempdir().expect("tempdir");
            let blob = Store::open(dir.path()).expect("store").open_blob(&meta).expect("open");
            for (n, i) in order.into_iter().enumerate() {
                blob.write_piece(i, piece(i)).expect("write");
                let prefix = blob.prefix.lock().expect("prefix").next;
                let contiguous = (0..5).take_while(|&j| order[..=n].contains(&j)).count() as u32;
                assert_eq!(prefix, contiguous, "order {order:?} after {} pieces", n + 1);
            }
            blob.verify().unwrap_or_else(|e| panic!("order {order:?}: {e}"));
        }

        // Piece hashes that match the bytes, under a digest the bytes do not have.
        let mut lie = meta.clone();
        lie.digest = Digest([7; 32]);
        let dir = tempfile::tempdir().expect("tempdir");
        let blob = Store::open(dir.path()).expect("store").open_blob(&lie).expect("open");
        for i in [3, 0, 1, 4, 2] {
            blob.write_piece(i, piece(i)).expect("write");
        }
        assert!(matches!(blob.verify(), Err(StoreError::DigestMismatch { .. })));
        assert_eq!(blob.have().count(), 0, "a blob that failed its digest keeps no piece");
    }

    #[test]
    fn a_claimed_piece_whose_bytes_rotted_is_dropped_on_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let data = sample(600_000);
        let meta = meta_of(&data, 1 << 18);
        let blob = store.open_blob(&meta).expect("open");
        blob.write_piece(0, &data[..1 << 18]).expect("write");
        blob.write_piece(1, &data[1 << 18..1 << 19]).expect("write");
        let path = blob.data_path().to_path_buf();
        drop(blob);
        let f = OpenOptions::new().write(true).open(&path).expect("open data");
        f.write_all_at(b"rot", 10).expect("corrupt");
        let blob = store.open_blob(&meta).expect("reopen");
        assert_eq!(blob.have().ones().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_blob_whose_download_a_crash_cut_before_its_marker_is_completed_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = sample(600_000);
        let meta = meta_of(&data, 1 << 18);
        let partial_meta = meta_of(&sample(300_000), 1 << 18);
        {
            let store = Store::open(dir.path()).expect("store");
            // Every piece stored, the process gone before `verify` + `persist`.
            let blob = store.open_blob(&meta).expect("open");
            for p in 0..meta.layout().piece_count() {
                let off = meta.layout().piece_offset(p) as usize;
                blob.write_piece(p, &data[off..off + meta.layout().piece_len(p) as usize]).expect("write");
            }
            // A second blob with one piece missing stays as it is.
            let partial = store.open_blob(&partial_meta).expect("open");
            partial.write_piece(1, &sample(300_000)[1 << 18..]).expect("write");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert!(store.complete_blobs().expect("list").is_empty());
        assert_eq!(store.finish_interrupted().expect("finish"), vec![meta.digest]);
        assert_eq!(store.complete_blobs().expect("list"), vec![meta.digest]);
        assert!(store.open_blob(&meta).expect("open").is_complete());
        assert_eq!(store.open_blob(&partial_meta).expect("open").have().ones().collect::<Vec<_>>(), vec![1]);
        // Nothing left to finish the second time.
        assert!(store.finish_interrupted().expect("finish").is_empty());
    }

    #[test]
    fn conflicting_metainfo_is_refused_and_hash_file_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        let data = sample(300_000);
        fs::write(&file, &data).expect("write");
        let mut seen = 0;
        let meta = hash_file(&file, |n| seen = n).expect("hash");
        assert_eq!(seen, 300_000);
        assert_eq!(meta.digest, Digest::of(&data));
        let store = Store::open(&dir.path().join("store")).expect("store");
        store.open_blob(&meta).expect("open");
        let mut other = meta.clone();
        other.piece_hashes[0] = [9; 32];
        assert!(matches!(store.open_blob(&other), Err(StoreError::Conflict { .. })));
        let seeded = BlobFile::from_existing(&file, meta).expect("seed");
        assert!(seeded.is_complete());
        let empty = dir.path().join("empty");
        fs::write(&empty, b"").expect("write");
        assert!(matches!(hash_file(&empty, |_| {}), Err(StoreError::EmptyFile { .. })));
    }

    #[test]
    fn hashes_may_arrive_after_the_layout_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let data = sample(1_000_000);
        let meta = meta_of(&data, 1 << 18);
        let piece = |i: u32| {
            let s = meta.piece_offset(i) as usize;
            &data[s..s + meta.piece_len(i) as usize]
        };
        let blob = store.open_layout(meta.layout()).expect("open");
        assert!(matches!(blob.write_piece(0, piece(0)), Err(StoreError::HashUnknown { piece: 0, .. })));
        assert_eq!(blob.add_hashes(0, &meta.piece_hashes[..2]).expect("add"), 2);
        assert_eq!(blob.add_hashes(1, &meta.piece_hashes[1..2]).expect("overlap"), 0);
        assert!(matches!(blob.add_hashes(3, &meta.piece_hashes[3..]), Err(StoreError::Conflict { .. })));
        assert!(matches!(blob.add_hashes(1, &[[0; 32]]), Err(StoreError::Conflict { .. })));
        assert!(blob.write_piece(0, piece(0)).expect("write"));
        assert!(blob.metainfo().is_none());
        drop(blob);
        let blob = store.open_layout(meta.layout()).expect("reopen");
        assert_eq!(blob.known_hashes(), 2);
        assert_eq!(blob.have().ones().collect::<Vec<_>>(), vec![0]);
        let (hash, new) = blob.write_source_piece(2, piece(2)).expect("source piece");
        assert!(new && hash == meta.piece_hashes[2], "a source piece is hashed once and stored");
        assert!(matches!(blob.write_source_piece(2, piece(1)), Err(StoreError::Conflict { .. })));
        assert_eq!(blob.add_hashes(2, &meta.piece_hashes[2..]).expect("rest"), 1);
        assert_eq!(blob.metainfo().as_ref(), Some(&meta));
        assert_eq!(store.metainfo(&meta.digest).expect("read").as_ref(), Some(&meta));
    }

    #[test]
    fn a_complete_blob_moves_onto_another_copy_verifies_it_and_notices_it_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let data = sample(700_000);
        let meta = meta_of(&data, 1 << 18);
        let blob = store.open_blob(&meta).expect("open");
        for i in 0..meta.piece_count() {
            let s = meta.piece_offset(i) as usize;
            blob.write_piece(i, &data[s..s + meta.piece_len(i) as usize]).expect("write");
        }
        let theirs = dir.path().join("containerd-blob");
        fs::write(&theirs, &data).expect("write theirs");
        assert!(!blob.serve_from(&theirs).expect("not yet persisted"), "only a persisted blob moves");
        blob.verify().expect("verify");
        blob.persist().expect("persist");
        let short = dir.path().join("short");
        fs::write(&short, &data[..10]).expect("write short");
        assert!(!blob.serve_from(&short).expect("length differs"));
        assert!(blob.serve_from(&theirs).expect("moved"));
        assert!(!store.data_path(&meta.digest).exists(), "the own copy is deleted");
        assert!(store.disk_usage(&meta.digest) < 4096 * 8, "only layout and hashes stay");
        let mut buf = vec![0; 1000];
        blob.read_at(&mut buf, 262_000).expect("read across pieces");
        assert_eq!(buf, &data[262_000..263_000]);
        drop(blob);
        let blob = store.open_blob(&meta).expect("reopen");
        assert!(blob.take_own_copy().expect("take back"), "a pinned blob gets its own copy back");
        assert_eq!(fs::read(store.data_path(&meta.digest)).expect("own copy"), data);
        assert_eq!((blob.source(), store.source(&meta.digest)), (None, None));
        assert!(blob.serve_from(&theirs).expect("moved again"));
        drop(blob);

        // A restart serves from the other copy; a corrupt piece there breaks the blob.
        let blob = store.open_blob(&meta).expect("reopen");
        assert!(blob.is_complete() && blob.source() == Some(theirs.clone()));
        let f = OpenOptions::new().write(true).open(&theirs).expect("open theirs");
        f.write_all_at(b"rot", 300_000).expect("corrupt");
        let mut piece = Vec::new();
        blob.read_piece_into(0, &mut piece).expect("piece 0 is intact");
        assert!(matches!(blob.read_piece_into(1, &mut piece), Err(StoreError::PieceMismatch { piece: 1, .. })));
        assert!(blob.is_broken() && !blob.is_complete());
        assert!(store.complete_blobs().expect("list").is_empty(), "a broken blob is not complete any more");
        drop(blob);

        // The other copy deleted: reopening finds nothing held.
        fs::remove_file(&theirs).expect("delete theirs");
        let blob = store.open_blob(&meta).expect("reopen");
        assert_eq!(blob.have().count(), 0);
        assert_eq!(blob.source(), None);
    }

    #[test]
    fn a_data_directory_serves_one_process_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Store::open(dir.path()).expect("store");
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Locked { .. })));
        drop(first);
        Store::open(dir.path()).expect("free again");
    }
}
