//! The on-disk manifest cache, keyed by digest.
//!
//! Layout: `<dir>/<hex digest>` holds the manifest bytes and `<dir>/<hex>.media-type`
//! its media type. Both are written to a temporary file in the same directory and
//! renamed into place (media type first, so a present bytes file always has its media
//! type). Every read re-hashes the bytes: an entry that does not match its name is
//! deleted and treated as a miss. Only manifests whose bytes already matched their
//! digest are ever written. Tags are never cached: a tag is always resolved upstream.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use swarm_proto::Digest;
use tracing::{debug, warn};

use crate::upstream::MAX_MANIFEST_BYTES;

/// A manifest read back from the cache (already verified).
#[derive(Clone, Debug)]
pub struct CachedManifest {
    pub bytes: Bytes,
    pub media_type: String,
}

/// Manifests on disk by digest.
#[derive(Clone, Debug)]
pub struct ManifestCache {
    dir: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ManifestCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn bytes_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    fn type_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.media-type", digest.hex()))
    }

    /// The cached manifest for `digest`, if present and intact.
    pub async fn get(&self, digest: &Digest) -> Option<CachedManifest> {
        let path = self.bytes_path(digest);
        let meta = tokio::fs::metadata(&path).await.ok()?;
        if meta.len() > MAX_MANIFEST_BYTES as u64 {
            warn!(path = %path.display(), "oversized manifest cache entry; removing");
            self.remove(digest).await;
            return None;
        }
        let bytes = tokio::fs::read(&path).await.ok()?;
        if Digest::of(&bytes) != *digest {
            warn!(%digest, path = %path.display(), "manifest cache entry does not match its digest; removing");
            self.remove(digest).await;
            return None;
        }
        let media_type = tokio::fs::read_to_string(self.type_path(digest)).await.ok()?;
        let media_type = media_type.trim().to_string();
        if !is_plausible_media_type(&media_type) {
            warn!(%digest, "manifest cache entry has a bad media type; removing");
            self.remove(digest).await;
            return None;
        }
        debug!(%digest, "manifest cache hit");
        Some(CachedManifest { bytes: Bytes::from(bytes), media_type })
    }

    /// Stores a manifest whose bytes hash to `digest` (checked again here).
    pub async fn put(&self, digest: &Digest, media_type: &str, bytes: &[u8]) -> std::io::Result<()> {
        if Digest::of(bytes) != *digest {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "manifest bytes do not match the digest"));
        }
        if !is_plausible_media_type(media_type) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "implausible media type"));
        }
        tokio::fs::create_dir_all(&self.dir).await?;
        self.write_atomic(&self.type_path(digest), media_type.as_bytes()).await?;
        self.write_atomic(&self.bytes_path(digest), bytes).await?;
        debug!(%digest, len = bytes.len(), "manifest cached");
        Ok(())
    }

    async fn write_atomic(&self, target: &Path, data: &[u8]) -> std::io::Result<()> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
        let tmp = self.dir.join(format!(".tmp-{name}-{}-{n}", std::process::id()));
        let result = async {
            tokio::fs::write(&tmp, data).await?;
            tokio::fs::rename(&tmp, target).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn remove(&self, digest: &Digest) {
        let _ = tokio::fs::remove_file(self.bytes_path(digest)).await;
        let _ = tokio::fs::remove_file(self.type_path(digest)).await;
    }
}

/// `type/subtype` with header-safe characters (no parameters), at most 255 bytes.
fn is_plausible_media_type(s: &str) -> bool {
    let ok =
        |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
    s.len() <= 255 && s.split_once('/').is_some_and(|(t, sub)| ok(t) && ok(sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

    #[tokio::test]
    async fn round_trip_and_verification_on_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ManifestCache::new(dir.path().join("manifests"));
        let bytes = br#"{"schemaVersion":2}"#;
        let d = Digest::of(bytes);
        assert!(cache.get(&d).await.is_none());
        cache.put(&d, TYPE, bytes).await.expect("put");
        let got = cache.get(&d).await.expect("hit");
        assert_eq!(got.bytes.as_ref(), bytes);
        assert_eq!(got.media_type, TYPE);
        // No temporary files left behind.
        let names: Vec<String> = std::fs::read_dir(cache.dir())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
        // Corrupt the entry on disk: it is refused and removed.
        std::fs::write(cache.dir().join(d.hex()), b"tampered").expect("write");
        assert!(cache.get(&d).await.is_none());
        assert!(!cache.dir().join(d.hex()).exists());
    }

    #[tokio::test]
    async fn refuses_mismatched_or_odd_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ManifestCache::new(dir.path());
        let d = Digest::of(b"a");
        assert!(cache.put(&d, TYPE, b"b").await.is_err());
        assert!(cache.put(&d, "text/plain\r\nX: y", b"a").await.is_err());
        assert!(cache.put(&d, "nonsense", b"a").await.is_err());
        assert!(cache.get(&d).await.is_none());
        assert!(is_plausible_media_type("application/vnd.docker.distribution.manifest.v2+json"));
    }
}
