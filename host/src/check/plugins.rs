//! What the worker would serve: the plugins of its directory loaded under their grants (each
//! refused one a failure), each granted HTTP origin resolved and held to the private-address
//! policy the sandbox enforces, the schedule's entries with their next runs and whether a
//! plugin serves them, and whether fleet deploys are trusted.

use super::Report;
use crate::config::WorkerConfig;
use crate::plugins::cache::Cache;
use crate::plugins::live::Live;
use jiff::Timestamp;
use std::sync::Arc;

pub(super) async fn check(config: &WorkerConfig, report: &mut Report) {
    let registry = match load(config, report).await {
        Some(registry) => registry,
        None => return,
    };
    origins(config, report).await;
    schedule(config, &registry, report);
    fleet(config, report);
}

/// Loads the plugin directory as the worker would; the registry, or none when it cannot be
/// read.
async fn load(config: &WorkerConfig, report: &mut Report) -> Option<Arc<crate::plugins::Registry>> {
    let dir = &config.plugins_dir;
    let sandbox = match crate::worker::sandbox(config) {
        Ok(sandbox) => sandbox,
        Err(e) => {
            report.fail("plugins", format!("the sandbox cannot start: {e:#}"));
            return None;
        }
    };
    let cache = config.cache_dir.as_ref().and_then(|d| Cache::new(d).ok());
    let grants = Arc::new(arc_swap::ArcSwap::from_pointee(config.grants.clone()));
    let live = match Live::open(sandbox, cache, dir, grants).await {
        Ok(live) => live,
        Err(e) => {
            report.fail("plugins", format!("{e:#}"));
            return None;
        }
    };
    let registry = live.registry();
    let loaded: Vec<String> = registry
        .plugins()
        .map(|p| format!("{} {} ({} tasks)", p.name, p.version, p.tasks.len()))
        .collect();
    if loaded.is_empty() {
        report.warn(
            "plugins",
            format!(
                "no plugin in {}: every task would be refused",
                dir.display()
            ),
        );
    } else {
        report.ok(
            "plugins",
            format!("{}: {}", dir.display(), loaded.join(", ")),
        );
    }
    for (path, reason) in live.refused() {
        let file = path.file_name().map_or_else(
            || path.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        report.fail(format!("plugin {file}"), format!("refused: {reason}"));
    }
    for name in config.grants.configured() {
        if registry.plugin(name).is_none() {
            report.warn(
                format!("grants [plugins.{name}]"),
                "no such plugin is loaded: the section grants nothing",
            );
        }
    }
    Some(registry)
}

/// Each granted origin whose host is a name: where it resolves now, and whether the sandbox
/// would let a plugin reach it there.
async fn origins(config: &WorkerConfig, report: &mut Report) {
    for plugin in config.grants.configured() {
        let grants = config.grants.for_plugin(plugin);
        for origin in &grants.allow_http {
            let name = format!("grant {plugin} → {}://{}", origin.scheme, origin.host);
            let host = origin.host.trim_matches(['[', ']']);
            if host.parse::<std::net::IpAddr>().is_ok() {
                report.ok(name, "an address, granted as written");
                continue;
            }
            let resolved = tokio::net::lookup_host((host, origin.port)).await;
            let addresses: Vec<std::net::IpAddr> = match resolved {
                Ok(addresses) => addresses.map(|a| a.ip()).collect(),
                Err(e) => {
                    report.warn(name, format!("does not resolve here: {e}"));
                    continue;
                }
            };
            let private: Vec<String> = addresses
                .iter()
                .filter(|ip| crate::sandbox::is_private(**ip))
                .map(ToString::to_string)
                .collect();
            if private.is_empty() || grants.allow_private_network {
                let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
                report.ok(name, format!("resolves to {}", list.join(", ")));
            } else {
                report.fail(
                    name,
                    format!(
                        "resolves to the private address(es) {}: the sandbox refuses every \
                         request to it unless [plugins.{plugin}] allow_private_network = true",
                        private.join(", ")
                    ),
                );
            }
        }
    }
}

/// The schedule's entries: when each runs next, and whether a loaded plugin serves its task.
fn schedule(config: &WorkerConfig, registry: &crate::plugins::Registry, report: &mut Report) {
    let now = Timestamp::now();
    for entry in config.schedule.iter().flatten() {
        let name = format!("schedule {}", entry.name);
        let next = entry
            .when
            .next_after(now)
            .map_or_else(|| "never".to_owned(), |t| t.to_string());
        let said = format!("{} {}: next {next}", entry.task, entry.when.describe());
        if registry.resolve(&entry.task).is_some() {
            report.ok(name, said);
        } else {
            report.warn(
                name,
                format!("{said}; no plugin here serves {}", entry.task),
            );
        }
    }
}

fn fleet(config: &WorkerConfig, report: &mut Report) {
    if !config.fleet {
        return;
    }
    let trust = &config.fleet_trust;
    if trust.trusted_keys.is_empty() {
        report.warn(
            "fleet",
            "no [fleet] trusted_keys: any writer to the broker can deploy code to this worker",
        );
    } else {
        report.ok(
            "fleet",
            format!(
                "deploys signed by {} trusted key(s) are installed",
                trust.trusted_keys.len()
            ),
        );
    }
}
