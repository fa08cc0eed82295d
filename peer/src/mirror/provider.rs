//! Where blob bytes come from: the [`BlobProvider`] seam, and [`UpstreamOnly`], the
//! provider that fetches straight from the upstream registry.
//!
//! The swarm node implements [`BlobProvider`] with pieces traded between peers; the
//! mirror does not care which provider it runs with.

use std::future::Future;
use std::io;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use sha2::{Digest as _, Sha256};
use swarm_proto::Digest;
use tracing::warn;

use crate::upstream::{UpstreamClient, UpstreamError};

/// Which blob a client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlobRequest {
    /// The upstream registry (`?ns=`), e.g. `docker.io`.
    pub registry: String,
    /// The repository, e.g. `library/ubuntu`.
    pub repository: String,
    pub digest: Digest,
}

/// A blob being served.
pub struct BlobBody {
    /// The whole blob's length.
    pub length: u64,
    /// The bytes from the requested offset to the end, in order. An `Err` item aborts
    /// the HTTP response (the client sees a truncated transfer).
    pub stream: BoxStream<'static, Result<Bytes, io::Error>>,
}

impl std::fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobBody").field("length", &self.length).finish_non_exhaustive()
    }
}

/// Why a provider could not serve a blob.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The blob does not exist (upstream said 404).
    #[error("blob not found")]
    NotFound,
    /// Upstream refused or is unreachable and no peer has the blob. The mirror answers
    /// with the fallback status so containerd goes to the next host.
    #[error("blob unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

/// A source of blob bytes for the mirror.
///
/// Contract: every byte a [`BlobBody`] stream yields must already be verified (for the
/// swarm: its piece hash checked). On any failure, end the stream with an `Err` rather
/// than yield doubtful bytes: an aborted response is resumed cleanly by containerd,
/// while a wrong byte poisons its ingest for that blob (see the [module
/// docs](super)). `open_blob` is called with `offset > 0` when containerd resumes.
pub trait BlobProvider: Send + Sync + 'static {
    /// The length of the blob.
    fn blob_length(&self, req: &BlobRequest) -> impl Future<Output = Result<u64, ProviderError>> + Send;
    /// The blob's bytes from `offset` (`offset <= length`) to the end.
    fn open_blob(&self, req: &BlobRequest, offset: u64)
    -> impl Future<Output = Result<BlobBody, ProviderError>> + Send;
}

/// Maps an upstream failure to what the mirror should tell containerd: 404 stays a
/// 404, everything else (refused credentials, unreachable, odd status, bad answer)
/// means "fetch it yourself".
pub fn provider_error(err: UpstreamError) -> ProviderError {
    if err.is_not_found() { ProviderError::NotFound } else { ProviderError::Unavailable(err.to_string()) }
}

/// Serves blobs straight from the upstream registry, with no swarm: the provider for
/// `--no-swarm` and for tests.
///
/// A whole-blob read (offset 0) is verified against the digest as it streams; the
/// last chunk is held back until the hash is checked, so a mismatch aborts the
/// response before the client has every byte and it never sees a complete, wrong
/// blob. Reads from an offset > 0 cannot be checked against a whole-blob digest and are
/// passed through with only their length checked (containerd verifies the digest of
/// what it assembles).
///
/// Without piece hashes this cannot meet the [`BlobProvider`] contract in full: when
/// upstream serves wrong bytes, all but the last chunk have reached containerd before
/// the mismatch shows. That is exactly what containerd pulling from that registry
/// directly would have received; `UpstreamOnly` adds no risk, but it removes none.
#[derive(Clone, Debug)]
pub struct UpstreamOnly {
    upstream: UpstreamClient,
}

impl UpstreamOnly {
    pub fn new(upstream: UpstreamClient) -> Self {
        Self { upstream }
    }
}

impl BlobProvider for UpstreamOnly {
    async fn blob_length(&self, req: &BlobRequest) -> Result<u64, ProviderError> {
        self.upstream.blob_length(&req.registry, &req.repository, &req.digest).await.map_err(provider_error)
    }

    async fn open_blob(&self, req: &BlobRequest, offset: u64) -> Result<BlobBody, ProviderError> {
        let blob =
            self.upstream.blob(&req.registry, &req.repository, &req.digest, offset).await.map_err(provider_error)?;
        let remaining = blob.total_length.saturating_sub(offset);
        let expected = if offset == 0 { Some(req.digest) } else { None };
        let stream = checked_stream(blob.stream, remaining, expected, req.clone());
        Ok(BlobBody { length: blob.total_length, stream })
    }
}

/// Passes `inner` through, failing it if it yields more or fewer than `len` bytes, or
/// (when `digest` is given) if the bytes do not hash to `digest`. The chunk that
/// completes the length is only released after the hash matched.
pub fn checked_stream<E>(
    inner: BoxStream<'static, Result<Bytes, E>>,
    len: u64,
    digest: Option<Digest>,
    req: BlobRequest,
) -> BoxStream<'static, Result<Bytes, io::Error>>
where
    E: std::error::Error + Send + Sync + 'static,
{
    struct State<E> {
        inner: BoxStream<'static, Result<Bytes, E>>,
        hasher: Option<Sha256>,
        received: u64,
        finished: bool,
    }
    let state = State { inner, hasher: digest.map(|_| Sha256::new()), received: 0, finished: false };
    let fail = move |st: &mut State<E>, req: &BlobRequest, err: io::Error| {
        st.finished = true;
        warn!(registry = %req.registry, repository = %req.repository, digest = %req.digest, error = %err, "blob stream failed");
        err
    };
    // Checks the hash once all bytes are in; `Err` on mismatch.
    let verify = move |st: &mut State<E>| -> Result<(), io::Error> {
        match (st.hasher.take(), digest) {
            (Some(hasher), Some(expected)) => {
                let actual = Digest(hasher.finalize().into());
                if actual == expected {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("upstream bytes hash to {actual}, not {expected}"),
                    ))
                }
            }
            _ => Ok(()),
        }
    };
    stream::unfold((state, req), move |(mut st, req)| async move {
        if st.finished {
            return None;
        }
        match st.inner.next().await {
            Some(Ok(chunk)) => {
                st.received += chunk.len() as u64;
                if st.received > len {
                    let err =
                        io::Error::new(io::ErrorKind::InvalidData, format!("upstream sent more than {len} bytes"));
                    let err = fail(&mut st, &req, err);
                    return Some((Err(err), (st, req)));
                }
                if let Some(h) = st.hasher.as_mut() {
                    h.update(&chunk);
                }
                if st.received == len {
                    st.finished = true;
                    if let Err(err) = verify(&mut st) {
                        let err = fail(&mut st, &req, err);
                        return Some((Err(err), (st, req)));
                    }
                }
                Some((Ok(chunk), (st, req)))
            }
            Some(Err(e)) => {
                let err = fail(&mut st, &req, io::Error::other(e));
                Some((Err(err), (st, req)))
            }
            None if st.received < len => {
                let err = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("upstream stream ended after {} of {len} bytes", st.received),
                );
                let err = fail(&mut st, &req, err);
                Some((Err(err), (st, req)))
            }
            None => {
                // Only reachable for a zero-length blob: nothing completed the length.
                st.finished = true;
                match verify(&mut st) {
                    Ok(()) => None,
                    Err(err) => {
                        let err = fail(&mut st, &req, err);
                        Some((Err(err), (st, req)))
                    }
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(data: &[u8]) -> BlobRequest {
        BlobRequest { registry: "r".into(), repository: "a".into(), digest: Digest::of(data) }
    }

    fn chunks(parts: &[&'static [u8]]) -> BoxStream<'static, Result<Bytes, io::Error>> {
        stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect::<Vec<_>>()).boxed()
    }

    async fn run(s: BoxStream<'static, Result<Bytes, io::Error>>) -> (Vec<u8>, Option<io::Error>) {
        let mut out = Vec::new();
        let mut s = s;
        while let Some(item) = s.next().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn good_bytes_pass() {
        let r = req(b"hello world");
        let (out, err) = run(checked_stream(chunks(&[b"hello", b" ", b"world"]), 11, Some(r.digest), r)).await;
        assert_eq!(out, b"hello world");
        assert!(err.is_none());
    }

    #[tokio::test]
    async fn mismatch_withholds_the_last_chunk() {
        let r = req(b"hello world");
        let (out, err) = run(checked_stream(chunks(&[b"hello", b" ", b"WORLD"]), 11, Some(r.digest), r)).await;
        assert_eq!(out, b"hello ", "the chunk that completes the blob must not be released");
        assert_eq!(err.expect("error").kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn short_and_long_streams_fail() {
        let r = req(b"hello world");
        let (_, err) = run(checked_stream(chunks(&[b"hello"]), 11, Some(r.digest), r.clone())).await;
        assert_eq!(err.expect("error").kind(), io::ErrorKind::UnexpectedEof);
        let (_, err) = run(checked_stream(chunks(&[b"hello world!"]), 11, None, r)).await;
        assert_eq!(err.expect("error").kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn empty_blob_is_verified() {
        let r = req(b"");
        let (out, err) = run(checked_stream(chunks(&[]), 0, Some(r.digest), r)).await;
        assert!(out.is_empty() && err.is_none());
        let wrong = req(b"x");
        let (_, err) = run(checked_stream(chunks(&[]), 0, Some(wrong.digest), wrong)).await;
        assert!(err.is_some());
    }

    #[tokio::test]
    async fn inner_errors_propagate() {
        let r = req(b"ab");
        let inner = stream::iter(vec![Ok(Bytes::from_static(b"a")), Err(io::Error::other("boom"))]).boxed();
        let (out, err) = run(checked_stream(inner, 2, Some(r.digest), r)).await;
        assert_eq!(out, b"a");
        assert!(err.expect("error").to_string().contains("boom"));
    }
}
