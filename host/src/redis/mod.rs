//! Everything that talks to Redis, and nothing else does: connections, the broker's queues and
//! in-flight lists, the result backend, the dead-letter list, worker registration and crash
//! recovery, the revoked set, remote-control and event channels, fleet deploys.
//!
//! Speaks bytes, keys and `protocol` values; knows nothing of WebAssembly, plugins or the
//! sandbox (`host/tests/layout.rs` keeps it so). Every key and channel name is in [`keys`];
//! every Lua script is a file in `scripts/`, loaded by [`scripts`]. Every move of a message
//! between lists is one atomic Redis step (a Lua script, `BLMOVE`, or `MULTI`): at no instant is
//! a fetched message only in worker memory.
//!
//! - [`Client`] (`client.rs`): where a Redis is, one address or the master a set of sentinels
//!   names; `follow.rs`: the shared connection that follows a Sentinel failover.
//! - [`connection`]: commands Redis refuses to the ACL user, named with their keys and reported.
//! - [`tls`]: `rediss://` with Celery's `ssl_*` options.
//! - [`broker`]: fetching into the in-flight lists, settling, the delayed set, publishing.
//! - [`backend`]: task results stored and published as Celery's backend does; waiting for one.
//! - [`chord`]: counting a chord's header as Celery's Redis backend does; writing its size.
//! - [`deadletter`]: the dead-letter entries: their format, and the operator's commands.
//! - [`eviction`]: whether a Redis may evict the worker's keys, said at start and on change.
//! - [`recovery`]: the worker registry, heartbeats, returning a dead worker's messages.
//! - [`control`]: the remote-control channel, its replies, and the revoked set.
//! - [`events`]: publishing monitoring events.
//! - [`fleet`]: deployed plugin blobs, their history, and what each worker runs.
//! - [`schedule`]: the schedule's last ticks, and sending a tick once across the fleet.
//! - [`settle`]: a batch of finished tasks: states, then acknowledgements.

pub mod backend;
pub mod broker;
pub mod chord;
mod client;
pub mod connection;
pub mod control;
pub mod deadletter;
pub mod events;
pub mod eviction;
pub mod fleet;
mod follow;
pub mod keys;
pub mod probe;
pub mod recovery;
pub mod schedule;
mod scripts;
pub mod settle;
pub mod tls;

pub use backend::{Backend, Stored, WaitError, Waiter};
pub use broker::{Broker, Delivery};
pub use client::Client;

use std::future::Future;
use std::time::Duration;

/// A shared connection that reconnects by itself (following the master through a Sentinel
/// failover, see `follow.rs`), for ordinary commands; a command refused to its ACL user is named
/// (see [`connection`]).
pub type Connection = connection::Named<follow::Link>;

/// Answers slower than this are a failed command (a blocking fetch gets its wait on top).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("invalid Redis URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot connect to Redis at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(
        "Redis at {url} refused the credentials ({reason}): check the user and password in the \
         URL (redis://user:password@host:port/db, percent-encoded)"
    )]
    Auth { url: String, reason: String },
    #[error(
        "TLS to Redis at {url} failed ({reason}): check ssl_ca_certs (the CA that signed the \
         server's certificate), that the certificate names the host in the URL, and \
         ssl_certfile/ssl_keyfile if the server asks for a client certificate"
    )]
    Tls { url: String, reason: String },
    #[error(
        "Redis at {url} refused a command connecting needs ({reason}): grant it to that ACL \
         user (README: Redis ACL users; on Sentinel a client checks the master with ROLE, so \
         the user needs +role)"
    )]
    Refused { url: String, reason: String },
    #[error("{}", command_message(.0))]
    Command(#[from] ::redis::RedisError),
}

impl RedisError {
    /// A `WRONGTYPE` reply, as Redis gives it, for tests of what handles permanent errors.
    #[cfg(test)]
    pub(crate) fn wrong_type() -> Self {
        Self::Command(::redis::make_extension_error("WRONGTYPE".into(), None))
    }

    /// Whether trying again cannot help: a key holds another type than the command needs
    /// (`WRONGTYPE`, e.g. a producer's id naming a list), the server refuses the command
    /// (`NOPERM`), or the URL, the credentials or the certificates are wrong. Everything else
    /// (connection lost, timeouts, loading, failover) may pass.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Command(e) => e.clone().into_server_errors().is_some_and(|errors| {
                errors
                    .iter()
                    .any(|(_, error)| matches!(error.code(), "WRONGTYPE" | "NOPERM"))
            }),
            Self::Url { .. } | Self::Auth { .. } | Self::Tls { .. } | Self::Refused { .. } => true,
            Self::Connect { .. } => false,
        }
    }

    /// Where every error of a pipeline that Redis ran is a key holding another type than its
    /// command needs: the positions of those commands (the others were run).
    pub fn wrong_types(&self) -> Option<Vec<usize>> {
        let Self::Command(e) = self else { return None };
        let errors = e.clone().into_server_errors()?;
        errors
            .iter()
            .all(|(_, error)| error.code() == "WRONGTYPE")
            .then(|| errors.iter().map(|(index, _)| *index).collect())
    }

    /// What Redis refused to the connection's ACL user, naming the command and its keys.
    pub fn refusal(&self) -> Option<&str> {
        match self {
            Self::Command(e) => connection::refusal(e),
            Self::Url { .. }
            | Self::Connect { .. }
            | Self::Auth { .. }
            | Self::Tls { .. }
            | Self::Refused { .. } => None,
        }
    }
}

/// A failed command's message: a refusal as [`connection`] names it, else Redis's own.
fn command_message(e: &::redis::RedisError) -> String {
    connection::refusal(e).map_or_else(|| e.to_string(), str::to_owned)
}

/// Opens a Redis client for `url`, refusing what is not Redis with a clear message.
pub fn client(url: &str) -> Result<Client, RedisError> {
    Client::open(url)
}

/// A reconnecting connection for `client` (whose URL is `url`, for messages).
pub async fn manager(client: &Client, url: &str) -> Result<Connection, RedisError> {
    let link = follow::Link::open(client, url).await?;
    Ok(connection::Named::new(link, client.user()))
}

/// Connects to `url` and checks that Redis answers a PING.
pub async fn connect(url: &str) -> Result<(Client, Connection), RedisError> {
    let client = client(url)?;
    let mut conn = manager(&client, url).await?;
    ::redis::cmd("PING")
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| connect_error(url, &e))?;
    Ok((client, conn))
}

/// Why connecting to `url` failed: credentials Redis refuses or certificates that do not
/// match (trying again cannot help), or anything else.
pub(super) fn connect_error(url: &str, e: &::redis::RedisError) -> RedisError {
    let (url, reason) = (redact(url), e.to_string());
    let refused = e.kind() == ::redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"));
    if refused {
        RedisError::Auth { url, reason }
    } else if e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoPerm)
        || e.code() == Some("NOPERM")
    {
        // Also when a running worker looks for a new master: it stops, as on any refusal.
        let refused = RedisError::Refused { url, reason };
        connection::report(&refused.to_string());
        refused
    } else if tls::is_certificate_failure(e) {
        RedisError::Tls { url, reason }
    } else {
        RedisError::Connect { url, reason }
    }
}

/// Whether a server answers at `client`'s address now: one connection attempt, one PING.
pub async fn answers(client: &Client) -> bool {
    let Ok(master) = client.master().await else {
        return false;
    };
    match master.get_multiplexed_async_connection().await {
        Ok(mut conn) => ::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok(),
        Err(_) => false,
    }
}

/// Whether Redis answers, within the connection's response timeout.
pub async fn ping(conn: &mut Connection) -> Result<(), RedisError> {
    ::redis::cmd("PING").query_async::<()>(conn).await?;
    Ok(())
}

/// The URL with every password replaced, for messages and logs: the user's (each address of
/// a Sentinel URL's list) and any `…password=` in the query (`sentinel_password`).
pub fn redact(url: &str) -> String {
    let url = hide_query_passwords(url);
    if url.starts_with("sentinel://") {
        url.split(';').map(redact_one).collect::<Vec<_>>().join(";")
    } else {
        redact_one(&url)
    }
}

fn hide_query_passwords(url: &str) -> String {
    let Some((head, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.contains("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{head}?{}", query.join("&"))
}

fn redact_one(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// 100 ms doubling up to 5 s: the pause before trying Redis again after `failures` failures.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)).min(5_000))
}

/// Runs `op` until it succeeds, with [`backoff`] between tries, and returns its value: a
/// result is never dropped because Redis was away for a while. (While it fails, the message
/// stays in the in-flight list: late, never lost; a stop that cannot wait aborts this and
/// leaves it there for recovery.) `what` names the step in the log.
///
/// An error trying again cannot cure ([`RedisError::is_permanent`]) is returned at once: a
/// key of one task holding another type, so the caller settles that task otherwise; or a
/// command refused to the ACL user (the connection reported it to
/// [`connection::refusals`], and a worker stops on it) — never retried in a loop.
pub async fn retrying<T, F: Future<Output = Result<T, RedisError>>>(
    what: &str,
    mut op: impl FnMut() -> F,
) -> Result<T, RedisError> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match op().await {
            Ok(value) => return Ok(succeeded_after(what, attempt, value)),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => failed_attempt(what, attempt, &e).await,
        }
    }
}

fn succeeded_after<T>(what: &str, attempt: u32, value: T) -> T {
    if attempt > 1 {
        tracing::info!("could {what} after {attempt} attempts");
    }
    value
}

async fn failed_attempt(what: &str, attempt: u32, e: &impl std::fmt::Display) {
    // Say so at the first failure and then at attempts 2, 4, 8, …: heard, not a flood.
    if attempt.is_power_of_two() {
        tracing::warn!("could not {what} (attempt {attempt}, retrying): {e}");
    }
    tokio::time::sleep(backoff(attempt)).await;
}

/// A Pub/Sub subscription to one channel.
pub struct Subscription {
    pubsub: ::redis::aio::PubSub,
}

impl Subscription {
    /// Subscribes to `channel`.
    pub async fn open(client: &Client, channel: &str) -> Result<Self, RedisError> {
        let mut pubsub = client.master().await?.get_async_pubsub().await?;
        if let Err(e) = pubsub.subscribe(channel).await {
            let mut subscribe = ::redis::cmd("SUBSCRIBE");
            subscribe.arg(channel);
            let user = client.user().unwrap_or("default");
            let e = connection::renamed(e, user, |_| Some(&subscribe));
            if let Some(refusal) = connection::refusal(&e) {
                connection::report(refusal);
            }
            return Err(e.into());
        }
        Ok(Self { pubsub })
    }

    /// The next message's payload; none once the subscription is lost.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        use futures_util::StreamExt as _;
        let message = self.pubsub.on_message().next().await?;
        Some(message.get_payload().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:pw@h/0"), "redis://u:***@h/0");
        assert_eq!(redact("redis://h:1/0"), "redis://h:1/0");
    }

    #[test]
    fn redacts_each_password_of_a_sentinel_list_and_the_sentinels_own() {
        assert_eq!(
            redact("sentinel://u:pw@h1:1;sentinel://u:pw@h2:2/0?master_name=m&sentinel_password=s"),
            "sentinel://u:***@h1:1;sentinel://u:***@h2:2/0?master_name=m&sentinel_password=***"
        );
        assert_eq!(redact("redis://u:pa;ss@h:1/0"), "redis://u:***@h:1/0");
    }

    #[tokio::test(start_paused = true)]
    async fn retrying_backs_off_and_returns_the_value() {
        let start = tokio::time::Instant::now();
        let mut tries = 0;
        let value = retrying("count", || {
            tries += 1;
            let attempt = tries;
            async move {
                if attempt < 4 {
                    Err(RedisError::Connect {
                        url: "redis://x".into(),
                        reason: "not yet".into(),
                    })
                } else {
                    Ok(attempt * 10)
                }
            }
        })
        .await;
        assert_eq!(value.ok(), Some(40));
        // Three failures: 200 + 400 + 800 ms of backoff, no more.
        assert_eq!(start.elapsed(), Duration::from_millis(1400));
    }

    #[test]
    fn a_wrong_type_is_permanent_and_a_lost_connection_is_not() {
        assert!(RedisError::wrong_type().is_permanent());
        let lost = RedisError::Connect {
            url: "redis://x".into(),
            reason: "refused".into(),
        };
        assert!(!lost.is_permanent());
        let loading = ::redis::make_extension_error("LOADING".into(), None);
        assert!(!RedisError::Command(loading).is_permanent());
    }

    #[test]
    fn refused_credentials_are_permanent_and_keep_the_password_out() {
        let refused = ::redis::RedisError::from((
            ::redis::ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        let e = connect_error("redis://worker:hunter2@h:1/0", &refused);
        assert!(matches!(e, RedisError::Auth { .. }) && e.is_permanent());
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let lost =
            ::redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(
            connect_error("redis://h:1/0", &lost),
            RedisError::Connect { .. }
        ));
    }

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(40), Duration::from_secs(5));
    }
}
