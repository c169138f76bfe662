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

/// Records revoked task ids, remembered until `until_ms` (ms since the epoch).
pub async fn record_revoked(
    conn: &mut Connection,
    ids: &[String],
    until_ms: i64,
) -> Result<(), RedisError> {
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.zadd(REVOKED, id, until_ms).ignore();
    }
    pipe.query_async::<()>(conn).await?;
    Ok(())
}

/// Forgets revokes that expired by `now_ms` and returns the others: (task id, remembered
/// until, ms since the epoch).
pub async fn revoked(conn: &mut Connection, now_ms: i64) -> Result<Vec<(String, i64)>, RedisError> {
    let () = conn.zrembyscore(REVOKED, "-inf", now_ms).await?;
    let current: Vec<(String, f64)> = conn
        .zrangebyscore_withscores(REVOKED, now_ms, "+inf")
        .await?;
    Ok(current
        .into_iter()
        .map(|(id, until)| (id, until as i64))
        .collect())
}

/// Whether some worker has taken task `task_id` (its message is in an in-flight list): it
/// then settles the task itself, by the task's outcome or, if it meets the revoke before
/// running it, as REVOKED.
pub async fn in_flight_anywhere(conn: &mut Connection, task_id: &str) -> Result<bool, RedisError> {
    let found: i64 = scripts::in_flight_anywhere()
        .key(WORKERS)
        .arg(INFLIGHT)
        .arg(task_id)
        .invoke_async(conn)
        .await?;
    Ok(found == 1)
}
