//! `taskhost beat` (the scheduler alone, for operators who keep Celery's layout of one beat
//! process beside the workers) and `taskhost schedule list`. Every worker runs the same
//! scheduler unless started with `--no-beat`; running `beat` as well is harmless, since each
//! tick is sent once across all of them.

use super::fleet::BrokerArgs;
use crate::config::FileConfig;
use crate::config::schedule::Entry;
use crate::redis::Broker;
use crate::worker::beat;
use anyhow::Context as _;
use clap::{Args, Subcommand};
use jiff::Timestamp;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct BeatArgs {
    /// The config file holding the `[schedule]` entries [default: ./taskhost.toml].
    #[arg(long, env = "TASKHOST_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Each `[schedule]` entry: its task, when it runs, its last and next run.
    List(BeatArgs),
}

/// The entries of the config file, and the broker they are sent through (the flag, then
/// `CELERY_BROKER_URL`, then the file's `[worker] broker_url`, then a running `taskhost dev`).
async fn open(args: &BeatArgs) -> anyhow::Result<(Vec<Entry>, Option<PathBuf>, Broker)> {
    let (file, path) = FileConfig::load(args.config.as_deref())?;
    let entries = file.schedule()?;
    let url = args
        .broker
        .broker
        .clone()
        .or_else(|| file.worker.broker_url.clone())
        .or_else(super::dev::running_broker)
        .context("no broker: pass --broker redis://HOST:PORT/DB or set CELERY_BROKER_URL")?;
    let node = format!("beat@{}", crate::node::machine_hostname());
    let broker = Broker::connect(&url, &node).await?;
    Ok((entries, path, broker))
}

pub async fn beat(args: &BeatArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (entries, path, broker) = open(args).await?;
    if entries.is_empty() {
        tracing::warn!(
            "no [schedule] entries: nothing to send until the file has some (SIGHUP reloads it)"
        );
    }
    tracing::info!(
        entries = entries.len(),
        "beat: sending the schedule's ticks"
    );
    let (entries_tx, entries_rx) = tokio::sync::watch::channel(Arc::new(entries));
    let (stop_tx, stop_rx) = crate::shutdown::flag();
    let mut scheduler = tokio::spawn(beat::run(broker, beat::SystemClock, entries_rx, stop_rx));
    let (mut term, mut int, mut hup) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
        signal(SignalKind::hangup())?,
    );
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let reloaded = FileConfig::load(path.as_deref()).and_then(|(f, _)| f.schedule());
                match reloaded {
                    Ok(entries) => {
                        tracing::info!(entries = entries.len(), "schedule reloaded");
                        entries_tx.send_replace(Arc::new(entries));
                    }
                    Err(e) => tracing::error!("schedule reload refused, the previous one stays: {e}"),
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    // A scheduler waiting on an unreachable Redis is stopped where it stands: each tick is one
    // atomic script, so nothing is left half sent.
    if tokio::time::timeout(std::time::Duration::from_secs(5), &mut scheduler)
        .await
        .is_err()
    {
        scheduler.abort();
    }
    Ok(())
}

pub async fn schedule(command: ScheduleCommand) -> anyhow::Result<()> {
    let ScheduleCommand::List(args) = command;
    let (entries, _, broker) = open(&args).await?;
    let last = broker.schedule_last_runs().await?;
    let now = Timestamp::now();
    println!(
        "{:<24} {:<36} {:<32} {:<26} NEXT",
        "NAME", "TASK", "WHEN", "LAST"
    );
    for entry in &entries {
        let last_run = last
            .get(&entry.name)
            .and_then(|ms| Timestamp::from_millisecond(*ms).ok())
            .map_or_else(|| "never".to_owned(), |t| t.to_string());
        let next = entry
            .when
            .next_after(now)
            .map_or_else(|| "never".to_owned(), |t| t.to_string());
        println!(
            "{:<24} {:<36} {:<32} {:<26} {next}",
            entry.name,
            entry.task,
            entry.when.describe(),
            last_run
        );
    }
    Ok(())
}
