//! Recorded frames of every tracker message, by protocol version
//! (`proto/tests/frames/v<N>/<name>.bin`, committed). The current code must decode
//! each recorded frame to the message it was made from and encode that message to
//! the very same bytes: a change that would break agents or trackers of an older
//! release (a field added to an existing variant, variants reordered) fails here.
//!
//! Frames are recorded once, when a version's messages are added: run this test with
//! `SWARM_RECORD_FRAMES=1` to write the frames that are missing, and commit them.
//! Recorded frames are never rewritten.

use std::path::{Path, PathBuf};

use swarm_proto::codec::{MAX_FRAME_LEN, decode_frame, encode_frame};
use swarm_proto::msg::*;
use swarm_proto::{Digest, Layout, Metainfo, PeerId};

fn blob() -> Digest {
    Digest::of(b"recorded blob")
}

fn peer() -> PeerId {
    PeerId([7; 16])
}

fn metainfo() -> Metainfo {
    Metainfo { digest: blob(), length: 600_000, piece_length: 1 << 18, piece_hashes: vec![[1; 32], [2; 32], [3; 32]] }
}

fn layout() -> Layout {
    Layout { digest: blob(), length: 600_000, piece_length: 1 << 18 }
}

/// Named requests and responses of one version.
type Frames = (Vec<(&'static str, TrackerRequest)>, Vec<(&'static str, TrackerResponse)>);

/// Version 1: every tracker request and response (and lease reply) as of the first
/// release.
fn v1() -> Frames {
    let announce = Announce {
        peer_id: peer(),
        blob: blob(),
        listen_port: 7001,
        advertise: Some("198.18.0.2:7001".parse().expect("addr")),
        zone: "rack-a".into(),
        have: 1,
        complete: false,
        num_want: 50,
    };
    let view = ClusterView {
        nodes: vec![NodeView {
            peer_id: peer(),
            addr: "[2001:db8::1]:7001".parse().expect("addr"),
            zone: "rack-a".into(),
            last_seen_ms: 1500,
        }],
        blobs: vec![BlobView {
            digest: blob(),
            layout: Some(layout()),
            known_hashes: 3,
            holders: vec![HolderView { peer_id: peer(), have: 3, complete: true }],
            lease: Some(LeaseView { holder: peer(), state: LeaseViewState::Stalled, held_ms: Some(10) }),
        }],
        truncated: true,
    };
    (
        vec![
            ("register", TrackerRequest::Register { metainfo: metainfo() }),
            ("get-metainfo", TrackerRequest::GetMetainfo { blob: blob() }),
            ("announce", TrackerRequest::Announce(announce)),
            ("leave", TrackerRequest::Leave { peer_id: peer(), blob: blob() }),
            ("acquire-lease", TrackerRequest::AcquireLease { peer_id: peer(), blob: blob() }),
            (
                "publish-hashes",
                TrackerRequest::PublishHashes { peer_id: peer(), layout: layout(), first: 1, hashes: vec![[4; 32]] },
            ),
            (
                "release-lease",
                TrackerRequest::ReleaseLease {
                    peer_id: peer(),
                    blob: blob(),
                    failed: Some("upstream said 401".into()),
                },
            ),
            ("get-hashes", TrackerRequest::GetHashes { blob: blob(), first: 2 }),
            ("cluster-view", TrackerRequest::ClusterView { blobs: vec![blob()] }),
        ],
        vec![
            ("registered", TrackerResponse::Registered),
            ("metainfo", TrackerResponse::Metainfo(metainfo())),
            (
                "peers",
                TrackerResponse::Peers {
                    peers: vec![PeerInfo {
                        peer_id: peer(),
                        addr: "127.0.0.1:7001".parse().expect("addr"),
                        zone: String::new(),
                        have: 3,
                        complete: true,
                    }],
                    interval_secs: 30,
                },
            ),
            ("left", TrackerResponse::Left),
            (
                "error-unknown-blob",
                TrackerResponse::Error { code: TrackerErrorCode::UnknownBlob, message: "no".into() },
            ),
            ("error-conflict", TrackerResponse::Error { code: TrackerErrorCode::Conflict, message: "c".into() }),
            ("error-invalid", TrackerResponse::Error { code: TrackerErrorCode::Invalid, message: "i".into() }),
            ("lease-granted", TrackerResponse::Lease(LeaseReply::Granted { ttl_secs: 10, resume_from: 3 })),
            ("lease-held-by", TrackerResponse::Lease(LeaseReply::HeldBy { holder: peer() })),
            ("lease-not-needed", TrackerResponse::Lease(LeaseReply::NotNeeded)),
            ("lease-failed", TrackerResponse::Lease(LeaseReply::Failed { reason: "401".into() })),
            (
                "hashes",
                TrackerResponse::Hashes { layout: layout(), first: 0, hashes: vec![[1; 32], [2; 32]], complete: false },
            ),
            ("cluster-view", TrackerResponse::ClusterView(view)),
        ],
    )
}

/// Version 2: the hello exchange and the store announce.
fn v2() -> Frames {
    let store = StoreAnnounce {
        peer_id: peer(),
        listen_port: 7001,
        advertise: None,
        zone: "rack-a".into(),
        blobs: vec![blob(), Digest::of(b"another")],
        metainfo: vec![metainfo()],
    };
    (
        vec![("hello", TrackerRequest::Hello { version: 2 }), ("announce-store", TrackerRequest::AnnounceStore(store))],
        vec![
            ("hello", TrackerResponse::Hello { version: 2, instance: 0x0123_4567_89ab_cdef }),
            ("store-announced", TrackerResponse::StoreAnnounced { interval_secs: 30, missing: vec![blob()] }),
        ],
    )
}

/// Version 3: the stage requests (`swarm stage`) and the uplink share exchange of the
/// cluster-wide uplink cap.
fn v3() -> Frames {
    let order = StageOrder {
        image: "registry.local:5000/kairos/core:v3.2".into(),
        zones: vec!["rack-a".into()],
        nodes: vec!["node-2".into(), "0707070707070707".into()],
        pin_until_secs: 1_800_000_000,
        release: false,
        issued_ms: 1_799_913_600_123,
    };
    let agent = StageAgent { peer_id: peer(), name: "node-2".into(), zone: "rack-a".into() };
    let progress = |state: StageState| StageProgress {
        image: order.image.clone(),
        issued_ms: order.issued_ms,
        state,
        manifest: Some(blob()),
        blobs: 4,
        blobs_held: 2,
        bytes: 600_000,
        bytes_held: 300_000,
    };
    let states = vec![
        progress(StageState::Resolving),
        progress(StageState::Fetching),
        progress(StageState::Done),
        progress(StageState::Failed { reason: "1048576 bytes lacking".into() }),
        progress(StageState::Released),
    ];
    let status = StageStatus {
        order: Some(order.clone()),
        interval_secs: 30,
        agents: vec![StageAgentView {
            agent: agent.clone(),
            addr: "198.18.0.2:7001".parse().expect("addr"),
            last_seen_ms: 250,
            progress: Some(progress(StageState::Fetching)),
        }],
    };
    (
        vec![
            ("stage", TrackerRequest::Stage(order.clone())),
            ("wait-stage", TrackerRequest::WaitStage { agent: agent.clone(), after: 17, wait_ms: 10_000 }),
            ("stage-progress", TrackerRequest::StageProgress { agent, progress: states }),
            ("stage-status", TrackerRequest::StageStatus { image: order.image.clone() }),
            ("uplink-share", TrackerRequest::UplinkShare { peer_id: peer(), blob: blob(), fetching: true }),
            ("uplink-share-done", TrackerRequest::UplinkShare { peer_id: peer(), blob: blob(), fetching: false }),
        ],
        vec![
            ("stage-orders", TrackerResponse::StageOrders { generation: 18, orders: vec![order] }),
            ("stage-status", TrackerResponse::StageStatus(status)),
            ("uplink-share", TrackerResponse::UplinkShare { bytes_per_sec: 2_500_000, renew_ms: 500 }),
            ("uplink-share-uncapped", TrackerResponse::UplinkShare { bytes_per_sec: 0, renew_ms: 5000 }),
        ],
    )
}

fn dir(group: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/frames").join(group)
}

fn check<T>(group: &str, kind: &str, name: &str, msg: &T, record: bool, problems: &mut Vec<String>)
where
    T: bincode::Encode + bincode::Decode<()> + PartialEq + std::fmt::Debug,
{
    let path = dir(group).join(format!("{kind}-{name}.bin"));
    let encoded = encode_frame(msg).expect("encode");
    let recorded = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(_) if record => {
            std::fs::create_dir_all(dir(group)).expect("mkdir");
            std::fs::write(&path, &encoded).expect("write");
            return;
        }
        Err(e) => {
            problems.push(format!(
                "{}: {e}; record it with SWARM_RECORD_FRAMES=1 cargo nextest run -p swarm-proto --test frames",
                path.display()
            ));
            return;
        }
    };
    match decode_frame::<T>(&recorded, MAX_FRAME_LEN) {
        Ok(decoded) if decoded == *msg => {}
        Ok(decoded) => problems.push(format!("{}: decodes to {decoded:?}, not {msg:?}", path.display())),
        Err(e) => problems.push(format!("{}: no longer decodes: {e}", path.display())),
    }
    if encoded != recorded {
        problems.push(format!("{}: the message now encodes to other bytes", path.display()));
    }
}

#[test]
fn recorded_tracker_frames_still_decode_and_encode_byte_identically() {
    let record = std::env::var_os("SWARM_RECORD_FRAMES").is_some();
    let mut problems = Vec::new();
    let mut count = 0;
    for (version, (requests, responses)) in [("v1", v1()), ("v2", v2()), ("v3", v3())] {
        for (name, m) in &requests {
            check(version, "request", name, m, record, &mut problems);
            count += 1;
        }
        for (name, m) in &responses {
            check(version, "response", name, m, record, &mut problems);
            count += 1;
        }
    }
    assert!(problems.is_empty(), "{} of {count} recorded frames fail:\n{}", problems.len(), problems.join("\n"));
    // Every request variant of version 1 is recorded (a new one is appended, never
    // inserted: its frame goes under the next version).
    assert_eq!(v1().0.len(), 9);
    assert_eq!(v2().0.len() + v1().0.len(), 11);
    assert_eq!(v3().0.len() + v2().0.len() + v1().0.len(), 17);
}

#[test]
fn version_2_requests_use_tags_a_version_1_decoder_does_not_know() {
    // A version-1 decoder knows variant tags 0..=8 of `TrackerRequest`: the new
    // requests must use later tags, so an old tracker refuses them as malformed
    // instead of misreading them.
    for (name, m) in v2().0 {
        let frame = encode_frame(&m).expect("encode");
        assert!(frame[4] > 8, "{name} has tag {}", frame[4]);
    }
    // Likewise, a version-2 decoder knows tags 0..=10.
    for (name, m) in v3().0 {
        let frame = encode_frame(&m).expect("encode");
        assert!(frame[4] > 10, "{name} has tag {}", frame[4]);
    }
}
