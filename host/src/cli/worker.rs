//! `taskhost worker` and `taskhost dev`: settings resolved by `config`, signals counted, the
//! worker run; `dev` first starts a private redis-server when no broker is configured.

use super::dev;
use crate::config::{FileConfig, WorkerConfig, WorkerFlags};
use crate::redis::redact;
use std::future::Future;
use std::path::Path;

pub async fn worker(flags: &WorkerFlags) -> anyhow::Result<()> {
    let config = WorkerConfig::resolve(flags, None)?;
    note_celery_flags(flags);
    if std::process::id() == 1 {
        reap_orphans();
    }
    let signals = signals();
    crate::worker::run(config, signals.nth(1), signals.nth(2)).await
}

/// `taskhost dev`: the worker's flags, and plugin projects to rebuild on change.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub flags: WorkerFlags,
    /// A plugin project (Rust, Python or JavaScript) to build into the plugin directory now and
    /// again whenever its sources change; the worker hot-reloads it. May be given more than
    /// once.
    #[arg(long, value_name = "DIR")]
    pub watch: Vec<std::path::PathBuf>,
}

pub async fn dev(args: &DevArgs) -> anyhow::Result<()> {
    let flags = &args.flags;
    let (file, path) = FileConfig::load(flags.config.as_deref())?;
    if !args.watch.is_empty() {
        // Where the builds go; it may not exist yet.
        let plugins = crate::config::resolve::configured_plugins_dir(flags, &file, path.as_deref());
        std::fs::create_dir_all(&plugins)?;
    }
    let configured = flags.broker.is_some() || file.worker.broker_url.is_some();
    let redis = if configured {
        None
    } else {
        Some(dev::PrivateRedis::start().await?)
    };
    let dev_url = redis.as_ref().map(dev::PrivateRedis::url);
    let mut config = WorkerConfig::resolve(flags, dev_url.as_deref())?;
    // An edit's wait is what counts here, not a task's speed.
    config.compiler = crate::config::Compiler::Fast;
    for project in &args.watch {
        if let Some(name) = super::build::reads_sources_live(project)? {
            config.read_sources_live(&name, &project.canonicalize()?);
        }
    }
    note_celery_flags(flags);
    let _state = dev::StateFile::write(&config.broker_url)?;
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| {
            let cwd = std::env::current_dir().ok()?;
            Some(p.strip_prefix(&cwd).map(Path::to_path_buf).unwrap_or(p))
        })
        .map_or_else(|| "taskhost".to_owned(), |p| p.display().to_string());
    let origin = if redis.is_some() {
        "private redis-server, stops with this process"
    } else {
        "configured"
    };
    eprintln!(
        "\ntaskhost dev: broker {} ({origin}), plugins from {}\n\
         send a task from another terminal:\n    {exe} call demo.add --args '[2,3]' --wait\n\
         stop with Ctrl-C\n",
        redact(&config.broker_url),
        config.plugins_dir.display()
    );
    let _watchers = super::watch::start(&args.watch, &config.plugins_dir)?;
    let signals = signals();
    crate::worker::run(config, signals.nth(1), signals.nth(2)).await
}

/// Says, once each, which of Celery's worker options given mean nothing here.
fn note_celery_flags(flags: &WorkerFlags) {
    for note in flags.celery.notes() {
        tracing::info!("{note}");
    }
}

/// Counts SIGTERM and Ctrl-C (SIGINT) signals.
#[derive(Clone)]
struct Signals(tokio::sync::watch::Receiver<u32>);

/// Starts counting stop signals.
fn signals() -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot listen for SIGTERM and SIGINT; stop the worker with SIGKILL");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    Signals(rx)
}

impl Signals {
    /// Completes once `n` signals have come.
    fn nth(&self, n: u32) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|count| *count >= n).await;
        }
    }
}

/// As a container's PID 1, collects the exit status of every orphan the kernel hands it (a
/// process exec'd into the container whose parent exited first), which would otherwise stay a
/// zombie for the container's life. Only for `worker`: it starts no children of its own whose
/// status it would then take from their waiter.
fn reap_orphans() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut exits) = signal(SignalKind::child()) else {
        tracing::warn!("cannot listen for SIGCHLD: orphans handed to this PID 1 stay zombies");
        return;
    };
    tokio::spawn(async move {
        while exits.recv().await.is_some() {
            loop {
                let mut status = 0;
                // SAFETY: waitpid only collects an exited child's status into `status`, a
                // local; WNOHANG never blocks.
                #[allow(unsafe_code)]
                let pid = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
            }
        }
    });
}
