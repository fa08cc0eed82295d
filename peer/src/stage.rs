//! `swarm stage` on a node: puts an image's blobs in the store ahead of a rollout and
//! pins them.
//!
//! - **Orders.** One task per tracker long-polls it (`WaitStage`, answered as soon as
//!   the tracker's orders change, else every [`POLL_WAIT`]), so an order reaches the
//!   agent within a round trip of the command. Orders from several trackers are
//!   merged: per image, the newest `issued_ms` wins.
//! - **A stage** ([`StageOrder`] that selects this node by zone, name or peer id): the
//!   agent resolves the reference with its own upstream settings and credentials
//!   (an index → the manifest of its platform → config and layers), keeps the
//!   manifests in the mirror's manifest cache (so containerd's later pull by digest
//!   needs nothing upstream and by tag only the tag lookup), checks that every blob
//!   fits the cache budget beside the other pinned ones (else its part fails with the
//!   bytes it lacks), pins them until the order's end, and fetches each one through
//!   [`SwarmProvider::prefetch`]: the path of a containerd request, so each blob
//!   crosses the uplink once (upstream leases) and its pieces swarm.
//! - **Records.** `<data>/staged/<sha256 of the image reference>.json` lists what a
//!   stage pinned, so a release after a restart (or after the tag moved) unpins
//!   exactly that, and a finished stage is reported done again without re-resolving.
//! - **A release** unpins the blobs its image's record lists, except those another
//!   staged image still pins, and deletes the record. Pins also end by themselves at
//!   the order's `pin_until_secs` ([`crate::disk::Pins`]).
//! - **Progress** ([`StageProgress`] per image) goes to every tracker at once when it
//!   changes (at most every [`REPORT_MIN_GAP`]) and every [`REPORT_EVERY`] anyway.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use swarm_proto::Digest;
use swarm_proto::msg::{MAX_STAGE_ORDERS, StageAgent, StageOrder, StageProgress, StageState};
use swarm_tracker::client::TrackerClientError;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::agent::SwarmProvider;
use crate::disk::Disk;
use crate::mirror::{BlobRequest, ManifestCache};
use crate::node::{DownloadState, Node};
use crate::upstream::{DEFAULT_MANIFEST_ACCEPT, UpstreamClient, UpstreamError, names};

/// How long one `WaitStage` long poll may be held by the tracker (under the tracker
/// client's request timeout).
pub const POLL_WAIT: Duration = Duration::from_secs(10);
/// Pause after a failed long poll.
const POLL_RETRY: Duration = Duration::from_secs(2);
/// Pause after a tracker said it does not know stage requests.
const TOO_OLD_RETRY: Duration = Duration::from_secs(60);
/// Progress goes to the trackers at least this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// And at most this often.
pub const REPORT_MIN_GAP: Duration = Duration::from_millis(250);
/// How often a running stage samples its bytes held.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Blobs of one image fetched at once: containerd's own default. Each blob is a
/// connection to each of its peers (two for a moment while a pair dials both ways),
/// and a node keeps at most `swarm_core::conns::MAX_CONNECTIONS_PER_ADDRESS` (8) to
/// one peer, so three blobs leave room for a containerd pull alongside.
const PARALLEL_BLOBS: usize = 3;
/// Tries per blob (a blob whose swarm failed is started again).
const BLOB_TRIES: u32 = 4;
/// Tries per manifest request that fails transiently.
const MANIFEST_TRIES: u32 = 4;

/// An image reference split the way a registry needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// `docker.io`, `ghcr.io`, `10.0.0.5:5000`, ...
    pub registry: String,
    /// `library/ubuntu`, `org/app`, ...
    pub repository: String,
    /// A tag or a `sha256:` digest (a digest wins over a tag given with it).
    pub reference: String,
}

impl ImageRef {
    /// Parses `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]` as containerd and docker do: the
    /// first component is a registry if it has a `.` or a `:` or is `localhost`, else
    /// the image is on `docker.io` (one-component names under `library/`); no tag
    /// means `latest`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = |why: &str| format!("invalid image reference {text:?}: {why}");
        let (name, digest) = match text.split_once('@') {
            Some((name, digest)) => {
                digest.parse::<Digest>().map_err(|_| bad("the part after @ is not a sha256: digest"))?;
                (name, Some(digest))
            }
            None => (text, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t)),
            _ => (name, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            Some(_) => ("docker.io".to_string(), name.to_string()),
            None => ("docker.io".to_string(), format!("library/{name}")),
        };
        if !names::is_valid_registry(&registry) {
            return Err(bad("bad registry host"));
        }
        if !names::is_valid_repository(&repository) {
            return Err(bad("bad repository name (lower case letters, digits, separators)"));
        }
        let reference = match (digest, tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) if names::is_valid_tag(t) => t.to_string(),
            (None, Some(_)) => return Err(bad("bad tag")),
            (None, None) => "latest".to_string(),
        };
        Ok(Self { registry, repository, reference })
    }
}

/// The OCI platform of this machine (`linux`, the Go name of the architecture, and a
/// variant for 32-bit ARM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this agent runs on.
    pub fn current() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            other => (other, None),
        };
        Self {
            os: std::env::consts::OS.to_string(),
            architecture: architecture.into(),
            variant: variant.map(Into::into),
        }
    }

    fn matches(&self, p: &serde_json::Value) -> bool {
        let field = |k: &str| p[k].as_str().unwrap_or_default();
        field("os") == self.os
            && field("architecture") == self.architecture
            && (self.variant.is_none() || p["variant"].is_null() || self.variant.as_deref() == Some(field("variant")))
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

/// What a stage pinned, kept on disk (see the module docs).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Record {
    image: String,
    issued_ms: u64,
    pin_until_secs: u64,
    /// The image manifest for this node's platform.
    manifest: Option<String>,
    /// `(digest, size)` of the config and layers.
    blobs: Vec<(String, u64)>,
    done: bool,
}

impl Record {
    fn digests(&self) -> Vec<Digest> {
        self.blobs.iter().filter_map(|(d, _)| d.parse().ok()).collect()
    }
}

/// A resolved image: its manifests (index first if any) and its blobs.
struct Resolved {
    manifest: Digest,
    blobs: Vec<(Digest, u64)>,
}

/// The stage side of an agent. See the module docs.
pub struct Stager {
    node: Node,
    provider: Arc<SwarmProvider>,
    upstream: UpstreamClient,
    disk: Option<Arc<Disk>>,
    manifests: ManifestCache,
    records: PathBuf,
    agent: StageAgent,
    platform: Platform,
    /// Progress per image, as reported.
    progress: Mutex<BTreeMap<String, StageProgress>>,
    changed: Notify,
}

impl Stager {
    /// The stager of `node`, fetching through `provider` and resolving with
    /// `upstream`; manifests go to `manifests` (the mirror's cache). `name` is the
    /// node's name as `--node` selects it.
    pub fn new(
        node: Node,
        provider: Arc<SwarmProvider>,
        upstream: UpstreamClient,
        disk: Option<Arc<Disk>>,
        manifests: ManifestCache,
        name: String,
    ) -> Arc<Self> {
        let (_, _, zone) = node.announce_identity();
        let agent = StageAgent { peer_id: node.peer_id(), name, zone };
        let records = node.store().root().join("staged");
        Arc::new(Self {
            node,
            provider,
            upstream,
            disk,
            manifests,
            records,
            agent,
            platform: Platform::current(),
            progress: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
        })
    }

    /// Follows the trackers' stage orders and carries them out until `cancel` fires.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let (tx, mut rx) = mpsc::channel::<Vec<StageOrder>>(16);
        let mut tasks: JoinSet<()> = JoinSet::new();
        tasks.spawn(self.clone().report(cancel.clone()).instrument(info_span!("stage-report")));
        let mut view = self.node.tracker().watch();
        let mut polling: Vec<(SocketAddr, CancellationToken)> = Vec::new();
        let mut orders: BTreeMap<String, StageOrder> = BTreeMap::new();
        let mut jobs: HashMap<String, (u64, CancellationToken)> = HashMap::new();
        loop {
            let listed = self.node.tracker().trackers();
            polling.retain(|(addr, stop)| {
                let keep = listed.contains(addr);
                if !keep {
                    stop.cancel();
                }
                keep
            });
            for addr in listed {
                if polling.iter().any(|(a, _)| *a == addr) {
                    continue;
                }
                let stop = cancel.child_token();
                polling.push((addr, stop.clone()));
                let span = info_span!("stage-poll", tracker = %addr);
                tasks.spawn(self.clone().poll(addr, tx.clone(), stop).instrument(span));
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                changed = view.changed() => if changed.is_err() { break },
                Some(list) = rx.recv() => {
                    for order in list {
                        let newer = orders.get(&order.image).is_none_or(|held| held.issued_ms < order.issued_ms);
                        if newer {
                            orders.insert(order.image.clone(), order.clone());
                            self.start(order, &mut jobs, &mut tasks, &cancel);
                        }
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        for (_, (_, stop)) in jobs {
            stop.cancel();
        }
        tasks.shutdown().await;
    }

    /// Carries out a new order: stops the image's previous job, then stages or
    /// releases.
    fn start(
        self: &Arc<Self>,
        order: StageOrder,
        jobs: &mut HashMap<String, (u64, CancellationToken)>,
        tasks: &mut JoinSet<()>,
        cancel: &CancellationToken,
    ) {
        let now = unix_secs();
        if let Some((_, stop)) = jobs.remove(&order.image) {
            stop.cancel();
        }
        let selected = order.selects(&self.agent.name, &self.agent.zone, &self.agent.peer_id);
        if order.release {
            let me = self.clone();
            let span = info_span!("stage-release", image = %order.image);
            tasks.spawn(async move { me.release(&order).await }.instrument(span));
            return;
        }
        if !selected || order.pin_until_secs <= now {
            debug!(image = %order.image, selected, "stage order not for this node");
            return;
        }
        let stop = cancel.child_token();
        jobs.insert(order.image.clone(), (order.issued_ms, stop.clone()));
        let me = self.clone();
        let span = info_span!("stage", image = %order.image);
        tasks.spawn(
            async move {
                let image = order.image.clone();
                let issued_ms = order.issued_ms;
                let result = tokio::select! {
                    r = me.stage(&order) => r,
                    () = stop.cancelled() => return,
                };
                if let Err(reason) = result {
                    warn!(%reason, "staging failed");
                    me.set(&image, issued_ms, |p| p.state = StageState::Failed { reason });
                }
            }
            .instrument(span),
        );
    }

    /// Long-polls `tracker` for orders and hands every new set to the main loop.
    async fn poll(self: Arc<Self>, tracker: SocketAddr, tx: mpsc::Sender<Vec<StageOrder>>, stop: CancellationToken) {
        let mut after = 0u64;
        let mut failing = false;
        loop {
            let answer = tokio::select! {
                () = stop.cancelled() => return,
                a = self.node.tracker().wait_stage(tracker, &self.agent, after, POLL_WAIT) => a,
            };
            let pause = match answer {
                Ok((generation, orders)) => {
                    failing = false;
                    if generation != after {
                        after = generation;
                        if tx.send(orders).await.is_err() {
                            return;
                        }
                        // The tracker may have restarted: tell it our progress again.
                        self.changed.notify_one();
                    }
                    continue;
                }
                Err(e @ TrackerClientError::TooOldForStage { .. }) => {
                    warn!(error = %e, "this tracker cannot pass on stage orders");
                    TOO_OLD_RETRY
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        debug!(error = %e, "stage long poll failed; retrying");
                    }
                    POLL_RETRY
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Sends the progress to every tracker when it changed and every [`REPORT_EVERY`].
    async fn report(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.changed.notified() => {}
                () = tokio::time::sleep(REPORT_EVERY) => {}
            }
            let list: Vec<StageProgress> = {
                let progress = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
                let mut v: Vec<StageProgress> = progress.values().cloned().collect();
                v.sort_by_key(|p| std::cmp::Reverse(p.issued_ms));
                v.truncate(MAX_STAGE_ORDERS);
                v
            };
            if !list.is_empty() {
                let sends = self.node.tracker().trackers().into_iter().map(|t| {
                    let (client, agent, list) = (self.node.tracker().clone(), self.agent.clone(), list.clone());
                    async move {
                        if let Err(e) = client.stage_progress(t, &agent, list).await {
                            debug!(tracker = %t, error = %e, "stage progress not reported");
                        }
                    }
                });
                futures_util::future::join_all(sends).await;
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(REPORT_MIN_GAP) => {}
            }
        }
    }

    /// Changes the progress of `image` (order `issued_ms`) and wakes the reporter.
    fn set(&self, image: &str, issued_ms: u64, f: impl FnOnce(&mut StageProgress)) {
        let mut progress = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = || StageProgress {
            image: image.to_string(),
            issued_ms,
            state: StageState::Resolving,
            manifest: None,
            blobs: 0,
            blobs_held: 0,
            bytes: 0,
            bytes_held: 0,
        };
        let p = progress.entry(image.to_string()).or_insert_with(fresh);
        if p.issued_ms != issued_ms {
            *p = fresh();
        }
        let before = p.clone();
        f(p);
        if *p != before {
            self.changed.notify_one();
        }
    }

    /// One stage order, start to end. The error is the reason the node's part failed.
    async fn stage(&self, order: &StageOrder) -> Result<(), String> {
        let (image, issued) = (order.image.as_str(), order.issued_ms);
        self.set(image, issued, |p| p.state = StageState::Resolving);
        let mut record = self.read_record(image).unwrap_or_default();
        let r = ImageRef::parse(image)?;
        let resolved = if record.issued_ms == issued && record.done {
            // Done before a restart: check the store still holds it all.
            let blobs: Vec<(Digest, u64)> =
                record.blobs.iter().filter_map(|(d, s)| d.parse().ok().map(|d| (d, *s))).collect();
            match record.manifest.as_deref().and_then(|m| m.parse().ok()) {
                Some(manifest) => Resolved { manifest, blobs },
                None => self.resolve(&r).await?,
            }
        } else {
            self.resolve(&r).await?
        };
        let total: u64 = resolved.blobs.iter().map(|(_, s)| s).sum();
        let digests: Vec<Digest> = resolved.blobs.iter().map(|(d, _)| *d).collect();
        if let Some(disk) = &self.disk {
            let kept = disk.kept_bytes(&digests);
            let budget = disk.budget();
            if kept.saturating_add(total) > budget {
                let lacks = kept.saturating_add(total) - budget;
                return Err(format!(
                    "cannot fit: the image's {} blobs need {total} bytes and {kept} bytes of the {budget}-byte cache \
                     budget are kept for other pinned or busy blobs: {lacks} bytes lacking (raise --cache-size or \
                     release another stage)",
                    digests.len()
                ));
            }
        }
        // Pins first: nothing fetched below can be evicted, and a release finds them.
        let until = SystemTime::UNIX_EPOCH + Duration::from_secs(order.pin_until_secs);
        if let Some(disk) = &self.disk {
            for d in &digests {
                disk.pins().pin(d, until).map_err(|e| format!("cannot pin {d}: {e}"))?;
            }
        }
        record = Record {
            image: image.to_string(),
            issued_ms: issued,
            pin_until_secs: order.pin_until_secs,
            manifest: Some(resolved.manifest.to_string()),
            blobs: resolved.blobs.iter().map(|(d, s)| (d.to_string(), *s)).collect(),
            done: false,
        };
        self.write_record(&record)?;
        let count = u32::try_from(digests.len()).unwrap_or(u32::MAX);
        self.set(image, issued, |p| {
            p.state = StageState::Fetching;
            p.manifest = Some(resolved.manifest);
            p.blobs = count;
            p.bytes = total;
        });
        info!(manifest = %resolved.manifest, blobs = count, bytes = total, until = order.pin_until_secs, "staging");
        let fetches = stream::iter(digests.iter().copied())
            .map(|d| {
                let req = BlobRequest { registry: r.registry.clone(), repository: r.repository.clone(), digest: d };
                async move { self.fetch(&req).await }
            })
            .buffer_unordered(PARALLEL_BLOBS)
            .collect::<Vec<Result<(), String>>>();
        tokio::pin!(fetches);
        let results = loop {
            tokio::select! {
                results = &mut fetches => break results,
                () = tokio::time::sleep(SAMPLE_EVERY) => self.sample(image, issued, &resolved.blobs),
            }
        };
        self.sample(image, issued, &resolved.blobs);
        let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        if !failed.is_empty() {
            return Err(failed.join("; "));
        }
        record.done = true;
        self.write_record(&record)?;
        self.set(image, issued, |p| p.state = StageState::Done);
        info!(manifest = %resolved.manifest, blobs = count, bytes = total, "staged: every blob held and pinned");
        Ok(())
    }

    /// Fetches one blob into the store, trying again a few times.
    async fn fetch(&self, req: &BlobRequest) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..BLOB_TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
            }
            match self.provider.prefetch(req).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    debug!(digest = %req.digest, attempt, error = %e, "staging a blob failed");
                    last = e.to_string();
                }
            }
        }
        Err(format!("{}: {last}", req.digest))
    }

    /// Updates the bytes and blobs held of `image`.
    fn sample(&self, image: &str, issued: u64, blobs: &[(Digest, u64)]) {
        let complete: HashSet<Digest> = self.node.store().complete_blobs().unwrap_or_default().into_iter().collect();
        let (mut held, mut bytes) = (0u32, 0u64);
        for (d, size) in blobs {
            let live = self.node.download(d).map(|dl| dl.progress().borrow().clone());
            match live {
                Some(p) if p.state == DownloadState::Complete => {
                    held += 1;
                    bytes += size;
                }
                Some(p) => bytes += p.bytes.min(*size),
                None if complete.contains(d) => {
                    held += 1;
                    bytes += size;
                }
                None => {}
            }
        }
        self.set(image, issued, |p| {
            p.blobs_held = held;
            p.bytes_held = bytes;
        });
    }

    /// Resolves `r` to its manifest for this node's platform and that manifest's
    /// blobs; every manifest on the way goes to the mirror's cache.
    async fn resolve(&self, r: &ImageRef) -> Result<Resolved, String> {
        let mut reference = r.reference.clone();
        // An index may point at another index; two levels are plenty.
        for _ in 0..3 {
            let m = self.manifest(r, &reference).await?;
            self.manifests
                .put(&m.digest, &m.media_type, &m.bytes)
                .await
                .map_err(|e| format!("cannot cache manifest {}: {e}", m.digest))?;
            let json: serde_json::Value = serde_json::from_slice(&m.bytes)
                .map_err(|e| format!("manifest {} of {}/{} is not JSON: {e}", m.digest, r.registry, r.repository))?;
            if let Some(entries) = json["manifests"].as_array() {
                let chosen = entries.iter().find(|e| self.platform.matches(&e["platform"]));
                let Some(chosen) = chosen else {
                    let have: Vec<String> = entries
                        .iter()
                        .map(|e| {
                            let p = &e["platform"];
                            format!("{}/{}", p["os"].as_str().unwrap_or("?"), p["architecture"].as_str().unwrap_or("?"))
                        })
                        .collect();
                    return Err(format!(
                        "the index {} has no manifest for {} (it has {})",
                        m.digest,
                        self.platform,
                        have.join(", ")
                    ));
                };
                reference = chosen["digest"].as_str().unwrap_or_default().to_string();
                continue;
            }
            let mut blobs = Vec::new();
            let entries = std::iter::once(&json["config"]).chain(json["layers"].as_array().into_iter().flatten());
            for e in entries {
                let digest: Digest = e["digest"]
                    .as_str()
                    .and_then(|d| d.parse().ok())
                    .ok_or_else(|| format!("manifest {} lists a blob without a sha256 digest", m.digest))?;
                let size =
                    e["size"].as_u64().ok_or_else(|| format!("manifest {} lists {digest} without a size", m.digest))?;
                if !blobs.iter().any(|(d, _)| *d == digest) {
                    blobs.push((digest, size));
                }
            }
            return Ok(Resolved { manifest: m.digest, blobs });
        }
        Err(format!("{}/{}:{}: indexes nested too deep", r.registry, r.repository, r.reference))
    }

    /// One manifest from upstream, trying again on transient failures.
    async fn manifest(&self, r: &ImageRef, reference: &str) -> Result<crate::upstream::Manifest, String> {
        let mut last: Option<UpstreamError> = None;
        for attempt in 0..MANIFEST_TRIES {
            if attempt > 0 {
                let pause =
                    last.as_ref().and_then(UpstreamError::retry_after).unwrap_or(Duration::from_secs(1 << attempt));
                tokio::time::sleep(pause.min(Duration::from_secs(30))).await;
            }
            match self.upstream.manifest(&r.registry, &r.repository, reference, DEFAULT_MANIFEST_ACCEPT).await {
                Ok(m) => return Ok(m),
                Err(e) if e.is_transient() => last = Some(e),
                Err(e) => return Err(format!("{}/{}:{reference}: {e}", r.registry, r.repository)),
            }
        }
        Err(format!(
            "{}/{}:{reference}: {}",
            r.registry,
            r.repository,
            last.map_or_else(|| "no answer".to_string(), |e| e.to_string())
        ))
    }

    /// Carries out a release order: unpins what the image's record lists (but blobs
    /// another staged image pins), deletes the record.
    async fn release(&self, order: &StageOrder) {
        let image = &order.image;
        if let Some(record) = self.read_record(image) {
            let others: HashSet<Digest> =
                self.all_records().into_iter().filter(|r| r.image != *image).flat_map(|r| r.digests()).collect();
            if let Some(disk) = &self.disk {
                for d in record.digests() {
                    if others.contains(&d) {
                        continue;
                    }
                    if let Err(e) = disk.pins().unpin(&d) {
                        warn!(digest = %d, error = %e, "cannot unpin");
                    }
                }
            }
            if let Err(e) = std::fs::remove_file(self.record_path(image)) {
                warn!(error = %e, "cannot remove the stage record");
            }
            info!(blobs = record.blobs.len(), "stage released: its blobs are unpinned");
        }
        let held = self.progress.lock().unwrap_or_else(PoisonError::into_inner).contains_key(image);
        if held || order.selects(&self.agent.name, &self.agent.zone, &self.agent.peer_id) {
            self.set(image, order.issued_ms, |p| p.state = StageState::Released);
        }
    }

    fn record_path(&self, image: &str) -> PathBuf {
        self.records.join(format!("{}.json", Digest::of(image.as_bytes()).hex()))
    }

    fn read_record(&self, image: &str) -> Option<Record> {
        let bytes = std::fs::read(self.record_path(image)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn all_records(&self) -> Vec<Record> {
        let Ok(dir) = std::fs::read_dir(&self.records) else { return Vec::new() };
        dir.flatten()
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<Record>(&b).ok())
            .collect()
    }

    fn write_record(&self, record: &Record) -> Result<(), String> {
        let path = self.record_path(&record.image);
        let err = |e: std::io::Error| format!("cannot write the stage record {}: {e}", path.display());
        std::fs::create_dir_all(&self.records).map_err(err)?;
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| format!("stage record: {e}"))?;
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }
}

/// This machine's host name, the node name `swarm stage --node` selects by.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalised_like_containerd_does() {
        let p = |s: &str| ImageRef::parse(s).expect(s);
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            p("ubuntu"),
            ImageRef { registry: "docker.io".into(), repository: "library/ubuntu".into(), reference: "latest".into() }
        );
        assert_eq!(p("org/app:v1").repository, "org/app");
        assert_eq!(p("org/app:v1").registry, "docker.io");
        let r = p("127.0.0.1:5000/edge/os:v2");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "edge/os", "v2")
        );
        let r = p(&format!("quay.io/kairos/core:v3@{d}"));
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("quay.io", "kairos/core", d.as_str())
        );
        assert_eq!(p("localhost/app").registry, "localhost");
        assert_eq!(p("registry.local:5000/app").reference, "latest");
        assert!(ImageRef::parse("Bad/Name").is_err());
        assert!(ImageRef::parse("app@sha256:zz").is_err());
        assert!(ImageRef::parse("app:").is_err());
    }

    #[test]
    fn the_platform_matches_index_entries() {
        let amd64 = Platform { os: "linux".into(), architecture: "amd64".into(), variant: None };
        assert!(amd64.matches(&serde_json::json!({"os": "linux", "architecture": "amd64"})));
        assert!(!amd64.matches(&serde_json::json!({"os": "linux", "architecture": "arm64"})));
        assert!(!amd64.matches(&serde_json::json!({"os": "unknown", "architecture": "unknown"})));
        let arm = Platform { os: "linux".into(), architecture: "arm".into(), variant: Some("v7".into()) };
        assert!(arm.matches(&serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v7"})));
        assert!(!arm.matches(&serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v6"})));
        assert_eq!(arm.to_string(), "linux/arm/v7");
    }
}
