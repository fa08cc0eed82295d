//! Reading k3s's `/etc/rancher/k3s/registries.yaml`, where Kairos and k3s users
//! already keep their registry credentials and TLS settings.
//!
//! This module owns the translation of that file into per-registry
//! [`RegistryConfig`]s for the upstream client:
//!
//! ```yaml
//! mirrors:
//!   registry.example.com:
//!     endpoint: ["http://127.0.0.1:5001", "https://registry.example.com"]
//! configs:
//!   registry.example.com:
//!     auth: { username: u, password: p }    # or auth: <base64 u:p>, identity_token, token
//!     tls: { ca_file: /etc/ssl/ca.pem, cert_file: c.pem, key_file: k.pem, insecure_skip_verify: false }
//! ```
//!
//! - `configs.<host>.auth`: `username` and `password`; `auth` (base64 of
//!   `username:password`, as in docker's `config.json`); `identity_token` (an OAuth2
//!   refresh token); `token` (a registry token sent as a bearer token).
//! - `configs.<host>.tls`: `ca_file`, `cert_file` with `key_file`,
//!   `insecure_skip_verify`.
//! - `mirrors.<registry>.endpoint`: the endpoints that point at the agent itself (the
//!   address its mirror listens on, or a loopback/`localhost` address with the same
//!   port) are skipped: they are how containerd reaches the agent, never an upstream.
//!   The first remaining endpoint, if any, becomes the registry's upstream endpoint
//!   (a pull-through cache, or the registry over plain http); with none left the
//!   registry's default endpoint is used.
//! - As in k3s, `configs` is looked up by the host of the endpoint used, then by the
//!   registry name. The `*` wildcard mirror and `rewrite` rules are accepted but not
//!   applied to upstream requests.
//!
//! Unknown keys are refused, like in the agent's own config file, so a typo such as
//! `usename` is reported instead of silently sending no credentials.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{RegistryConfig, UpstreamError};

/// The parts of `registries.yaml` the agent reads.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistriesYaml {
    #[serde(default)]
    pub mirrors: BTreeMap<String, Mirror>,
    #[serde(default)]
    pub configs: BTreeMap<String, Config>,
}

/// `mirrors.<registry>`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    #[serde(default)]
    pub endpoint: Vec<String>,
    /// Repository rewrites (accepted, not applied upstream).
    #[serde(default)]
    pub rewrite: BTreeMap<String, String>,
}

/// `configs.<host>`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub auth: Option<Auth>,
    #[serde(default)]
    pub tls: Option<Tls>,
}

/// `configs.<host>.auth`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// base64 of `username:password`.
    #[serde(default)]
    pub auth: Option<String>,
    #[serde(default)]
    pub identity_token: Option<String>,
    /// A registry token, sent as `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
}

/// `configs.<host>.tls`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Reads `path` and returns a [`RegistryConfig`] per registry it configures.
/// `agent_mirror` is the address the agent's mirror listens on.
pub fn load(path: &Path, agent_mirror: SocketAddr) -> Result<BTreeMap<String, RegistryConfig>, UpstreamError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UpstreamError::Config { reason: format!("cannot read {}: {e}", path.display()) })?;
    parse(&text, agent_mirror)
        .map_err(|e| UpstreamError::Config { reason: format!("{}: {}", path.display(), config_reason(e)) })
}

fn config_reason(e: UpstreamError) -> String {
    match e {
        UpstreamError::Config { reason } => reason,
        other => other.to_string(),
    }
}

/// Parses the text of a `registries.yaml` (see [`load`]).
pub fn parse(text: &str, agent_mirror: SocketAddr) -> Result<BTreeMap<String, RegistryConfig>, UpstreamError> {
    let file: RegistriesYaml = if text.trim().is_empty() {
        RegistriesYaml::default()
    } else {
        serde_norway::from_str(text).map_err(|e| UpstreamError::Config { reason: format!("invalid YAML: {e}") })?
    };
    let mut out = BTreeMap::new();
    for (registry, mirror) in &file.mirrors {
        if registry == "*" {
            continue;
        }
        let mut endpoint = None;
        for raw in &mirror.endpoint {
            let url = normalize_endpoint(raw)
                .map_err(|reason| UpstreamError::Config { reason: format!("mirrors.{registry}.endpoint: {reason}") })?;
            if points_at(&url, agent_mirror) {
                continue;
            }
            endpoint = Some(url);
            break;
        }
        let Some(endpoint) = endpoint else { continue };
        let host = endpoint.host_str().map(|h| match endpoint.port() {
            Some(p) => format!("{h}:{p}"),
            None => h.to_string(),
        });
        let config = host.as_ref().and_then(|h| file.configs.get(h)).or_else(|| file.configs.get(registry));
        let mut rc = registry_config(registry, config)?;
        rc.endpoint = Some(endpoint.as_str().trim_end_matches('/').to_string());
        out.insert(registry.clone(), rc);
    }
    for (host, config) in &file.configs {
        if !out.contains_key(host) && host != "*" {
            out.insert(host.clone(), registry_config(host, Some(config))?);
        }
    }
    Ok(out)
}

fn registry_config(registry: &str, config: Option<&Config>) -> Result<RegistryConfig, UpstreamError> {
    let mut rc = RegistryConfig::default();
    let Some(config) = config else { return Ok(rc) };
    let err = |reason: String| UpstreamError::Config { reason: format!("configs.{registry}.auth: {reason}") };
    if let Some(auth) = &config.auth {
        rc.username = auth.username.clone().filter(|u| !u.is_empty());
        rc.password = auth.password.clone();
        if let Some(encoded) = auth.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = super::base64_decode(encoded.trim())
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| err("`auth` is not base64 of username:password".into()))?;
            let (user, pass) =
                decoded.split_once(':').ok_or_else(|| err("`auth` decodes to no username:password".into()))?;
            rc.username = Some(user.to_string());
            rc.password = Some(pass.to_string());
        }
        if rc.username.is_some() && rc.password.is_none() {
            return Err(err("username without password".into()));
        }
        if rc.password.is_some() && rc.username.is_none() {
            rc.password = None;
        }
        rc.identity_token = auth.identity_token.clone().filter(|t| !t.is_empty());
        rc.token = auth.token.clone().filter(|t| !t.is_empty());
    }
    if let Some(tls) = &config.tls {
        rc.ca_file = tls.ca_file.clone();
        rc.cert_file = tls.cert_file.clone();
        rc.key_file = tls.key_file.clone();
        rc.insecure_skip_verify = tls.insecure_skip_verify;
    }
    Ok(rc)
}

/// An endpoint as k3s reads it: `https://` when no scheme is given, a trailing `/v2`
/// dropped (the client adds it).
fn normalize_endpoint(raw: &str) -> Result<reqwest::Url, String> {
    let text = raw.trim();
    let with_scheme = if text.contains("://") { text.to_string() } else { format!("https://{text}") };
    let mut url = reqwest::Url::parse(&with_scheme).map_err(|e| format!("{raw:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{raw:?} is not an http(s) URL"));
    }
    let path = url.path().trim_end_matches('/');
    let path = path.strip_suffix("/v2").unwrap_or(path).to_string();
    url.set_path(&path);
    Ok(url)
}

/// Whether `url` reaches the agent's own mirror at `mirror`.
fn points_at(url: &reqwest::Url, mirror: SocketAddr) -> bool {
    let Some(port) = url.port_or_known_default() else { return false };
    if port != mirror.port() {
        return false;
    }
    let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    if host == "localhost" {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => ip == mirror.ip() || ip.is_loopback() || ip.is_unspecified() || mirror.ip().is_unspecified(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> SocketAddr {
        "127.0.0.1:5001".parse().expect("addr")
    }

    #[test]
    fn every_auth_and_tls_field_is_read() {
        let text = r#"
mirrors:
  docker.io:
    endpoint: ["http://127.0.0.1:5001", "https://cache.local:5443/v2"]
  registry.local:5000:
    endpoint:
      - http://localhost:5001
      - http://[::1]:5001
      - http://registry.local:5000
  quay.io:
    endpoint: ["http://127.0.0.1:5001"]
  "*":
    endpoint: ["http://127.0.0.1:5001"]
configs:
  cache.local:5443:
    auth: { identity_token: refresh-me }
    tls:
      ca_file: /etc/ssl/cache-ca.pem
      cert_file: /etc/ssl/client.pem
      key_file: /etc/ssl/client.key
  registry.local:5000:
    auth:
      auth: dXNlcjpwYTpzcw==
  quay.io:
    auth: { token: registry-token }
    tls: { insecure_skip_verify: true }
  ghcr.io:
    auth: { username: me, password: secret }
"#;
        let got = parse(text, agent()).expect("parse");
        let docker = &got["docker.io"];
        assert_eq!(docker.endpoint.as_deref(), Some("https://cache.local:5443"));
        assert_eq!(docker.identity_token.as_deref(), Some("refresh-me"));
        assert_eq!(docker.ca_file.as_deref(), Some(Path::new("/etc/ssl/cache-ca.pem")));
        assert_eq!(docker.cert_file.as_deref(), Some(Path::new("/etc/ssl/client.pem")));
        assert_eq!(docker.key_file.as_deref(), Some(Path::new("/etc/ssl/client.key")));
        let local = &got["registry.local:5000"];
        assert_eq!(local.endpoint.as_deref(), Some("http://registry.local:5000"), "the agent's own endpoints skipped");
        assert_eq!((local.username.as_deref(), local.password.as_deref()), (Some("user"), Some("pa:ss")));
        // Only the agent as a mirror: the registry's default endpoint, k3s's fallback.
        let quay = &got["quay.io"];
        assert_eq!(quay.endpoint, None);
        assert_eq!(quay.token.as_deref(), Some("registry-token"));
        assert!(quay.insecure_skip_verify);
        let ghcr = &got["ghcr.io"];
        assert_eq!((ghcr.username.as_deref(), ghcr.password.as_deref()), (Some("me"), Some("secret")));
        assert!(!got.contains_key("*"));
    }

    #[test]
    fn the_agent_on_any_address_is_recognised() {
        let any: SocketAddr = "0.0.0.0:5001".parse().expect("addr");
        let text = "mirrors:\n  docker.io:\n    endpoint: [\"http://10.0.0.7:5001\"]\n";
        assert!(parse(text, any).expect("parse").is_empty(), "a node address on the mirror port is the agent");
        let got = parse(text, agent()).expect("parse");
        assert_eq!(got["docker.io"].endpoint.as_deref(), Some("http://10.0.0.7:5001"));
    }

    #[test]
    fn mistakes_are_reported() {
        for (text, needle) in [
            ("configs:\n  r.io:\n    auth: { usename: u, password: p }\n", "usename"),
            ("configs:\n  r.io:\n    auth: { auth: '!!!' }\n", "base64"),
            ("configs:\n  r.io:\n    auth: { username: u }\n", "without password"),
            ("mirrors:\n  r.io:\n    endpoint: [\"ftp://x\"]\n", "http(s)"),
            ("mirrors: [", "YAML"),
        ] {
            let err = parse(text, agent()).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert!(parse("", agent()).expect("empty file").is_empty());
    }
}
