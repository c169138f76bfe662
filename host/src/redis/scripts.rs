//! Every Lua script the host runs, each a file in `scripts/` named for its atomic step with
//! its key count (bullmq's habit). Each file opens with its contract: what it does, `KEYS`,
//! `ARGV` and its output; callers and tests read the header, not the body.

use redis::Script;

/// Each script's function and its file.
macro_rules! scripts {
    ($($(#[$doc:meta])* $name:ident => $file:literal,)*) => {
        $(
            $(#[$doc])*
            pub fn $name() -> Script {
                Script::new(include_str!(concat!("scripts/", $file)))
            }
        )*

        /// Every script's file name and source, for naming one by its SHA-1.
        const ALL: &[(&str, &str)] = &[$(($file, include_str!(concat!("scripts/", $file)))),*];
    };
}

scripts! {
    /// Takes queued messages into the in-flight lists, without waiting.
    fetch => "fetch-n.lua",
    /// Moves due messages from the delayed set to their queues.
    move_due => "move_due-2.lua",
    /// Removes a message from its in-flight list and sends it on, only if it was still there.
    settle => "settle-2.lua",
    /// Returns a lapsed worker's in-flight messages to their queues.
    recover => "recover-2.lua",
    /// Stores and publishes task states, never over a SUCCESS or a REVOKED.
    store_results => "store_results-n.lua",
    /// Makes a plugin's previous deployed version current.
    rollback => "rollback-3.lua",
    /// Drops the oldest dead-letter entries past the cap, counting them.
    trim_dead => "trim_dead-2.lua",
    /// Moves one dead-letter entry's message back onto its queue.
    requeue_dead => "requeue_dead-2.lua",
    /// Records a chord header task's outcome once; claims the body when the header is complete.
    chord_part_return => "chord_part_return-6.lua",
    /// Deletes a completed chord's data and marks it done, if the caller still holds the claim.
    chord_cleanup => "chord_cleanup-5.lua",
    /// Takes a start under a fleet-wide rate limit, or says how long until the next one.
    fleet_rate => "fleet_rate-1.lua",
    /// Sends a schedule entry's tick unless it, or a later one, was sent already.
    schedule_tick => "schedule_tick-2.lua",
    /// Says whether any registered worker holds a task in one of its in-flight lists.
    in_flight_anywhere => "in_flight_anywhere-1.lua",
}

/// The file of the script whose SHA-1 is `sha`, as `EVALSHA` names it.
pub fn name_of(sha: &str) -> Option<&'static str> {
    ALL.iter()
        .find(|(_, source)| Script::new(source).get_hash() == sha)
        .map(|(file, _)| *file)
}
