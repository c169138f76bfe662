//! Every Redis key and channel name the host reads or writes, in one place: kombu's and
//! Celery's (which producers and monitors share with us) and taskhost's own (`taskhost:*`).
//!
//! Pub/Sub ignores database numbers, so channel names carry the database, as kombu's do.

use std::time::Duration;

// --- kombu: queues, bindings, remote control, events -------------------------------------

/// kombu's separator between a queue name and its priority bucket.
pub const PRIORITY_SEP: &str = "\x06\x16";
/// kombu's default `priority_steps`.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

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

/// The set kombu declares a queue's binding in, and the binding itself (direct exchange of
/// the queue's name).
pub fn binding(queue: &str) -> (String, String) {
    (
        format!("_kombu.binding.{queue}"),
        format!("{queue}{PRIORITY_SEP}{PRIORITY_SEP}{queue}"),
    )
}

/// The remote-control broadcast channel of database `db`.
pub fn pidbox_channel(db: i64) -> String {
    format!("/{db}.celery.pidbox")
}

/// The list a remote-control reply is pushed to, for the caller's reply routing key.
pub fn reply_list(routing_key: &str) -> String {
    format!("{routing_key}.reply.celery.pidbox")
}

/// How long an uncollected reply list is kept: clients wait seconds for replies, and Flower's
/// have grown without bound when nothing expired them.
pub const REPLY_TTL: Duration = Duration::from_secs(60);

/// The channel of monitoring events with `routing_key` (`task.multi`, `worker.heartbeat`) in
/// database `db`.
pub fn event_channel(db: i64, routing_key: &str) -> String {
    format!("/{db}.celeryev/{routing_key}")
}

// --- Celery's result backend ---------------------------------------------------------------

/// The key (and channel) of a task's result.
pub fn result_key(task_id: &str) -> String {
    format!("celery-task-meta-{task_id}")
}

/// The key of a group's saved result (`GroupResult.save()`); with a suffix, one of the keys a
/// chord counts its header in: `.j` the parts' outcomes (ZSET by `group_index`), `.t` parts
/// added later, `.s` the size the publisher wrote, `.d` parts seen (`<id>:<index>`), `.c` the
/// claim on calling the body, then `done`.
pub fn taskset_key(group_id: &str, suffix: &str) -> String {
    format!("celery-taskset-meta-{group_id}{suffix}")
}

// --- taskhost's own ------------------------------------------------------------------------

/// LIST per worker and source: messages the worker fetched from that list and has not
/// settled, so recovery knows where each goes back. This is the prefix; the source list's key
/// completes the name.
pub fn inflight_prefix(node: &str) -> String {
    format!("{INFLIGHT}{node}:")
}

/// What every in-flight list's name starts with; the node and source complete it.
pub const INFLIGHT: &str = "taskhost:inflight:";

/// ZSET: `<queue key>\n<message>` scored by when it is due (ms since the epoch): messages with
/// an `eta` in the future, and tasks waiting out a rate limit or a plugin's `max_instances`.
pub const DELAYED: &str = "taskhost:delayed";

/// LIST: JSON entries for messages that cannot be run, with the reason (newest first).
pub const DEAD: &str = "taskhost:dead";

/// STRING: how many dead-letter entries were dropped, oldest first, over `dead_letter_max`.
pub const DEAD_DROPPED: &str = "taskhost:dead-dropped";

/// HASH: node → the worker's registry entry (heartbeat, the lists it fetches from, process).
pub const WORKERS: &str = "taskhost:workers";

/// Prefix of the STRING counting how often a message (by delivery tag) was returned from dead
/// workers (`taskhost:redelivered:<tag>`, expiring).
pub const REDELIVERED_PREFIX: &str = "taskhost:redelivered:";

/// ZSET: revoked task ids, scored by when the revoke is forgotten (ms since the epoch).
pub const REVOKED: &str = "taskhost:revoked";

/// STRING per task name with a fleet rate limit: when its next start is allowed
/// (microseconds since the epoch on Redis's clock), expiring once that has passed.
pub fn fleet_rate(task: &str) -> String {
    format!("taskhost:fleet-rate:{task}")
}

/// HASH: schedule entry name → its last tick sent (ms since the epoch), shared by every
/// worker's scheduler: a tick is sent only if it is later than this.
pub const SCHEDULE_LAST: &str = "taskhost:schedule:last";

/// HASH: plugin name → the SHA-256 of its deployed version.
pub const DEPLOYED: &str = "taskhost:deployed";

/// STRING: a deployed plugin's bytes, by SHA-256.
pub fn plugin_blob(digest: &str) -> String {
    format!("taskhost:plugin-blob:{digest}")
}

/// HASH: plugin name → the signed record of its deployed version (`signing::DeployRecord`
/// JSON); no field: the deploy is unsigned.
pub const DEPLOY_RECORDS: &str = "taskhost:deploy-records";

/// LIST: the SHA-256 of a plugin's deployed versions, newest first, for rollbacks.
pub fn deploy_history(name: &str) -> String {
    format!("taskhost:deploy-history:{name}")
}

/// Prefix of the HASH each worker keeps of the plugin versions it runs
/// (`taskhost:running:<node>`, expiring unless refreshed).
pub const RUNNING_PREFIX: &str = "taskhost:running:";

/// The deploy notice channel of database `db`.
pub fn deploy_channel(db: i64) -> String {
    format!("/{db}.taskhost:deploy")
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
}
