//! Signed fleet deploys: Ed25519 key pairs (`taskhost keygen`), and the deploy record an
//! operator signs (`taskhost deploy --sign-key`) and a worker with `[fleet] trusted_keys`
//! verifies before it installs a blob. Pure: keys and records in, verdicts out; where they are
//! stored is the callers'.
//!
//! A record signs the plugin name, the blob's SHA-256, the plugin's version and the time of
//! the deploy, so a signature cannot be moved to another name or blob, and a worker can refuse
//! an older record replayed over a newer one.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};

/// How a public key is written: in `[fleet] trusted_keys` and in records.
const PUBLIC_PREFIX: &str = "ed25519:";
/// How a secret key file starts.
const SECRET_PREFIX: &str = "taskhost-ed25519-secret:";

/// Why a key or a record is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("not a public key: {0} (expected ed25519:<base64 of 32 bytes>)")]
    BadPublicKey(String),
    #[error("not a taskhost secret key file ({0})")]
    BadSecretKey(String),
    #[error("no random numbers for a key: {0}")]
    NoRandom(String),
    #[error("the deploy is not signed")]
    Unsigned,
    #[error("the deploy record is malformed: {0}")]
    Malformed(String),
    #[error("the deploy record is for {record}, not {wanted}")]
    WrongEntry { record: String, wanted: String },
    #[error("signed by {0}, which is not among [fleet] trusted_keys")]
    UntrustedKey(String),
    #[error("the signature does not match the record")]
    BadSignature,
    #[error("the deploy record is older ({time_ms}) than one already installed ({newest_ms})")]
    Stale { time_ms: i64, newest_ms: i64 },
    #[error(
        "the deploy record was signed {age_h} h ago, before [fleet] max_record_age allows: \
         sign it again (taskhost deploy --sign-key) if it is still the version to run"
    )]
    Expired { age_h: i64 },
}

/// A public key, as trusted in `[fleet] trusted_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// Parses `ed25519:<base64>`.
    pub fn parse(text: &str) -> Result<Self, SignError> {
        let bad = || SignError::BadPublicKey(text.to_owned());
        let encoded = text.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(bad)?;
        let bytes: [u8; 32] = BASE64
            .decode(encoded)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| bad())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", BASE64.encode(self.0.as_bytes()))
    }
}

/// A secret key: signs deploys.
pub struct SecretKey(ed25519_dalek::SigningKey);

impl SecretKey {
    /// A new key from the operating system's random numbers.
    pub fn generate() -> Result<Self, SignError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| SignError::NoRandom(e.to_string()))?;
        Ok(Self(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// Reads the text of a key file written by [`SecretKey::to_file_text`].
    pub fn parse(text: &str) -> Result<Self, SignError> {
        let encoded = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or_else(|| SignError::BadSecretKey(format!("it must start {SECRET_PREFIX}")))?;
        let seed: [u8; 32] = BASE64
            .decode(encoded)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| SignError::BadSecretKey("not 32 bytes of base64".into()))?;
        Ok(Self(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// The key file's text (keep it private: whoever reads it can deploy).
    pub fn to_file_text(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", BASE64.encode(self.0.to_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

/// What an operator signs for one deploy: stored beside the deployed version in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub name: String,
    pub sha256: String,
    pub version: String,
    /// When it was signed, ms since the epoch: a worker never installs a record older than
    /// one it installed before for the same name.
    pub time_ms: i64,
    /// The signer's public key (`ed25519:...`).
    pub key: String,
    /// The signature (base64) over [`DeployRecord::signed_bytes`].
    pub sig: String,
}

impl DeployRecord {
    /// Signs (name, sha256, version, time) with `key`.
    pub fn sign(key: &SecretKey, name: &str, sha256: &str, version: &str, time_ms: i64) -> Self {
        let message = Self::signed_bytes(name, sha256, version, time_ms);
        Self {
            name: name.to_owned(),
            sha256: sha256.to_owned(),
            version: version.to_owned(),
            time_ms,
            key: key.public().to_string(),
            sig: BASE64.encode(key.0.sign(&message).to_bytes()),
        }
    }

    /// The bytes a signature covers: every field, each on its own line after a tag, so no
    /// field can be shifted into another.
    fn signed_bytes(name: &str, sha256: &str, version: &str, time_ms: i64) -> Vec<u8> {
        format!("taskhost-deploy-v1\n{name}\n{sha256}\n{version}\n{time_ms}").into_bytes()
    }

    /// The record as stored.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks a stored record (none: unsigned) for deploying blob `sha256` as `name`: signed
    /// by one of `trusted`, not older than `newest_ms`, the newest record already installed
    /// for the name, nor than `oldest_ms`, the oldest any record may be (`max_record_age`).
    /// Returns the record.
    pub fn verify(
        stored: Option<&str>,
        (name, sha256): (&str, &str),
        trusted: &[PublicKey],
        newest_ms: Option<i64>,
        oldest_ms: Option<(i64, i64)>,
    ) -> Result<Self, SignError> {
        let text = stored.ok_or(SignError::Unsigned)?;
        let record: Self =
            serde_json::from_str(text).map_err(|e| SignError::Malformed(e.to_string()))?;
        if record.name != name || record.sha256 != sha256 {
            return Err(SignError::WrongEntry {
                record: format!("{} {}", record.name, record.sha256),
                wanted: format!("{name} {sha256}"),
            });
        }
        let key = PublicKey::parse(&record.key)?;
        if !trusted.contains(&key) {
            return Err(SignError::UntrustedKey(record.key));
        }
        let signature: [u8; 64] = BASE64
            .decode(&record.sig)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(SignError::BadSignature)?;
        let message = Self::signed_bytes(name, sha256, &record.version, record.time_ms);
        key.0
            .verify(&message, &ed25519_dalek::Signature::from_bytes(&signature))
            .map_err(|_| SignError::BadSignature)?;
        if let Some(newest_ms) = newest_ms
            && record.time_ms < newest_ms
        {
            return Err(SignError::Stale {
                time_ms: record.time_ms,
                newest_ms,
            });
        }
        if let Some((oldest_ms, now_ms)) = oldest_ms
            && record.time_ms < oldest_ms
        {
            return Err(SignError::Expired {
                age_h: (now_ms - record.time_ms) / 3_600_000,
            });
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(key: &SecretKey, time_ms: i64) -> String {
        DeployRecord::sign(key, "demo", "abc", "0.1.0+abc", time_ms).to_json()
    }

    #[test]
    fn a_record_signed_by_a_trusted_key_verifies() {
        let key = SecretKey::generate().expect("key");
        let record = signed(&key, 10);
        let trusted = [key.public()];
        let ok = DeployRecord::verify(Some(&record), ("demo", "abc"), &trusted, Some(10), None);
        assert_eq!(ok.map(|r| r.version), Ok("0.1.0+abc".to_owned()));
    }

    #[test]
    fn unsigned_untrusted_forged_moved_and_stale_records_are_refused() {
        let key = SecretKey::generate().expect("key");
        let other = SecretKey::generate().expect("key");
        let trusted = [key.public()];
        let verify = |record: Option<&str>, name: &str, digest: &str, newest: Option<i64>| {
            DeployRecord::verify(record, (name, digest), &trusted, newest, None)
        };
        assert_eq!(verify(None, "demo", "abc", None), Err(SignError::Unsigned));
        let by_other = signed(&other, 10);
        assert!(matches!(
            verify(Some(&by_other), "demo", "abc", None),
            Err(SignError::UntrustedKey(_))
        ));
        let record = signed(&key, 10);
        assert!(matches!(
            verify(Some(&record), "crucible", "abc", None),
            Err(SignError::WrongEntry { .. })
        ));
        let mut forged: DeployRecord = serde_json::from_str(&record).expect("record");
        forged.version = "9.9.9".into();
        assert_eq!(
            verify(Some(&forged.to_json()), "demo", "abc", None),
            Err(SignError::BadSignature)
        );
        assert_eq!(
            verify(Some(&record), "demo", "abc", Some(11)),
            Err(SignError::Stale {
                time_ms: 10,
                newest_ms: 11
            })
        );
    }

    #[test]
    fn a_record_older_than_the_oldest_allowed_is_refused_by_a_worker_that_saw_no_newer() {
        let key = SecretKey::generate().expect("key");
        let trusted = [key.public()];
        let day = 86_400_000;
        let record = signed(&key, 10 * day);
        let at = |now: i64| {
            DeployRecord::verify(
                Some(&record),
                ("demo", "abc"),
                &trusted,
                None,
                Some((now - day, now)),
            )
        };
        assert!(at(10 * day + 1).is_ok(), "signed just now");
        assert_eq!(at(12 * day), Err(SignError::Expired { age_h: 48 }));
    }

    #[test]
    fn keys_round_trip_through_their_texts() {
        let key = SecretKey::generate().expect("key");
        let again = SecretKey::parse(&key.to_file_text()).expect("secret parses");
        assert_eq!(again.public(), key.public());
        let public = PublicKey::parse(&key.public().to_string()).expect("public parses");
        assert_eq!(public, key.public());
        assert!(PublicKey::parse("ed25519:short").is_err());
        assert!(SecretKey::parse("ed25519:abc").is_err());
    }
}
