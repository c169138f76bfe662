//! `taskhost check`: what an operator asks before traffic arrives — would a worker started
//! with these settings work, here, against these Redis servers? One line per check, each
//! passed, warned about (the worker runs, but something is risky) or failed (the worker would
//! stop, or lose or refuse tasks).
//!
//! - [`servers`]: each Redis reachable, the ACL commands and keys the worker uses, eviction,
//!   persistence, clock skew.
//! - [`plugins`]: plugins loadable under their grants, granted origins against the
//!   private-address policy, schedules and their next runs, fleet trust.
//!
//! Nothing here writes what a worker or producer reads: the ACL probes are writes that change
//! nothing (`LREM` of a value no list holds, `DEL` of a key no one uses).

mod plugins;
mod servers;

use crate::config::{WorkerConfig, WorkerFlags};
use serde::Serialize;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One line of the report: what was checked, how it came out, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

/// Every check, in the order run.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    fn add(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            status,
            detail: detail.into(),
        });
    }

    fn ok(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.add(name, Status::Ok, detail);
    }

    fn warn(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.add(name, Status::Warn, detail);
    }

    fn fail(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.add(name, Status::Fail, detail);
    }

    /// Whether a worker started with these settings would work: no check failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    /// The report as lines for a terminal: `ok`, `WARN` or `FAIL`, the check, the detail.
    pub fn lines(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for check in &self.checks {
            let status = match check.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            out.push_str(&format!(
                "{status}  {:<width$}  {}\n",
                check.name, check.detail
            ));
        }
        let (warned, failed) = self.checks.iter().fold((0, 0), |(w, f), c| match c.status {
            Status::Ok => (w, f),
            Status::Warn => (w + 1, f),
            Status::Fail => (w, f + 1),
        });
        out.push_str(&match (failed, warned) {
            (0, 0) => "all checks passed\n".to_owned(),
            (0, w) => format!("passed, with {w} warning(s)\n"),
            (f, _) => format!("{f} check(s) failed: a worker started so would not work\n"),
        });
        out
    }
}

/// Checks the worker `flags` (with the environment and config file, as `taskhost worker`
/// resolves them) describe.
pub async fn run(flags: &WorkerFlags) -> Report {
    let mut report = Report::default();
    let config = match WorkerConfig::resolve(flags, None) {
        Ok(config) => config,
        Err(e) => {
            report.fail("config", format!("{e:#}"));
            return report;
        }
    };
    report.ok("config", describe(&config));
    servers::check(&config, &mut report).await;
    plugins::check(&config, &mut report).await;
    report
}

fn describe(config: &WorkerConfig) -> String {
    let file = config
        .config_path
        .as_ref()
        .map_or_else(|| "no config file".to_owned(), |p| p.display().to_string());
    format!(
        "{file}: node {}, queues {}, {} slot(s), plugins from {}",
        config.node,
        config.queues.join(","),
        config.concurrency,
        config.plugins_dir.display()
    )
}
