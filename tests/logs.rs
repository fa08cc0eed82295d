//! Log output of the real `swarm` binary when stderr is not a terminal (a pipe or a
//! file, as under journald): plain text without ANSI escapes, or one JSON object per
//! line with `--log-format json` / `SWARM_LOG_FORMAT=json`.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use support::agents::{swarm_bin, tracker_command, write_token};
use support::process::{run_unchecked, tcp_open, wait_until};
use support::{ChildGuard, free_port, test_dir};

/// Runs a tracker with `format` (None: the default) until its HTTP address answers,
/// then stops it and returns its stderr.
fn tracker_stderr(name: &str, format: Option<&str>) -> String {
    let dir = test_dir(name);
    let token = dir.path().join("token");
    write_token(&token).expect("token");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = tracker_command(addr, http, &token);
    if let Some(format) = format {
        cmd.env("SWARM_LOG_FORMAT", format);
    }
    let mut tracker = ChildGuard::spawn("tracker", cmd, dir.path()).expect("tracker");
    // Its last start-up line names the HTTP address.
    let stderr = tracker.stderr_path().to_path_buf();
    let started = || std::fs::read_to_string(&stderr).is_ok_and(|t| t.contains("tracker health and metrics on"));
    wait_until("tracker started", Duration::from_secs(20), &mut tracker, || tcp_open(http) && started())
        .expect("tracker up");
    let text = tracker.stderr_text();
    tracker.kill();
    text
}

#[test]
fn text_logs_have_no_colour_when_stderr_is_not_a_terminal() {
    let text = tracker_stderr("logs-text", None);
    assert!(text.contains("tracker listening on"), "the status line is there:\n{text}");
    assert!(!text.contains('\u{1b}'), "no ANSI escape in piped logs:\n{text:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let text = tracker_stderr("logs-json", Some("json"));
    assert!(!text.trim().is_empty(), "the tracker logged something");
    let mut messages = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{text}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(), "{line}");
        messages.push(v["fields"]["message"].as_str().unwrap_or_default().to_string());
    }
    assert!(messages.iter().any(|m| m.starts_with("tracker listening on")), "{messages:?}");

    // A failing command reports its error as JSON too.
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["--log-format", "json", "agent"]).env_remove("SWARM_TRACKER").env_remove("SWARM_CONFIG");
    let out = run_unchecked(&mut cmd, Duration::from_secs(20)).expect("swarm agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!(v["level"], "ERROR", "{line}");
    assert!(v["fields"]["message"].as_str().unwrap_or_default().contains("no tracker"), "{line}");
}

#[test]
fn an_invalid_log_format_or_filter_is_refused_with_the_flag_named() {
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["--log-format", "yaml", "token"]);
    let out = run_unchecked(&mut cmd, Duration::from_secs(20)).expect("swarm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log-format"), "{out:?}");

    let mut cmd = Command::new(swarm_bin());
    cmd.args(["--log", "swarm=loud", "token"]);
    let out = run_unchecked(&mut cmd, Duration::from_secs(20)).expect("swarm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --log"), "{out:?}");
}
