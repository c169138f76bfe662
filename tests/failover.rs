//! Redis Sentinel: a master, a replica and three sentinels, each a real `redis-server` on a
//! loopback port. A Python Celery producer on a `sentinel://` URL sends 2,000 tasks; the
//! master is killed while the worker runs them and the sentinels promote the replica. Every
//! task completes with its result readable from Python, and the number run twice is stated
//! and bounded by what the worker had in flight. The same again with the master and replica
//! answering only TLS (certificates under a CA the test makes).

use std::time::Duration;
use taskhost_tests::{
    Certs, Process, RedisServer, TestDir, free_port, python_on, run_snippet_in, taskhost_bin,
    wait_for_within,
};

const MASTER: &str = "mymaster";
const TASKS: usize = 2_000;
const CONCURRENCY: usize = 8;
/// Celery's default prefetch multiplier, which the worker keeps.
const PREFETCH: usize = 4;

/// A master, its replica and three sentinels watching them; `secure`: the master and the
/// replica are reached (and replicate) over TLS, and clients log in as the README's ACL users.
struct Cluster {
    master: RedisServer,
    replica: RedisServer,
    /// The port the sentinels will name once the replica is promoted.
    replica_port: u16,
    sentinels: Vec<RedisServer>,
    certs: Option<Certs>,
    /// Whether the README's ACL users are set up (and clients use them).
    users: bool,
    dir: TestDir,
}

impl Cluster {
    fn start(test: &str, secure: bool) -> Self {
        let dir = TestDir::new(&format!("failover-{test}"));
        let certs = secure.then(|| Certs::make(&dir));
        let (master_tls, replica_tls) = (free_port(), free_port());
        let tls_args = |port: u16| -> Vec<String> {
            certs
                .as_ref()
                .map_or_else(Vec::new, |c| c.server_args(port))
        };
        let master = RedisServer::start_with(&dir, &strs(&tls_args(master_tls)));
        let master_port = if secure { master_tls } else { master.port() };
        let mut replica_args = vec![
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master_port.to_string(),
        ];
        replica_args.extend(tls_args(replica_tls));
        if secure {
            replica_args.extend(["--tls-replication".to_owned(), "yes".to_owned()]);
        }
        let replica = RedisServer::start_with(&dir, &strs(&replica_args));
        let replica_port = if secure { replica_tls } else { replica.port() };
        // ACL users are not replicated: each server gets them.
        if secure {
            for server in [&master, &replica] {
                server.apply(&taskhost_tests::readme_block("acl-recipe"));
            }
        }
        wait_for_within("the replica to sync", Duration::from_secs(30), || {
            info(&replica, "replication")
                .contains("master_link_status:up")
                .then_some(())
        });
        // Sentinels reach the master, the replica and each other over TLS too: each listens
        // on a TLS port of its own, which it announces to the others.
        let sentinel_tls = || {
            certs.as_ref().map_or_else(String::new, |c| {
                format!(
                    "tls-replication yes\ntls-port {}\ntls-auth-clients no\ntls-cert-file {}\n\
                     tls-key-file {}\ntls-ca-cert-file {}\n",
                    free_port(),
                    c.path("server.crt"),
                    c.path("server.key"),
                    c.path("ca.crt")
                )
            })
        };
        let sentinels: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_sentinel(&dir, MASTER, master_port, &sentinel_tls()))
            .collect();
        // A failover needs the sentinels to know the replica and each other.
        for sentinel in &sentinels {
            wait_for_within(
                "each sentinel to see the others and the replica",
                Duration::from_secs(30),
                || {
                    let mut conn = sentinel.conn(0);
                    let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("SENTINELS")
                        .arg(MASTER)
                        .query(&mut conn)
                        .ok()?;
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg(MASTER)
                        .query(&mut conn)
                        .ok()?;
                    (others.len() == 2 && replicas.len() == 1).then_some(())
                },
            );
        }
        Self {
            master,
            replica,
            replica_port,
            sentinels,
            certs,
            users: secure,
            dir,
        }
    }

    /// kombu's form, as `user` where users are set up: `sentinel://[user:pass@]127.0.0.1:P1/db;
    /// sentinel://…`.
    fn sentinels_url(&self, user: &str, db: u8) -> String {
        let login = if self.users {
            format!("{user}:{user}-secret@")
        } else {
            String::new()
        };
        self.sentinels
            .iter()
            .map(|s| format!("sentinel://{login}127.0.0.1:{}/{db}", s.port()))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The worker's URL of database `db`, with the CA for the master's TLS.
    fn url(&self, db: u8) -> String {
        let url = self.sentinels_url("worker", db);
        match &self.certs {
            Some(c) => format!("{url}?ssl_ca_certs={}", c.path("ca.crt")),
            None => url,
        }
    }

    /// A worker config file naming the sentinels' master, as kombu's transport options do.
    fn worker_config(&self) -> String {
        let path = self.dir.write(
            "taskhost.toml",
            "[worker]\nbroker_transport_options = { master_name = \"mymaster\" }\n\
             result_backend_transport_options = { master_name = \"mymaster\" }\n",
        );
        path.to_string_lossy().into_owned()
    }

    /// Waits until the replica holds every write the master took; `what` names them.
    fn replicated(&self, what: &str) {
        let synced: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(10_000)
            .query(&mut self.master.conn(0))
            .expect("WAIT");
        assert_eq!(synced, 1, "the replica did not take {what}");
    }

    /// Kills the master and waits until the sentinels have promoted the replica.
    fn fail_over(&mut self) {
        self.master.kill();
        let promoted = self.replica_port;
        wait_for_within(
            "the sentinels to promote the replica",
            Duration::from_secs(60),
            || (self.master_port() == Some(promoted)).then_some(()),
        );
    }

    /// The port the sentinels name as the master's.
    fn master_port(&self) -> Option<u16> {
        let mut conn = self.sentinels.first()?.conn(0);
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER)
            .query(&mut conn)
            .ok()?;
        Some(port)
    }

    /// Runs `code` with Python Celery on the sentinels, as an operator's Celery config has it:
    /// `app` a producer, `ops` an operator (for `inspect`).
    fn python(&self, code: &str, logs: impl Fn() -> String) -> String {
        // Celery's environment variables would win over each app's own broker: two apps here.
        let mut prelude = "import os, ssl\nfrom celery import Celery\n\
            os.environ.pop('CELERY_BROKER_URL'); os.environ.pop('CELERY_RESULT_BACKEND')\n\
            app = Celery('failover', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])\n\
            ops = Celery('ops', broker=os.environ['OPS'])\n\
            for a in (app, ops):\n\
            \x20   a.conf.broker_transport_options = {'master_name': 'mymaster'}\n\
            \x20   a.conf.result_backend_transport_options = {'master_name': 'mymaster'}"
            .to_owned();
        let (broker, backend) = (
            self.sentinels_url("producer", 0),
            self.sentinels_url("producer", 1),
        );
        let mut python = python_on(&self.dir, &broker, &backend, &["producer.py"]);
        python.env("OPS", self.sentinels_url("operator", 0));
        if let Some(certs) = &self.certs {
            python.env("CA", certs.path("ca.crt"));
            prelude.push_str(
                "\ntls = {'ssl_cert_reqs': ssl.CERT_REQUIRED, 'ssl_ca_certs': os.environ['CA']}\n\
                 for a in (app, ops):\n\
                 \x20   a.conf.broker_use_ssl = tls\n\
                 \x20   a.conf.redis_backend_use_ssl = tls",
            );
        }
        run_snippet_in(&self.dir, python, &prelude, code, logs)
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn info(server: &RedisServer, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query::<String>(&mut server.conn(0))
        .unwrap_or_default()
}

fn results_stored(server: &RedisServer) -> usize {
    redis::cmd("DBSIZE")
        .query::<usize>(&mut server.conn(1))
        .unwrap_or(0)
}

#[test]
fn no_task_is_lost_when_the_master_dies_and_a_replica_is_promoted() {
    promoted_under_load("promote", false);
}

/// The deployment the README's operator section describes: Sentinel, TLS-only servers, ACL
/// users (worker, producer, operator).
#[test]
fn no_task_is_lost_when_a_tls_acl_master_dies_and_a_replica_is_promoted() {
    promoted_under_load("promote-tls", true);
}

fn promoted_under_load(test: &str, secure: bool) {
    let mut cluster = Cluster::start(test, secure);
    let config = cluster.worker_config();
    let plugins = cluster.dir.plugins(&["demo"]);
    let urls = [cluster.url(0), cluster.url(1)];
    let concurrency = CONCURRENCY.to_string();
    let extra = ["--config", config.as_str(), "-c", concurrency.as_str()];
    // Every task is queued before the worker starts, so the master dies with most of them
    // still waiting however fast the producer and the worker run on a loaded machine (a
    // producer slower than the worker saw each task run as it came, and none left).
    cluster.python(
        &format!(
            "ids = [app.send_task('demo.sleep', (20,)).id for _ in range({TASKS})]\n\
             open('ids.txt', 'w').write('\\n'.join(ids))"
        ),
        String::new,
    );
    // What the producer sent is on the replica before the master dies: a producer's write
    // lost with an asynchronous replica is Celery's to answer for, not the worker's.
    cluster.replicated("the producer's writes");
    let command =
        Process::worker_command_on(&taskhost_bin(), &cluster.dir, &urls, &plugins, &extra);
    let worker = Process::spawn(&cluster.dir, "worker.log", command);
    worker.wait_log("worker ready");
    wait_for_within(
        "a tenth of the tasks to finish",
        Duration::from_secs(60),
        || (results_stored(&cluster.master) >= TASKS / 10).then_some(()),
    );
    let done_before = results_stored(&cluster.master);
    assert!(
        done_before < TASKS,
        "every task ran before the master was killed"
    );
    cluster.fail_over();
    // The worker finishes on the new master; then Python reads every result there (one GET
    // each: a get() per task, subscribing and unsubscribing, would outlast the snippet's
    // bound on a loaded machine).
    wait_for_within(
        "every result on the promoted replica",
        Duration::from_secs(120),
        || (results_stored(&cluster.replica) >= TASKS).then_some(()),
    );

    let out = cluster.python(
        &format!(
            "ids = open('ids.txt').read().split('\\n')\n\
             assert len(ids) == {TASKS}\n\
             states = [app.AsyncResult(i).state for i in ids]\n\
             assert states == ['SUCCESS'] * {TASKS}, sorted(set(states))\n\
             stats = ops.control.inspect(timeout=5).stats() or {{}}\n\
             runs = sum(s['total'].get('demo.sleep', 0) for s in stats.values())\n\
             print('RUNS', runs)"
        ),
        || worker.log(),
    );
    let runs: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("RUNS "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no run count in:\n{out}"));
    let twice = runs.checked_sub(TASKS).unwrap_or_else(|| {
        panic!("the worker ran {runs} of {TASKS} tasks, yet every result is stored")
    });
    println!(
        "failover{}: {TASKS} tasks, {done_before} done before the master died, all {TASKS} completed, {twice} run twice",
        if secure {
            " over TLS with ACL users"
        } else {
            ""
        }
    );
    assert!(
        twice <= CONCURRENCY * (1 + PREFETCH),
        "{twice} tasks ran twice: more than the {} the worker can have in flight",
        CONCURRENCY * (1 + PREFETCH)
    );
}

#[test]
fn a_worker_waiting_for_replicas_that_do_not_answer_still_settles_its_tasks() {
    let dir = TestDir::new("failover-no-replica");
    let redis = RedisServer::start(&dir);
    let config = dir.write("taskhost.toml", "[worker]\nwait_replicas = 1\n");
    let plugins = dir.plugins(&["demo"]);
    let config = config.to_string_lossy().into_owned();
    let worker = Process::worker(&dir, &redis, &plugins, &["--config", &config]);
    let urls = [redis.url(0), redis.url(1)];
    let python = python_on(&dir, &urls[0], &urls[1], &["producer.py"]);
    run_snippet_in(
        &dir,
        python,
        "import os\nfrom celery import Celery\n\
         app = Celery('w', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])",
        "assert [app.send_task('demo.add', (i, i)).get(timeout=30) for i in range(3)] == [0, 2, 4]",
        || worker.log(),
    );
}

/// Two workers (2 s lapse) running long tasks when the master dies: the sentinels take longer
/// than the lapse to promote the replica, and the registry comes back with every heartbeat old.
/// No task may be taken from its live worker.
#[test]
fn two_workers_through_a_failover_longer_than_the_lapse_take_nothing_from_each_other() {
    let mut cluster = Cluster::start("lapse", false);
    let config = cluster.worker_config();
    let plugins = cluster.dir.plugins(&["demo"]);
    let urls = [cluster.url(0), cluster.url(1)];
    let workers: Vec<Process> = ["w1@lapse", "w2@lapse"]
        .iter()
        .map(|node| {
            let extra = [
                "-n",
                node,
                "--config",
                config.as_str(),
                "-c",
                "2",
                "--prefetch-multiplier",
                "1",
                "--heartbeat-lapse",
                "2",
            ];
            let command =
                Process::worker_command_on(&taskhost_bin(), &cluster.dir, &urls, &plugins, &extra);
            let worker = Process::spawn(&cluster.dir, &format!("{node}.log"), command);
            worker.wait_log("worker ready");
            worker
        })
        .collect();
    cluster.python(
        "ids = [app.send_task('demo.sleep', (8000,)).id for _ in range(8)]\n\
         open('ids.txt', 'w').write('\\n'.join(ids))",
        String::new,
    );
    let in_flight = |node: &str| -> usize {
        redis::cmd("LLEN")
            .arg(format!("taskhost:inflight:{node}:celery"))
            .query(&mut cluster.master.conn(0))
            .unwrap_or(0)
    };
    wait_for_within(
        "each worker to run two tasks",
        Duration::from_secs(30),
        || (in_flight("w1@lapse") >= 2 && in_flight("w2@lapse") >= 2).then_some(()),
    );
    cluster.replicated("the fetches");
    cluster.fail_over();
    wait_for_within(
        "every result on the promoted replica",
        Duration::from_secs(120),
        || (results_stored(&cluster.replica) >= 8).then_some(()),
    );
    let returned = taskhost_tests::returned_by_recovery(&mut cluster.replica.conn(0));
    assert!(
        returned.is_empty(),
        "tasks were taken from a live worker: {returned:?}"
    );
    drop(workers);
}
