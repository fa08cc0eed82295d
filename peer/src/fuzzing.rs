//! Fuzz target bodies for the agent's parsers of untrusted text: the mirror's request
//! paths, `?ns=` and `Range` headers, repository names, tags and registry hosts, the
//! upstream's `WWW-Authenticate` challenges and k3s's `registries.yaml`.
//!
//! Each function takes arbitrary bytes, calls the parser the daemon itself uses and
//! panics when a property that must hold for every input does not: a parsed route
//! prints back as the path it was read from and its name matches the OCI name grammar
//! (checked by an independent reading of the grammar below), a resolved range lies
//! inside the blob, a parsed challenge survives being written out and read again.
//!
//! The same functions are called by the cargo-fuzz targets in `fuzz/fuzz_targets/`
//! and by the replay test `tests/fuzz_corpus.rs`, which runs every committed corpus
//! file through them. Not part of the agent's API.

use std::net::SocketAddr;

use swarm_proto::Digest;
use swarm_proto::fuzzing::Target;

use crate::mirror::{RangeSpec, Reference, Route, parse_ns, parse_range, parse_route, resolve_range};
use crate::upstream::names::{self, MAX_REPOSITORY_LEN};
use crate::upstream::{Challenge, k3s, parse_challenge};

/// The distribution spec's repository grammar,
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, read
/// as runs: every `/`-separated component is non-empty, starts and ends with a
/// lowercase letter or digit, and each run of other characters in it is `.`, `_`,
/// `__` or dashes. Deliberately written differently from
/// [`names::is_valid_repository`] so that the fuzzer compares two readings.
pub fn oci_name_grammar(name: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    name.len() <= MAX_REPOSITORY_LEN
        && name.split('/').all(|component| {
            let b = component.as_bytes();
            b.first().is_some_and(alnum)
                && b.last().is_some_and(alnum)
                && b.chunk_by(|x, y| alnum(x) == alnum(y))
                    .filter(|run| !alnum(&run[0]))
                    .all(|sep| matches!(sep, b"." | b"_" | b"__") || sep.iter().all(|&c| c == b'-'))
        })
}

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Checks that a registry accepted as `host[:port]` ends up as exactly that host and
/// port in a URL: no user info, path or other port can be smuggled in.
fn check_registry(registry: &str) {
    assert!(!registry.contains(['/', '@', '?', '#', '%', '\\', ' ']), "{registry:?}");
    if let Ok(url) = reqwest::Url::parse(&format!("http://{registry}/v2/")) {
        assert_eq!(url.path(), "/v2/", "{registry:?}");
        assert!(url.username().is_empty() && url.password().is_none(), "{registry:?}");
        let port = registry.rsplit_once(':').filter(|(_, p)| !p.contains(']')).map(|(_, p)| p);
        let expected = port.map_or(Ok(80), str::parse::<u16>);
        assert_eq!(url.port_or_known_default().map(Ok), Some(expected), "{registry:?}");
    }
}

/// The mirror's request line: the input up to the first `?` is the path, the rest the
/// query. [`parse_route`], [`parse_ns`] and [`Route::registry_in_path`].
pub fn mirror_route(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let (path, query) = match input.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (input, None),
    };
    match parse_route(path) {
        Ok(Route::Base) => assert!(path == "/v2" || path == "/v2/", "{path:?}"),
        Ok(Route::Manifest { name, reference }) => {
            assert!(oci_name_grammar(&name), "{path:?}: name {name:?} breaks the grammar");
            let reference = match reference {
                Reference::Tag(tag) => {
                    assert!(names::is_valid_tag(&tag), "{path:?}");
                    tag
                }
                Reference::Digest(d) => d.to_string(),
            };
            assert_eq!(format!("/v2/{name}/manifests/{reference}"), path);
        }
        Ok(Route::Blob { name, digest }) => {
            assert!(oci_name_grammar(&name), "{path:?}: name {name:?} breaks the grammar");
            assert_eq!(format!("/v2/{name}/blobs/{digest}"), path);
        }
        Err(_) => {}
    }
    if let Ok(ns) = parse_ns(query) {
        assert!(names::is_valid_registry(&ns), "{query:?}");
        check_registry(&ns);
    }
    if let Some(rewritten) = Route::registry_in_path(path, query) {
        let (new_path, new_query) = match rewritten.split_once('?') {
            Some(parts) => parts,
            None => panic!("{input:?} rewritten without a query: {rewritten:?}"),
        };
        let rest = path.strip_prefix("/v2/").unwrap_or_default();
        let (registry, tail) = rest.split_once('/').unwrap_or_default();
        assert_eq!(new_path, format!("/v2/{tail}"), "{input:?}");
        match parse_ns(Some(new_query)) {
            Ok(ns) => assert_eq!(ns, registry, "{input:?} -> {rewritten:?}"),
            Err(e) => panic!("{input:?} rewritten to {rewritten:?} whose ns is refused: {}", e.message),
        }
        assert_eq!(Route::registry_in_path(new_path, Some(new_query)), None, "{rewritten:?} rewritten twice");
    }
}

/// Repository names, tags and registry hosts ([`names`]), and [`Digest`] parsing of
/// the same text.
pub fn names(data: &[u8]) {
    let Some(s) = text(data) else { return };
    assert_eq!(names::is_valid_repository(s), oci_name_grammar(s), "{s:?}");
    let tag_ok = names::is_valid_tag(s);
    if tag_ok {
        assert!(s.len() <= names::MAX_TAG_LEN && !s.contains(['/', ':', '%']), "{s:?}");
    }
    if names::is_valid_repository(s) && tag_ok {
        // What the upstream client builds from them is the URL it was given.
        let path = format!("/v2/{s}/manifests/{s}");
        match reqwest::Url::parse(&format!("https://registry.test{path}")) {
            Ok(url) => assert_eq!(url.path(), path),
            Err(e) => panic!("{path:?} is no URL path: {e}"),
        }
    }
    if names::is_valid_registry(s) {
        check_registry(s);
    }
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s);
        assert!(!names::is_valid_tag(s) && !names::is_valid_repository(s), "{s:?}");
    }
}

/// `Range` headers: the first 8 bytes (little endian) are the blob's length, the rest
/// the header's value. [`parse_range`] then [`resolve_range`].
pub fn range(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<8>() else { return };
    let len = u64::from_le_bytes(*len);
    let Some(value) = text(rest) else { return };
    let Some(spec) = parse_range(value) else { return };
    if let RangeSpec::FromTo(a, b) = spec {
        assert!(a <= b, "{value:?} -> {spec:?}");
    }
    match resolve_range(spec, len) {
        Some((start, end)) => {
            assert!(start <= end && end < len, "{value:?} in {len} bytes -> {start}..={end}");
            match spec {
                RangeSpec::FromTo(a, b) => assert_eq!((start, end), (a, b.min(len - 1))),
                RangeSpec::From(a) => assert_eq!((start, end), (a, len - 1)),
                RangeSpec::Suffix(n) => assert_eq!((start, end - start + 1), (len - n.min(len), n.min(len))),
            }
        }
        None => {
            let satisfiable = len > 0
                && match spec {
                    RangeSpec::FromTo(a, _) | RangeSpec::From(a) => a < len,
                    RangeSpec::Suffix(n) => n > 0,
                };
            assert!(!satisfiable, "{value:?} in {len} bytes refused");
        }
    }
}

/// Writes a parameter value as a quoted string.
fn quoted(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `WWW-Authenticate` headers from the upstream registry: [`parse_challenge`]. A
/// bearer challenge written out again (quoted, with escapes) reads back the same.
pub fn www_authenticate(data: &[u8]) {
    let Some(header) = text(data) else { return };
    let Some(challenge) = parse_challenge(header) else { return };
    if let Challenge::Bearer { realm, service, scope } = &challenge {
        let mut again = format!("Bearer realm={}", quoted(realm));
        for (key, value) in [("service", service), ("scope", scope)] {
            if let Some(value) = value {
                again.push_str(&format!(",{key}={}", quoted(value)));
            }
        }
        assert_eq!(parse_challenge(&again).as_ref(), Some(&challenge), "{header:?} written as {again:?}");
    }
}

/// k3s's `registries.yaml`: [`k3s::parse`], as for an agent whose mirror listens on
/// 127.0.0.1:5001. Every upstream endpoint it yields is an http(s) URL that does not
/// point back at the agent.
pub fn k3s_registries(data: &[u8]) {
    let Some(yaml) = text(data) else { return };
    let mirror = SocketAddr::from(([127, 0, 0, 1], 5001));
    let Ok(registries) = k3s::parse(yaml, mirror) else { return };
    for (registry, config) in &registries {
        let Some(endpoint) = &config.endpoint else { continue };
        match reqwest::Url::parse(endpoint) {
            Ok(url) => {
                assert!(matches!(url.scheme(), "http" | "https"), "{registry}: {endpoint}");
                assert!(url.host_str().is_some(), "{registry}: {endpoint}");
                assert!(!endpoint.ends_with('/'), "{registry}: {endpoint}");
            }
            Err(e) => panic!("{registry}: endpoint {endpoint:?} is no URL: {e}"),
        }
    }
}

/// Every target of this crate.
pub const TARGETS: &[Target] = &[
    ("mirror_route", mirror_route),
    ("names", names),
    ("range", range),
    ("www_authenticate", www_authenticate),
    ("k3s_registries", k3s_registries),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_oracle_agrees_on_known_names() {
        for good in ["ubuntu", "library/ubuntu", "a.b_c__d---e/f0", "0"] {
            assert!(oci_name_grammar(good), "{good}");
        }
        for bad in ["", "a//b", "a/", "A", "a___b", "a_.b", "a.-b", "-a", "a-", "a/./b", "a%2Fb"] {
            assert!(!oci_name_grammar(bad), "{bad}");
        }
    }

    #[test]
    fn targets_accept_valid_and_garbage_input() {
        let d = Digest::of(b"x");
        mirror_route(format!("/v2/quay.io/a/b/blobs/{d}?x=1").as_bytes());
        mirror_route(b"/v2/a/manifests/latest?ns=docker.io");
        names(b"library/ubuntu");
        let mut r = 100u64.to_le_bytes().to_vec();
        r.extend_from_slice(b"bytes=-10");
        range(&r);
        www_authenticate(br#"Bearer realm="https://a/t\"",service=s,scope="repository:a:pull,push""#);
        k3s_registries(b"mirrors:\n  docker.io:\n    endpoint: [\"http://cache:5000/v2/\"]\n");
        for (_, target) in TARGETS {
            target(&[]);
            target(&[0xff; 64]);
        }
    }
}
