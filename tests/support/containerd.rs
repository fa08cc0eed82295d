//! A real containerd (Debian's 1.6) with its root, state and socket under a temp dir,
//! driven with `ctr`, and the `hosts.toml` that points it at a mirror.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::process::{ChildGuard, require_tool, run, run_unchecked, wait_until};

/// Longest a pull may take before the test fails.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(300);
/// Unix socket paths must fit in `sun_path` (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 100;

/// A running containerd, killed on drop.
pub struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    _child: ChildGuard,
}

/// What `ctr image check` says about one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageCheck {
    /// `STATUS` is `complete (n/n)`: every blob is in the content store.
    pub complete: bool,
    /// `UNPACKED` is `true`: the layers were unpacked into snapshots.
    pub unpacked: bool,
    /// The `ctr image check` line.
    pub line: String,
}

impl Containerd {
    /// Starts containerd with root, state, config and socket under `dir` (the CRI
    /// plugin disabled).
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        require_tool("containerd", "containerd");
        require_tool("ctr", "containerd");
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("c.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!("containerd socket path {} is too long for a unix socket; use a shorter temp dir", socket.display());
        }
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\n\
                 root = \"{root}\"\n\
                 state = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n  level = \"info\"\n\
                 [metrics]\n  address = \"\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
            ),
        )?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let mut child = ChildGuard::spawn("containerd", cmd, dir)?;
        let sock = socket.clone();
        wait_until("containerd socket", Duration::from_secs(30), &mut child, || {
            sock.exists() && ctr_command(&sock, &["version"]).output().is_ok_and(|o| o.status.success())
        })?;
        Ok(Self { dir: dir.to_path_buf(), socket, _child: child })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `ctr -a SOCK ARGS...`, failing unless it exits 0.
    pub fn ctr(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let out = run(ctr_command(&self.socket, args), timeout)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr image pull --hosts-dir HOSTS_DIR IMAGE_REF` (with `--plain-http` for a
    /// loopback registry). Runs on a blocking thread, so in-process servers on the
    /// caller's runtime keep running. Returns how long the pull took; the error
    /// carries ctr's output.
    pub async fn pull(&self, image_ref: &str, hosts_dir: &Path) -> anyhow::Result<Duration> {
        let socket = self.socket.clone();
        let image_ref = image_ref.to_string();
        let hosts_dir = hosts_dir.to_path_buf();
        tokio::task::spawn_blocking(move || pull_blocking(&socket, &image_ref, &hosts_dir))
            .await
            .context("pull thread panicked")?
    }

    /// `ctr image check` for `image_ref`.
    pub fn image_check(&self, image_ref: &str) -> anyhow::Result<ImageCheck> {
        let out = self.ctr(&["image", "check"], Duration::from_secs(60))?;
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(image_ref))
            .with_context(|| format!("{image_ref} not in `ctr image check`:\n{out}"))?
            .to_string();
        let complete = line.split("complete (").nth(1).and_then(|rest| rest.split(')').next()).is_some_and(|n| {
            let mut parts = n.split('/');
            matches!((parts.next(), parts.next()), (Some(a), Some(b)) if a == b)
        });
        let unpacked = line.split_whitespace().last() == Some("true");
        Ok(ImageCheck { complete, unpacked, line })
    }

    /// Digests (`sha256:...`) in the content store.
    pub fn content_digests(&self) -> anyhow::Result<Vec<String>> {
        let out = self.ctr(&["content", "ls", "-q"], Duration::from_secs(60))?;
        Ok(out.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
    }

    /// Committed snapshots (one per unpacked layer).
    pub fn snapshot_count(&self) -> anyhow::Result<usize> {
        let out = self.ctr(&["snapshots", "ls"], Duration::from_secs(60))?;
        Ok(out.lines().skip(1).filter(|l| l.contains("Committed")).count())
    }
}

fn ctr_command(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg("-a").arg(socket).args(args);
    cmd
}

fn pull_blocking(socket: &Path, image_ref: &str, hosts_dir: &Path) -> anyhow::Result<Duration> {
    let host = image_ref.split('/').next().unwrap_or_default();
    let loopback = host.starts_with("127.") || host.starts_with("localhost");
    let mut args = vec!["image", "pull", "--hosts-dir"];
    let hosts = hosts_dir.to_string_lossy().into_owned();
    args.push(&hosts);
    if loopback {
        args.push("--plain-http");
    }
    args.push(image_ref);
    let started = Instant::now();
    let out = run_unchecked(&mut ctr_command(socket, &args), PULL_TIMEOUT)?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "ctr image pull {image_ref} failed ({}) after {took:?}\n--- stdout (tail) ---\n{}\n--- stderr ---\n{}",
            out.status,
            last_lines(&String::from_utf8_lossy(&out.stdout), 10),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes `HOSTS_DIR/<registry>/hosts.toml` sending pulls and resolves for `registry`
/// to `mirror_url` first, then to the registry itself: `http://<registry>` for
/// loopback registries, `https://registry-1.docker.io` for `docker.io`, else
/// `https://<registry>`.
pub fn write_hosts_toml(hosts_dir: &Path, registry: &str, mirror_url: &str) -> anyhow::Result<PathBuf> {
    let server = if registry.starts_with("127.") || registry.starts_with("localhost") {
        format!("http://{registry}")
    } else if registry == "docker.io" {
        "https://registry-1.docker.io".to_string()
    } else {
        format!("https://{registry}")
    };
    let dir = hosts_dir.join(registry);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("hosts.toml");
    std::fs::write(
        &path,
        format!(
            "server = \"{server}\"\n\n\
             [host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror = mirror_url.trim_end_matches('/')
        ),
    )?;
    Ok(path)
}

/// Writes `HOSTS_DIR/<registry>/hosts.toml` with no mirror: pulls go straight to the
/// registry (plain http for loopback registries).
pub fn write_direct_hosts_toml(hosts_dir: &Path, registry: &str) -> anyhow::Result<PathBuf> {
    let scheme = if registry.starts_with("127.") || registry.starts_with("localhost") { "http" } else { "https" };
    let dir = hosts_dir.join(registry);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("hosts.toml");
    std::fs::write(&path, format!("server = \"{scheme}://{registry}\"\n"))?;
    Ok(path)
}
