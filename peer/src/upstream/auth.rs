//! Registry authentication: parsing `WWW-Authenticate` challenges and caching what
//! they lead to.
//!
//! Owns the per-registry knowledge of *how* to authenticate (the last challenge seen:
//! `Basic`, or `Bearer` with its realm and service) and the bearer tokens obtained from
//! token realms, cached per `(registry, scope)` until shortly before they expire. No
//! I/O happens here; [`super::UpstreamClient`] fetches tokens and feeds them in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a registry asked for in its last `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP basic authentication with the configured username and password.
    Basic,
    /// The docker token flow: get a token from `realm` for `service` and `scope`.
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

/// Parses a `WWW-Authenticate` header value. Returns the first `Bearer` or `Basic`
/// challenge; other schemes are ignored. Parameter values may be quoted (with `\`
/// escapes) and may then contain commas, as in `scope="repository:a:pull,push"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let mut rest = header.trim();
    while !rest.is_empty() {
        let (scheme, after) = match rest.find(|c: char| c.is_ascii_whitespace() || c == ',') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (params, remainder) = parse_params(after);
        if scheme.eq_ignore_ascii_case("bearer") {
            let get = |key: &str| params.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.clone());
            let realm = get("realm")?;
            return Some(Challenge::Bearer { realm, service: get("service"), scope: get("scope") });
        }
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        rest = remainder.trim_start_matches(|c: char| c.is_ascii_whitespace() || c == ',');
    }
    None
}

/// Parses `key=value` pairs separated by commas until a token that is not followed by
/// `=` (the start of the next challenge). Returns the pairs and the unparsed rest.
fn parse_params(input: &str) -> (Vec<(String, String)>, &str) {
    let mut params = Vec::new();
    let mut rest = input;
    loop {
        let trimmed = rest.trim_start_matches(|c: char| c.is_ascii_whitespace() || c == ',');
        // The key ends at the first `=`, white space, `,` or `"`; only an `=` there
        // makes it a parameter. Looking no further than that keeps a header of many
        // bare tokens linear (searching the whole rest for `=` at each token made it
        // quadratic: 1 s of CPU for a 100 KB header, 17 s for 400 KB; found by the
        // `www_authenticate` fuzz target running slowly).
        let eq = trimmed.find(|c: char| c == '=' || c.is_ascii_whitespace() || c == ',' || c == '"');
        let Some(eq) = eq.filter(|&i| i > 0 && trimmed[i..].starts_with('=')) else {
            // Not a parameter: the next challenge's scheme starts here.
            return (params, trimmed);
        };
        let key = &trimmed[..eq];
        let after = &trimmed[eq + 1..];
        let (value, remainder) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.push((key.trim().to_string(), value));
        rest = remainder;
    }
}

/// A bearer token and when to stop using it.
#[derive(Clone, Debug)]
struct CachedToken {
    token: String,
    valid_until: Instant,
}

/// Tokens are dropped this long before the registry says they expire, so a request
/// does not race the expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Lifetime assumed when the token response does not say (the spec's default).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Challenges per registry and tokens per `(registry, scope)`.
#[derive(Debug, Default)]
pub struct AuthCache {
    challenges: HashMap<String, Challenge>,
    tokens: HashMap<(String, String), CachedToken>,
}

impl AuthCache {
    /// The last challenge `registry` sent, if any.
    pub fn challenge(&self, registry: &str) -> Option<Challenge> {
        self.challenges.get(registry).cloned()
    }

    /// Remembers how `registry` wants to be authenticated.
    pub fn set_challenge(&mut self, registry: &str, challenge: Challenge) {
        self.challenges.insert(registry.to_string(), challenge);
    }

    /// A cached token for `(registry, scope)` that is still valid at `now`.
    pub fn token(&self, registry: &str, scope: &str, now: Instant) -> Option<String> {
        self.tokens
            .get(&(registry.to_string(), scope.to_string()))
            .filter(|t| t.valid_until > now)
            .map(|t| t.token.clone())
    }

    /// Caches `token` for `(registry, scope)`, valid for `lifetime` from `now` (minus a
    /// safety margin). Expired entries are pruned on the way.
    pub fn set_token(&mut self, registry: &str, scope: &str, token: String, lifetime: Duration, now: Instant) {
        self.tokens.retain(|_, t| t.valid_until > now);
        let valid_until = now + lifetime.saturating_sub(EXPIRY_MARGIN.min(lifetime / 2));
        self.tokens.insert((registry.to_string(), scope.to_string()), CachedToken { token, valid_until });
    }

    /// Forgets the token for `(registry, scope)` (the registry refused it).
    pub fn forget_token(&mut self, registry: &str, scope: &str) {
        self.tokens.remove(&(registry.to_string(), scope.to_string()));
    }
}

/// The body of a token realm's answer.
#[derive(Debug, serde::Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token to send (`token`, or the OAuth2 `access_token`), if any.
    pub fn bearer(&self) -> Option<&str> {
        self.token.as_deref().filter(|t| !t.is_empty()).or(self.access_token.as_deref().filter(|t| !t.is_empty()))
    }

    /// How long the token may be used.
    pub fn lifetime(&self) -> Duration {
        self.expires_in.filter(|&s| s > 0).map(Duration::from_secs).unwrap_or(DEFAULT_TOKEN_LIFETIME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#;
        assert_eq!(
            parse_challenge(h),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull".into()),
            })
        );
    }

    #[test]
    fn quoted_values_keep_commas_and_escapes() {
        let h = r#"Bearer realm="http://x/t\"q",scope="repository:a/b:pull,push", service=svc"#;
        assert_eq!(
            parse_challenge(h),
            Some(Challenge::Bearer {
                realm: "http://x/t\"q".into(),
                service: Some("svc".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
    }

    #[test]
    fn basic_and_unknown_schemes() {
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("basic"), Some(Challenge::Basic));
        assert_eq!(parse_challenge(r#"Negotiate abc, Basic realm="x""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge(r#"Digest realm="x", nonce="y""#), None);
        assert_eq!(parse_challenge(""), None);
        // Bearer without a realm is useless.
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
    }

    #[test]
    fn tokens_expire_with_margin() {
        let mut cache = AuthCache::default();
        let t0 = Instant::now();
        cache.set_token("r", "s", "tok".into(), Duration::from_secs(300), t0);
        assert_eq!(cache.token("r", "s", t0 + Duration::from_secs(200)).as_deref(), Some("tok"));
        assert_eq!(cache.token("r", "s", t0 + Duration::from_secs(295)), None);
        assert_eq!(cache.token("r", "other", t0), None);
        assert_eq!(cache.token("other", "s", t0), None);
        cache.forget_token("r", "s");
        assert_eq!(cache.token("r", "s", t0), None);
    }

    #[test]
    fn token_response_fields() {
        let r: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":120,"issued_at":"x"}"#).expect("valid json");
        assert_eq!(r.bearer(), Some("a"));
        assert_eq!(r.lifetime(), Duration::from_secs(120));
        let r: TokenResponse = serde_json::from_str(r#"{"token":"t","access_token":"a"}"#).expect("valid json");
        assert_eq!(r.bearer(), Some("t"));
        assert_eq!(r.lifetime(), DEFAULT_TOKEN_LIFETIME);
    }

    #[test]
    fn a_long_header_of_bare_tokens_parses_in_linear_time() {
        // 400 KB, about what the HTTP client accepts as a response's header block:
        // the quadratic parser needed 17 s of CPU for it in an optimised build, the
        // linear one 12 ms.
        let header = "a ".repeat(200_000);
        let started = Instant::now();
        assert_eq!(parse_challenge(&header), None);
        let with_bearer = format!("{header}Bearer realm=\"https://r/t\"");
        assert_eq!(
            parse_challenge(&with_bearer),
            Some(Challenge::Bearer { realm: "https://r/t".into(), service: None, scope: None })
        );
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }

    proptest! {
        #[test]
        fn challenge_parser_never_panics(s in "\\PC{0,120}") {
            let _ = parse_challenge(&s);
        }

        #[test]
        fn challenge_parser_never_panics_on_header_like_input(
            s in r#"(Bearer|Basic|x)? ?([a-z]{0,5}=("[^"]{0,10}"?|[a-z,\\]{0,5}),? ?){0,4}"#
        ) {
            let _ = parse_challenge(&s);
        }
    }
}
