//! `swarm containerd-config`: point containerd (or k3s) at the node's swarm agent.
//!
//! containerd 1.5+ reads registry hosts from `hosts.toml` files under its
//! `config_path` (`/etc/containerd/certs.d` by convention; `ctr --hosts-dir`):
//!
//! ```toml
//! server = "https://registry-1.docker.io"
//!
//! [host."http://127.0.0.1:5001"]
//!   capabilities = ["pull", "resolve"]
//! ```
//!
//! The `[host]` entries are tried first, in order, and `server` last. A mirror
//! answering 404, 500, 502 or 503 makes containerd move on to the next host for that
//! request (`swarm_peer::mirror`, measured with containerd 1.6.20), so the agent sits
//! in front of the registry without ever being a single point of failure.
//!
//! What this command writes, per registry `R` (a `host[:port]` as it appears in image
//! references):
//!
//! - `DIR/R/hosts.toml` with `server` = `https://registry-1.docker.io` for `docker.io`,
//!   `http://R` for registries given with `--plain-http`, else `https://R`.
//! - With no `--registry`: `DIR/_default/hosts.toml`, the catch-all containerd uses for
//!   every registry without a directory of its own, with no `server` line (containerd
//!   then falls back to the registry's own default endpoint; a `server` there would
//!   send *every* registry to one host).
//!
//! How containerd 1.6 finds the directory for a registry (`hostPaths` in
//! `remotes/docker/config`): for `host:port` it tries `DIR/host_port_` first, then
//! `DIR/host:port`, then `DIR/_default`, and uses the first that *exists*, even when
//! it holds no `hosts.toml`. We write `host:port` (the spelling of the containerd
//! docs) and warn when a `host_port_` directory would shadow it, and when writing
//! `_default`, about registries whose own directory bypasses it.
//!
//! Files are replaced atomically (a temp file renamed over the old one: containerd
//! re-reads `hosts.toml` on every pull and must never see half a file), the previous
//! file is kept as `hosts.toml.bak-<unix time>`, and a file that already has the
//! wanted content is left alone.
//!
//! `--k3s` prints the equivalent `/etc/rancher/k3s/registries.yaml` instead: k3s
//! generates its own `certs.d` from that file at every start, so writing `hosts.toml`
//! files for k3s's containerd would be overwritten. `--k3s --write` merges the mirror
//! entries into the file at `--k3s-registries` (created if missing): the agent's
//! endpoint goes first in each named registry's `endpoint` list, and every other
//! mirror, endpoint, `rewrite` and `configs` entry is kept (YAML comments are not; the
//! previous file is kept as a backup, with its mode). Without `--k3s`, on a node
//! where that file's directory exists (k3s is installed), a warning says that k3s
//! ignores `/etc/containerd/certs.d`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use swarm_peer::upstream::names::is_valid_registry;

/// The catch-all host directory of containerd.
pub const DEFAULT_NAMESPACE: &str = "_default";
/// The agent's mirror as `swarm agent` serves it by default.
pub const DEFAULT_MIRROR_URL: &str = "http://127.0.0.1:5001";
/// containerd's conventional `config_path`.
pub const DEFAULT_CERTS_DIR: &str = "/etc/containerd/certs.d";
/// Where k3s reads its registry settings.
pub const DEFAULT_K3S_REGISTRIES: &str = "/etc/rancher/k3s/registries.yaml";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The agent's registry mirror as containerd should reach it. A bare ADDR:PORT
    /// means http://ADDR:PORT.
    #[arg(long, env = "SWARM_MIRROR", default_value = DEFAULT_MIRROR_URL, value_name = "URL")]
    mirror: String,
    /// A registry to pull through the mirror, as it appears in image references
    /// (docker.io, quay.io, ghcr.io, registry.k8s.io, 10.0.0.5:5000). Repeatable.
    /// Without it: `_default`, every registry that has no directory of its own.
    #[arg(long = "registry", env = "SWARM_REGISTRIES", value_name = "REGISTRY", value_delimiter = ',')]
    registries: Vec<String>,
    /// A registry (one of --registry) served over plain HTTP: its fallback `server`
    /// becomes http://REGISTRY. Repeatable.
    #[arg(long = "plain-http", env = "SWARM_PLAIN_HTTP", value_name = "REGISTRY", value_delimiter = ',')]
    plain_http: Vec<String>,
    /// containerd's hosts directory (`config_path`; `ctr --hosts-dir`).
    #[arg(long, env = "SWARM_CONTAINERD_HOSTS_DIR", default_value = DEFAULT_CERTS_DIR, value_name = "DIR")]
    dir: PathBuf,
    /// Print the equivalent /etc/rancher/k3s/registries.yaml to stdout (with --write:
    /// merge it into the file at --k3s-registries).
    #[arg(long, env = "SWARM_K3S")]
    k3s: bool,
    /// With --k3s: merge the mirror entries into the existing registries.yaml, keeping
    /// its other mirrors and configs (the previous file is kept as a backup).
    #[arg(long, env = "SWARM_WRITE", requires = "k3s")]
    write: bool,
    /// k3s's registries.yaml, written by --k3s --write; its directory existing is
    /// how a k3s node is recognised.
    #[arg(long, env = "SWARM_K3S_REGISTRIES", default_value = DEFAULT_K3S_REGISTRIES, value_name = "PATH")]
    k3s_registries: PathBuf,
    /// Print the files that would be written, write nothing.
    #[arg(long, env = "SWARM_DRY_RUN")]
    dry_run: bool,
}

pub fn run(args: Args) -> Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let stdout = io::stdout();
    let stderr = io::stderr();
    execute(&args, now, &mut stdout.lock(), &mut stderr.lock())
}

/// A registry host namespace: `_default` or a `host[:port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespace {
    Default,
    Registry(String),
}

impl Namespace {
    /// The directory name under the hosts directory.
    fn dir_name(&self) -> &str {
        match self {
            Namespace::Default => DEFAULT_NAMESPACE,
            Namespace::Registry(r) => r,
        }
    }

    /// The key in k3s's `registries.yaml`.
    fn k3s_key(&self) -> &str {
        match self {
            Namespace::Default => "*",
            Namespace::Registry(r) => r,
        }
    }
}

/// Checks a mirror URL and returns it as `scheme://host[:port]` (no trailing slash).
pub fn parse_mirror_url(input: &str) -> Result<String> {
    let s = input.trim();
    let (scheme, rest) = match s.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None if is_valid_registry(s) && has_port(s) => ("http", s),
        None => bail!(
            "invalid mirror URL {input:?}: expected http://HOST:PORT (the agent's --mirror address, by default \
             {DEFAULT_MIRROR_URL})"
        ),
    };
    if scheme != "http" && scheme != "https" {
        bail!("invalid mirror URL {input:?}: the scheme must be http or https, not {scheme:?}");
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if let Some(c) = authority.chars().find(|c| matches!(c, '/' | '?' | '#' | '@')) {
        bail!(
            "invalid mirror URL {input:?}: only scheme://HOST[:PORT] is allowed (found {c:?}); containerd adds /v2 \
             itself and the agent serves the registry API at the root"
        );
    }
    if !is_valid_registry(authority) {
        bail!(
            "invalid mirror URL {input:?}: {authority:?} is not a valid HOST[:PORT] (a DNS name, an IPv4 address or a \
             [bracketed] IPv6 address, and a port in 1..=65535)"
        );
    }
    Ok(format!("{scheme}://{authority}"))
}

/// Whether `host[:port]` (already valid) has a port.
fn has_port(hostport: &str) -> bool {
    match hostport.strip_prefix('[') {
        Some(rest) => rest.split_once(']').is_some_and(|(_, after)| after.starts_with(':')),
        None => hostport.contains(':'),
    }
}

/// Checks a registry name as given to `--registry` / `--plain-http`.
pub fn parse_registry(input: &str) -> Result<Namespace> {
    let r = input.trim();
    if r == DEFAULT_NAMESPACE || r == "*" {
        return Ok(Namespace::Default);
    }
    if r.contains("://") || r.contains('/') {
        bail!(
            "invalid registry {input:?}: give the registry as it appears in image references, HOST[:PORT] without \
             scheme or path (e.g. docker.io, ghcr.io, 10.0.0.5:5000)"
        );
    }
    if matches!(r, "index.docker.io" | "registry-1.docker.io") {
        bail!(
            "invalid registry {input:?}: containerd names Docker Hub `docker.io` (images written index.docker.io/... \
             are normalised to docker.io); use --registry docker.io"
        );
    }
    if !is_valid_registry(r) {
        bail!(
            "invalid registry {input:?}: expected HOST[:PORT], a DNS name, an IPv4 address or a [bracketed] IPv6 \
             address, and a port in 1..=65535"
        );
    }
    Ok(Namespace::Registry(r.to_string()))
}

/// The `server` containerd falls back to for `registry`.
pub fn upstream_server(registry: &str, plain_http: bool) -> String {
    if registry == "docker.io" {
        "https://registry-1.docker.io".to_string()
    } else if plain_http {
        format!("http://{registry}")
    } else {
        format!("https://{registry}")
    }
}

/// The `hosts.toml` sending `ns` to `mirror` first.
pub fn hosts_toml(ns: &Namespace, mirror: &str, plain_http: bool) -> String {
    let mut out = String::from("# Written by `swarm containerd-config`: pull through the swarm agent first.\n");
    match ns {
        Namespace::Registry(r) => {
            out.push_str("# When the agent cannot serve a request (it answers 503, or is not running)\n");
            out.push_str("# containerd moves on to `server`, the registry itself.\n");
            out.push_str(&format!("server = \"{}\"\n", upstream_server(r, plain_http)));
        }
        Namespace::Default => {
            out.push_str("# No `server`: after the agent, containerd uses each registry's own default\n");
            out.push_str("# endpoint (https://registry-1.docker.io for docker.io, https://REGISTRY else).\n");
        }
    }
    out.push_str(&format!("\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"));
    out
}

/// The k3s `registries.yaml` equivalent to the `hosts.toml` files.
pub fn registries_yaml(namespaces: &[Namespace], mirror: &str, plain_http: &[String]) -> String {
    let mut out = String::from(
        "# /etc/rancher/k3s/registries.yaml, written by `swarm containerd-config --k3s`.\n\
         # k3s tries each endpoint in order and the registry's default endpoint last.\n\
         mirrors:\n",
    );
    for ns in namespaces {
        out.push_str(&format!("  \"{}\":\n    endpoint:\n      - \"{mirror}\"\n", ns.k3s_key()));
        if let Namespace::Registry(r) = ns
            && plain_http.contains(r)
        {
            // k3s's implicit default endpoint is https://R; a plain-http registry needs
            // its own endpoint listed.
            out.push_str(&format!("      - \"http://{r}\"\n"));
        }
    }
    out
}

/// Merges the mirror entries for `namespaces` into the `registries.yaml` text `existing`
/// (empty for a new file): each named registry's `endpoint` list starts with the
/// agent (and `http://R` for a plain-http registry), followed by the endpoints it
/// already had; everything else in the file is kept as it was.
pub fn merge_registries_yaml(
    existing: &str,
    namespaces: &[Namespace],
    mirror: &str,
    plain_http: &[String],
) -> Result<String> {
    use serde_norway::{Mapping, Value};
    let mut root = if existing.trim().is_empty() {
        Value::Mapping(Mapping::new())
    } else {
        serde_norway::from_str::<Value>(existing).context("the existing file is not valid YAML")?
    };
    let Value::Mapping(top) = &mut root else {
        bail!("the existing file is not a YAML mapping (expected `mirrors:` and `configs:` keys)");
    };
    let mirrors = top.entry(Value::from("mirrors")).or_insert_with(|| Value::Mapping(Mapping::new()));
    if mirrors.is_null() {
        *mirrors = Value::Mapping(Mapping::new());
    }
    let Value::Mapping(mirrors) = mirrors else {
        bail!("`mirrors` in the existing file is not a mapping");
    };
    for ns in namespaces {
        let key = ns.k3s_key();
        let entry = mirrors.entry(Value::from(key)).or_insert_with(|| Value::Mapping(Mapping::new()));
        if entry.is_null() {
            *entry = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(entry) = entry else {
            bail!("`mirrors.{key}` in the existing file is not a mapping");
        };
        let mut ours = vec![mirror.to_string()];
        if let Namespace::Registry(r) = ns
            && plain_http.contains(r)
        {
            ours.push(format!("http://{r}"));
        }
        let old: Vec<String> = match entry.get("endpoint") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Sequence(seq)) => seq
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .with_context(|| format!("`mirrors.{key}.endpoint` holds something that is not a URL string"))?,
            Some(_) => bail!("`mirrors.{key}.endpoint` in the existing file is not a list"),
        };
        let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
        let mut endpoints = ours.clone();
        endpoints.extend(old.into_iter().filter(|e| !ours.iter().any(|o| same(o, e))));
        entry.insert(Value::from("endpoint"), Value::Sequence(endpoints.into_iter().map(Value::from).collect()));
    }
    serde_norway::to_string(&root).context("writing YAML")
}

/// `--k3s --write`: merge into the registries.yaml at `--k3s-registries`.
fn write_k3s(args: &Args, plan: &Plan, now: u64, out: &mut dyn Write, err: &mut dyn Write) -> Result<()> {
    let path = &args.k3s_registries;
    let existing = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let content = merge_registries_yaml(&existing, &plan.namespaces, &plan.mirror, &plan.plain_http)
        .with_context(|| format!("merging into {}", path.display()))?;
    let outcome = plan_outcome(path, &content, now)?;
    let verb = match (&outcome, args.dry_run) {
        (Outcome::Unchanged, _) => "unchanged, already has these mirrors".to_string(),
        (Outcome::Created, false) => "written".to_string(),
        (Outcome::Created, true) => "would be written (dry run)".to_string(),
        (Outcome::Replaced { backup }, false) => format!("updated, previous file kept as {}", backup.display()),
        (Outcome::Replaced { backup }, true) => {
            format!("would be updated, previous file kept as {} (dry run)", backup.display())
        }
    };
    if !args.dry_run {
        // registries.yaml may hold registry passwords: a new file is 0600.
        apply_with_mode(path, &content, &outcome, 0o600)?;
    }
    writeln!(
        out,
        "# {}: {verb}
{content}",
        path.display()
    )?;
    if existing.contains('#') {
        writeln!(err, "note: comments in the previous file are not carried over (see the backup)")?;
    }
    writeln!(
        err,
        "Restart k3s to apply it (`systemctl restart k3s` on servers, `k3s-agent` on agents). \
         Do not enable k3s's embedded registry (Spegel) as well: its P2P port is also 5001."
    )?;
    Ok(())
}

/// What happened (or would happen) to one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Unchanged,
    /// Replaced; the previous content was kept at this path.
    Replaced {
        backup: PathBuf,
    },
}

/// The outcome writing `content` to `path` would have, and the backup name to use.
fn plan_outcome(path: &Path, content: &str, now: u64) -> Result<Outcome> {
    match fs::read(path) {
        Ok(old) if old == content.as_bytes() => Ok(Outcome::Unchanged),
        Ok(_) => Ok(Outcome::Replaced { backup: backup_path(path, now) }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Outcome::Created),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `hosts.toml.bak-<now>`, or `hosts.toml.bak-<now>-<n>` if that is taken.
fn backup_path(path: &Path, now: u64) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let first = path.with_file_name(format!("{name}.bak-{now}"));
    if !first.exists() {
        return first;
    }
    (1u32..).map(|n| path.with_file_name(format!("{name}.bak-{now}-{n}"))).find(|p| !p.exists()).unwrap_or(first)
}

/// Writes `content` to `path` as `plan_outcome` said: the old file copied to the backup,
/// then a temp file in the same directory renamed over `path`.
fn apply(path: &Path, content: &str, outcome: &Outcome) -> Result<()> {
    if *outcome == Outcome::Unchanged {
        return Ok(());
    }
    apply_with_mode(path, content, outcome, 0o644)
}

/// [`apply`] for a file created with `new_mode`; a replaced file keeps its mode.
fn apply_with_mode(path: &Path, content: &str, outcome: &Outcome, new_mode: u32) -> Result<()> {
    if *outcome == Outcome::Unchanged {
        return Ok(());
    }
    let dir = path.parent().context("the path has no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut mode = new_mode;
    if let Outcome::Replaced { backup } = outcome {
        fs::copy(path, backup)
            .with_context(|| format!("cannot keep a backup of {} at {}", path.display(), backup.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            mode = fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(new_mode);
        }
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.swarm-{}", std::process::id()));
    let written = write_synced(&tmp, content, mode).and_then(|()| {
        fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn write_synced(path: &Path, content: &str, mode: u32) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(content.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    }
    f.sync_all().with_context(|| format!("cannot sync {}", path.display()))
}

/// Warnings about directories that would keep containerd from reading ours.
fn shadow_warnings(dir: &Path, namespaces: &[Namespace]) -> Vec<String> {
    let mut warnings = Vec::new();
    for ns in namespaces {
        match ns {
            Namespace::Registry(r) => {
                // containerd 1.6 looks for `host_port_` before `host:port`.
                if let Some((host, port)) = r.rsplit_once(':')
                    && !host.is_empty()
                {
                    let shadow = dir.join(format!("{host}_{port}_"));
                    if shadow.exists() {
                        warnings.push(format!(
                            "{} exists: containerd reads it before {} and will ignore the file written here; remove it \
                             or merge the two",
                            shadow.display(),
                            dir.join(r).display()
                        ));
                    }
                }
            }
            Namespace::Default => {
                let mut own: Vec<String> = fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name != DEFAULT_NAMESPACE && !namespaces.iter().any(|n| n.dir_name() == name))
                    .collect();
                own.sort();
                if !own.is_empty() {
                    warnings.push(format!(
                        "these registries have their own directory under {} and do not use _default, so they bypass \
                         the mirror: {} (add them with --registry to route them through it)",
                        dir.display(),
                        own.join(", ")
                    ));
                }
            }
        }
    }
    warnings
}

/// Checked arguments.
struct Plan {
    mirror: String,
    namespaces: Vec<Namespace>,
    plain_http: Vec<String>,
}

fn check(args: &Args) -> Result<Plan> {
    let mirror = parse_mirror_url(&args.mirror).context("--mirror")?;
    let mut namespaces = Vec::new();
    for r in &args.registries {
        let ns = parse_registry(r).context("--registry")?;
        if !namespaces.contains(&ns) {
            namespaces.push(ns);
        }
    }
    if namespaces.is_empty() {
        namespaces.push(Namespace::Default);
    }
    let mut plain_http = Vec::new();
    for r in &args.plain_http {
        let Namespace::Registry(name) = parse_registry(r).context("--plain-http")? else {
            bail!("--plain-http takes a registry HOST[:PORT], not {r:?}");
        };
        if !namespaces.contains(&Namespace::Registry(name.clone())) {
            bail!(
                "--plain-http {name}: only registries given with --registry get a `server` line; add --registry {name} \
                 (with _default, containerd picks the scheme itself: https, or http under `ctr --plain-http`)"
            );
        }
        if name == "docker.io" {
            bail!("--plain-http docker.io: Docker Hub is only served over https");
        }
        plain_http.push(name);
    }
    Ok(Plan { mirror, namespaces, plain_http })
}

/// The command, with the clock and the output streams passed in (for tests).
fn execute(args: &Args, now: u64, out: &mut dyn Write, err: &mut dyn Write) -> Result<()> {
    let plan = check(args)?;
    if args.k3s && args.write {
        return write_k3s(args, &plan, now, out, err);
    }
    if args.k3s {
        out.write_all(registries_yaml(&plan.namespaces, &plan.mirror, &plan.plain_http).as_bytes())?;
        writeln!(
            err,
            "Put this in /etc/rancher/k3s/registries.yaml on every node (servers too) and restart k3s \
             (`systemctl restart k3s` or `k3s-agent`).\n\
             Do not enable k3s's embedded registry (Spegel) as well: its P2P port is also 5001."
        )?;
        if plan.namespaces.contains(&Namespace::Default) {
            writeln!(
                err,
                "Note: a few k3s releases did not fall back to the default endpoint with a \"*\" entry (k3s issues \
                 #9728, #11857); use a fixed release, or list registries with --registry."
            )?;
        }
        return Ok(());
    }

    if let Some(k3s_dir) = args.k3s_registries.parent().filter(|d| d.is_dir()) {
        writeln!(
            err,
            "warning: this looks like a k3s node ({} exists). k3s's containerd ignores {} and reads registry \
             mirrors only from {}: run `swarm containerd-config --k3s --write` instead.",
            k3s_dir.display(),
            args.dir.display(),
            args.k3s_registries.display()
        )?;
    }
    let dir_text = args.dir.to_string_lossy();
    if dir_text.contains("rancher/k3s") || dir_text.contains("rancher/rke2") {
        writeln!(
            err,
            "warning: k3s/rke2 regenerate {} from registries.yaml at every start; use --k3s instead",
            args.dir.display()
        )?;
    }
    for w in shadow_warnings(&args.dir, &plan.namespaces) {
        writeln!(err, "warning: {w}")?;
    }
    for ns in &plan.namespaces {
        let plain = matches!(ns, Namespace::Registry(r) if plan.plain_http.contains(r));
        let content = hosts_toml(ns, &plan.mirror, plain);
        let path = args.dir.join(ns.dir_name()).join("hosts.toml");
        let outcome = plan_outcome(&path, &content, now)?;
        let verb = match (&outcome, args.dry_run) {
            (Outcome::Unchanged, _) => "unchanged, already has this content".to_string(),
            (Outcome::Created, false) => "written".to_string(),
            (Outcome::Created, true) => "would be written (dry run)".to_string(),
            (Outcome::Replaced { backup }, false) => format!("replaced, previous file kept as {}", backup.display()),
            (Outcome::Replaced { backup }, true) => {
                format!("would be replaced, previous file kept as {} (dry run)", backup.display())
            }
        };
        if !args.dry_run {
            apply(&path, &content, &outcome)?;
        }
        writeln!(out, "# {}: {verb}\n{content}", path.display())?;
    }
    writeln!(
        err,
        "containerd uses these files only with, in /etc/containerd/config.toml (containerd 1.x, version = 2):\n  \
         [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = \"{dir}\"\n\
         then `systemctl restart containerd` once (later changes to hosts.toml are read at the next pull).\n\
         For ctr: ctr image pull --hosts-dir {dir} IMAGE",
        dir = args.dir.display()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIRROR: &str = "http://127.0.0.1:5001";

    fn args(dir: &Path, extra: &[&str]) -> Args {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            a: Args,
        }
        let dir = dir.to_str().expect("utf8 temp dir");
        let mut v = vec!["containerd-config", "--dir", dir];
        v.extend_from_slice(extra);
        W::try_parse_from(v).expect("arguments parse").a
    }

    /// Runs the command, returning (stdout, stderr).
    fn exec(a: &Args, now: u64) -> Result<(String, String)> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        execute(a, now, &mut out, &mut err)?;
        Ok((String::from_utf8(out).expect("utf8"), String::from_utf8(err).expect("utf8")))
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn docker_io_goes_to_registry_1_after_the_mirror() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (out, err) = exec(&args(tmp.path(), &["--mirror", MIRROR, "--registry", "docker.io"]), 1).expect("run");
        let text = read(&tmp.path().join("docker.io/hosts.toml"));
        assert!(text.contains("server = \"https://registry-1.docker.io\"\n"), "{text}");
        assert!(text.ends_with("\n[host.\"http://127.0.0.1:5001\"]\n  capabilities = [\"pull\", \"resolve\"]\n"));
        // The mirror comes after `server` in the file but containerd tries [host] first;
        // `server` is a root key, so it must precede the first table.
        assert!(text.find("server =") < text.find("[host."), "{text}");
        assert!(out.contains("docker.io/hosts.toml: written"), "{out}");
        assert!(out.contains(&text), "stdout shows the content: {out}");
        assert!(err.contains("config_path = "), "{err}");
        assert!(err.contains("[plugins.\"io.containerd.grpc.v1.cri\".registry]"), "{err}");
        assert!(err.contains("--hosts-dir"), "{err}");
    }

    #[test]
    fn other_registries_and_ports() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = args(
            tmp.path(),
            &[
                "--mirror",
                "http://127.0.0.1:5001/",
                "--registry",
                "quay.io,ghcr.io",
                "--registry",
                "registry.k8s.io",
                "--registry",
                "127.0.0.1:5000",
                "--registry",
                "quay.io",
                "--plain-http",
                "127.0.0.1:5000",
            ],
        );
        exec(&a, 1).expect("run");
        let quay = read(&tmp.path().join("quay.io/hosts.toml"));
        assert!(quay.contains("server = \"https://quay.io\"\n"), "{quay}");
        assert!(quay.contains("[host.\"http://127.0.0.1:5001\"]\n"), "trailing slash dropped: {quay}");
        assert!(read(&tmp.path().join("ghcr.io/hosts.toml")).contains("server = \"https://ghcr.io\"\n"));
        assert!(read(&tmp.path().join("registry.k8s.io/hosts.toml")).contains("server = \"https://registry.k8s.io\""));
        // A port is kept as is in the directory name (containerd 1.6 tries
        // `127.0.0.1_5000_`, then `127.0.0.1:5000`).
        let local = read(&tmp.path().join("127.0.0.1:5000/hosts.toml"));
        assert!(local.contains("server = \"http://127.0.0.1:5000\"\n"), "{local}");
        let mut names: Vec<String> = fs::read_dir(tmp.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        names.sort();
        assert_eq!(names, ["127.0.0.1:5000", "ghcr.io", "quay.io", "registry.k8s.io"]);
    }

    #[test]
    fn default_namespace_has_no_server() {
        let tmp = tempfile::tempdir().expect("tempdir");
        exec(&args(tmp.path(), &["--mirror", "127.0.0.1:5001"]), 1).expect("run");
        let text = read(&tmp.path().join("_default/hosts.toml"));
        assert!(!text.lines().any(|l| l.starts_with("server")), "{text}");
        assert!(
            text.contains("[host.\"http://127.0.0.1:5001\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
            "{text}"
        );
        assert_eq!(fs::read_dir(tmp.path()).expect("ls").count(), 1);
    }

    #[test]
    fn a_changed_file_is_backed_up_and_an_identical_one_left_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("docker.io/hosts.toml");
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let old = "server = \"https://registry-1.docker.io\"\n[host.\"https://other-mirror\"]\n";
        fs::write(&path, old).expect("write");

        let a = args(tmp.path(), &["--registry", "docker.io"]);
        let (out, _) = exec(&a, 1700000000).expect("run");
        let backup = tmp.path().join("docker.io/hosts.toml.bak-1700000000");
        assert_eq!(read(&backup), old);
        assert!(out.contains("replaced, previous file kept as"), "{out}");
        let new = read(&path);
        assert!(new.contains(MIRROR), "{new}");

        // Again: identical content, nothing touched, no new backup.
        let before = fs::metadata(&path).expect("stat").modified().expect("mtime");
        let (out, _) = exec(&a, 1700000001).expect("run");
        assert!(out.contains("unchanged, already has this content"), "{out}");
        assert_eq!(fs::metadata(&path).expect("stat").modified().expect("mtime"), before);
        assert!(!tmp.path().join("docker.io/hosts.toml.bak-1700000001").exists());

        // A different mirror within the same second: the backup name gets a suffix.
        fs::write(&path, old).expect("write");
        exec(&a, 1700000000).expect("run");
        assert_eq!(read(&tmp.path().join("docker.io/hosts.toml.bak-1700000000-1")), old);
        // No temp file left behind.
        let leftovers: Vec<_> = fs::read_dir(tmp.path().join("docker.io"))
            .expect("ls")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".hosts.toml"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn dry_run_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (out, _) = exec(&args(tmp.path(), &["--registry", "ghcr.io", "--dry-run"]), 1).expect("run");
        assert!(out.contains("ghcr.io/hosts.toml: would be written (dry run)"), "{out}");
        assert!(out.contains("server = \"https://ghcr.io\""), "{out}");
        assert_eq!(fs::read_dir(tmp.path()).expect("ls").count(), 0);
    }

    #[test]
    fn k3s_prints_registries_yaml_and_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (out, err) = exec(&args(tmp.path(), &["--k3s"]), 1).expect("run");
        assert!(out.ends_with("mirrors:\n  \"*\":\n    endpoint:\n      - \"http://127.0.0.1:5001\"\n"), "{out}");
        assert!(err.contains("registries.yaml"), "{err}");
        assert_eq!(fs::read_dir(tmp.path()).expect("ls").count(), 0);

        let a = args(
            tmp.path(),
            &["--k3s", "--registry", "docker.io,10.0.0.5:5000", "--plain-http", "10.0.0.5:5000", "--mirror", MIRROR],
        );
        let (out, _) = exec(&a, 1).expect("run");
        assert!(
            out.ends_with(
                "mirrors:\n  \"docker.io\":\n    endpoint:\n      - \"http://127.0.0.1:5001\"\n  \
                 \"10.0.0.5:5000\":\n    endpoint:\n      - \"http://127.0.0.1:5001\"\n      - \"http://10.0.0.5:5000\"\n"
            ),
            "{out}"
        );
        assert_eq!(fs::read_dir(tmp.path()).expect("ls").count(), 0);
    }

    #[test]
    fn k3s_write_merges_and_keeps_other_entries() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("rancher/k3s/registries.yaml");
        fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        let before = "# mine\nmirrors:\n  quay.io:\n    endpoint: [\"https://q.cache\"]\n  docker.io:\n    endpoint:\n      - \"https://d.cache\"\n    rewrite:\n      \"^x/(.*)\": \"y/$1\"\nconfigs:\n  docker.io:\n    auth: {username: u, password: p}\n";
        fs::write(&file, before).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let k3s_file = file.to_str().expect("utf8");
        let a = args(
            tmp.path(),
            &[
                "--k3s",
                "--write",
                "--k3s-registries",
                k3s_file,
                "--registry",
                "docker.io,10.0.0.5:5000",
                "--plain-http",
                "10.0.0.5:5000",
            ],
        );
        let (out, err) = exec(&a, 7).expect("run");
        assert!(out.contains("updated"), "{out}");
        assert!(err.contains("comments"), "{err}");
        let after: serde_norway::Value = serde_norway::from_str(&read(&file)).expect("yaml");
        let endpoints = |r: &str| -> Vec<String> {
            after["mirrors"][r]["endpoint"]
                .as_sequence()
                .expect("list")
                .iter()
                .map(|v| v.as_str().expect("str").to_string())
                .collect()
        };
        assert_eq!(endpoints("docker.io"), ["http://127.0.0.1:5001", "https://d.cache"]);
        assert_eq!(endpoints("10.0.0.5:5000"), ["http://127.0.0.1:5001", "http://10.0.0.5:5000"]);
        assert_eq!(endpoints("quay.io"), ["https://q.cache"]);
        assert_eq!(after["mirrors"]["docker.io"]["rewrite"]["^x/(.*)"].as_str(), Some("y/$1"));
        assert_eq!(after["configs"]["docker.io"]["auth"]["username"].as_str(), Some("u"));
        assert_eq!(read(&tmp.path().join("rancher/k3s/registries.yaml.bak-7")), before);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&file).expect("stat").permissions().mode() & 0o777, 0o600);
        }
        // A second run changes nothing.
        let (out, _) = exec(&a, 8).expect("run");
        assert!(out.contains("unchanged"), "{out}");
        // --write needs --k3s.
        use clap::Parser;
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            a: Args,
        }
        assert!(W::try_parse_from(["containerd-config", "--write"]).is_err());
    }

    #[test]
    fn plain_hosts_toml_on_a_k3s_node_warns() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(tmp.path().join("rancher/k3s")).expect("mkdir");
        let k3s_file = tmp.path().join("rancher/k3s/registries.yaml");
        let hosts = tmp.path().join("certs.d");
        let a = args(&hosts, &["--k3s-registries", k3s_file.to_str().expect("utf8")]);
        let (_, err) = exec(&a, 1).expect("run");
        assert!(err.contains("k3s's containerd ignores") && err.contains("--k3s --write"), "{err}");
    }

    #[test]
    fn shadowing_directories_are_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(tmp.path().join("10.0.0.5_5000_")).expect("mkdir");
        fs::create_dir_all(tmp.path().join("quay.io")).expect("mkdir");
        let (_, err) = exec(&args(tmp.path(), &["--registry", "10.0.0.5:5000"]), 1).expect("run");
        assert!(err.contains("10.0.0.5_5000_ exists"), "{err}");
        let (_, err) = exec(&args(tmp.path(), &[]), 1).expect("run");
        assert!(err.contains("bypass the mirror: 10.0.0.5:5000, 10.0.0.5_5000_, quay.io"), "{err}");
    }

    #[test]
    fn invalid_inputs_are_refused() {
        for bad in [
            "ftp://127.0.0.1:5001",
            "127.0.0.1",
            "http://",
            "http://127.0.0.1:0",
            "http://127.0.0.1:65536",
            "http://127.0.0.1:5001/v2",
            "http://user@127.0.0.1:5001",
            "http://bad_host:5001",
            "http://[::1:5001",
            "",
        ] {
            let e = parse_mirror_url(bad).err().unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(format!("{e}").contains("invalid mirror URL"), "{bad:?}: {e}");
        }
        for (good, want) in [
            ("http://127.0.0.1:5001", "http://127.0.0.1:5001"),
            ("https://mirror.local", "https://mirror.local"),
            ("http://[::1]:5001/", "http://[::1]:5001"),
            ("127.0.0.1:5001", "http://127.0.0.1:5001"),
        ] {
            assert_eq!(parse_mirror_url(good).expect(good), want);
        }
        for bad in [
            "https://docker.io",
            "docker.io/library",
            "index.docker.io",
            "registry:0",
            "registry:99999",
            "-bad.example",
            "under_score.io",
            "",
        ] {
            assert!(parse_registry(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_registry("*").expect("*"), Namespace::Default);
        assert_eq!(parse_registry("[::1]:5000").expect("v6"), Namespace::Registry("[::1]:5000".into()));

        let tmp = tempfile::tempdir().expect("tempdir");
        let cases: [&[&str]; 4] = [
            &["--mirror", "tcp://x:1"],
            &["--registry", "https://quay.io"],
            &["--plain-http", "10.0.0.5:5000"],
            &["--registry", "docker.io", "--plain-http", "docker.io"],
        ];
        for extra in cases {
            let e = exec(&args(tmp.path(), extra), 1).err().unwrap_or_else(|| panic!("{extra:?} accepted"));
            assert!(!format!("{e:#}").is_empty());
        }
        assert_eq!(fs::read_dir(tmp.path()).expect("ls").count(), 0, "nothing written on refusal");
    }
}
