//! Child processes of a test: `redis-server`, `taskhost` and Celery, each reaped when dropped.

use crate::{TestDir, WAIT, taskhost_bin, wait_for};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Makes the child die with the test process, so a killed test run leaves nothing behind.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        kill(pid, signal);
    }
}

/// Sends `signal` to the process group `leader` leads.
pub fn signal_group(leader: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(leader) {
        kill(-pid, signal);
    }
}

#[allow(unsafe_code)]
fn kill(target: i32, signal: i32) {
    // SAFETY: kill(2) has no memory effects on this process.
    unsafe {
        libc::kill(target, signal);
    }
}

/// A loopback port free now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}

/// Waits for `child` to exit, up to `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        let poll_interval = Duration::from_millis(5);
        std::thread::sleep(poll_interval);
    }
}

/// How long compiling a directory of plugins may take: Cranelift over the largest (a Python
/// runtime) on a 2-core machine busy with other tests.
const COMPILE_WAIT: Duration = Duration::from_secs(300);

/// What identifies a directory's plugins for [`Process::precompile`]: their names and bytes,
/// and the cache they go to.
fn contents_key(plugins: &Path, cache: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut files: Vec<PathBuf> = std::fs::read_dir(plugins)
        .expect("read the plugin directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut hasher = std::hash::DefaultHasher::new();
    cache.hash(&mut hasher);
    for file in files {
        file.file_name().hash(&mut hasher);
        std::fs::read(&file).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}

/// A private `redis-server` on a free loopback port (never 6379).
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    /// A configuration file given first (a sentinel needs one it can rewrite).
    config: Option<PathBuf>,
}

impl RedisServer {
    /// Starts a server keeping nothing on disk.
    pub fn start(dir: &TestDir) -> Self {
        Self::start_with(dir, &[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `--appendonly yes`).
    pub fn start_with(dir: &TestDir, args: &[&str]) -> Self {
        Self::start_configured(dir, None, args)
    }

    /// Starts a sentinel watching the master on `master_port` as `name` (quorum 2; a master is
    /// down after a second without answers), with `extra` lines of configuration (TLS).
    pub fn start_sentinel(dir: &TestDir, name: &str, master_port: u16, extra: &str) -> Self {
        let config = dir.path().join(format!("sentinel-{}.conf", free_port()));
        std::fs::write(
            &config,
            format!(
                "sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n{extra}"
            ),
        )
        .expect("write the sentinel's configuration");
        Self::start_configured(dir, Some(config), &["--sentinel"])
    }

    fn start_configured(dir: &TestDir, config: Option<PathBuf>, args: &[&str]) -> Self {
        let data = dir.path().join(format!("redis-{}", free_port()));
        std::fs::create_dir_all(&data).expect("create redis dir");
        let mut server = Self {
            child: None,
            port: free_port(),
            dir: data,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            config,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        if let Some(config) = &self.config {
            command.arg(config);
        }
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .expect("start redis-server (is it on PATH?)");
        self.child = Some(child);
        let client = redis::Client::open(self.url(0)).expect("redis url");
        wait_for(
            &format!("redis-server on port {} to answer", self.port),
            || {
                if let Some(child) = &mut self.child
                    && let Ok(Some(status)) = child.try_wait()
                {
                    panic!(
                        "redis-server exited at start ({status}): {}",
                        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
                    );
                }
                let mut conn = client.get_connection().ok()?;
                redis::cmd("PING").query::<String>(&mut conn).ok()
            },
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs each line of `commands` (words split at spaces, e.g. the README's `ACL SETUSER`
    /// recipe) as the default user.
    pub fn apply(&self, commands: &str) {
        let mut conn = self.conn(0);
        for line in commands.lines().filter(|l| !l.trim().is_empty()) {
            let mut words = line.split_whitespace();
            let mut cmd = redis::cmd(words.next().unwrap_or_default());
            for word in words {
                cmd.arg(word);
            }
            cmd.query::<()>(&mut conn)
                .unwrap_or_else(|e| panic!("{line:?} failed: {e}"));
        }
    }

    /// `redis://127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// A connection to database `db`.
    pub fn conn(&self, db: u8) -> redis::Connection {
        redis::Client::open(self.url(db))
            .and_then(|c| c.get_connection())
            .expect("connect to the test redis")
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Environment variables a test's `taskhost` must not inherit from the machine.
const CLEARED_ENV: &[&str] = &[
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "CELERY_CONCURRENCY",
    "TASKHOST_CONFIG",
    "TASKHOST_PLUGINS",
    "EXECUTOR_SERVICE_URL",
    "STORAGE_SERVICE_URL",
    "RUST_LOG",
    "XDG_CACHE_HOME",
];

/// A child process (taskhost, or Celery for interoperability), its output in a log file.
pub struct Process {
    child: Option<Child>,
    log: PathBuf,
}

/// What a finished `taskhost` command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Process {
    /// The command, in the test's directory (so no `./taskhost.toml` is picked up), with a clean
    /// environment and `TASKHOST_DEV_STATE` private to the test.
    pub fn command(dir: &TestDir, args: &[&str]) -> Command {
        Self::command_of(&taskhost_bin(), dir, args)
    }

    /// [`Process::command`] with another `taskhost` binary (an earlier build, to compare).
    pub fn command_of(binary: &Path, dir: &TestDir, args: &[&str]) -> Command {
        let mut command = Command::new(binary);
        command
            .current_dir(dir.path())
            .args(args)
            .stdin(Stdio::null());
        for var in CLEARED_ENV {
            command.env_remove(var);
        }
        command.env("TASKHOST_DEV_STATE", dir.path().join("dev-state.json"));
        command.env("TASKHOST_CACHE_DIR", dir.path().join("cache"));
        command
    }

    /// Starts `taskhost ARGS`, output to `<dir>/<log>`.
    pub fn spawn(dir: &TestDir, log: &str, mut command: Command) -> Self {
        let log = dir.path().join(log);
        let file = std::fs::File::create(&log).expect("create log");
        let err = file.try_clone().expect("clone log handle");
        command.stdout(file).stderr(err);
        die_with_parent(&mut command);
        let child = command.spawn().expect("start taskhost");
        Self {
            child: Some(child),
            log,
        }
    }

    /// Starts `taskhost worker` against `redis` (broker db 0, backend db 1) and waits until it
    /// is consuming.
    pub fn worker(dir: &TestDir, redis: &RedisServer, plugins: &Path, extra: &[&str]) -> Self {
        Self::worker_logged(dir, "worker.log", redis, plugins, extra)
    }

    /// [`Process::worker`], logging to `<dir>/<log>` (for several workers in one test).
    pub fn worker_logged(
        dir: &TestDir,
        log: &str,
        redis: &RedisServer,
        plugins: &Path,
        extra: &[&str],
    ) -> Self {
        let worker = Self::spawn(dir, log, Self::worker_command(dir, redis, plugins, extra));
        worker.wait_log("worker ready");
        worker
    }

    /// The command line of `taskhost worker` against `redis` (broker db 0, backend db 1).
    pub fn worker_command(
        dir: &TestDir,
        redis: &RedisServer,
        plugins: &Path,
        extra: &[&str],
    ) -> Command {
        Self::worker_command_of(&taskhost_bin(), dir, redis, plugins, extra)
    }

    /// [`Process::worker_command`] with another `taskhost` binary.
    pub fn worker_command_of(
        binary: &Path,
        dir: &TestDir,
        redis: &RedisServer,
        plugins: &Path,
        extra: &[&str],
    ) -> Command {
        let urls = [redis.url(0), redis.url(1)];
        Self::worker_command_on(binary, dir, &urls, plugins, extra)
    }

    /// The command line of `taskhost worker` on the broker and backend `urls` (a user's, a
    /// `rediss://` one).
    pub fn worker_command_on(
        binary: &Path,
        dir: &TestDir,
        [broker, backend]: &[String; 2],
        plugins: &Path,
        extra: &[&str],
    ) -> Command {
        let plugins = plugins.to_string_lossy().into_owned();
        let mut args = vec![
            "worker",
            "--broker",
            broker,
            "--result-backend",
            backend,
            "--plugins",
            &plugins,
        ];
        args.extend_from_slice(extra);
        Self::command_of(binary, dir, &args)
    }

    /// Runs a one-shot command to completion (bounded by [`WAIT`]).
    pub fn run(dir: &TestDir, args: &[&str]) -> Output {
        Self::run_command(dir, Self::command(dir, args))
    }

    /// Compiles the plugins in `plugins` into the precompile cache `cache`, as a worker given
    /// `--config config --cache-dir cache` would, once per set of plugin contents in this test
    /// binary and one compile at a time. Tests whose workers share a cache call it before
    /// starting one: Cranelift takes tens of seconds over an 18 MB Python or a 12 MB JavaScript
    /// component on a loaded 2-core machine, and several workers compiling it side by side
    /// would each miss [`WAIT`] for "worker ready".
    pub fn precompile(dir: &TestDir, plugins: &Path, config: &str, cache: &str) {
        static DONE: Mutex<Vec<u64>> = Mutex::new(Vec::new());
        let mut done = DONE.lock().unwrap_or_else(PoisonError::into_inner);
        let key = contents_key(plugins, cache);
        if done.contains(&key) {
            return;
        }
        let listed = plugins.to_string_lossy();
        let mut command = Self::command(dir, &["plugins", &listed, "--config", config]);
        command.env("TASKHOST_CACHE_DIR", cache);
        let output = Self::run_command_within(dir, command, COMPILE_WAIT);
        assert!(
            output.status.success(),
            "taskhost plugins {listed} refused a plugin:\n{}{}",
            output.stdout,
            output.stderr
        );
        done.push(key);
    }

    /// Runs a prepared command to completion (bounded by [`WAIT`]).
    pub fn run_command(dir: &TestDir, command: Command) -> Output {
        Self::run_command_within(dir, command, WAIT)
    }

    /// [`Process::run_command`], bounded by `within`.
    pub fn run_command_within(dir: &TestDir, mut command: Command, within: Duration) -> Output {
        let out = dir.path().join(format!("out-{}", uuid::Uuid::new_v4()));
        let err = out.with_extension("err");
        command
            .stdout(std::fs::File::create(&out).expect("create stdout file"))
            .stderr(std::fs::File::create(&err).expect("create stderr file"));
        die_with_parent(&mut command);
        let mut child = command.spawn().expect("run taskhost");
        let status = wait_exit(&mut child, within);
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {within:?}");
        };
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        Output {
            status,
            stdout: read(&out),
            stderr: read(&err),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Where a worker started with `--metrics-addr` (port 0 picks one) serves `/metrics` and
    /// `/healthz`: its text log says so, the only place the picked port shows.
    pub fn metrics_addr(&self) -> String {
        self.wait_log("serving /metrics and /healthz");
        self.log()
            .lines()
            .filter(|l| l.contains("serving /metrics and /healthz"))
            .find_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("addr=")))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no metrics address in the log:\n{}", self.log()))
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; fails if the process exits first.
    pub fn wait_log(&self, needle: &str) {
        wait_for(&format!("{needle:?} in the taskhost log"), || {
            if self.log().contains(needle) {
                return Some(());
            }
            self.assert_running();
            None
        });
    }

    /// Waits until the log contains `needle` at least `count` times.
    pub fn wait_log_count(&self, needle: &str, count: usize) {
        wait_for(&format!("{count} x {needle:?} in the taskhost log"), || {
            if self.log().matches(needle).count() >= count {
                return Some(());
            }
            self.assert_running();
            None
        });
    }

    fn assert_running(&self) {
        if let Some(child) = &self.child {
            // A child that exited is a zombie (state Z) until reaped.
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            assert!(
                matches!(state, Some(s) if s != "Z"),
                "taskhost exited early:\n{}",
                self.log()
            );
        }
    }

    /// Waits for the process to exit by itself (bounded by [`WAIT`]).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the process is running");
        match wait_exit(&mut child, WAIT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the process did not exit within {WAIT:?}:\n{}", self.log());
            }
        }
    }

    /// Sends `sig` and waits for the exit (bounded by [`WAIT`]).
    pub fn stop_with(&mut self, sig: i32) -> ExitStatus {
        self.stop_by(|pid| signal(pid, sig))
    }

    /// Sends `sig` to the process group this process leads, as a terminal's Ctrl-C does to its
    /// foreground job, and waits for the exit (bounded by [`WAIT`]).
    pub fn stop_group_with(&mut self, sig: i32) -> ExitStatus {
        self.stop_by(|pid| signal_group(pid, sig))
    }

    fn stop_by(&mut self, send: impl FnOnce(u32)) -> ExitStatus {
        let mut child = self.child.take().expect("taskhost is running");
        send(child.id());
        match wait_exit(&mut child, WAIT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("taskhost did not stop within {WAIT:?}:\n{}", self.log());
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- taskhost log {} ----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}
