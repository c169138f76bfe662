//! Every Lua script the host runs, each a file in `scripts/` named for its atomic step with
//! its key count (bullmq's habit). Each file opens with its contract: what it does, `KEYS`,
//! `ARGV` and its output; callers and tests read the header, not the body.

use redis::Script;

/// Takes queued messages into the in-flight lists, without waiting.
pub fn fetch() -> Script {
    Script::new(include_str!("scripts/fetch-n.lua"))
}

/// Moves due messages from the delayed set to their queues.
pub fn move_due() -> Script {
    Script::new(include_str!("scripts/move_due-2.lua"))
}

/// Removes a message from its in-flight list and sends it on, only if it was still there.
pub fn settle() -> Script {
    Script::new(include_str!("scripts/settle-2.lua"))
}

/// Returns a lapsed worker's in-flight messages to their queues.
pub fn recover() -> Script {
    Script::new(include_str!("scripts/recover-2.lua"))
}

/// Stores and publishes a task state, never over a SUCCESS.
pub fn store_result() -> Script {
    Script::new(include_str!("scripts/store_result-1.lua"))
}

/// Makes a plugin's previous deployed version current.
pub fn rollback() -> Script {
    Script::new(include_str!("scripts/rollback-3.lua"))
}

/// Drops the oldest dead-letter entries past the cap, counting them.
pub fn trim_dead() -> Script {
    Script::new(include_str!("scripts/trim_dead-2.lua"))
}

/// Moves one dead-letter entry's message back onto its queue.
pub fn requeue_dead() -> Script {
    Script::new(include_str!("scripts/requeue_dead-2.lua"))
}

/// Records a chord header task's outcome once; claims the body when the header is complete.
pub fn chord_part_return() -> Script {
    Script::new(include_str!("scripts/chord_part_return-6.lua"))
}

/// Deletes a completed chord's data and marks it done, if the caller still holds the claim.
pub fn chord_cleanup() -> Script {
    Script::new(include_str!("scripts/chord_cleanup-5.lua"))
}

/// Takes a start under a fleet-wide rate limit, or says how long until the next one.
pub fn fleet_rate() -> Script {
    Script::new(include_str!("scripts/fleet_rate-1.lua"))
}

/// Sends a schedule entry's tick unless it, or a later one, was sent already.
pub fn schedule_tick() -> Script {
    Script::new(include_str!("scripts/schedule_tick-2.lua"))
}

/// Says whether any registered worker holds a task in one of its in-flight lists.
pub fn in_flight_anywhere() -> Script {
    Script::new(include_str!("scripts/in_flight_anywhere-1.lua"))
}
