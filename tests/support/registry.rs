//! A real registry: Debian's `docker-registry` (CNCF distribution 2.8) on
//! 127.0.0.1 with filesystem storage in a temp dir; optionally with htpasswd auth and
//! https from a CA made for the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use swarm_proto::Digest;

use super::process::{ChildGuard, free_port, require_tool, run, tcp_open, wait_until};

/// The registry binary Debian installs.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running `docker-registry`, killed on drop.
pub struct Registry {
    addr: SocketAddr,
    dir: PathBuf,
    credentials: Option<(String, String)>,
    child: ChildGuard,
}

/// One line of the registry's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLine {
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    pub status: u16,
}

impl Registry {
    /// Starts a registry with its storage, config and logs under `dir`. The access log
    /// (Apache combined format, one line per completed request) is the process's
    /// stdout, `<dir>/docker-registry.out`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_inner(dir, None, None)
    }

    /// Like [`Registry::start`], but every request needs HTTP basic credentials
    /// (`htpasswd` auth; the registry answers `401` with `WWW-Authenticate: Basic`).
    /// The bcrypt hash is made with python3's `crypt` module.
    pub fn start_with_basic_auth(dir: &Path, username: &str, password: &str) -> anyhow::Result<Self> {
        Self::start_with_basic_auth_and(dir, username, password, None)
    }

    fn start_with_basic_auth_and(
        dir: &Path,
        username: &str,
        password: &str,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> anyhow::Result<Self> {
        require_tool("python3", "python3");
        std::fs::create_dir_all(dir)?;
        let script =
            "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))";
        let mut cmd = Command::new("python3");
        cmd.args(["-W", "ignore", "-c", script, password]);
        let out = run(cmd, Duration::from_secs(30))?;
        let hash = String::from_utf8(out.stdout)?.trim().to_string();
        if !hash.starts_with("$2") {
            bail!("python3 crypt did not produce a bcrypt hash: {hash:?}");
        }
        let htpasswd = dir.join("htpasswd");
        std::fs::write(&htpasswd, format!("{username}:{hash}\n"))?;
        let mut registry = Self::start_inner(dir, Some(htpasswd), tls)?;
        registry.credentials = Some((username.to_string(), password.to_string()));
        Ok(registry)
    }

    /// Like [`Registry::start_with_basic_auth`], but serving https only, with a
    /// certificate for `127.0.0.1` signed by a CA made for the test (with `openssl`).
    /// Returns the registry and the CA's PEM file, which no system trust store holds.
    pub fn start_with_tls_and_basic_auth(
        dir: &Path,
        username: &str,
        password: &str,
    ) -> anyhow::Result<(Self, PathBuf)> {
        require_tool("openssl", "openssl");
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        let openssl = |args: &[&str]| {
            let mut cmd = Command::new("openssl");
            cmd.args(args).current_dir(&tls);
            run(cmd, Duration::from_secs(30))
        };
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let ca = format!(
            "req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign -subj /CN=swarm-test-ca"
        );
        openssl(&ca.split(' ').collect::<Vec<_>>())?;
        let csr = format!("req {ec} -keyout server.key -out server.csr -subj /CN=127.0.0.1");
        openssl(&csr.split(' ').collect::<Vec<_>>())?;
        std::fs::write(
            tls.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ])?;
        let tls_files = Some((tls.join("server.pem"), tls.join("server.key")));
        let registry = Self::start_with_basic_auth_and(dir, username, password, tls_files)?;
        Ok((registry, tls.join("ca.pem")))
    }

    fn start_inner(dir: &Path, htpasswd: Option<PathBuf>, tls: Option<(PathBuf, PathBuf)>) -> anyhow::Result<Self> {
        require_tool(REGISTRY_BIN, "docker-registry");
        let mut last_error = None;
        // The port is picked before the registry binds it: retry if someone took it.
        for _ in 0..3 {
            match Self::try_start(dir, htpasswd.as_deref(), tls.as_ref()) {
                Ok(registry) => return Ok(registry),
                Err(e) => last_error = Some(e),
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => bail!("registry did not start"),
        }
    }

    fn try_start(dir: &Path, htpasswd: Option<&Path>, tls: Option<&(PathBuf, PathBuf)>) -> anyhow::Result<Self> {
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        std::fs::create_dir_all(dir.join("storage"))?;
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  formatter: text\n\
                 storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  secret: swarm-test-secret\n{tls}{auth}",
                storage = dir.join("storage").display(),
                tls = match tls {
                    Some((cert, key)) => {
                        format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display())
                    }
                    None => String::new(),
                },
                auth = match htpasswd {
                    Some(path) => format!("auth:\n  htpasswd:\n    realm: swarm-test\n    path: {}\n", path.display()),
                    None => String::new(),
                }
            ),
        )?;
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve").arg(&config);
        let mut child = ChildGuard::spawn("docker-registry", cmd, dir)?;
        wait_until(&format!("docker-registry on {addr}"), Duration::from_secs(15), &mut child, || tcp_open(addr))?;
        Ok(Self { addr, dir: dir.to_path_buf(), credentials: None, child })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`: the registry's name in image references and in `?ns=`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `(username, password)` the registry wants, if it was started with auth.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Every request in the access log so far.
    pub fn access_log(&self) -> Vec<AccessLine> {
        let text = std::fs::read_to_string(self.child.stdout_path()).unwrap_or_default();
        text.lines().filter_map(parse_access_line).collect()
    }

    /// How many `GET`s of the blob `digest` (`sha256:...`) the registry has answered,
    /// whatever their status and whichever repository they named. The log is read
    /// until it stops changing (up to 1 s), since a line is written just after its
    /// response completes.
    pub fn blob_get_count(&self, digest: &impl std::fmt::Display) -> usize {
        let suffix = format!("/blobs/{digest}");
        let count = || {
            self.access_log()
                .iter()
                .filter(|l| l.method == "GET" && l.target.split('?').next().unwrap_or_default().ends_with(&suffix))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut last = count();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = count();
            if now == last || Instant::now() >= deadline {
                return now;
            }
            last = now;
        }
    }

    /// Pushes the bytes `source` yields as one blob of repository `repo` through the
    /// registry's upload API: `POST` an upload, one streamed `PATCH` (curl reading its
    /// stdin, chunked) and the closing `PUT` with the digest, hashed on the way. The
    /// bytes are neither held in memory nor written to a file here, so a blob of any
    /// size costs only the registry's copy. Returns the digest and the length.
    pub fn push_blob(&self, repo: &str, mut source: impl std::io::Read) -> anyhow::Result<(Digest, u64)> {
        use sha2::Digest as _;
        use std::io::Write;
        let curl = require_tool("curl", "curl");
        let base = format!("http://{}", self.addr);
        let curl_cmd = |method: &str, url: &str| {
            let mut cmd = Command::new(&curl);
            cmd.args(["-sS", "--fail", "-X", method, "-D", "-", "-o", "/dev/null"]);
            if let Some((u, p)) = self.credentials() {
                cmd.args(["-u", &format!("{u}:{p}")]);
            }
            cmd.arg(url);
            cmd
        };
        // The upload's URL from a response's `Location` header (relative or absolute).
        let location = |headers: &[u8]| -> anyhow::Result<String> {
            let text = String::from_utf8_lossy(headers);
            let value = text
                .lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("location")).map(|(_, v)| v))
                .map(str::trim)
                .with_context(|| format!("no Location header in:\n{text}"))?;
            Ok(if value.starts_with('/') { format!("{base}{value}") } else { value.to_string() })
        };
        let started = run(curl_cmd("POST", &format!("{base}/v2/{repo}/blobs/uploads/")), Duration::from_secs(30))?;
        let upload = location(&started.stdout)?;

        let mut patch = curl_cmd("PATCH", &upload);
        patch.args(["-H", "Content-Type: application/octet-stream", "-T", "-"]);
        patch.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = patch.spawn().context("starting curl")?;
        let mut stdin = child.stdin.take().context("curl's stdin")?;
        let (digest, len) = copy_hashed(&mut source, &mut stdin).context("streaming the blob to curl")?;
        drop(stdin);
        let patched = child.wait_with_output().context("waiting for curl")?;
        if !patched.status.success() {
            bail!("PATCH of {len} bytes to {upload} failed: {}", String::from_utf8_lossy(&patched.stderr));
        }
        let upload = location(&patched.stdout)?;
        let sep = if upload.contains('?') { '&' } else { '?' };
        let mut put = curl_cmd("PUT", &format!("{upload}{sep}digest={digest}"));
        put.args(["--data-binary", ""]);
        run(put, Duration::from_secs(300))?;
        Ok((digest, len))
    }

    /// The registry's log tail, for assertion messages.
    pub fn logs_tail(&self) -> String {
        self.child.logs_tail()
    }
}

/// Parses `127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 123 "" "agent"`.
fn parse_access_line(line: &str) -> Option<AccessLine> {
    let start = line.find('"')? + 1;
    let end = start + line[start..].find('"')?;
    let mut request = line[start..end].split(' ');
    let method = request.next()?.to_string();
    let target = request.next()?.to_string();
    let status = line[end + 1..].split_whitespace().next()?.parse().ok()?;
    Some(AccessLine { method, target, status })
}

/// Copies `source` to `sink` in 1 MiB steps, hashing as it goes (a blob of any size
/// never held whole): the bytes' sha256 digest and their length.
pub fn copy_hashed(source: &mut impl std::io::Read, sink: &mut impl std::io::Write) -> std::io::Result<(Digest, u64)> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = source.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        sink.write_all(&buf[..n])?;
        len += n as u64;
    }
    Ok((Digest(hasher.finalize().into()), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_log_lines() {
        let line = r#"127.0.0.1 - - [24/Nov/2026:06:03:17 +0000] "GET /v2/test/img/blobs/sha256:ab?ns=x HTTP/1.1" 200 157 "" "skopeo/1.9.3""#;
        assert_eq!(
            parse_access_line(line),
            Some(AccessLine { method: "GET".into(), target: "/v2/test/img/blobs/sha256:ab?ns=x".into(), status: 200 })
        );
        assert_eq!(parse_access_line("time=... level=info msg=x"), None);
    }
}
