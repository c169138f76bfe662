//! `[fleet]` resolved: the keys whose signed deploys a `--fleet` worker installs, the plugin
//! names it may install, and the largest blob it takes.

use super::file::{ConfigError, DEFAULT_MAX_BLOB_MB, FileConfig};
use crate::signing::PublicKey;

/// What a `--fleet` worker installs.
#[derive(Debug, Clone)]
pub struct FleetTrust {
    /// None trusted: any deploy is installed (any Redis writer can deploy code).
    pub trusted_keys: Vec<PublicKey>,
    /// None: any name.
    pub names: Option<Vec<String>>,
    pub max_blob_bytes: usize,
    /// Signed records older than this are refused (`max_record_age`); none: any age.
    pub max_record_age: Option<std::time::Duration>,
}

impl Default for FleetTrust {
    fn default() -> Self {
        Self {
            trusted_keys: Vec::new(),
            names: None,
            max_blob_bytes: mib(DEFAULT_MAX_BLOB_MB),
            max_record_age: None,
        }
    }
}

fn mib(n: u64) -> usize {
    usize::try_from(n.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
}

impl FleetTrust {
    /// Whether the fleet may install plugin `name`.
    pub fn allows_name(&self, name: &str) -> bool {
        self.names
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }
}

impl FileConfig {
    /// `[fleet]`, checked: every trusted key parses, the blob cap is at least 1 MiB.
    pub fn fleet_trust(&self) -> Result<FleetTrust, ConfigError> {
        let section = &self.fleet;
        let invalid = |message: String| ConfigError::Invalid {
            place: "[fleet]".into(),
            message,
        };
        let trusted_keys = section
            .trusted_keys
            .iter()
            .map(|k| PublicKey::parse(k).map_err(|e| invalid(format!("trusted_keys: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let max_blob_bytes = match section.max_blob_mb {
            Some(0) => return Err(invalid("max_blob_mb must be at least 1".into())),
            Some(n) => mib(n),
            None => mib(DEFAULT_MAX_BLOB_MB),
        };
        let max_record_age = match &section.max_record_age {
            None => None,
            Some(value) => Some(super::schedule::parse_duration(value).ok_or_else(|| {
                invalid(format!(
                    "max_record_age: {value:?} is not a duration (\"30d\", \"12h\", seconds)"
                ))
            })?),
        };
        if max_record_age.is_some() && trusted_keys.is_empty() {
            return Err(invalid(
                "max_record_age needs trusted_keys: only signed records carry a time".into(),
            ));
        }
        Ok(FleetTrust {
            trusted_keys,
            names: section.names.clone(),
            max_blob_bytes,
            max_record_age,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::SecretKey;

    #[test]
    fn trusted_keys_names_and_blob_cap_resolve() {
        let key = SecretKey::generate().expect("key").public();
        let file = FileConfig::parse(&format!(
            "[fleet]\ntrusted_keys = [\"{key}\"]\nnames = [\"crucible\"]\nmax_blob_mb = 8\n"
        ))
        .expect("parses");
        let trust = file.fleet_trust().expect("resolves");
        assert_eq!(trust.trusted_keys, [key]);
        assert!(trust.allows_name("crucible") && !trust.allows_name("demo"));
        assert_eq!(trust.max_blob_bytes, 8 << 20);
    }

    #[test]
    fn a_bad_trusted_key_is_refused_before_anything_connects() {
        let file = FileConfig::parse("[fleet]\ntrusted_keys = [\"ed25519:nope\"]\n").expect("toml");
        let e = file.fleet_trust().expect_err("bad key");
        assert!(e.to_string().contains("[fleet]"), "{e}");
    }
}
