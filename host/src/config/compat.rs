//! Celery worker options that mean nothing for this worker, accepted so that an operator's
//! existing `celery worker` command line starts as it is; each given is logged once, saying
//! why it has no effect.

use clap::Args;

/// The accepted-and-ignored Celery worker options.
#[derive(Debug, Default, Args)]
pub struct CeleryFlags {
    /// Accepted for Celery's command line, no effect (Celery's `-O fair`: this worker fetches
    /// only for its free slots and prefetch allowance already).
    #[arg(short = 'O', value_name = "OPTIMIZATION")]
    pub optimization: Option<String>,
    /// Accepted for Celery's command line, no effect (there is no gossip between workers).
    #[arg(long)]
    pub without_gossip: bool,
    /// Accepted for Celery's command line, no effect (there is no start-up sync between workers).
    #[arg(long)]
    pub without_mingle: bool,
    /// Accepted for Celery's command line, no effect (heartbeats are kept: crash recovery and
    /// Flower need them).
    #[arg(long)]
    pub without_heartbeat: bool,
    /// Accepted for Celery's command line, no effect (every task runs in its own WebAssembly
    /// instance; -c sets how many at once).
    #[arg(short = 'P', long = "pool", value_name = "POOL")]
    pub pool: Option<String>,
    /// Accepted for Celery's command line, no effect (every worker sends the `[schedule]`
    /// entries unless --no-beat; each tick goes out once across the fleet).
    #[arg(short = 'B', long = "beat")]
    pub beat: bool,
}

impl CeleryFlags {
    /// One line for each option given: what it is, and why it does nothing here.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(o) = &self.optimization {
            notes.push(format!(
                "-O {o}: no effect; this worker fetches only for its free slots and prefetch \
                 allowance, what -O fair does for Celery's prefork pool"
            ));
        }
        if self.without_gossip {
            notes.push("--without-gossip: no effect; this worker has no gossip".into());
        }
        if self.without_mingle {
            notes.push("--without-mingle: no effect; this worker has no start-up mingle".into());
        }
        if self.without_heartbeat {
            notes.push(
                "--without-heartbeat: ignored; heartbeats are still sent, crash recovery and \
                 Flower depend on them"
                    .into(),
            );
        }
        if let Some(pool) = &self.pool {
            notes.push(format!(
                "--pool {pool}: no effect; every task runs in its own WebAssembly instance, -c \
                 sets how many run at once"
            ));
        }
        if self.beat {
            notes.push(
                "-B/--beat: no effect; every worker sends the [schedule] entries unless \
                 --no-beat, each tick once across the fleet"
                    .into(),
            );
        }
        notes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        celery: CeleryFlags,
    }

    #[test]
    fn celerys_flags_without_meaning_are_accepted_and_each_noted_once() {
        let cli = Cli::try_parse_from([
            "worker",
            "-O",
            "fair",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-P",
            "prefork",
            "-B",
        ])
        .expect("Celery's flags parse");
        let notes = cli.celery.notes();
        assert_eq!(notes.len(), 6, "{notes:#?}");
        assert!(notes[0].starts_with("-O fair: no effect"));
        assert!(notes[4].starts_with("--pool prefork: no effect"));
        let none = Cli::try_parse_from(["worker"]).expect("parses");
        assert!(none.celery.notes().is_empty());
    }
}
