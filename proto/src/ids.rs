//! Identifiers: blob digests and peer ids.

use std::fmt;
use std::str::FromStr;

use bincode::{Decode, Encode};
use sha2::{Digest as _, Sha256};

use crate::ProtoError;

/// A sha256 content digest; its text form is the OCI `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// The 64 lowercase hex characters, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A short form for logs and tables: the first 12 hex characters.
    pub fn short(&self) -> String {
        let mut h = self.hex();
        h.truncate(12);
        h
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.short())
    }
}

impl FromStr for Digest {
    type Err = ProtoError;

    /// Parses exactly `sha256:` followed by 64 lowercase hex digits; anything else
    /// (other algorithms, upper case, path separators, short input) is refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ProtoError::InvalidDigest { input: s.chars().take(80).collect(), reason };
        let hex_part = s.strip_prefix("sha256:").ok_or_else(|| err("expected the prefix sha256:"))?;
        if hex_part.len() != 64 {
            return Err(err("expected 64 hex digits"));
        }
        if !hex_part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(err("expected lowercase hex digits"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| err("expected lowercase hex digits"))?;
        Ok(Self(out))
    }
}

/// A node's identity for one run, chosen at random at start-up.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub struct PeerId(pub [u8; 16]);

impl PeerId {
    /// A short form for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer:{}", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_through_text() {
        let d = Digest::of(b"hello");
        let text = d.to_string();
        assert_eq!(text, "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(text.parse::<Digest>(), Ok(d));
    }

    #[test]
    fn digest_rejects_malformed_text() {
        for bad in [
            "",
            "sha256:",
            "sha512:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b982",
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b98244",
            "sha256:../../etc/passwd/../../../../../../../../../../../../../../../x",
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} should be refused");
        }
    }
}
