//! The broker side of Redis: queue keys as kombu names them, fetching messages atomically into
//! this worker's in-flight list, acknowledging them, the delayed set for tasks not yet due, and
//! the dead-letter list.
//!
//! Speaks raw messages (bytes) and keys; knows nothing of plugins, and of the protocol only what
//! it needs to name queues. Every move of a message between lists is one atomic Redis step (a
//! Lua script, `BLMOVE`, or `MULTI`): at no instant is a fetched message only in worker memory.
//!
//! Keys of our own (next to kombu's):
//! - `taskhost:inflight:<node>:<queue list>` LIST: messages this worker fetched from that list
//!   and has not settled (one list per source, so recovery knows where each goes back).
//! - `taskhost:delayed` ZSET: `<queue key>\n<message>` scored by due time (ms since epoch).
//! - `taskhost:dead` LIST: JSON entries for messages that cannot be run, with the reason.

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncCommands, AsyncConnectionConfig, Client, Script};
use serde_json::json;
use std::time::Duration;

/// Dead-letter list: messages that cannot be run, each with the reason.
pub const DEAD_LETTER_KEY: &str = "taskhost:dead";
/// Delayed set: messages with an `eta` in the future.
pub const DELAYED_KEY: &str = "taskhost:delayed";
/// kombu's separator between a queue name and its priority bucket.
pub const PRIORITY_SEP: &str = "\x06\x16";
/// kombu's default `priority_steps`.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// How long one blocking fetch waits before it is re-issued (kombu's `brpop_timeout`).
pub const BLOCK_TIMEOUT: Duration = Duration::from_secs(1);
/// Answers slower than this are a failed command (a blocking fetch gets its wait on top).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid Redis URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot connect to Redis at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// Opens a Redis client for `url`, refusing what is not Redis with a clear message.
pub fn client(url: &str) -> Result<Client, BrokerError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    if !matches!(scheme, "redis" | "rediss" | "unix" | "redis+unix") {
        return Err(BrokerError::Url {
            url: redact(url),
            reason: "taskhost speaks Celery's Redis transport: use redis://host:port/db".into(),
        });
    }
    Client::open(url).map_err(|e| BrokerError::Url {
        url: redact(url),
        reason: e.to_string(),
    })
}

/// A connection that reconnects by itself, for ordinary commands.
pub async fn manager(client: &Client, url: &str) -> Result<ConnectionManager, BrokerError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2);
    client
        .get_connection_manager_with_config(config)
        .await
        .map_err(|e| BrokerError::Connect {
            url: redact(url),
            reason: e.to_string(),
        })
}

/// The URL with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
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

/// The list holding `queue`'s messages of `priority` (kombu's bucket naming).
pub fn queue_key(queue: &str, priority: u8) -> String {
    let step = PRIORITY_STEPS
        .iter()
        .rev()
        .find(|s| **s <= priority)
        .copied()
        .unwrap_or(0);
    if step == 0 {
        queue.to_owned()
    } else {
        format!("{queue}{PRIORITY_SEP}{step}")
    }
}

/// The lists to consume for `queues`, in kombu's order: priority-major, queue-minor (bucket 0,
/// the highest priority, first).
pub fn source_keys(queues: &[String]) -> Vec<String> {
    PRIORITY_STEPS
        .iter()
        .flat_map(|step| queues.iter().map(move |q| queue_key(q, *step)))
        .collect()
}

/// The queue name of a list key (the key without its priority suffix).
pub fn queue_of(key: &str) -> &str {
    key.rsplit_once(PRIORITY_SEP).map_or(key, |(q, _)| q)
}

/// The prefix of `node`'s in-flight lists.
pub fn inflight_prefix(node: &str) -> String {
    format!("taskhost:inflight:{node}:")
}

/// A message fetched into the in-flight list, and the list it came from.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub raw: Vec<u8>,
    pub source: String,
}

const FETCH: &str = r"
local out = {}
local max = tonumber(ARGV[1]) * 2
for i = 1, #KEYS do
  while #out < max do
    local m = redis.call('RPOP', KEYS[i])
    if not m then break end
    redis.call('LPUSH', ARGV[2] .. KEYS[i], m)
    out[#out + 1] = KEYS[i]
    out[#out + 1] = m
  end
  if #out >= max then break end
end
return out
";

const MOVE_DUE: &str = r"
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local sep = string.find(member, '\n', 1, true)
  if sep then
    redis.call('RPUSH', string.sub(member, 1, sep - 1), string.sub(member, sep + 1))
  else
    redis.call('LPUSH', KEYS[2], cjson.encode({reason = 'malformed delayed entry', message = member}))
  end
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or '-1'}
";

/// Where [`Broker::settle_with`] moves a message.
enum Move<'a> {
    /// LPUSH onto a list (the end producers push to).
    Push(&'a str, &'a [u8]),
    /// RPUSH onto a list (the end consumers take from next).
    ToFront(&'a str, &'a [u8]),
    /// ZADD to a sorted set with a score.
    Schedule(&'a str, i64, &'a [u8]),
}

const SETTLE: &str = r"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if ARGV[2] == 'lpush' then redis.call('LPUSH', KEYS[2], ARGV[3])
elseif ARGV[2] == 'rpush' then redis.call('RPUSH', KEYS[2], ARGV[3])
elseif ARGV[2] == 'zadd' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3]) end
return 1
";

/// One worker's view of the broker.
#[derive(Clone)]
pub struct Broker {
    client: Client,
    conn: ConnectionManager,
    /// `taskhost:inflight:<node>:`; the source list's key completes an in-flight list's name.
    inflight_prefix: String,
    fetch: Script,
    move_due: Script,
    settle: Script,
}

impl Broker {
    /// Connects; `node` names this worker's in-flight list.
    pub async fn connect(url: &str, node: &str) -> Result<Self, BrokerError> {
        let client = client(url)?;
        let mut conn = manager(&client, url).await?;
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| BrokerError::Connect {
                url: redact(url),
                reason: e.to_string(),
            })?;
        Ok(Self {
            client,
            conn,
            inflight_prefix: inflight_prefix(node),
            fetch: Script::new(FETCH),
            move_due: Script::new(MOVE_DUE),
            settle: Script::new(SETTLE),
        })
    }

    /// The client, for connections of other kinds (Pub/Sub).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// This worker's in-flight list for messages from `source`.
    pub fn inflight_key(&self, source: &str) -> String {
        format!("{}{source}", self.inflight_prefix)
    }

    /// A shared connection for other commands on the broker.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Takes up to `max` messages from `keys` (in that order) into the in-flight list, without
    /// waiting.
    pub async fn fetch(&self, keys: &[String], max: usize) -> Result<Vec<Delivery>, BrokerError> {
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
    pub async fn blocking_connection(&self) -> Result<MultiplexedConnection, BrokerError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(BLOCK_TIMEOUT + RESPONSE_TIMEOUT));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// Waits up to [`BLOCK_TIMEOUT`] for a message on `key` and moves it into the in-flight list.
    pub async fn blocking_fetch(
        &self,
        conn: &mut MultiplexedConnection,
        key: &str,
    ) -> Result<Option<Delivery>, BrokerError> {
        let raw: Option<Vec<u8>> = redis::cmd("BLMOVE")
            .arg(key)
            .arg(self.inflight_key(key))
            .arg("RIGHT")
            .arg("LEFT")
            .arg(BLOCK_TIMEOUT.as_secs_f64())
            .query_async(conn)
            .await?;
        Ok(raw.map(|raw| Delivery {
            raw,
            source: key.to_owned(),
        }))
    }

    /// Settles a message: removes it from the in-flight list.
    pub async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        self.add_ack(&mut pipe, delivery);
        self.run(&pipe).await
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

    /// Runs a pipeline of commands on the broker.
    pub async fn run(&self, pipe: &redis::Pipeline) -> Result<(), BrokerError> {
        pipe.exec_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Settles `delivery` and, in the same transaction, schedules `message` for `key` at
    /// `due_ms` (or queues it now if `due_ms` is none).
    pub async fn ack_and_schedule(
        &self,
        delivery: &Delivery,
        key: &str,
        message: &[u8],
        due_ms: Option<i64>,
    ) -> Result<(), BrokerError> {
        match due_ms {
            Some(due) => {
                let mut member = Vec::with_capacity(key.len() + 1 + message.len());
                member.extend_from_slice(key.as_bytes());
                member.push(b'\n');
                member.extend_from_slice(message);
                self.settle_with(delivery, Move::Schedule(DELAYED_KEY, due, &member))
                    .await
            }
            None => self.settle_with(delivery, Move::Push(key, message)).await,
        }
    }

    /// Moves `delivery` to the dead-letter list with `reason`, in one transaction.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
        task_id: Option<&str>,
        task: Option<&str>,
        node: &str,
    ) -> Result<(), BrokerError> {
        let message = match std::str::from_utf8(&delivery.raw) {
            Ok(text) => json!({"message": text}),
            Err(_) => {
                use base64::Engine as _;
                json!({"message_base64": base64::engine::general_purpose::STANDARD.encode(&delivery.raw)})
            }
        };
        let mut entry = json!({
            "reason": reason,
            "task_id": task_id,
            "task": task,
            "queue": queue_of(&delivery.source),
            "worker": node,
            "time": crate::protocol::format_time(time::OffsetDateTime::now_utc()),
        });
        if let (Some(entry), serde_json::Value::Object(message)) = (entry.as_object_mut(), message)
        {
            entry.extend(message);
        }
        let entry = entry.to_string();
        self.settle_with(delivery, Move::Push(DEAD_LETTER_KEY, entry.as_bytes()))
            .await
    }

    /// Puts an unstarted message back at the consuming end of its list, in one transaction.
    pub async fn requeue(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        self.settle_with(delivery, Move::ToFront(&delivery.source, &delivery.raw))
            .await
    }

    /// Removes `delivery` from the in-flight list and makes `then` happen, in one step and only
    /// if it was still there: so a retry after a lost reply (a killed connection) never moves a
    /// message twice, and a message another worker already returned is left alone.
    async fn settle_with(&self, delivery: &Delivery, then: Move<'_>) -> Result<(), BrokerError> {
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
        invocation
            .invoke_async::<i64>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// The messages in this worker's in-flight lists for `sources`.
    pub async fn in_flight(&self, sources: &[String]) -> Result<Vec<Delivery>, BrokerError> {
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
    pub async fn delayed(&self, limit: usize) -> Result<Vec<(i64, Delivery)>, BrokerError> {
        let entries: Vec<(Vec<u8>, f64)> = self
            .conn
            .clone()
            .zrange_withscores(
                DELAYED_KEY,
                0,
                isize::try_from(limit).unwrap_or(isize::MAX) - 1,
            )
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
    pub async fn lengths(&self, queues: &[String]) -> Result<(Vec<u64>, u64, u64), BrokerError> {
        let mut pipe = redis::pipe();
        for queue in queues {
            for step in PRIORITY_STEPS {
                pipe.llen(queue_key(queue, step));
            }
        }
        pipe.zcard(DELAYED_KEY).llen(DEAD_LETTER_KEY);
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
    pub async fn move_due(&self, now_ms: i64) -> Result<(usize, Option<i64>), BrokerError> {
        let (moved, next): (usize, String) = self
            .move_due
            .key(DELAYED_KEY)
            .key(DEAD_LETTER_KEY)
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

/// Publishes a message as a producer: declares the queue's binding as kombu does, then pushes.
pub async fn publish(
    conn: &mut ConnectionManager,
    queue: &str,
    priority: u8,
    message: &[u8],
) -> Result<(), BrokerError> {
    let binding = format!("{queue}{PRIORITY_SEP}{PRIORITY_SEP}{queue}");
    redis::pipe()
        .cmd("SADD")
        .arg(format!("_kombu.binding.{queue}"))
        .arg(&binding)
        .ignore()
        .cmd("LPUSH")
        .arg(queue_key(queue, priority))
        .arg(message)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_priority_buckets_like_kombu() {
        assert_eq!(queue_key("celery", 0), "celery");
        assert_eq!(queue_key("celery", 2), "celery");
        assert_eq!(queue_key("celery", 5), "celery\x06\x163");
        assert_eq!(queue_key("celery", 9), "celery\x06\x169");
        assert_eq!(queue_key("celery", 200), "celery\x06\x169");
        assert_eq!(
            source_keys(&["celery".into(), "hi".into()])[..3],
            ["celery", "hi", "celery\x06\x163"]
        );
        assert_eq!(queue_of("hi\x06\x166"), "hi");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:pw@h/0"), "redis://u:***@h/0");
        assert_eq!(redact("redis://h:1/0"), "redis://h:1/0");
    }

    #[test]
    fn refuses_what_is_not_redis() {
        assert!(client("amqp://guest@localhost//").is_err());
        assert!(client("redis://127.0.0.1:1/0").is_ok());
    }
}
