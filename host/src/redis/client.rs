//! Where a Redis is: one address (`redis://`, `rediss://`, `unix://`), or the master a set of
//! sentinels names (kombu's `sentinel://h1:26379;sentinel://h2:26379`). Every connection is
//! made from a [`Client`]; one on Sentinel asks the sentinels for the master each time it
//! connects, so a connection made after a failover reaches the new master (see
//! `follow.rs` for the connections that outlive one).
//!
//! Sentinel options, as kombu's `broker_transport_options` name them, come in the URL's query
//! (the config puts `[worker] broker_transport_options` there): `master_name` (required) and
//! `sentinel_password` (kombu's `sentinel_kwargs = {"password": ...}`). The URL's own user and
//! password are the master's, as in kombu; `ssl_*` options reach the master over TLS.

use super::{RedisError, redact, tls};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, TlsMode};
use std::sync::Arc;

/// How to reach a Redis (cheap to clone).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

enum Inner {
    Direct(redis::Client),
    Sentinel(Sentinel),
}

struct Sentinel {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The sentinels' addresses, for messages.
    addresses: String,
    master_name: String,
    db: i64,
    user: Option<String>,
    /// The master is reached over TLS.
    tls: bool,
}

impl Client {
    /// The client for `url`, refusing what is not Redis with a clear message.
    pub fn open(url: &str) -> Result<Self, RedisError> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        let inner = match scheme {
            "redis" | "rediss" | "unix" | "redis+unix" => Inner::Direct(tls::client(url)?),
            "sentinel" => Inner::Sentinel(Sentinel::open(url)?),
            _ => {
                return Err(RedisError::Url {
                    url: redact(url),
                    reason: "taskhost speaks Celery's Redis transport: use redis://host:port/db, \
                             rediss:// or sentinel://"
                        .into(),
                });
            }
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The redis crate's client for the master now (the one address, or the master the
    /// sentinels name, checked to be one).
    pub(super) async fn master(&self) -> Result<redis::Client, RedisError> {
        match self.inner.as_ref() {
            Inner::Direct(client) => Ok(client.clone()),
            Inner::Sentinel(s) => s
                .sentinels
                .lock()
                .await
                .async_get_client()
                .await
                .map_err(|e| {
                    let url = format!(
                        "the master {:?} of the sentinels {}",
                        s.master_name, s.addresses
                    );
                    super::connect_error(&url, &e)
                }),
        }
    }

    /// Whether the master can move (Sentinel): then a connection that loses it looks again.
    pub fn follows_failover(&self) -> bool {
        matches!(self.inner.as_ref(), Inner::Sentinel(_))
    }

    /// The ACL user connections authenticate as (none: Redis's `default`).
    pub fn user(&self) -> Option<&str> {
        match self.inner.as_ref() {
            Inner::Direct(client) => client.get_connection_info().redis_settings().username(),
            Inner::Sentinel(s) => s.user.as_deref(),
        }
    }

    /// Whether connections to Redis go over TLS (`rediss://`, or a Sentinel master with `ssl_*`
    /// options), as Celery's `stats` reports `broker.ssl`.
    pub fn uses_tls(&self) -> bool {
        match self.inner.as_ref() {
            Inner::Direct(client) => matches!(
                client.get_connection_info().addr(),
                redis::ConnectionAddr::TcpTls { .. }
            ),
            Inner::Sentinel(s) => s.tls,
        }
    }

    /// The database number (Pub/Sub channel names carry it).
    pub fn db(&self) -> i64 {
        match self.inner.as_ref() {
            Inner::Direct(client) => client.get_connection_info().redis_settings().db(),
            Inner::Sentinel(s) => s.db,
        }
    }

    /// The host and port connections go to, as Celery's `stats` reports them (for Sentinel,
    /// the first sentinel's).
    pub fn address(&self) -> (String, Option<u16>) {
        let addr = match self.inner.as_ref() {
            Inner::Direct(client) => client.get_connection_info().addr().to_string(),
            Inner::Sentinel(s) => s.addresses.split(',').next().unwrap_or_default().to_owned(),
        };
        match addr.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), port.parse().ok()),
            None => (addr, None),
        }
    }
}

impl Sentinel {
    /// `sentinel://[user:pass@]h1:26379[/db];sentinel://h2:26379?master_name=M[&sentinel_password=P]`.
    fn open(url: &str) -> Result<Self, RedisError> {
        let refuse = |reason: String| RedisError::Url {
            url: redact(url),
            reason,
        };
        let mut addresses = Vec::new();
        let (mut user, mut password, mut db) = (None, None, 0);
        let mut query = Vec::new();
        for part in url.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let shown = redact(part);
            let parsed = url::Url::parse(part).map_err(|e| refuse(format!("{shown}: {e}")))?;
            if parsed.scheme() != "sentinel" {
                return Err(refuse(format!(
                    "{shown}: every address is sentinel://host:port"
                )));
            }
            let host = parsed
                .host_str()
                .ok_or_else(|| refuse(format!("{shown}: no host")))?;
            addresses.push((host.to_owned(), parsed.port().unwrap_or(26379)));
            if !parsed.username().is_empty() && user.is_none() {
                user = Some(decoded(parsed.username()));
            }
            if password.is_none() {
                password = parsed.password().map(decoded);
            }
            if let Ok(n) = parsed.path().trim_matches('/').parse::<i64>() {
                db = n;
            }
            query.extend(parsed.query_pairs().into_owned());
        }
        let option = |key: &str| query.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let master_name = option("master_name").ok_or_else(|| {
            refuse(
                "no master_name: set [worker] broker_transport_options = { master_name = \"…\" } \
                 (result_backend_transport_options for the backend), or ?master_name= in the URL"
                    .into(),
            )
        })?;
        let tls = query.iter().any(|(k, _)| k.starts_with("ssl_"));
        let nodes = addresses
            .iter()
            .map(|(host, port)| ConnectionAddr::Tcp(host.clone(), *port));
        let mut builder =
            SentinelClientBuilder::new(nodes, &master_name, SentinelServerType::Master)
                .map_err(|e| refuse(e.to_string()))?
                .set_client_to_redis_db(db);
        if let Some(user) = &user {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = &password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(password) = option("sentinel_password") {
            builder = builder.set_client_to_sentinel_password(password);
        }
        if tls {
            let (insecure, certificates) = tls::options_of(&query).map_err(refuse)?;
            builder = builder
                .set_client_to_redis_tls_mode(if insecure {
                    TlsMode::Insecure
                } else {
                    TlsMode::Secure
                })
                .set_client_to_redis_certificates(certificates);
        }
        let sentinels = builder.build().map_err(|e| refuse(e.to_string()))?;
        Ok(Self {
            sentinels: tokio::sync::Mutex::new(sentinels),
            addresses: addresses
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            master_name,
            db,
            user,
            tls,
        })
    }
}

/// A URL's percent-encoded user or password, as written before encoding.
fn decoded(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_url_names_its_sentinels_master_db_and_user() {
        let client = Client::open(
            "sentinel://worker:pw@10.0.0.1:26379/3;sentinel://10.0.0.2:26380/3?master_name=mymaster",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(client.follows_failover());
        assert_eq!(client.db(), 3);
        assert_eq!(client.user(), Some("worker"));
        assert_eq!(client.address(), ("10.0.0.1".into(), Some(26379)));
    }

    #[test]
    fn a_sentinel_url_without_a_master_name_says_where_to_give_one() {
        let e = Client::open("sentinel://10.0.0.1:26379").err();
        assert!(e.is_some_and(|e| e.to_string().contains("broker_transport_options")));
    }

    #[test]
    fn what_is_not_redis_is_refused() {
        assert!(Client::open("amqp://guest@localhost//").is_err());
        assert!(Client::open("redis://127.0.0.1:1/0").is_ok());
    }
}
