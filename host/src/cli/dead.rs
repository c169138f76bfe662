//! `taskhost dead`: the dead-letter list, for operators.

use super::fleet::{BrokerArgs, connect};
use crate::redis::deadletter;
use crate::redis::keys::queue_of;
use anyhow::bail;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// One line per entry, newest first (index, time, task, id, queue, reason).
    List {
        /// Entries to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// One entry in full, with its raw message.
    Show {
        /// Its index in `dead list`.
        index: usize,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Push entries' messages back onto their queues and remove the entries.
    Requeue {
        /// Indexes in `dead list`.
        #[arg(required_unless_present = "all")]
        index: Vec<usize>,
        /// Every entry.
        #[arg(long, conflicts_with = "index")]
        all: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Delete every entry.
    Purge {
        /// Confirm: the entries cannot be recovered.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

pub async fn dead(command: DeadCommand) -> anyhow::Result<()> {
    match command {
        DeadCommand::List { limit, broker } => {
            let (_, mut conn) = connect(&broker).await?;
            let total = deadletter::count(&mut conn).await?;
            for entry in deadletter::list(&mut conn, limit).await? {
                println!("{}", entry.summary());
            }
            println!(
                "{total} dead-letter entr{}",
                if total == 1 { "y" } else { "ies" }
            );
            let dropped = deadletter::dropped(&mut conn).await?;
            if dropped > 0 {
                println!("{dropped} older entries were dropped over [worker] dead_letter_max");
            }
        }
        DeadCommand::Show { index, broker } => {
            let (_, mut conn) = connect(&broker).await?;
            let entry = deadletter::show(&mut conn, index).await?;
            let shown = serde_json::to_string_pretty(&entry.doc).unwrap_or(entry.raw);
            println!("{shown}");
        }
        DeadCommand::Requeue { index, all, broker } => {
            let (_, mut conn) = connect(&broker).await?;
            let mut indexes = if all {
                (0..deadletter::count(&mut conn).await?).collect()
            } else {
                index
            };
            // Highest first: removing an entry shifts the ones after it.
            indexes.sort_unstable_by(|a, b| b.cmp(a));
            indexes.dedup();
            for index in indexes {
                let target = deadletter::requeue(&mut conn, index).await?;
                println!("requeued entry {index} onto {}", queue_of(&target));
            }
        }
        DeadCommand::Purge { yes, broker } => {
            if !yes {
                bail!("purge deletes every dead-letter entry for good: add --yes to confirm");
            }
            let (_, mut conn) = connect(&broker).await?;
            let purged = deadletter::purge(&mut conn).await?;
            println!("purged {purged} dead-letter entries");
        }
    }
    Ok(())
}
