//! The broker side of Redis: fetching messages atomically into this worker's in-flight lists,
//! settling them (acknowledged, sent on to a queue, the delayed set or the dead-letter list),
//! the delayed set, and publishing as a producer. Speaks raw messages (bytes) and keys.

use super::keys::{self, DEAD, DELAYED, PRIORITY_STEPS, queue_key};
use super::{Client, Connection, RedisError, scripts};
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, AsyncConnectionConfig, Script};
use std::time::Duration;

/// How long one blocking fetch waits before it is re-issued (kombu's `brpop_timeout`).
pub const BLOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// A message fetched into the in-flight list, and the list it came from.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub raw: Vec<u8>,
    pub source: String,
}

/// Where settling sends a message.
enum Move<'a> {
    /// LPUSH onto a list (the end producers push to).
    Push(&'a str, &'a [u8]),
    /// RPUSH onto a list (the end consumers take from next).
    ToFront(&'a str, &'a [u8]),
    /// ZADD to a sorted set with a score.
    Schedule(&'a str, i64, &'a [u8]),
}

/// Whether settling moved the message: false if it was no longer in flight (another worker
/// returned it after taking this one for dead, say), and nothing was written.
pub type Moved = bool;

/// One worker's view of the broker.
#[derive(Clone)]
pub struct Broker {
    client: Client,
    conn: Connection,
    /// `taskhost:inflight:<node>:`; the source list's key completes an in-flight list's name.
    inflight_prefix: String,
    fetch: Script,
    move_due: Script,
    settle: Script,
}

impl Broker {
    /// Connects; `node` names this worker's in-flight lists.
    pub async fn connect(url: &str, node: &str) -> Result<Self, RedisError> {
        let (client, conn) = super::connect(url).await?;
        Ok(Self {
            client,
            conn,
            inflight_prefix: keys::inflight_prefix(node),
            fetch: scripts::fetch(),
            move_due: scripts::move_due(),
            settle: scripts::settle(),
        })
    }

    /// The client, for connections of other kinds (Pub/Sub).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A shared connection for other commands on the broker.
    pub fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// This worker's in-flight list for messages from `source`.
    pub fn inflight_key(&self, source: &str) -> String {
        format!("{}{source}", self.inflight_prefix)
    }

    /// Takes up to `max` messages from `keys` (in that order) into the in-flight list, without
    /// waiting.
    pub async fn fetch(&self, keys: &[String], max: usize) -> Result<Vec<Delivery>, RedisError> {
        let mut invocation = self.fetch.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        let flat: Vec<Vec<u8>> = invocation
            .arg(max)
            .arg(&self.inflight_prefix)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut items = flat.into_iter();
        while let (Some(key), Some(raw)) = (items.next(), items.next()) {
            out.push(Delivery {
                raw,
                source: String::from_utf8_lossy(&key).into_owned(),
            });
        }
        Ok(out)
    }

    /// A dedicated connection for blocking fetches (a blocking command holds its connection).
    pub async fn blocking_connection(&self) -> Result<BlockingConnection, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(super::CONNECT_TIMEOUT))
            .set_response_timeout(Some(BLOCK_TIMEOUT + super::RESPONSE_TIMEOUT));
        let conn = self
            .client
            .master()
            .await?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(BlockingConnection(super::connection::Named::new(
            conn,
            self.client.user(),
        )))
    }

    /// Waits up to [`BLOCK_TIMEOUT`] for a message on `key` and moves it into the in-flight list.
    pub async fn blocking_fetch(
        &self,
        conn: &mut BlockingConnection,
        key: &str,
    ) -> Result<Option<Delivery>, RedisError> {
        let raw: Option<Vec<u8>> = redis::cmd("BLMOVE")
            .arg(key)
            .arg(self.inflight_key(key))
            .arg("RIGHT")
            .arg("LEFT")
            .arg(BLOCK_TIMEOUT.as_secs_f64())
            .query_async(&mut conn.0)
            .await?;
        Ok(raw.map(|raw| Delivery {
            raw,
            source: key.to_owned(),
        }))
    }

    /// Adds to `pipe` the command that removes `delivery` from the in-flight list. It looks
    /// from the oldest end, where a message usually is when it is settled.
    pub fn add_ack(&self, pipe: &mut redis::Pipeline, delivery: &Delivery) {
        pipe.cmd("LREM")
            .arg(self.inflight_key(&delivery.source))
            .arg(-1)
            .arg(&delivery.raw)
            .ignore();
    }

    /// Takes one start of `task` under its fleet-wide rate limit of one per `interval`: none
    /// if taken, else how long until the next start is allowed.
    pub async fn take_fleet_start(
        &self,
        task: &str,
        interval: Duration,
    ) -> Result<Option<Duration>, RedisError> {
        // Capped at 30 days, so the key's expiry stays one Redis accepts.
        let micros = u64::try_from(interval.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, 30 * 86_400 * 1_000_000);
        let wait: u64 = scripts::fleet_rate()
            .key(keys::fleet_rate(task))
            .arg(micros)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((wait > 0).then(|| Duration::from_micros(wait)))
    }

    /// Pushes messages onto their queues, in one pipeline; the positions of those whose queue
    /// key holds another type (Redis pushed the others).
    pub async fn push(
        &self,
        messages: &[super::settle::Outgoing],
    ) -> Result<Vec<usize>, RedisError> {
        let mut pipe = redis::pipe();
        for message in messages {
            pipe.cmd("LPUSH")
                .arg(&message.key)
                .arg(&message.raw)
                .ignore();
        }
        match self.run(&pipe).await {
            Ok(()) => Ok(Vec::new()),
            Err(e) => e.wrong_types().ok_or(e),
        }
    }

    /// Runs a pipeline of commands on the broker.
    pub async fn run(&self, pipe: &redis::Pipeline) -> Result<(), RedisError> {
        pipe.exec_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Settles `delivery` and, in the same step, schedules `message` for `key` at `due_ms`
    /// (or queues it now if `due_ms` is none).
    pub async fn ack_and_schedule(
        &self,
        delivery: &Delivery,
        key: &str,
        message: &[u8],
        due_ms: Option<i64>,
    ) -> Result<Moved, RedisError> {
        match due_ms {
            Some(due) => {
                let mut member = Vec::with_capacity(key.len() + 1 + message.len());
                member.extend_from_slice(key.as_bytes());
                member.push(b'\n');
                member.extend_from_slice(message);
                self.settle_with(delivery, Move::Schedule(DELAYED, due, &member))
                    .await
            }
            None => self.settle_with(delivery, Move::Push(key, message)).await,
        }
    }

    /// Moves `delivery` to the dead-letter list as `entry` (see [`super::deadletter::entry`]),
    /// in one step.
    pub async fn dead_letter(&self, delivery: &Delivery, entry: &str) -> Result<Moved, RedisError> {
        self.settle_with(delivery, Move::Push(DEAD, entry.as_bytes()))
            .await
    }

    /// Adds `entry` to the dead-letter list: a message that never was in flight (a follow-up
    /// its queue refused).
    pub async fn add_dead_letter(&self, entry: &str) -> Result<(), RedisError> {
        redis::cmd("LPUSH")
            .arg(DEAD)
            .arg(entry)
            .exec_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Puts an unstarted message back at the consuming end of its list, in one step.
    pub async fn requeue(&self, delivery: &Delivery) -> Result<Moved, RedisError> {
        self.settle_with(delivery, Move::ToFront(&delivery.source, &delivery.raw))
            .await
    }

    async fn settle_with(&self, delivery: &Delivery, then: Move<'_>) -> Result<Moved, RedisError> {
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .key(self.inflight_key(&delivery.source))
            .arg(&delivery.raw);
        match then {
            Move::Push(key, value) => invocation.key(key).arg("lpush").arg(value),
            Move::ToFront(key, value) => invocation.key(key).arg("rpush").arg(value),
            Move::Schedule(key, due, member) => {
                invocation.key(key).arg("zadd").arg(member).arg(due)
            }
        };
        let moved: i64 = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(moved == 1)
    }

    /// The messages in this worker's in-flight lists for `sources`.
    pub async fn in_flight(&self, sources: &[String]) -> Result<Vec<Delivery>, RedisError> {
        let mut pipe = redis::pipe();
        for source in sources {
            pipe.cmd("LRANGE")
                .arg(self.inflight_key(source))
                .arg(0)
                .arg(-1);
        }
        let lists: Vec<Vec<Vec<u8>>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(sources
            .iter()
            .zip(lists)
            .flat_map(|(source, raws)| {
                raws.into_iter().map(|raw| Delivery {
                    raw,
                    source: source.clone(),
                })
            })
            .collect())
    }

    /// The first `limit` messages of the delayed set, soonest first, with when each is due
    /// (ms since the epoch) and the queue list it goes to.
    pub async fn delayed(&self, limit: usize) -> Result<Vec<(i64, Delivery)>, RedisError> {
        let entries: Vec<(Vec<u8>, f64)> = self
            .conn
            .clone()
            .zrange_withscores(DELAYED, 0, isize::try_from(limit).unwrap_or(isize::MAX) - 1)
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(member, due)| {
                let sep = member.iter().position(|b| *b == b'\n')?;
                Some((
                    due as i64,
                    Delivery {
                        source: String::from_utf8_lossy(&member[..sep]).into_owned(),
                        raw: member[sep + 1..].to_vec(),
                    },
                ))
            })
            .collect())
    }

    /// Messages waiting in each of `queues` (all priority buckets), in one round trip, with the
    /// length of the delayed set and of the dead-letter list.
    pub async fn lengths(&self, queues: &[String]) -> Result<(Vec<u64>, u64, u64), RedisError> {
        let mut pipe = redis::pipe();
        for queue in queues {
            for step in PRIORITY_STEPS {
                pipe.llen(queue_key(queue, step));
            }
        }
        pipe.zcard(DELAYED).llen(DEAD);
        let counts: Vec<u64> = pipe.query_async(&mut self.conn.clone()).await?;
        let per_queue = counts
            .chunks(PRIORITY_STEPS.len())
            .take(queues.len())
            .map(|buckets| buckets.iter().sum())
            .collect();
        let tail = counts
            .get(queues.len() * PRIORITY_STEPS.len()..)
            .unwrap_or_default();
        Ok((
            per_queue,
            tail.first().copied().unwrap_or(0),
            tail.get(1).copied().unwrap_or(0),
        ))
    }

    /// Moves delayed messages that are due (by `now_ms`) to their queues. Returns how many
    /// moved and when the next one is due.
    pub async fn move_due(&self, now_ms: i64) -> Result<(usize, Option<i64>), RedisError> {
        let (moved, next): (usize, String) = self
            .move_due
            .key(DELAYED)
            .key(DEAD)
            .arg(now_ms)
            .arg(500)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let next = next
            .parse::<f64>()
            .ok()
            .filter(|n| *n >= 0.0)
            .map(|n| n as i64);
        Ok((moved, next))
    }
}

/// A connection of its own for blocking fetches.
pub struct BlockingConnection(super::connection::Named<MultiplexedConnection>);

/// Publishes a message as a producer: declares the queue's binding as kombu does, then pushes.
pub async fn publish(
    conn: &mut Connection,
    queue: &str,
    priority: u8,
    message: &[u8],
) -> Result<(), RedisError> {
    let (bindings, binding) = keys::binding(queue);
    redis::pipe()
        .cmd("SADD")
        .arg(bindings)
        .arg(binding)
        .ignore()
        .cmd("LPUSH")
        .arg(queue_key(queue, priority))
        .arg(message)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}
