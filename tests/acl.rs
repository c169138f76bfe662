//! Redis ACL users, set up with the README's least-privilege recipe as written: a worker user
//! and a producer user run tasks end to end; the producer cannot deploy or send remote-control
//! commands; the operator can; a command refused to a user is an error naming the command and
//! its key, and a worker refused what it needs stops instead of retrying. And what a worker
//! says of its Redis's eviction policy, which the recipe lets it read.

use taskhost_tests::{
    Process, RedisServer, TestDir, python_on, readme_block, run_snippet_in, taskhost_bin,
};

/// A private Redis with the README's ACL users.
struct Acl {
    redis: RedisServer,
    dir: TestDir,
}

impl Acl {
    fn start(test: &str) -> Self {
        Self::start_with(test, &[])
    }

    /// With extra `redis-server` arguments.
    fn start_with(test: &str, args: &[&str]) -> Self {
        let dir = TestDir::new(&format!("acl-{test}"));
        let redis = RedisServer::start_with(&dir, args);
        let acl = Self { redis, dir };
        acl.redis.apply(&readme_block("acl-recipe"));
        acl
    }

    /// The URL of database `db` as `user` (whose password is `<user>-secret`).
    fn url(&self, user: &str, db: u8) -> String {
        format!(
            "redis://{user}:{user}-secret@127.0.0.1:{}/{db}",
            self.redis.port()
        )
    }

    /// Starts a worker serving the demo plugin as `user`, waiting until it is ready.
    fn worker(&self, user: &str) -> Process {
        let worker = self.spawn_worker(user);
        worker.wait_log("worker ready");
        worker
    }

    /// Starts a worker as `user` (following fleet deploys) without waiting for it.
    fn spawn_worker(&self, user: &str) -> Process {
        self.spawn_worker_with(user, &[])
    }

    fn spawn_worker_with(&self, user: &str, extra: &[&str]) -> Process {
        let plugins = self.dir.plugins(&["demo"]);
        let urls = [self.url(user, 0), self.url(user, 1)];
        let mut args = vec!["--fleet"];
        args.extend(extra);
        let command =
            Process::worker_command_on(&taskhost_bin(), &self.dir, &urls, &plugins, &args);
        Process::spawn(&self.dir, "worker.log", command)
    }

    /// A worker as `user` logging JSON, once it is ready.
    fn json_worker(&self, user: &str) -> Process {
        let worker = self.spawn_worker_with(user, &["--log-format", "json"]);
        worker.wait_log("worker ready");
        worker
    }

    /// Runs `code` with Python Celery connected as `user`.
    fn python(&self, user: &str, code: &str, logs: impl Fn() -> String) {
        const PRELUDE: &str = "import os\nfrom celery import Celery\n\
            app = Celery('acl', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])";
        let (broker, backend) = (self.url(user, 0), self.url(user, 1));
        let python = python_on(&self.dir, &broker, &backend, &["producer.py"]);
        run_snippet_in(&self.dir, python, PRELUDE, code, logs);
    }

    /// `taskhost deploy demo.wasm` as `user`: whether it deployed, and what it said.
    fn deploy_demo_as(&self, user: &str) -> (bool, String) {
        let demo = taskhost_tests::plugin_wasm("demo");
        self.taskhost(user, &["deploy", &demo.to_string_lossy()])
    }

    /// Runs `taskhost ARGS --broker <user's URL>`.
    fn taskhost(&self, user: &str, args: &[&str]) -> (bool, String) {
        let broker = self.url(user, 0);
        let mut all = args.to_vec();
        all.extend(["--broker", broker.as_str()]);
        let out = Process::run(&self.dir, &all);
        (
            out.status.success(),
            format!("{}{}", out.stdout, out.stderr),
        )
    }
}

#[test]
fn a_producer_user_sends_to_a_worker_user_and_reads_the_result() {
    let acl = Acl::start("roles");
    let worker = acl.worker("worker");
    acl.python(
        "producer",
        "assert app.send_task('demo.add', (2, 3)).get(timeout=30) == 5",
        || worker.log(),
    );
}

#[test]
fn a_producer_user_cannot_deploy_and_the_error_names_the_command_and_key() {
    let acl = Acl::start("producer-deploy");
    let (deployed, said) = acl.deploy_demo_as("producer");
    assert!(!deployed, "a producer deployed a plugin:\n{said}");
    assert!(
        said.contains("Redis refused ")
            && said.contains("\"taskhost:")
            && said.contains("ACL user \"producer\""),
        "the refusal does not name the command, key and user:\n{said}"
    );
}

#[test]
fn a_worker_user_cannot_deploy() {
    let acl = Acl::start("worker-deploy");
    let (deployed, said) = acl.deploy_demo_as("worker");
    assert!(!deployed, "a worker user deployed a plugin:\n{said}");
    assert!(said.contains("ACL user \"worker\""), "{said}");
}

#[test]
fn a_producer_user_cannot_send_remote_control_commands() {
    let acl = Acl::start("producer-control");
    let worker = acl.worker("worker");
    acl.python(
        "producer",
        r#"
import kombu.exceptions
try:
    app.control.broadcast('shutdown')
except kombu.exceptions.OperationalError as e:
    assert 'no permissions' in str(e), e
else:
    raise AssertionError('a producer sent a remote-control command')
"#,
        || worker.log(),
    );
    // The shutdown never reached the worker: it still runs tasks.
    acl.python(
        "producer",
        "assert app.send_task('demo.add', (1, 1)).get(timeout=30) == 2",
        || worker.log(),
    );
}

#[test]
fn an_operator_user_deploys_rolls_back_reads_dead_letters_and_pings_workers() {
    let acl = Acl::start("operator");
    let worker = acl.worker("worker");
    let version = |v: &str| {
        taskhost_tests::test_plugin_wasm(&format!("versioned-{v}"))
            .to_string_lossy()
            .into_owned()
    };
    let (v1, v2) = (version("v1"), version("v2"));
    for args in [
        vec!["deploy", v1.as_str(), "--name", "demo"],
        vec!["deploy", v2.as_str(), "--name", "demo"],
        vec!["rollback", "demo"],
        vec!["deployments"],
        vec!["dead", "list"],
    ] {
        let (ok, said) = acl.taskhost("operator", &args);
        assert!(
            ok,
            "the operator could not {args:?}:\n{said}\n{}",
            worker.log()
        );
    }
    acl.python(
        "operator",
        "assert app.control.ping(timeout=5), 'no worker answered the ping'",
        || worker.log(),
    );
}

#[test]
fn a_worker_refused_a_command_it_needs_stops_and_says_which() {
    let acl = Acl::start("worker-refused");
    // The recipe's worker, without its in-flight lists.
    let recipe = readme_block("acl-recipe");
    let worker_line = recipe
        .lines()
        .find(|l| l.starts_with("ACL SETUSER worker "))
        .expect("the recipe has a worker user");
    acl.redis.apply(&format!(
        "{worker_line}\nACL SETUSER worker resetkeys ~celery* ~_kombu.binding* ~taskhost:workers ~taskhost:running:* %R~taskhost:deployed %R~taskhost:deploy-records %R~taskhost:plugin-blob:*"
    ));
    let mut worker = acl.spawn_worker("worker");
    let status = worker.wait_exit();
    let log = worker.log();
    assert!(!status.success(), "the worker went on:\n{log}");
    assert!(
        log.contains("Redis refused ") && log.contains("ACL user \"worker\""),
        "the worker did not say what was refused:\n{log}"
    );
}

#[test]
fn a_wrong_password_stops_the_worker_at_start() {
    let acl = Acl::start("wrong-password");
    let plugins = acl.dir.plugins(&["demo"]);
    let broker = format!(
        "redis://worker:not-the-secret@127.0.0.1:{}/0",
        acl.redis.port()
    );
    let plugins = plugins.to_string_lossy().into_owned();
    let args = ["worker", "--broker", &broker, "--plugins", &plugins];
    let mut worker = Process::spawn(&acl.dir, "worker.log", Process::command(&acl.dir, &args));
    let status = worker.wait_exit();
    let log = worker.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("refused the credentials") && !log.contains("not-the-secret"),
        "{log}"
    );
}

// --- what the worker says of eviction -------------------------------------------------------

/// The worker's JSON log lines that carry a `policy` field (what it said of a Redis's eviction
/// policy), as (level, redis, policy).
fn eviction_lines(worker: &Process) -> Vec<(String, String, String)> {
    worker
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l.get("policy").is_some())
        .map(|l| {
            let field = |name: &str| l[name].as_str().unwrap_or_default().to_owned();
            (field("level"), field("redis"), field("policy"))
        })
        .collect()
}

/// Waits for the worker to warn of `policy` on the broker's Redis.
fn wait_for_eviction_warning(worker: &Process, policy: &str) {
    let wanted = ("WARN".to_owned(), "broker".to_owned(), policy.to_owned());
    taskhost_tests::wait_for(&format!("a warning of {policy}"), || {
        eviction_lines(worker).contains(&wanted).then_some(())
    });
}

#[test]
fn a_worker_warns_at_start_that_volatile_lru_evicts() {
    let args = ["--maxmemory", "256mb", "--maxmemory-policy", "volatile-lru"];
    let acl = Acl::start_with("evict-volatile", &args);
    let worker = acl.json_worker("worker");
    wait_for_eviction_warning(&worker, "volatile-lru");
}

#[test]
fn a_worker_whose_user_may_not_run_config_warns_of_allkeys_lru() {
    let args = ["--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"];
    let acl = Acl::start_with("evict-allkeys", &args);
    let worker = acl.json_worker("worker");
    wait_for_eviction_warning(&worker, "allkeys-lru");
    // The recipe's worker user may not read the configuration: INFO is what told it.
    let mut conn = redis::Client::open(acl.url("worker", 0))
        .and_then(|c| c.get_connection())
        .expect("connect as the worker user");
    let config: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query(&mut conn);
    assert!(
        config.is_err(),
        "the worker user may run CONFIG: {config:?}"
    );
}

#[test]
fn a_worker_says_nothing_against_noeviction_and_warns_when_its_redis_returns_evicting() {
    let dir = TestDir::new("acl-evict-restart");
    let mut redis = RedisServer::start_with(&dir, &["--maxmemory-policy", "noeviction"]);
    let plugins = dir.plugins(&["demo"]);
    let worker = Process::worker(&dir, &redis, &plugins, &["--log-format", "json"]);
    worker.wait_log("worker ready");
    let safe = (
        "INFO".to_owned(),
        "broker".to_owned(),
        "noeviction".to_owned(),
    );
    taskhost_tests::wait_for("the worker to read noeviction", || {
        eviction_lines(&worker).contains(&safe).then_some(())
    });
    assert!(
        eviction_lines(&worker)
            .iter()
            .all(|(level, ..)| level != "WARN"),
        "{:?}",
        eviction_lines(&worker)
    );
    // The same Redis back from a restart, now evicting.
    redis.restart();
    redis.apply("CONFIG SET maxmemory-policy allkeys-lfu");
    wait_for_eviction_warning(&worker, "allkeys-lfu");
}
