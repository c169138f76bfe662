//! Redis Sentinel: a master, a replica and three sentinels, each a real `redis-server` on a
//! loopback port. A Python Celery producer on a `sentinel://` URL sends 2,000 tasks; the
//! master is killed while the worker runs them and the sentinels promote the replica. Every
//! task completes with its result readable from Python, and the number run twice is stated
//! and bounded by what the worker had in flight.

use std::time::Duration;
use taskhost_tests::{
    Process, RedisServer, TestDir, python_on, run_snippet_in, taskhost_bin, wait_for_within,
};

const MASTER: &str = "mymaster";
const TASKS: usize = 2_000;
const CONCURRENCY: usize = 8;
/// Celery's default prefetch multiplier, which the worker keeps.
const PREFETCH: usize = 4;

/// A master, its replica and three sentinels watching them.
struct Cluster {
    master: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisServer>,
    dir: TestDir,
}

impl Cluster {
    fn start(test: &str) -> Self {
        let dir = TestDir::new(&format!("failover-{test}"));
        let master = RedisServer::start(&dir);
        let master_port = master.port().to_string();
        let replica = RedisServer::start_with(&dir, &["--replicaof", "127.0.0.1", &master_port]);
        wait_for_within("the replica to sync", Duration::from_secs(30), || {
            info(&replica, "replication")
                .contains("master_link_status:up")
                .then_some(())
        });
        let sentinels: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_sentinel(&dir, MASTER, master.port()))
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
            sentinels,
            dir,
        }
    }

    /// kombu's form: `sentinel://127.0.0.1:P1/db;sentinel://127.0.0.1:P2/db;…`.
    fn url(&self, db: u8) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("sentinel://127.0.0.1:{}/{db}", s.port()))
            .collect::<Vec<_>>()
            .join(";")
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

    /// Runs `code` with Python Celery on the sentinels, as an operator's Celery config has it.
    fn python(&self, code: &str, logs: impl Fn() -> String) -> String {
        const PRELUDE: &str = "import os\nfrom celery import Celery\n\
            app = Celery('failover', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])\n\
            app.conf.broker_transport_options = {'master_name': 'mymaster'}\n\
            app.conf.result_backend_transport_options = {'master_name': 'mymaster'}";
        let python = python_on(&self.dir, &self.url(0), &self.url(1), &["producer.py"]);
        run_snippet_in(&self.dir, python, PRELUDE, code, logs)
    }
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
    let mut cluster = Cluster::start("promote");
    let config = cluster.dir.write(
        "taskhost.toml",
        "[worker]\nbroker_transport_options = { master_name = \"mymaster\" }\n\
         result_backend_transport_options = { master_name = \"mymaster\" }\n",
    );
    let plugins = cluster.dir.plugins(&["demo"]);
    let urls = [cluster.url(0), cluster.url(1)];
    let config = config.to_string_lossy().into_owned();
    let concurrency = CONCURRENCY.to_string();
    let extra = ["--config", config.as_str(), "-c", concurrency.as_str()];
    let command =
        Process::worker_command_on(&taskhost_bin(), &cluster.dir, &urls, &plugins, &extra);
    let worker = Process::spawn(&cluster.dir, "worker.log", command);
    worker.wait_log("worker ready");

    cluster.python(
        &format!(
            "ids = [app.send_task('demo.sleep', (20,)).id for _ in range({TASKS})]\n\
             open('ids.txt', 'w').write('\\n'.join(ids))"
        ),
        || worker.log(),
    );
    // What the producer sent is on the replica before the master dies: a producer's write
    // lost with an asynchronous replica is Celery's to answer for, not the worker's.
    let synced: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query(&mut cluster.master.conn(0))
        .expect("WAIT");
    assert_eq!(synced, 1, "the replica did not take the producer's writes");
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
    cluster.master.kill();
    let promoted = cluster.replica.port();
    wait_for_within(
        "the sentinels to promote the replica",
        Duration::from_secs(60),
        || (cluster.master_port() == Some(promoted)).then_some(()),
    );

    let out = cluster.python(
        &format!(
            "ids = open('ids.txt').read().split('\\n')\n\
             assert len(ids) == {TASKS}\n\
             for i in ids:\n    app.AsyncResult(i).get(timeout=120)\n\
             stats = app.control.inspect(timeout=5).stats() or {{}}\n\
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
        "failover: {TASKS} tasks, {done_before} done before the master died, all {TASKS} completed, {twice} run twice"
    );
    assert!(
        twice <= CONCURRENCY * (1 + PREFETCH),
        "{twice} tasks ran twice: more than the {} the worker can have in flight",
        CONCURRENCY * (1 + PREFETCH)
    );
}
