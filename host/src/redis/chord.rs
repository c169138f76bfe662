//! A chord's header counted on the result backend exactly as Celery 5.7's Redis backend counts
//! it (`on_chord_part_return`, `set_chord_size`; its Lua scripts verbatim in `scripts/`), so a
//! chord whose header runs partly on Python workers and partly on taskhost completes once.

use super::keys::taskset_key;
use super::{Backend, RedisError, scripts};
use crate::protocol::PartOutcome;

/// How long a claim on calling a chord's body lasts: Celery's `max(5, 2 x join timeout 3 s)`.
const CLAIM_SECONDS: u64 = 6;
/// How long the `done` marker keeps late duplicates out: Celery's `max(2 x claim, 300)`.
const DONE_SECONDS: u64 = 300;

/// One header task's outcome.
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    pub group_id: &'a str,
    pub task_id: &'a str,
    /// Its `group_index`: the order the body receives the results in.
    pub index: Option<u64>,
    pub state: &'a str,
    /// The stored result (JSON text): a value, or an exception document.
    pub result: &'a str,
}

/// Where a chord stands after a part returned.
#[derive(Debug, PartialEq)]
pub enum Joined {
    /// Parts are still out (or the producer has not written the size yet).
    Pending,
    /// The chord was completed before: this part is a late duplicate.
    Done,
    /// This caller claimed the body: every part's `[1, id, state, result]`, in header order.
    Claimed { parts: Vec<String>, token: String },
}

impl Backend {
    /// Records `part` and, when the header is complete and the claim is this caller's, reads
    /// every part's outcome.
    pub async fn chord_part_return(&self, part: &Part<'_>) -> Result<Joined, RedisError> {
        let key = |suffix| taskset_key(part.group_id, suffix);
        let score = part.index.map_or("+inf".to_owned(), |i| i.to_string());
        let encoded = PartOutcome::encode(part.task_id, part.state, part.result);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut conn = self.connection();
        let (ready, _, _, claimed): (i64, Option<String>, Option<String>, i64) =
            scripts::chord_part_return()
                .key(key(".j"))
                .key(key(".t"))
                .key(key(".s"))
                .key(key(".d"))
                .key(key(""))
                .key(key(".c"))
                .arg(part.task_id)
                .arg(encoded)
                .arg(1)
                .arg(score)
                .arg(self.expires())
                .arg(self.expires())
                .arg(CLAIM_SECONDS)
                .arg(&token)
                .invoke_async(&mut conn)
                .await?;
        if ready == -1 {
            return Ok(Joined::Done);
        }
        if claimed != 1 {
            return Ok(Joined::Pending);
        }
        let parts: Vec<String> = redis::cmd("ZRANGE")
            .arg(key(".j"))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        Ok(Joined::Claimed { parts, token })
    }

    /// After the body is published: deletes the chord's data and marks it done. False if the
    /// claim had lapsed meanwhile (the data is then left to expire).
    pub async fn chord_cleanup(&self, group_id: &str, token: &str) -> Result<bool, RedisError> {
        let key = |suffix| taskset_key(group_id, suffix);
        let cleaned: i64 = scripts::chord_cleanup()
            .key(key(".c"))
            .key(key(".j"))
            .key(key(".t"))
            .key(key(".s"))
            .key(key(".d"))
            .arg(token)
            .arg(DONE_SECONDS)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(cleaned == 1)
    }

    /// Writes a chord's size before its last header task is published, as Celery's publisher
    /// does (a new run of a frozen chord reuses its group id, so the old claim goes first).
    pub async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(taskset_key(group_id, ".c")).ignore();
        let set = pipe.cmd("SET").arg(taskset_key(group_id, ".s")).arg(size);
        if self.expires() > 0 {
            set.arg("EX").arg(self.expires());
        }
        set.ignore();
        self.run(&pipe).await
    }

    /// Forgets a failed chord's size, so a late copy of a header task cannot fail it again.
    pub async fn drop_chord_size(&self, group_id: &str) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(taskset_key(group_id, ".s")).ignore();
        self.run(&pipe).await
    }
}
