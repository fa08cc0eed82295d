//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same
//! target bodies the cargo-fuzz targets run (`swarm_proto::fuzzing`,
//! `swarm_peer::fuzzing`), so every input the fuzzer kept, and every crash it found
//! and we fixed, is checked on each CI run without cargo-fuzz. A target without a
//! corpus, or with an empty one, fails the test. See docs/fuzzing.md.

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

/// Runs every file of `target`'s corpus through `body`; returns how many ran.
fn replay(target: &str, body: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "fuzz target {target}: cannot read its corpus {}: {e} (run the target and commit its corpus)",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("corpus entry").path()).filter(|p| p.is_file()).collect();
    files.sort();
    assert!(!files.is_empty(), "fuzz target {target}: its corpus {} is empty", dir.display());
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "fuzz target {target} fails on {}", file.display());
    }
    files.len()
}

fn replay_all(targets: &[swarm_proto::fuzzing::Target]) {
    assert!(!targets.is_empty());
    for (target, body) in targets {
        let n = replay(target, *body);
        eprintln!("{target}: {n} corpus files replayed");
    }
}

#[test]
fn proto_decoders_pass_on_their_fuzz_corpora() {
    replay_all(swarm_proto::fuzzing::TARGETS);
}

#[test]
fn mirror_and_upstream_parsers_pass_on_their_fuzz_corpora() {
    replay_all(swarm_peer::fuzzing::TARGETS);
}

/// Every cargo-fuzz target has a body in one of the `TARGETS` lists (so its corpus is
/// replayed above), and every listed body has a cargo-fuzz target.
#[test]
fn every_fuzz_target_is_replayed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    let mut on_disk: Vec<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display()))
        .map(|e| e.expect("entry").path())
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = swarm_proto::fuzzing::TARGETS
        .iter()
        .chain(swarm_peer::fuzzing::TARGETS)
        .map(|(name, _)| name.to_string())
        .collect();
    listed.sort();
    assert_eq!(on_disk, listed);
}
