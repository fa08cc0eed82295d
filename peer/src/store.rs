//! Blobs on disk.
//!
//! Layout under the data directory:
//!
//! ```text
//! blobs/<64 hex>/meta      the blob's Metainfo, in the proto codec's framing
//! blobs/<64 hex>/data      the blob bytes, written piece by piece at their offsets
//! blobs/<64 hex>/have      the persisted bitfield: one bit per piece, MSB first
//! blobs/<64 hex>/complete  present once every piece is in and the whole digest matched
//! ```
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
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};
use swarm_proto::codec::{self, CodecError};
use swarm_proto::{Bitfield, Digest, Metainfo, PieceHasher, piece_length_for};

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
    #[error("stored metainfo for {digest} is unreadable: {source}")]
    BadMeta {
        digest: Digest,
        #[source]
        source: CodecError,
    },
    #[error("piece {piece} of {digest} does not match its sha256")]
    PieceMismatch { digest: Digest, piece: u32 },
    #[error("piece {piece} out of range for {digest}")]
    PieceOutOfRange { digest: Digest, piece: u32 },
    #[error("blob {expected} is incomplete: {have} of {count} pieces")]
    Incomplete { expected: Digest, have: u32, count: u32 },
    #[error("blob content hashes to {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("a different metainfo is already stored for {digest}")]
    MetainfoConflict { digest: Digest },
    #[error("{path} is empty: there is nothing to share")]
    EmptyFile { path: PathBuf },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { action, path: path.to_path_buf(), source }
}

/// The data directory: one subdirectory per blob.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let blobs = root.join("blobs");
        fs::create_dir_all(&blobs).map_err(io_err("cannot create", &blobs))?;
        Ok(Self { root: root.to_path_buf() })
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_dir(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.hex())
    }

    /// The metainfo stored for `digest`, if any.
    pub fn metainfo(&self, digest: &Digest) -> Result<Option<Metainfo>, StoreError> {
        let path = self.blob_dir(digest).join("meta");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot read", &path)(e)),
        };
        let meta: Metainfo = codec::decode_frame(&bytes, codec::MAX_FRAME_LEN)
            .map_err(|source| StoreError::BadMeta { digest: *digest, source })?;
        if meta.digest != *digest || meta.validate().is_err() {
            return Err(StoreError::BadMeta {
                digest: *digest,
                source: CodecError::Malformed("metainfo does not describe this blob".into()),
            });
        }
        Ok(Some(meta))
    }

    /// Opens the stored copy of `metainfo`'s blob, creating it empty if it is new.
    /// An incomplete copy is resumed: the pieces its bitfield claims are re-hashed and
    /// kept when they match.
    pub fn open_blob(&self, metainfo: &Metainfo) -> Result<BlobFile, StoreError> {
        let digest = metainfo.digest;
        let dir = self.blob_dir(&digest);
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        match self.metainfo(&digest) {
            Ok(Some(existing)) if existing != *metainfo => {
                return Err(StoreError::MetainfoConflict { digest });
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(StoreError::BadMeta { .. }) => {
                let frame = codec::encode_frame(metainfo).map_err(|source| StoreError::BadMeta { digest, source })?;
                write_atomic(&dir.join("meta"), &frame)?;
            }
            Err(e) => return Err(e),
        }
        let data_path = dir.join("data");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io_err("cannot open", &data_path))?;
        let len = file.metadata().map_err(io_err("cannot stat", &data_path))?.len();
        if len != metainfo.length {
            file.set_len(metainfo.length).map_err(io_err("cannot size", &data_path))?;
        }
        let count = metainfo.piece_count();
        let complete = dir.join("complete").exists() && len == metainfo.length;
        let have_path = dir.join("have");
        let have_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&have_path)
            .map_err(io_err("cannot open", &have_path))?;
        let mut have = if complete {
            Bitfield::full(count)
        } else {
            let mut raw = Vec::new();
            (&have_file).read_to_end(&mut raw).map_err(io_err("cannot read", &have_path))?;
            raw.resize(count.div_ceil(8) as usize, 0);
            // Spare bits past the last piece are noise from an older layout: clear them.
            let mut claimed = Bitfield::new(count);
            for i in 0..count {
                if raw[(i / 8) as usize] & (0x80 >> (i % 8)) != 0 {
                    claimed.set(i, true);
                }
            }
            claimed
        };
        let blob = BlobFile {
            metainfo: metainfo.clone(),
            data_path,
            file,
            have_file: Some(have_file),
            have: Mutex::new(Bitfield::new(count)),
            dir: Some(dir),
        };
        if !complete {
            // Re-check every claimed piece; rewrite the bitfield with what survived.
            let claimed: Vec<u32> = have.ones().collect();
            let mut buf = Vec::new();
            for i in claimed {
                blob.read_piece_into(i, &mut buf)?;
                if !metainfo.verify_piece(i, &buf) {
                    have.set(i, false);
                }
            }
            blob.have_file_rewrite(&have)?;
        }
        *blob.have.lock().unwrap_or_else(|e| e.into_inner()) = have;
        Ok(blob)
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

/// One blob's bytes and the record of which pieces are verified.
pub struct BlobFile {
    metainfo: Metainfo,
    data_path: PathBuf,
    file: File,
    /// `None` for a seeded file served in place (always complete).
    have_file: Option<File>,
    have: Mutex<Bitfield>,
    /// `None` for a seeded file served in place.
    dir: Option<PathBuf>,
}

impl BlobFile {
    /// Serves an existing, already hashed file in place (the seed case).
    pub fn from_existing(path: &Path, metainfo: Metainfo) -> Result<Self, StoreError> {
        let file = File::open(path).map_err(io_err("cannot open", path))?;
        let count = metainfo.piece_count();
        Ok(Self {
            metainfo,
            data_path: path.to_path_buf(),
            file,
            have_file: None,
            have: Mutex::new(Bitfield::full(count)),
            dir: None,
        })
    }

    pub fn metainfo(&self) -> &Metainfo {
        &self.metainfo
    }

    /// Where the blob's bytes live.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    fn have_lock(&self) -> std::sync::MutexGuard<'_, Bitfield> {
        // A panic while holding this lock cannot leave the bitfield half-updated
        // (single bit flips), so a poisoned lock is still usable.
        self.have.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the verified-pieces bitfield.
    pub fn have(&self) -> Bitfield {
        self.have_lock().clone()
    }

    pub fn has_piece(&self, piece: u32) -> bool {
        self.have_lock().get(piece)
    }

    pub fn is_complete(&self) -> bool {
        self.have_lock().is_complete()
    }

    fn check_range(&self, piece: u32) -> Result<(), StoreError> {
        if piece >= self.metainfo.piece_count() {
            return Err(StoreError::PieceOutOfRange { digest: self.metainfo.digest, piece });
        }
        Ok(())
    }

    /// Reads piece `piece` into `buf` (resized to the piece's length).
    pub fn read_piece_into(&self, piece: u32, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        self.check_range(piece)?;
        buf.resize(self.metainfo.piece_len(piece) as usize, 0);
        self.file.read_exact_at(buf, self.metainfo.piece_offset(piece)).map_err(io_err("cannot read", &self.data_path))
    }

    /// Reads `buf.len()` bytes at `offset` of the blob.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.file.read_exact_at(buf, offset).map_err(io_err("cannot read", &self.data_path))
    }

    /// Verifies `data` against piece `piece`'s hash and, when it matches, stores it and
    /// marks it held. Returns `Ok(false)` when the piece was already held (nothing
    /// written), and [`StoreError::PieceMismatch`] when the bytes are wrong.
    pub fn write_piece(&self, piece: u32, data: &[u8]) -> Result<bool, StoreError> {
        self.check_range(piece)?;
        if !self.metainfo.verify_piece(piece, data) {
            return Err(StoreError::PieceMismatch { digest: self.metainfo.digest, piece });
        }
        if self.has_piece(piece) {
            return Ok(false);
        }
        self.file
            .write_all_at(data, self.metainfo.piece_offset(piece))
            .map_err(io_err("cannot write", &self.data_path))?;
        let mut have = self.have_lock();
        if have.get(piece) {
            // A concurrent writer stored the same verified bytes first.
            return Ok(false);
        }
        have.set(piece, true);
        if let Some(have_file) = &self.have_file {
            let byte_index = (piece / 8) as usize;
            let byte = have.as_bytes()[byte_index];
            have_file.write_all_at(&[byte], byte_index as u64).map_err(io_err("cannot write", &self.data_path))?;
        }
        Ok(true)
    }

    fn have_file_rewrite(&self, have: &Bitfield) -> Result<(), StoreError> {
        if let Some(f) = &self.have_file {
            f.set_len(0).map_err(io_err("cannot truncate", &self.data_path))?;
            f.write_all_at(have.as_bytes(), 0).map_err(io_err("cannot write", &self.data_path))?;
        }
        Ok(())
    }

    /// Checks the whole blob against its digest once every piece is in, syncs it to
    /// disk and marks it complete. On a mismatch every piece is forgotten (the caller
    /// should drop the blob and tell the tracker).
    pub fn finish(&self) -> Result<(), StoreError> {
        let have = self.have();
        if !have.is_complete() {
            return Err(StoreError::Incomplete {
                expected: self.metainfo.digest,
                have: have.count(),
                count: have.len(),
            });
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while offset < self.metainfo.length {
            let n = (self.metainfo.length - offset).min(buf.len() as u64) as usize;
            self.read_at(&mut buf[..n], offset)?;
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        let actual = Digest(hasher.finalize().into());
        if actual != self.metainfo.digest {
            let empty = Bitfield::new(self.metainfo.piece_count());
            self.have_file_rewrite(&empty)?;
            *self.have_lock() = empty;
            return Err(StoreError::DigestMismatch { expected: self.metainfo.digest, actual });
        }
        if let Some(dir) = &self.dir {
            self.file.sync_all().map_err(io_err("cannot sync", &self.data_path))?;
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
        assert!(matches!(blob.finish(), Err(StoreError::Incomplete { have: 2, count: 4, .. })));
        drop(blob);

        let blob = store.open_blob(&meta).expect("reopen");
        assert_eq!(blob.have().ones().collect::<Vec<_>>(), vec![1, 3]);
        let mut buf = Vec::new();
        blob.read_piece_into(3, &mut buf).expect("read");
        assert_eq!(buf, piece(3));
        blob.write_piece(0, piece(0)).expect("write");
        blob.write_piece(2, piece(2)).expect("write");
        blob.finish().expect("complete");
        drop(blob);
        assert_eq!(store.complete_blobs().expect("list"), vec![meta.digest]);
        let blob = store.open_blob(&meta).expect("reopen complete");
        assert!(blob.is_complete());
        assert_eq!(fs::read(blob.data_path()).expect("read"), data);
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
        assert!(matches!(store.open_blob(&other), Err(StoreError::MetainfoConflict { .. })));
        let seeded = BlobFile::from_existing(&file, meta).expect("seed");
        assert!(seeded.is_complete());
        seeded.finish().expect("seeded file matches its digest");
        let empty = dir.path().join("empty");
        fs::write(&empty, b"").expect("write");
        assert!(matches!(hash_file(&empty, |_| {}), Err(StoreError::EmptyFile { .. })));
    }
}
