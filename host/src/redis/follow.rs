//! A shared connection that follows the master through a Sentinel failover.
//!
//! The redis crate's `ConnectionManager` reconnects by itself, but always to the address it was
//! made for (redis-rs#1438): after a failover it keeps knocking at the old master, dead or now a
//! replica answering writes with `READONLY`. A [`Link`] on a Sentinel [`Client`] sees those
//! replies — connection errors, timeouts, `READONLY`, `MASTERDOWN` — asks the sentinels for the
//! master again and swaps a connection to it in, for every clone at once. The failed command
//! still fails: its caller retries it as it would after any lost connection, and the retry goes
//! to the new master. On one address a link is the plain reconnecting connection.

use super::{CONNECT_TIMEOUT, Client, RESPONSE_TIMEOUT, RedisError};
use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A reconnecting connection that follows the master (cheap to clone; clones share it).
#[derive(Clone)]
pub struct Link {
    current: Arc<ArcSwap<ConnectionManager>>,
    client: Client,
    /// Bumped at each swap, so that of many commands failing together only one looks again.
    generation: Arc<AtomicU64>,
    looking: Arc<tokio::sync::Mutex<()>>,
}

impl Link {
    /// Connects to `client`'s master (whose URL is `url`, for messages).
    pub async fn open(client: &Client, url: &str) -> Result<Self, RedisError> {
        let (manager, _) = manager(client, url).await?;
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(manager)),
            client: client.clone(),
            generation: Arc::default(),
            looking: Arc::default(),
        })
    }

    /// After a reply that says the master is lost: unless another command already did, ask for
    /// the master again and swap a connection to it in.
    async fn look_again(&self, seen: u64) {
        let _one_at_a_time = self.looking.lock().await;
        if self.generation.load(Ordering::SeqCst) != seen {
            return;
        }
        match manager(&self.client, "the master").await {
            Ok((manager, master)) => {
                self.current.store(Arc::new(manager));
                self.generation.fetch_add(1, Ordering::SeqCst);
                tracing::info!(%master, "connected to the Redis master the sentinels name now");
            }
            Err(e) => tracing::warn!("cannot reach a Redis master through the sentinels yet: {e}"),
        }
    }

    /// Whether `client` can move and `reply` says the master was lost.
    fn lost_master<T>(&self, reply: &RedisResult<T>, server_error: impl Fn(&T) -> bool) -> bool {
        if !self.client.follows_failover() {
            return false;
        }
        match reply {
            Ok(value) => server_error(value),
            Err(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || matches!(e.code(), Some("READONLY" | "MASTERDOWN"))
            }
        }
    }
}

/// Whether Redis answered that it is not a writable master.
fn not_master(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if matches!(e.code(), "READONLY" | "MASTERDOWN"))
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let seen = self.generation.load(Ordering::SeqCst);
            let mut conn = ConnectionManager::clone(&self.current.load());
            let reply = conn.req_packed_command(cmd).await;
            if self.lost_master(&reply, not_master) {
                self.look_again(seen).await;
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let seen = self.generation.load(Ordering::SeqCst);
            let mut conn = ConnectionManager::clone(&self.current.load());
            let reply = conn.req_packed_commands(pipeline, offset, count).await;
            if self.lost_master(&reply, |values: &Vec<Value>| values.iter().any(not_master)) {
                self.look_again(seen).await;
            }
            reply
        })
    }

    fn get_db(&self) -> i64 {
        self.client.db()
    }
}

/// A reconnecting connection to `client`'s master now, and the master's address.
async fn manager(client: &Client, url: &str) -> Result<(ConnectionManager, String), RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2);
    let master = client.master().await?;
    let address = master.get_connection_info().addr().to_string();
    let manager = master
        .get_connection_manager_with_config(config)
        .await
        .map_err(|e| super::connect_error(url, &e))?;
    Ok((manager, address))
}
