//! Redis over TLS (`rediss://`), with certificates this test makes under a CA of its own: a
//! Python Celery producer and a worker both on TLS, a client certificate for a server that
//! asks for one, and a wrong CA refused at start.

use taskhost_tests::{
    Certs, Process, RedisServer, TestDir, free_port, python_on, run_snippet_in, taskhost_bin,
};

/// A Redis answering TLS on its own port (and plain on the harness's), with `certs`; asking
/// clients for a certificate when `client_certs`.
struct Tls {
    _redis: RedisServer,
    tls_port: u16,
    certs: Certs,
    dir: TestDir,
}

impl Tls {
    fn start(test: &str, client_certs: bool) -> Self {
        let dir = TestDir::new(&format!("tls-{test}"));
        let certs = Certs::make(&dir);
        let tls_port = free_port();
        let mut args = certs.server_args(tls_port);
        if client_certs {
            args.extend(["--tls-auth-clients".to_owned(), "yes".to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let redis = RedisServer::start_with(&dir, &args);
        Self {
            _redis: redis,
            tls_port,
            certs,
            dir,
        }
    }

    /// `rediss://127.0.0.1:<tls port>/<db>?<query>`.
    fn url(&self, db: u8, query: &str) -> String {
        format!("rediss://127.0.0.1:{}/{db}?{query}", self.tls_port)
    }

    fn spawn_worker(&self, query: &str) -> Process {
        let plugins = self.dir.plugins(&["demo"]);
        let urls = [self.url(0, query), self.url(1, query)];
        let command = Process::worker_command_on(&taskhost_bin(), &self.dir, &urls, &plugins, &[]);
        Process::spawn(&self.dir, "worker.log", command)
    }

    fn worker(&self, query: &str) -> Process {
        let worker = self.spawn_worker(query);
        worker.wait_log("worker ready");
        worker
    }
}

fn ca_query(certs: &Certs) -> String {
    format!(
        "ssl_cert_reqs=required&ssl_ca_certs={}",
        certs.path("ca.crt")
    )
}

/// A Celery app on `tls`'s TLS port, as an operator's Celery config has it: broker_use_ssl
/// and redis_backend_use_ssl.
const TLS_APP: &str = "import os, ssl\nfrom celery import Celery\n\
    app = Celery('tls', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])\n\
    tls = {'ssl_cert_reqs': ssl.CERT_REQUIRED, 'ssl_ca_certs': os.environ['CA']}\n\
    app.conf.broker_use_ssl = tls\n\
    app.conf.redis_backend_use_ssl = tls";

/// Runs `code` with Python Celery over TLS (after [`TLS_APP`]).
fn python_on_tls(tls: &Tls, worker: &Process, code: &str) {
    let broker = format!("rediss://127.0.0.1:{}/0", tls.tls_port);
    let backend = format!("rediss://127.0.0.1:{}/1", tls.tls_port);
    let mut python = python_on(&tls.dir, &broker, &backend, &["producer.py"]);
    python.env("CA", tls.certs.path("ca.crt"));
    run_snippet_in(&tls.dir, python, TLS_APP, code, || worker.log());
}

#[test]
fn a_worker_on_tls_runs_a_task_a_python_producer_sends_on_tls() {
    let tls = Tls::start("python", false);
    let worker = tls.worker(&ca_query(&tls.certs));
    python_on_tls(
        &tls,
        &worker,
        "assert app.send_task('demo.add', (2, 3)).get(timeout=30) == 5",
    );
}

#[test]
fn inspect_stats_says_the_broker_is_on_tls() {
    let tls = Tls::start("stats-ssl", false);
    let worker = tls.worker(&ca_query(&tls.certs));
    python_on_tls(
        &tls,
        &worker,
        "stats = app.control.inspect(timeout=5).stats()\n\
         assert stats, 'no worker answered'\n\
         assert all(s['broker']['ssl'] is True for s in stats.values()), stats",
    );
}

#[test]
fn a_client_certificate_is_shown_to_a_server_that_asks_for_one() {
    let tls = Tls::start("client-cert", true);
    let query = format!(
        "{}&ssl_certfile={}&ssl_keyfile={}",
        ca_query(&tls.certs),
        tls.certs.path("client.crt"),
        tls.certs.path("client.key")
    );
    let worker = tls.worker(&query);
    let (broker, backend) = (tls.url(0, &query), tls.url(1, &query));
    let out = Process::run(
        &tls.dir,
        &[
            "call",
            "demo.add",
            "--args",
            "[2, 3]",
            "--wait",
            "--broker",
            &broker,
            "--result-backend",
            &backend,
        ],
    );
    assert!(
        out.status.success() && out.stdout.trim() == "5",
        "{}{}\n{}",
        out.stdout,
        out.stderr,
        worker.log()
    );
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_at_start() {
    let tls = Tls::start("wrong-ca", false);
    let query = format!("ssl_ca_certs={}", tls.certs.path("other-ca.crt"));
    let mut worker = tls.spawn_worker(&query);
    let status = worker.wait_exit();
    let log = worker.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("TLS to Redis at rediss://127.0.0.1"), "{log}");
}

#[test]
fn without_a_client_certificate_a_server_that_asks_for_one_refuses_at_start() {
    let tls = Tls::start("no-client-cert", true);
    let mut worker = tls.spawn_worker(&ca_query(&tls.certs));
    let status = worker.wait_exit();
    let log = worker.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("TLS to Redis at rediss://127.0.0.1"), "{log}");
}

/// `taskhost check --json` against `tls` with the URL query `query`: exit status and report.
fn check_over_tls(tls: &Tls, query: &str) -> (Option<i32>, serde_json::Value) {
    let plugins = tls.dir.plugins(&["demo"]);
    let plugins = plugins.to_string_lossy().into_owned();
    let mut command = Process::command(&tls.dir, &["check", "--json", "--plugins", &plugins]);
    command.env("CELERY_BROKER_URL", tls.url(0, query));
    let out = Process::run_command(&tls.dir, command);
    let report = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON ({e}): {out:?}"));
    (out.status.code(), report)
}

fn check_named<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

#[test]
fn check_reaches_a_tls_redis_and_says_so() {
    let tls = Tls::start("check", false);
    let (code, report) = check_over_tls(&tls, &ca_query(&tls.certs));
    let broker = check_named(&report, "broker");
    assert_eq!(broker["status"], "ok", "{report:#}");
    assert!(
        broker["detail"]
            .as_str()
            .is_some_and(|d| d.contains("over TLS")),
        "{broker}"
    );
    assert_eq!(code, Some(0), "{report:#}");
}

#[test]
fn check_fails_a_tls_redis_whose_certificate_is_not_trusted() {
    let tls = Tls::start("check-untrusted", false);
    // No CA named: the server's certificate, signed by the test's own CA, is not trusted.
    let (code, report) = check_over_tls(&tls, "ssl_cert_reqs=required");
    assert_eq!(
        check_named(&report, "broker")["status"],
        "fail",
        "{report:#}"
    );
    assert_eq!(code, Some(1));
}
