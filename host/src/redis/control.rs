//! Remote control through Redis: the broadcast channel commands arrive on, the reply lists
//! answers are pushed to, and the revoked set (so a worker started after a revoke honours it).

use super::keys::{self, INFLIGHT, REPLY_TTL, REVOKED, WORKERS};
use super::{Client, Connection, RedisError, Subscription, scripts};
use redis::AsyncCommands;

/// Subscribes to the remote-control channel of `client`'s database.
pub async fn subscribe(client: &Client) -> Result<Subscription, RedisError> {
    Subscription::open(client, &keys::pidbox_channel(client.db())).await
}

/// Pushes `reply` (see `protocol::pidbox::reply`) to the caller's reply list, which expires if
/// nobody collects it.
pub async fn send_reply(
    conn: &mut Connection,
    routing_key: &str,
    reply: String,
) -> Result<(), RedisError> {
    let key = keys::reply_list(routing_key);
    let ttl = i64::try_from(REPLY_TTL.as_secs()).unwrap_or(60);
    redis::pipe()
        .lpush(&key, reply)
        .ignore()
        .expire(&key, ttl)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// The most revoked ids kept, as Celery's worker keeps (`maxlen` of its revoked set): past it,
/// those forgotten soonest go first.
pub const MAX_REVOKED: usize = 50_000;

/// Records revoked task ids, remembered until `until_ms` (ms since the epoch), keeping the
/// set within [`MAX_REVOKED`].
pub async fn record_revoked(
    conn: &mut Connection,
    ids: &[String],
    until_ms: i64,
) -> Result<(), RedisError> {
    let mut pipe = redis::pipe();
    for chunk in ids.chunks(1_000) {
        let members: Vec<(i64, &String)> = chunk.iter().map(|id| (until_ms, id)).collect();
        pipe.zadd_multiple(REVOKED, &members).ignore();
    }
    let keep = isize::try_from(MAX_REVOKED).unwrap_or(isize::MAX);
    pipe.zremrangebyrank(REVOKED, 0, -keep - 1).ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(())
}

/// Forgets revokes that expired by `now_ms` and returns those remembered until `from_ms` or
/// later (all of them: `now_ms`): (task id, remembered until, ms since the epoch). Every
/// revoke is remembered for the same time, so those recorded since a last read are the ones
/// remembered until its latest or later.
pub async fn revoked(
    conn: &mut Connection,
    now_ms: i64,
    from_ms: i64,
) -> Result<Vec<(String, i64)>, RedisError> {
    let () = conn.zrembyscore(REVOKED, "-inf", now_ms).await?;
    let current: Vec<(String, f64)> = conn
        .zrangebyscore_withscores(REVOKED, from_ms.max(now_ms), "+inf")
        .await?;
    Ok(current
        .into_iter()
        .map(|(id, until)| (id, until as i64))
        .collect())
}

/// Which of `task_ids` some worker has taken (their messages are in in-flight lists): it
/// then settles each itself, by the task's outcome or, if it meets the revoke before running
/// it, as REVOKED. One script call per [`IDS_PER_CALL`] ids, each reading every in-flight
/// list once.
pub async fn in_flight_anywhere(
    conn: &mut Connection,
    task_ids: &[String],
) -> Result<std::collections::HashSet<String>, RedisError> {
    let mut held = std::collections::HashSet::new();
    let script = scripts::in_flight_anywhere();
    for chunk in task_ids.chunks(IDS_PER_CALL) {
        let mut invocation = script.prepare_invoke();
        invocation.key(WORKERS).arg(INFLIGHT);
        for id in chunk {
            invocation.arg(id);
        }
        let found: Vec<String> = invocation.invoke_async(conn).await?;
        held.extend(found);
    }
    Ok(held)
}

/// Task ids one in-flight search takes: a script call stays short (Redis runs nothing else
/// meanwhile), however many ids a revoke names.
const IDS_PER_CALL: usize = 1_000;
