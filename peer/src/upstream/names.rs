//! Validation of the names that end up in registry URLs: repository names, tags and
//! registry hosts.
//!
//! Everything here is strict on purpose: these strings come from HTTP requests (the
//! mirror) and are pasted into upstream URLs and cache paths, so anything outside the
//! distribution-spec grammar is refused rather than escaped.

/// Longest repository name the distribution spec allows.
pub const MAX_REPOSITORY_LEN: usize = 255;
/// Longest tag the distribution spec allows.
pub const MAX_TAG_LEN: usize = 128;
/// Longest registry host (with port) accepted in `?ns=`.
pub const MAX_REGISTRY_LEN: usize = 253 + 6;

/// Whether `name` matches the distribution spec's repository grammar
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`
/// and is at most 255 characters long.
///
/// This refuses `..`, empty components, leading or trailing separators, upper case and
/// every escape (`%2F` and friends), because `%` is not in the grammar.
pub fn is_valid_repository(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_REPOSITORY_LEN && name.split('/').all(is_valid_path_component)
}

/// One `/`-separated component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    // The component must start with an alphanumeric run.
    if bytes.is_empty() || !alnum(bytes[0]) {
        return false;
    }
    while i < bytes.len() {
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == bytes.len() {
            return true;
        }
        // A separator: `.`, `_`, `__` or one or more `-`.
        let sep_start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        debug_assert!(i > sep_start);
        // A separator must be followed by another alphanumeric run.
        if i == bytes.len() || !alnum(bytes[i]) {
            return false;
        }
    }
    true
}

/// Whether `tag` matches `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    let Some((&first, rest)) = bytes.split_first() else {
        return false;
    };
    bytes.len() <= MAX_TAG_LEN
        && (first.is_ascii_alphanumeric() || first == b'_')
        && rest.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `registry` is a plausible `host[:port]`: a DNS name or IPv4 address, or a
/// bracketed IPv6 address, optionally followed by a port in 1..=65535.
pub fn is_valid_registry(registry: &str) -> bool {
    if registry.is_empty() || registry.len() > MAX_REGISTRY_LEN {
        return false;
    }
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return false,
            },
        }
    } else {
        match registry.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(port) = port {
        let digits_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
        if !digits_ok || !matches!(port.parse::<u32>(), Ok(1..=65535)) {
            return false;
        }
    }
    match host {
        None => true,
        Some(host) => is_valid_hostname(host),
    }
}

/// DNS labels `[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?` separated by dots (this also
/// covers dotted IPv4 addresses).
fn is_valid_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn repositories() {
        for good in ["ubuntu", "library/ubuntu", "a/b/c", "a.b_c__d---e/f0", "x1-2", "0", "quay.io_x/y"] {
            assert!(is_valid_repository(good), "{good:?} should be accepted");
        }
        let too_long = "a".repeat(256);
        for bad in [
            "",
            "..",
            "a/../b",
            "a//b",
            "/a",
            "a/",
            "A",
            "a%2Fb",
            "a%2fb",
            "a___b",
            "a_.b",
            "a.-b",
            "-a",
            "a-",
            "a.",
            ".a",
            "a b",
            "a/./b",
            "a\\b",
            too_long.as_str(),
        ] {
            assert!(!is_valid_repository(bad), "{bad:?} should be refused");
        }
        assert!(is_valid_repository(&"a".repeat(255)));
    }

    #[test]
    fn tags() {
        for good in ["latest", "v1.2.3", "_x", "A-b_c.d", "1"] {
            assert!(is_valid_tag(good), "{good:?} should be accepted");
        }
        let too_long = format!("a{}", "b".repeat(128));
        for bad in ["", ".x", "-x", "a/b", "a:b", "a%2F", "sha256:abc", too_long.as_str()] {
            assert!(!is_valid_tag(bad), "{bad:?} should be refused");
        }
        assert!(is_valid_tag(&"b".repeat(128)));
    }

    #[test]
    fn registries() {
        for good in
            ["docker.io", "127.0.0.1:5000", "registry-1.docker.io", "localhost", "[::1]:5000", "[::1]", "ghcr.io"]
        {
            assert!(is_valid_registry(good), "{good:?} should be accepted");
        }
        for bad in [
            "",
            "docker.io:",
            "docker.io:0",
            "docker.io:65536",
            "a..b",
            "-a.b",
            "a/b",
            "a@b",
            "a:b:c",
            "[::1",
            "[zz]:1",
            "[::1]x",
            "host:12ab",
            "http://docker.io",
        ] {
            assert!(!is_valid_registry(bad), "{bad:?} should be refused");
        }
    }

    proptest! {
        #[test]
        fn accepted_repositories_are_safe_path_fragments(s in "[a-z0-9./_%-]{0,40}") {
            if is_valid_repository(&s) {
                prop_assert!(!s.contains(".."));
                prop_assert!(!s.contains("//"));
                prop_assert!(!s.contains('%'));
                prop_assert!(!s.starts_with('/') && !s.ends_with('/'));
            }
        }

        #[test]
        fn validators_never_panic(s in "\\PC{0,64}") {
            let _ = is_valid_repository(&s);
            let _ = is_valid_tag(&s);
            let _ = is_valid_registry(&s);
        }
    }
}
