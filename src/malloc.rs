//! The process's malloc setting: piece buffers go back to the system when freed.
//!
//! A node allocates one piece-sized buffer (256 KiB to 4 MiB) per upload, download,
//! mirror read and upstream piece, on whichever thread of tokio's pools runs the
//! task. glibc serves a block that large with `mmap` at first, but raises its mmap
//! threshold to the size of every such block freed (up to 32 MiB); from then on the
//! buffers come from its arenas (up to 8 per core, one per thread that met
//! contention) and stay there once freed, each arena keeping its own. An agent serving
//! and pulling a 1 GiB blob grew to 51-67 MiB of RSS that way; with the threshold
//! fixed at glibc's default of 128 KiB (no raising) it stayed at 26-30 MiB: every
//! buffer is unmapped when freed, so RSS follows the buffers alive, which the upload
//! slots and the receive budget bound (`swarm_core::upload`). See
//! docs/reliability.md, Limits.
//!
//! The threshold is a glibc tunable read once at start-up, and this crate forbids
//! `unsafe` (so no `mallopt`): [`fix_mmap_threshold`] re-executes the binary with
//! `GLIBC_TUNABLES` set, once, before anything else runs. A `GLIBC_TUNABLES` that
//! already sets `glibc.malloc.mmap_threshold` is left alone. Other C libraries
//! ignore it. The re-executed process carries [`REEXECUTED`] too and never
//! re-executes again, even where the loader drops `GLIBC_TUNABLES` (a binary with
//! file capabilities or setuid runs in secure mode).

use std::ffi::{OsStr, OsString};

/// The tunable: allocations of 128 KiB and more are mapped, and unmapped when freed.
pub const MMAP_THRESHOLD: &str = "glibc.malloc.mmap_threshold=131072";

/// Set in the environment of the re-executed process (and so of its children).
pub const REEXECUTED: &str = "SWARM_MALLOC_REEXECUTED";

/// `GLIBC_TUNABLES` with [`MMAP_THRESHOLD`] added to `current`, or `None` when
/// `current` already sets the threshold (the user's choice wins, and a re-executed
/// process does not re-execute again).
pub fn tunables_with_threshold(current: Option<&OsStr>) -> Option<OsString> {
    let current = current.filter(|v| !v.is_empty());
    let Some(current) = current else { return Some(MMAP_THRESHOLD.into()) };
    let sets_it = current.to_string_lossy().split(':').any(|t| t.starts_with("glibc.malloc.mmap_threshold="));
    if sets_it {
        return None;
    }
    let mut value = current.to_os_string();
    value.push(":");
    value.push(MMAP_THRESHOLD);
    Some(value)
}

/// Re-executes this binary with the same arguments and [`MMAP_THRESHOLD`] in
/// `GLIBC_TUNABLES` (see the module docs); returns only when that is not needed or
/// not possible (then the process runs on with glibc's defaults, and says so).
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;

        if std::env::var_os(REEXECUTED).is_some() {
            return;
        }
        let Some(value) = tunables_with_threshold(std::env::var_os("GLIBC_TUNABLES").as_deref()) else { return };
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                eprintln!("swarm: cannot find its own binary to set {MMAP_THRESHOLD} ({e}); memory may grow");
                return;
            }
        };
        let mut args = std::env::args_os();
        let mut cmd = std::process::Command::new(&exe);
        if let Some(argv0) = args.next() {
            cmd.arg0(argv0);
        }
        let err = cmd.args(args).env("GLIBC_TUNABLES", value).env(REEXECUTED, "1").exec();
        eprintln!("swarm: cannot re-execute {} to set {MMAP_THRESHOLD} ({err}); memory may grow", exe.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_added_once_and_a_users_own_threshold_wins() {
        assert_eq!(tunables_with_threshold(None), Some(MMAP_THRESHOLD.into()));
        assert_eq!(tunables_with_threshold(Some(OsStr::new(""))), Some(MMAP_THRESHOLD.into()));
        assert_eq!(
            tunables_with_threshold(Some(OsStr::new("glibc.malloc.arena_max=2"))),
            Some(format!("glibc.malloc.arena_max=2:{MMAP_THRESHOLD}").into())
        );
        assert_eq!(tunables_with_threshold(Some(OsStr::new(MMAP_THRESHOLD))), None, "no second re-execution");
        assert_eq!(tunables_with_threshold(Some(OsStr::new("glibc.malloc.mmap_threshold=65536"))), None);
    }
}
