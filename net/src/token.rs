//! [`ClusterToken`]: the shared secret that admits a node to the cluster, how it is
//! loaded (file, environment, generated) and the keyed MACs built from it.

use std::fmt;
use std::path::Path;

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::NetError;

type HmacSha256 = Hmac<Sha256>;

/// Fewest secret bytes a token may have.
pub const MIN_TOKEN_LEN: usize = 16;
/// Bytes of randomness in a generated token.
const GENERATED_TOKEN_LEN: usize = 32;

/// The cluster's shared secret. Every node and the tracker hold the same one; a
/// connection is only used once both ends have proved they hold it (see the crate
/// docs).
///
/// Text form: [`ClusterToken::to_text`] writes lowercase hex, and
/// [`ClusterToken::from_text`] reads it back to the same bytes. Text that is not an
/// even number of hex digits (a passphrase, base64) is used as is: its UTF-8 bytes are
/// the secret. Every node applies the same rule, so any text shared by the whole
/// cluster works.
///
/// `Debug` prints only the length, never the secret.
#[derive(Clone)]
pub struct ClusterToken {
    bytes: Vec<u8>,
    /// HMAC-SHA256 keyed with `bytes`, cloned for every proof.
    mac: HmacSha256,
}

impl ClusterToken {
    /// A token from raw secret bytes; refuses fewer than [`MIN_TOKEN_LEN`].
    pub fn new(bytes: Vec<u8>) -> Result<Self, NetError> {
        if bytes.len() < MIN_TOKEN_LEN {
            return Err(NetError::TokenTooShort { len: bytes.len(), min: MIN_TOKEN_LEN });
        }
        Ok(Self { mac: keyed(&bytes), bytes })
    }

    /// Reads a token file. Text (what `swarm token` writes) is trimmed of surrounding
    /// whitespace and newlines and parsed as by [`ClusterToken::from_text`]; a file
    /// that is not UTF-8 is taken as raw secret bytes.
    pub fn from_file(path: &Path) -> Result<Self, NetError> {
        let raw = std::fs::read(path).map_err(|source| NetError::TokenFile { path: path.to_path_buf(), source })?;
        let token = match String::from_utf8(raw) {
            Ok(text) => Self::from_text(&text),
            Err(e) => Self::new(e.into_bytes()),
        };
        token.map_err(|e| match e {
            NetError::TokenTooShort { len, min } => NetError::TokenFileTooShort { path: path.to_path_buf(), len, min },
            other => other,
        })
    }

    /// A token from text (`SWARM_TOKEN`, a file's contents). Surrounding whitespace is
    /// trimmed; an even number of hex digits is decoded, anything else is used as
    /// UTF-8 bytes.
    pub fn from_text(text: &str) -> Result<Self, NetError> {
        let text = text.trim();
        let is_hex = !text.is_empty() && text.len().is_multiple_of(2) && text.bytes().all(|b| b.is_ascii_hexdigit());
        match is_hex.then(|| hex::decode(text).ok()).flatten() {
            Some(bytes) => Self::new(bytes),
            None => Self::new(text.as_bytes().to_vec()),
        }
    }

    /// A fresh token of 32 random bytes from the operating system.
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; GENERATED_TOKEN_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self { mac: keyed(&bytes), bytes }
    }

    /// The text form: lowercase hex of the secret bytes. This is what `swarm token`
    /// prints and what a token file holds.
    pub fn to_text(&self) -> String {
        hex::encode(&self.bytes)
    }

    /// `HMAC-SHA256(token, role || ekm)`.
    pub(crate) fn proof(&self, role: &[u8], ekm: &[u8]) -> [u8; 32] {
        self.mac.clone().chain_update(role).chain_update(ekm).finalize().into_bytes().into()
    }

    /// Checks a received proof in constant time.
    pub(crate) fn verify(&self, role: &[u8], ekm: &[u8], proof: &[u8]) -> bool {
        self.mac.clone().chain_update(role).chain_update(ekm).verify_slice(proof).is_ok()
    }

    /// The keyed MAC, for deriving other keys (the stateless-reset key).
    pub(crate) fn mac(&self) -> &HmacSha256 {
        &self.mac
    }
}

/// HMAC-SHA256 keyed with `key`, built infallibly: as RFC 2104 says, a key longer
/// than the block is hashed first, and the key is zero-padded to the 64-byte block.
/// (`Mac::new_from_slice` does the same but returns a `Result` it never fails.)
fn keyed(key: &[u8]) -> HmacSha256 {
    let mut block = hmac::digest::Key::<HmacSha256>::default();
    if key.len() > block.len() {
        let hashed = <Sha256 as sha2::Digest>::digest(key);
        block[..hashed.len()].copy_from_slice(&hashed);
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    <HmacSha256 as KeyInit>::new(&block)
}

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterToken(<{} secret bytes>)", self.bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn short_tokens_are_refused_with_the_fix() {
        let err = ClusterToken::new(vec![1; 15]).expect_err("15 bytes is too short");
        assert!(matches!(err, NetError::TokenTooShort { len: 15, min: 16 }));
        assert!(err.to_string().contains("swarm token"), "{err}");
        assert!(ClusterToken::new(vec![1; 16]).is_ok());
        assert!(matches!(ClusterToken::from_text("  \n"), Err(NetError::TokenTooShort { len: 0, .. })));
        // 30 hex digits decode to 15 bytes.
        assert!(matches!(ClusterToken::from_text(&"ab".repeat(15)), Err(NetError::TokenTooShort { len: 15, .. })));
    }

    #[test]
    fn text_round_trips_and_is_trimmed() {
        let token = ClusterToken::generate();
        let text = token.to_text();
        assert_eq!(text.len(), 64);
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let back = ClusterToken::from_text(&format!("  {text}\r\n\n")).expect("parse");
        assert_eq!(back.bytes, token.bytes);
        // Same secret means same proofs.
        assert_eq!(back.proof(b"r", b"e"), token.proof(b"r", b"e"));
        // Two generated tokens differ.
        assert_ne!(ClusterToken::generate().to_text(), text);
    }

    #[test]
    fn non_hex_text_is_used_as_a_passphrase() {
        let token = ClusterToken::from_text("correct horse battery staple\n").expect("passphrase");
        assert_eq!(token.bytes, b"correct horse battery staple");
        // An odd number of hex digits is a passphrase too, not a truncated hex string.
        let odd = ClusterToken::from_text(&"a".repeat(33)).expect("odd hex");
        assert_eq!(odd.bytes, "a".repeat(33).as_bytes());
    }

    #[test]
    fn token_files_are_trimmed_and_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        let token = ClusterToken::generate();
        std::fs::write(&path, format!("{}\n", token.to_text())).expect("write");
        let loaded = ClusterToken::from_file(&path).expect("load");
        assert_eq!(loaded.bytes, token.bytes);

        let short = dir.path().join("short");
        std::fs::write(&short, "abcd\n").expect("write");
        let err = ClusterToken::from_file(&short).expect_err("too short");
        assert!(matches!(&err, NetError::TokenFileTooShort { path, len: 2, min: 16 } if path == &short), "{err:?}");
        assert!(err.to_string().contains(&short.display().to_string()), "{err}");

        let binary = dir.path().join("binary");
        let mut f = std::fs::File::create(&binary).expect("create");
        let raw: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) | 0x80).collect();
        f.write_all(&raw).expect("write");
        drop(f);
        assert_eq!(ClusterToken::from_file(&binary).expect("binary token").bytes, raw);

        let missing = dir.path().join("no-such-token");
        let err = ClusterToken::from_file(&missing).expect_err("missing file");
        assert!(matches!(&err, NetError::TokenFile { path, .. } if path == &missing));
        let msg = err.to_string();
        assert!(msg.contains(&missing.display().to_string()) && msg.contains("swarm token"), "{msg}");
    }

    #[test]
    fn keyed_hmac_matches_the_library_for_every_key_length() {
        for len in [16usize, 32, 63, 64, 65, 200] {
            let key: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
            let ours = keyed(&key).chain_update(b"msg").finalize().into_bytes();
            let lib =
                <HmacSha256 as Mac>::new_from_slice(&key).expect("hmac").chain_update(b"msg").finalize().into_bytes();
            assert_eq!(ours, lib, "key length {len}");
        }
    }

    #[test]
    fn debug_does_not_print_the_secret() {
        let token = ClusterToken::from_text("super-secret-passphrase-1234").expect("token");
        let debug = format!("{token:?}");
        assert!(!debug.contains("super") && !debug.contains(&token.to_text()), "{debug}");
        assert!(debug.contains("28"), "{debug}");
    }

    #[test]
    fn proofs_depend_on_token_role_and_session() {
        let a = ClusterToken::new(vec![1; 32]).expect("a");
        let b = ClusterToken::new(vec![2; 32]).expect("b");
        let p = a.proof(b"client", b"ekm-1");
        assert!(a.verify(b"client", b"ekm-1", &p));
        assert!(!b.verify(b"client", b"ekm-1", &p));
        assert!(!a.verify(b"server", b"ekm-1", &p));
        assert!(!a.verify(b"client", b"ekm-2", &p));
        assert!(!a.verify(b"client", b"ekm-1", &p[..31]));
    }
}
