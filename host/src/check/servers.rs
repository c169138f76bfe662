//! Each Redis the worker would use: that it answers (over TLS, through Sentinel, as the URL
//! says), that its ACL user may run the commands on the keys and channels the worker uses,
//! that it does not evict, that it persists, and that its clock agrees with this machine's.

use super::Report;
use crate::config::WorkerConfig;
use crate::redis::keys::{self, DEAD, DELAYED, REVOKED, SCHEDULE_LAST, WORKERS};
use crate::redis::probe::{self, Probe};
use crate::redis::{Client, Connection, eviction, redact};
use std::time::Duration;

/// How long connecting may take before the Redis counts as not answering.
const ANSWER: Duration = Duration::from_secs(10);
/// Clock skew beyond which etas, countdowns and schedule ticks run visibly off.
const SKEW_WARN_MS: i64 = 500;
/// Clock skew beyond which they run wrong: a failure.
const SKEW_FAIL_MS: i64 = 5_000;

pub(super) async fn check(config: &WorkerConfig, report: &mut Report) {
    let Some(broker) = connect(report, "broker", &config.broker_url).await else {
        return;
    };
    let backend = if config.backend_url == config.broker_url {
        None
    } else {
        match connect(report, "backend", &config.backend_url).await {
            Some(backend) => Some(backend),
            None => return,
        }
    };
    let (client, mut conn) = broker;
    let refused = probe::refusals(&mut conn, &client, &broker_probes(config, client.db())).await;
    acl_line(report, "broker acl", &client, refused);
    let (backend_client, mut backend_conn) = backend
        .clone()
        .unwrap_or_else(|| (client.clone(), conn.clone()));
    let refused = probe::refusals(&mut backend_conn, &backend_client, &backend_probes()).await;
    acl_line(report, "backend acl", &backend_client, refused);
    let mut servers = vec![("broker", conn)];
    if let Some((_, conn)) = backend {
        servers.push(("backend", conn));
    }
    for (role, mut conn) in servers {
        eviction_line(report, role, &mut conn).await;
        persistence_line(report, role, &mut conn).await;
        clock_line(report, role, &mut conn).await;
    }
}

/// A client and connection to `url`, or a failed check saying why not.
async fn connect(report: &mut Report, role: &str, url: &str) -> Option<(Client, Connection)> {
    match tokio::time::timeout(ANSWER, crate::redis::connect(url)).await {
        Ok(Ok((client, conn))) => {
            let mut how = Vec::new();
            if client.uses_tls() {
                how.push("over TLS");
            }
            if client.follows_failover() {
                how.push("through Sentinel");
            }
            let user = client.user().unwrap_or("default");
            report.ok(
                role,
                format!(
                    "{} answers{}{}, as ACL user {user:?}",
                    redact(url),
                    if how.is_empty() { "" } else { " " },
                    how.join(", ")
                ),
            );
            Some((client, conn))
        }
        Ok(Err(e)) => {
            report.fail(role, format!("{}: {e}", redact(url)));
            None
        }
        Err(_) => {
            report.fail(
                role,
                format!(
                    "{} did not answer within {} s",
                    redact(url),
                    ANSWER.as_secs()
                ),
            );
            None
        }
    }
}

/// A value and key part no worker or producer uses.
fn nobody() -> String {
    format!("taskhost-check-{}", uuid::Uuid::new_v4())
}

fn cmd(name: &str, args: &[&str]) -> Probe {
    Probe::command(name, args)
}

/// The broker's commands, keys and channels, as the worker `config` describes uses them.
fn broker_probes(config: &WorkerConfig, db: i64) -> Vec<Probe> {
    let none = nobody();
    let inflight = format!("{}{none}", keys::inflight_prefix(&config.node));
    let mut probes = vec![
        cmd("TIME", &[]),
        // The worker's scripts: loaded once, then run by digest.
        cmd("SCRIPT", &["LOAD", "return 1"]),
        cmd(
            "EVALSHA",
            &["e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"],
        ),
        // A fetch: a blocking move into the worker's in-flight list.
        cmd("BLMOVE", &[&inflight, &inflight, "LEFT", "RIGHT", "0.01"]),
        cmd("LREM", &[DEAD, "0", &none]),
        cmd("ZREM", &[DELAYED, &none]),
        cmd("ZREM", &[REVOKED, &none]),
        cmd("HDEL", &[WORKERS, &none]),
        cmd("DEL", &[&format!("{}{none}", keys::REDELIVERED_PREFIX)]),
        cmd("DEL", &[&keys::reply_list(&none)]),
        Probe::channel(keys::pidbox_channel(db)),
        Probe::channel(keys::event_channel(db, "worker.heartbeat")),
    ];
    for key in keys::source_keys(&config.queues) {
        probes.push(cmd("LREM", &[&key, "0", &none]));
    }
    for queue in &config.queues {
        let (binding, _) = keys::binding(queue);
        probes.push(cmd("SREM", &[&binding, &none]));
    }
    if config.schedule.as_ref().is_some_and(|s| !s.is_empty()) {
        probes.push(cmd("HDEL", &[SCHEDULE_LAST, &none]));
    }
    if config.fleet {
        probes.push(cmd("HLEN", &[keys::DEPLOYED]));
        probes.push(cmd("STRLEN", &[&keys::plugin_blob(&none)]));
        probes.push(cmd("DEL", &[&format!("{}{none}", keys::RUNNING_PREFIX)]));
        probes.push(Probe::channel(keys::deploy_channel(db)));
    }
    if config.wait_replicas > 0 {
        probes.push(cmd("WAIT", &["0", "1"]));
    }
    probes
}

/// The result backend's: results, group results and chord counters, their channels.
fn backend_probes() -> Vec<Probe> {
    let none = nobody();
    vec![
        cmd("SCRIPT", &["LOAD", "return 1"]),
        cmd("DEL", &[&keys::result_key(&none)]),
        cmd("DEL", &[&keys::taskset_key(&none, "")]),
        cmd("PUBLISH", &[&keys::result_key(&none), ""]),
    ]
}

fn acl_line(report: &mut Report, name: &str, client: &Client, refused: Vec<String>) {
    let user = client.user().unwrap_or("default");
    if refused.is_empty() {
        report.ok(
            name,
            format!("user {user:?} may run what the worker runs, on its keys and channels"),
        );
    } else {
        report.fail(
            name,
            format!(
                "{} (README: Redis ACL users has the recipe)",
                refused.join("; ")
            ),
        );
    }
}

async fn eviction_line(report: &mut Report, role: &str, conn: &mut Connection) {
    let name = format!("{role} eviction");
    match eviction::read(conn).await {
        Ok(Some(reading)) => match eviction::evicts(&reading.policy) {
            None => report.ok(
                name,
                "maxmemory-policy noeviction: a full Redis refuses writes",
            ),
            Some(what) => report.warn(
                name,
                format!(
                    "maxmemory-policy {}: when full, Redis deletes {what}; set noeviction",
                    reading.policy
                ),
            ),
        },
        Ok(None) => report.warn(name, "INFO does not say the eviction policy"),
        Err(e) => report.warn(name, format!("cannot read the eviction policy: {e}")),
    }
}

async fn persistence_line(report: &mut Report, role: &str, conn: &mut Connection) {
    let name = format!("{role} persistence");
    match probe::aof_enabled(conn).await {
        Ok(true) => {
            report.ok(
                name,
                "appendonly yes: what Redis accepted survives its restart",
            );
        }
        Ok(false) => report.warn(
            name,
            "appendonly no: a Redis restart loses the tasks and results accepted since its last \
             snapshot; set appendonly yes",
        ),
        Err(e) => report.warn(name, format!("cannot read persistence: {e}")),
    }
}

async fn clock_line(report: &mut Report, role: &str, conn: &mut Connection) {
    let name = format!("{role} clock");
    let before = crate::clock::now_ms();
    let time = probe::time_ms(conn).await;
    let after = crate::clock::now_ms();
    let redis_ms = match time {
        Ok(ms) => ms,
        Err(e) => {
            report.warn(name, format!("cannot read Redis's TIME: {e}"));
            return;
        }
    };
    // This machine's clock at the moment Redis answered, as near as one round trip tells.
    let skew = (before + after) / 2 - redis_ms;
    let said = format!(
        "this machine's clock is {:.1} s {} Redis's",
        skew.abs() as f64 / 1000.0,
        if skew >= 0 { "ahead of" } else { "behind" }
    );
    let effect =
        "etas, countdowns and schedule ticks run that far off; heartbeats use Redis's clock";
    match skew.abs() {
        s if s < SKEW_WARN_MS => report.ok(name, said),
        s if s < SKEW_FAIL_MS => report.warn(name, format!("{said}: {effect}")),
        _ => report.fail(
            name,
            format!("{said}: {effect}; synchronise the clocks (NTP)"),
        ),
    }
}
