//! The contenders: taskhost worker processes and a real Celery worker, started on the bench's
//! Redis and ready to consume; and the memory of a whole worker (every process of it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use taskhost_tests::{Process, RedisServer, TestDir};

/// The configuration every taskhost contender starts from: crucible serves the Celery
/// service's names (`tasks.*`), granted as in the repository's taskhost.toml.
pub const BASE_CONFIG: &str = "[plugins.crucible]\ntasks = [\"tasks.*\"]\n";

/// `reuse_instances` of the reusing contender: like a Celery `worker_max_tasks_per_child`.
pub const REUSE_INSTANCES: u32 = 10_000;

/// A worker configuration under test.
#[derive(Debug, Clone, PartialEq)]
pub enum Contender {
    /// `processes` taskhost workers with `-c concurrency` each.
    Taskhost {
        concurrency: usize,
        processes: usize,
    },
    /// One taskhost worker with `-c concurrency` whose demo instances serve up to
    /// [`REUSE_INSTANCES`] tasks each (`[plugins.demo] reuse_instances`).
    TaskhostReusing { concurrency: usize },
    /// Celery with its prefork pool.
    CeleryPrefork { concurrency: usize },
    /// Celery with its thread pool.
    CeleryThreads { concurrency: usize },
    /// The floor: a native echo worker (see `echo.rs`).
    Echo,
    /// One taskhost worker with `-c concurrency` serving the `lang` template as an author
    /// builds it (`taskhost new demo --lang L`, `taskhost build`): its `add` and `progress` are
    /// `demo.add` and `demo.progress`. With `reuse`, its instances serve up to
    /// [`REUSE_INSTANCES`] tasks each.
    Plugin {
        lang: Lang,
        concurrency: usize,
        reuse: bool,
    },
}

/// A plugin language beside Rust.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lang {
    Python,
    Js,
}

impl Lang {
    /// As `taskhost new --lang` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Python => "python",
            Self::Js => "js",
        }
    }
}

impl std::fmt::Display for Lang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Lang {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "python" => Ok(Self::Python),
            "js" => Ok(Self::Js),
            other => Err(format!("no language {other:?} (python, js)")),
        }
    }
}

impl Contender {
    pub fn taskhost(concurrency: usize) -> Self {
        Self::Taskhost {
            concurrency,
            processes: 1,
        }
    }

    /// taskhost serving the Rust demo plugin.
    pub fn is_taskhost(&self) -> bool {
        matches!(self, Self::Taskhost { .. } | Self::TaskhostReusing { .. })
    }

    /// Whether it serves `task`: a language template has no `demo.echo`.
    pub fn serves(&self, task: &str) -> bool {
        !matches!(self, Self::Plugin { .. }) || task != "demo.echo"
    }

    pub fn is_celery(&self) -> bool {
        matches!(
            self,
            Self::CeleryPrefork { .. } | Self::CeleryThreads { .. }
        )
    }

    pub fn label(&self) -> String {
        match self {
            Self::Taskhost {
                concurrency,
                processes: 1,
            } => format!("taskhost -c {concurrency}"),
            Self::Taskhost {
                concurrency,
                processes,
            } => format!("taskhost {processes} procs x -c {concurrency}"),
            Self::TaskhostReusing { concurrency } => format!("taskhost -c {concurrency} reuse"),
            Self::CeleryPrefork { concurrency } => format!("celery prefork -c {concurrency}"),
            Self::CeleryThreads { concurrency } => format!("celery threads -c {concurrency}"),
            Self::Echo => "native echo worker (floor)".to_owned(),
            Self::Plugin {
                lang,
                concurrency,
                reuse,
            } => format!(
                "{} plugin -c {concurrency}{}",
                lang.as_str(),
                if *reuse { " reuse" } else { "" }
            ),
        }
    }
}

/// Where the contenders run: the private Redis (broker db 0, results db 1), the plugins, the
/// Celery app.
pub struct Stage {
    pub dir: TestDir,
    pub redis: RedisServer,
    pub plugins: PathBuf,
    celery_app: PathBuf,
    /// Per language, a plugin directory holding its template built as `demo.wasm`.
    languages: Mutex<BTreeMap<Lang, PathBuf>>,
}

impl Stage {
    pub fn new() -> Self {
        let dir = TestDir::new("bench");
        let redis = RedisServer::start(&dir);
        let plugins = dir.plugins(&["demo", "crucible"]);
        // crucible serves the Celery service's names (`tasks.*`), granted as in the repository's
        // taskhost.toml; every taskhost command here runs in this directory and reads it.
        dir.write("taskhost.toml", BASE_CONFIG);
        // Fills the precompile cache every taskhost contender uses, so none of them is
        // measured compiling (the start-time figures use caches of their own).
        let listed = Process::run(&dir, &["plugins", &plugins.to_string_lossy()]);
        assert!(
            listed.status.success(),
            "taskhost plugins failed: {}",
            listed.stderr
        );
        let celery_app = dir.path().join("celery-app");
        std::fs::create_dir_all(&celery_app).expect("create the Celery app directory");
        std::fs::copy(
            taskhost_tests::root().join("bench").join("celery_app.py"),
            celery_app.join("celery_app.py"),
        )
        .expect("copy bench/celery_app.py");
        Self {
            dir,
            redis,
            plugins,
            celery_app,
            languages: Mutex::default(),
        }
    }

    /// The plugin directory of `lang`: its template, written by `taskhost new demo --lang L`
    /// and built by `taskhost build` (pre-warmed, as every author's build is), compiled into
    /// the precompile cache, once per bench.
    fn language_plugins(&self, lang: Lang) -> PathBuf {
        let mut built = self
            .languages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(dir) = built.get(&lang) {
            return dir.clone();
        }
        let project = self
            .dir
            .path()
            .join(format!("lang-{}", lang.as_str()))
            .join("demo");
        let plugins = self.dir.path().join(format!("plugins-{}", lang.as_str()));
        let plugins_arg = plugins.to_string_lossy();
        write_template(&self.dir, "demo", lang.as_str(), &project);
        std::fs::create_dir_all(&plugins).expect("create the language's plugin directory");
        build_template(&project, &plugins.join("demo.wasm"));
        let listed = Process::run(&self.dir, &["plugins", &plugins_arg]);
        assert!(
            listed.status.success(),
            "taskhost plugins failed: {}",
            listed.stderr
        );
        built.insert(lang, plugins.clone());
        plugins
    }

    /// Empties both databases: no queue, no result, no trace of an earlier worker.
    pub fn flush(&self) {
        redis::cmd("FLUSHALL")
            .exec(&mut self.redis.conn(0))
            .expect("FLUSHALL");
    }

    /// Starts `contender` and returns once it is consuming.
    pub fn start(&self, contender: &Contender) -> Running {
        self.start_with(contender, None, true)
    }

    /// Starts `contender`; taskhost with its precompile cache in `cache_dir` if given. With
    /// `wait`, returns once it is consuming; otherwise at once.
    pub fn start_with(
        &self,
        contender: &Contender,
        cache_dir: Option<&Path>,
        wait: bool,
    ) -> Running {
        let processes = match contender {
            Contender::Taskhost {
                concurrency,
                processes,
            } => (0..*processes)
                .map(|i| self.taskhost(*concurrency, i, cache_dir, wait))
                .collect(),
            Contender::TaskhostReusing { concurrency } => {
                let config = self.dir.write(
                    "reuse.toml",
                    &format!("{BASE_CONFIG}[plugins.demo]\nreuse_instances = {REUSE_INSTANCES}\n"),
                );
                let config = config.to_string_lossy();
                let worker = self.taskhost_of(
                    &taskhost_tests::taskhost_bin(),
                    *concurrency,
                    0,
                    cache_dir,
                    &["--config", &config],
                );
                vec![if wait { ready(worker) } else { worker }]
            }
            Contender::CeleryPrefork { concurrency } => {
                vec![self.celery("prefork", *concurrency, wait)]
            }
            Contender::CeleryThreads { concurrency } => {
                vec![self.celery("threads", *concurrency, wait)]
            }
            Contender::Echo => vec![self.echo()],
            Contender::Plugin {
                lang,
                concurrency,
                reuse,
            } => {
                let config = self.dir.write(
                    &format!("{}-reuse-{reuse}.toml", lang.as_str()),
                    &if *reuse {
                        format!("[plugins.demo]\nreuse_instances = {REUSE_INSTANCES}\n")
                    } else {
                        String::new()
                    },
                );
                let (config, plugins) = (config.to_string_lossy(), self.language_plugins(*lang));
                let worker = self.taskhost_in(
                    &taskhost_tests::taskhost_bin(),
                    &plugins,
                    *concurrency,
                    0,
                    cache_dir,
                    &["--config", &config],
                );
                vec![if wait { ready(worker) } else { worker }]
            }
        };
        Running { processes }
    }

    /// A `taskhost` worker of the build `binary` with `-c concurrency`, consuming.
    pub fn start_build(&self, binary: &Path, concurrency: usize) -> Running {
        Running {
            processes: vec![ready(self.taskhost_of(binary, concurrency, 0, None, &[]))],
        }
    }

    /// A `taskhost` worker with `-c concurrency` and the configuration file `config`, consuming.
    pub fn start_configured(&self, concurrency: usize, config: &Path) -> Running {
        let config = config.to_string_lossy();
        let binary = taskhost_tests::taskhost_bin();
        Running {
            processes: vec![ready(self.taskhost_of(
                &binary,
                concurrency,
                0,
                None,
                &["--config", &config],
            ))],
        }
    }

    fn taskhost(
        &self,
        concurrency: usize,
        index: usize,
        cache: Option<&Path>,
        wait: bool,
    ) -> Process {
        let worker = self.taskhost_of(
            &taskhost_tests::taskhost_bin(),
            concurrency,
            index,
            cache,
            &[],
        );
        if wait { ready(worker) } else { worker }
    }

    /// A `taskhost` worker of the build `binary`, not waited for: a caller waits for "worker
    /// ready" unless it measures the start.
    fn taskhost_of(
        &self,
        binary: &Path,
        concurrency: usize,
        index: usize,
        cache: Option<&Path>,
        more: &[&str],
    ) -> Process {
        self.taskhost_in(binary, &self.plugins, concurrency, index, cache, more)
    }

    /// [`Stage::taskhost_of`] serving the plugins in `plugins`.
    fn taskhost_in(
        &self,
        binary: &Path,
        plugins: &Path,
        concurrency: usize,
        index: usize,
        cache: Option<&Path>,
        more: &[&str],
    ) -> Process {
        let (c, node) = (concurrency.to_string(), format!("bench{index}@%h"));
        let mut extra = vec!["-c", &c, "-n", &node];
        extra.extend_from_slice(more);
        let cache = cache.map(|c| c.to_string_lossy().into_owned());
        if let Some(cache) = &cache {
            extra.extend(["--cache-dir", cache]);
        }
        let log = format!("taskhost-{index}-{}.log", uuid::Uuid::new_v4());
        let command = Process::worker_command_of(binary, &self.dir, &self.redis, plugins, &extra);
        Process::spawn(&self.dir, &log, command)
    }

    /// The native echo worker: this very binary, in its echo mode.
    fn echo(&self) -> Process {
        let me = std::env::current_exe().expect("the bench's own path");
        let mut command = Command::new(me);
        command.args(["--echo-worker", &self.redis.url(0), &self.redis.url(1)]);
        let echo = Process::spawn(
            &self.dir,
            &format!("echo-{}.log", uuid::Uuid::new_v4()),
            command,
        );
        echo.wait_log("echo worker ready");
        echo
    }

    fn celery(&self, pool: &str, concurrency: usize, wait: bool) -> Process {
        let mut command = Command::new(taskhost_tests::python());
        command
            .current_dir(&self.celery_app)
            .args([
                "-m",
                "celery",
                "-A",
                "celery_app",
                "worker",
                "-P",
                pool,
                "-c",
            ])
            .arg(concurrency.to_string())
            .args(["-n", "celery-bench@%h", "--loglevel", "WARNING"])
            .env("BENCH_BROKER", self.redis.url(0))
            .env("BENCH_BACKEND", self.redis.url(1))
            .env("PYTHONDONTWRITEBYTECODE", "1");
        let log = format!("celery-{pool}-{}.log", uuid::Uuid::new_v4());
        let worker = Process::spawn(&self.dir, &log, command);
        if wait {
            worker.wait_log("bench: celery worker ready");
        }
        worker
    }
}

/// Writes the template of `lang` named `name` into `project` (`taskhost new`).
pub fn write_template(dir: &TestDir, name: &str, lang: &str, project: &Path) {
    let project = project.to_string_lossy();
    let new = Process::run(dir, &["new", name, "--lang", lang, "--dir", &project]);
    assert!(new.status.success(), "taskhost new failed: {}", new.stderr);
}

/// Builds the plugin in `project` into `output` (`taskhost build`, pre-warmed as an author's
/// build is), with the build tools cached in the target directory across benches.
pub fn build_template(project: &Path, output: &Path) {
    let status = Command::new(taskhost_tests::taskhost_bin())
        .args(["build", "-o"])
        .arg(output)
        .current_dir(project)
        .env(
            "TASKHOST_CACHE_DIR",
            taskhost_tests::target_dir().join("build-cache"),
        )
        .status()
        .expect("run taskhost build");
    assert!(
        status.success(),
        "taskhost build of {} failed",
        project.display()
    );
}

/// A started contender; its processes are stopped when dropped.
pub struct Running {
    processes: Vec<Process>,
}

impl Running {
    /// Every process of the worker: the started ones and their descendants (Celery's pool).
    pub fn pids(&self) -> Vec<u32> {
        let roots: Vec<u32> = self.processes.iter().map(Process::pid).collect();
        let parents = parent_table();
        let mut all = roots.clone();
        let mut frontier = roots;
        while let Some(pid) = frontier.pop() {
            for (child, _) in parents.iter().filter(|(_, parent)| *parent == pid) {
                all.push(*child);
                frontier.push(*child);
            }
        }
        all
    }

    /// The worker's memory now.
    pub fn memory(&self) -> Memory {
        Memory::of(&self.pids())
    }

    /// Stops the worker as an operator would (SIGTERM) and waits for it.
    pub fn stop(mut self) {
        for process in &mut self.processes {
            process.stop_with(libc::SIGTERM);
        }
    }
}

/// (pid, parent pid) of every process.
/// `worker`, once it says it is consuming.
fn ready(worker: Process) -> Process {
    worker.wait_log("worker ready");
    worker
}

fn parent_table() -> Vec<(u32, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The fields after the command name (which may hold spaces) start after ')'.
            let ppid = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// Resident and proportional memory of a set of processes, KiB.
#[derive(Debug, Default, Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl Memory {
    pub fn of(pids: &[u32]) -> Self {
        let mut total = Self::default();
        for pid in pids {
            let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
                continue;
            };
            let field = |name: &str| -> u64 {
                rollup
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            total.rss_kib += field("Rss:");
            total.pss_kib += field("Pss:");
        }
        total
    }

    pub fn max(self, other: Self) -> Self {
        Self {
            rss_kib: self.rss_kib.max(other.rss_kib),
            pss_kib: self.pss_kib.max(other.pss_kib),
        }
    }
}
