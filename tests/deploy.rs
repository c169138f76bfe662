//! The deployment files as a deployment tool reads them: `deploy/compose.yml` replaces the
//! seed's Celery workers service for service (the same variables, queues and Redis, Redis
//! without eviction and with AOF, Flower behind a login), and `deploy/kubernetes.yaml` probes
//! and stops a worker as docs/compose.md and the README say.

use serde::Deserialize as _;
use serde_yaml::Value;
use taskhost_tests::root;

fn yaml(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(path)).expect("read a deployment file");
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = Value::deserialize(document).expect("valid YAML");
            value.apply_merge().expect("merge keys apply");
            value
        })
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Seconds in a compose duration (`40s`, `1m`).
fn seconds(duration: &str) -> u64 {
    let (number, unit) = duration.split_at(duration.len() - 1);
    let n: u64 = number.parse().expect("a number");
    match unit {
        "s" => n,
        "m" => n * 60,
        other => panic!("unit {other}"),
    }
}

#[test]
fn the_compose_file_replaces_each_celery_worker_service_with_the_same_settings() {
    let compose = yaml("deploy/compose.yml").remove(0);
    let services = &compose["services"];
    let workers = [
        ("celery-worker", "celery"),
        ("celery-worker-high-priority", "high_priority"),
        ("celery-worker-batch", "batch"),
    ];
    for (name, queue) in workers {
        let service = &services[name];
        assert_eq!(
            service["build"]["dockerfile"].as_str(),
            Some("deploy/Containerfile"),
            "{name}"
        );
        let env = &service["environment"];
        for var in [
            "CELERY_BROKER_URL",
            "CELERY_RESULT_BACKEND",
            "CELERY_CONCURRENCY",
            "EXECUTOR_SERVICE_URL",
            "STORAGE_SERVICE_URL",
        ] {
            assert!(env[var].as_str().is_some(), "{name} lacks {var}");
        }
        assert_eq!(
            env["CELERY_BROKER_URL"].as_str(),
            Some("redis://redis:6379/0"),
            "{name}"
        );
        let command = strings(&service["command"]);
        let q = command.iter().position(|a| a == "-Q").expect("-Q");
        assert_eq!(
            command.get(q + 1).map(String::as_str),
            Some(queue),
            "{name}"
        );
        // Longer than the worker's own 30 s shutdown grace.
        let grace = seconds(service["stop_grace_period"].as_str().expect("a grace"));
        assert!(grace > 30, "{name}: {grace} s");
        assert!(
            strings(&service["healthcheck"]["test"]).contains(&"health".to_owned()),
            "{name}"
        );
    }
    let redis = strings(&services["redis"]["command"]).join(" ");
    assert!(redis.contains("--maxmemory-policy noeviction"), "{redis}");
    assert!(redis.contains("--appendonly yes"), "{redis}");
    let flower = strings(&services["flower"]["command"]).join(" ");
    assert!(flower.contains("--broker=redis://redis:6379/0"), "{flower}");
    assert!(flower.contains("--basic-auth="), "{flower}");
    assert_eq!(strings(&services["flower"]["ports"]), ["5555:5555"]);
}

#[test]
fn the_kubernetes_workers_stop_within_their_grace_and_are_probed_as_documented() {
    let documents = yaml("deploy/kubernetes.yaml");
    let deployment = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args = strings(&container["args"]);
    let grace: u64 = args
        .iter()
        .position(|a| a == "--shutdown-grace")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .expect("--shutdown-grace N");
    let termination = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace < termination,
        "{grace} s grace, {termination} s to terminate"
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 1000);
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let dir = taskhost_tests::TestDir::new("deploy-systemd");
    let unit = std::fs::read_to_string(root().join("deploy/taskhost.service")).expect("read");
    for hardening in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CacheDirectoryMode=0700",
    ] {
        assert!(unit.contains(hardening), "{hardening}");
    }
    // systemd checks the binary named exists: this build's.
    let binary = taskhost_tests::taskhost_bin();
    let here = dir.write(
        "taskhost.service",
        &unit.replace("/usr/local/bin/taskhost", &binary.to_string_lossy()),
    );
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&here)
        .output()
        .expect("systemd-analyze (systemd) on PATH");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}
