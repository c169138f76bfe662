//! TLS to Redis: `rediss://` URLs with Celery's options in the query, as Celery's Redis
//! backend reads them: `ssl_cert_reqs` (`required` by default; `optional` is the same for a
//! client, since a server always shows its certificate; `none` turns checks off and is logged
//! as insecure), `ssl_ca_certs` (the CA file that signed the server's certificate, instead of
//! the system's), `ssl_certfile` and `ssl_keyfile` (a client certificate, for servers that ask
//! for one). The server's name is always checked against its certificate unless `none`.

use super::{RedisError, redact};
use redis::{Client, ClientTlsConfig, TlsCertificates};
use std::path::PathBuf;

/// The query keys this module reads (and takes out of the URL before the redis crate sees it).
const KEYS: [&str; 4] = [
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
];

/// A query key and its value.
pub(super) type Pair = (String, String);

/// Opens a client for `url`, a `redis://` or `rediss://` URL, with its TLS options.
pub fn client(url: &str) -> Result<Client, RedisError> {
    let refuse = |reason: String| RedisError::Url {
        url: redact(url),
        reason,
    };
    let mut parsed = url::Url::parse(url).map_err(|e| refuse(e.to_string()))?;
    let (options, rest): (Vec<Pair>, Vec<Pair>) = parsed
        .query_pairs()
        .into_owned()
        .partition(|(k, _)| KEYS.contains(&k.as_str()));
    if options.is_empty() {
        return Client::open(url).map_err(|e| refuse(e.to_string()));
    }
    if parsed.scheme() != "rediss" {
        return Err(refuse(format!(
            "{} is for TLS: use a rediss:// URL",
            options[0].0
        )));
    }
    let (insecure, certificates) = options_of(&options).map_err(refuse)?;
    if insecure {
        parsed.set_fragment(Some("insecure"));
    }
    if rest.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    Client::build_with_tls(parsed.as_str(), certificates).map_err(|e| refuse(e.to_string()))
}

/// The TLS options among a URL's query `pairs`: whether checks are off (`ssl_cert_reqs=none`,
/// logged), and the CA and client certificate read from their files.
pub(super) fn options_of(pairs: &[Pair]) -> Result<(bool, TlsCertificates), String> {
    let option = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let insecure = match option("ssl_cert_reqs") {
        None => false,
        Some(reqs) => match reqs.to_ascii_lowercase().trim_start_matches("cert_") {
            "required" | "optional" => false,
            "none" => true,
            other => {
                return Err(format!(
                    "ssl_cert_reqs={other}: expected required, optional or none (or CERT_REQUIRED, …)"
                ));
            }
        },
    };
    if insecure {
        tracing::warn!(
            "ssl_cert_reqs=none: the Redis server's certificate is not checked, so anyone on the \
             way can read and change tasks and results"
        );
    }
    let read = |key: &str| -> Result<Option<Vec<u8>>, String> {
        let Some(path) = option(key) else {
            return Ok(None);
        };
        let path = PathBuf::from(path);
        std::fs::read(&path)
            .map(Some)
            .map_err(|e| format!("cannot read {key} {}: {e}", path.display()))
    };
    let client_tls = match (read("ssl_certfile")?, read("ssl_keyfile")?) {
        (Some(client_cert), Some(client_key)) => Some(ClientTlsConfig {
            client_cert,
            client_key,
        }),
        (None, None) => None,
        _ => return Err("ssl_certfile and ssl_keyfile go together: give both or neither".into()),
    };
    let certificates = TlsCertificates {
        client_tls,
        root_cert: read("ssl_ca_certs")?,
    };
    Ok((insecure, certificates))
}

/// Whether `e` (from connecting) is a TLS handshake the certificates failed: the server's is not
/// signed by the trusted CA or does not name the host, or the server refused ours. Trying
/// again cannot help.
pub fn is_certificate_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(error) = source {
        if let Some(rustls) = rustls_error(error) {
            return matches!(
                rustls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::AlertReceived(_)
            );
        }
        source = error.source();
    }
    false
}

/// The rustls error `error` is or carries. The redis crate keeps an I/O error behind an Arc,
/// and the rustls error is that I/O error's payload, which `source()` skips: look through both.
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    let error: &(dyn std::error::Error + 'static) = match error.downcast_ref::<Shared>() {
        Some(shared) => shared.as_ref(),
        None => error,
    };
    error.downcast_ref::<rustls::Error>().or_else(|| {
        error
            .downcast_ref::<std::io::Error>()?
            .get_ref()?
            .downcast_ref::<rustls::Error>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_on_a_plain_url_are_refused() {
        let e = client("redis://h:1/0?ssl_cert_reqs=required").err();
        assert!(
            e.is_some_and(|e| e.to_string().contains("use a rediss:// URL")),
            "a redis:// URL with TLS options was accepted"
        );
    }

    #[test]
    fn an_unknown_ssl_cert_reqs_is_refused() {
        let e = client("rediss://h:1/0?ssl_cert_reqs=maybe").err();
        assert!(e.is_some_and(|e| e.to_string().contains("expected required")));
    }

    #[test]
    fn a_client_certificate_without_its_key_is_refused() {
        let readable = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let e = client(&format!("rediss://h:1/0?ssl_certfile={readable}")).err();
        assert!(e.is_some_and(|e| e.to_string().contains("go together")));
    }

    #[test]
    fn an_unreadable_ca_file_is_named() {
        let e = client("rediss://h:1/0?ssl_ca_certs=/nonexistent/ca.pem").err();
        assert!(e.is_some_and(|e| {
            e.to_string()
                .contains("cannot read ssl_ca_certs /nonexistent/ca.pem")
        }));
    }

    #[test]
    fn rediss_without_options_checks_against_the_system_roots() {
        assert!(client("rediss://h:1/0").is_ok());
        assert!(client("rediss://h:1/0?ssl_cert_reqs=CERT_REQUIRED").is_ok());
    }
}
