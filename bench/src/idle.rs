//! Memory per loaded plugin: the RSS (and PSS) of one `taskhost worker` holding N distinct
//! Python plugins, idle once loaded and again after one task on each; beside the worker with
//! the Rust demo plugin alone; and the compile of one such plugin with empty caches (cold)
//! and from the precompile cache (cached load).
//!
//!     bench/run --idle-plugins 1,10,50
//!
//! Each plugin is the Python template built under its own name (`taskhost new pNNN --lang
//! python`, `taskhost build`), so no two share a byte of code or memory image: what the
//! figures show is what a platform with that many third-party plugins holds. The builds take
//! about 15 s each; they are kept in the target directory until what builds them changes, so
//! a second run of the bench starts measuring at once.

use crate::options::Options;
use crate::report::{Figure, Section};
use crate::workers::{Memory, build_template, write_template};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use taskhost_tests::{Client, Process, RedisServer, TestDir};

/// Concurrency of the measured workers: the bench's language runs use 16.
const CONCURRENCY: &str = "16";

pub fn idle_plugins(options: &Options) {
    let dir = TestDir::new("bench-idle");
    let redis = RedisServer::start(&dir);
    let most = options.idle_plugins.iter().copied().max().unwrap_or(0);
    let (components, cache) = built(&dir, most);

    let mut compile = Section::new(
        "one Python plugin (the template, pre-warmed) made ready by a worker",
        "s",
        &[],
    );
    if let Some(first) = components.first() {
        let size = std::fs::metadata(first).map(|m| m.len()).unwrap_or(0);
        eprintln!("bench: component size {:.1} MB", size as f64 / 1e6);
        let one = plugin_dir(&dir, "compile", &components[..1]);
        let (cold, cached) = compile_times(&dir, &one, options.repeat.max(1));
        compile.row(Figure::new("cold compile (empty caches)", cold), Vec::new());
        compile.row(
            Figure::new("cached load (precompile cache)", cached),
            Vec::new(),
        );
    }

    let mut memory = Section::new(
        "memory of one idle worker (-c 16) by plugins loaded",
        "MiB",
        &["RSS per Python plugin over the Rust-only worker"],
    );
    let rust = dir.plugins(&["demo"]);
    let (rust_idle, _) = measure(&dir, &redis, &rust, &cache, &[]);
    memory.row(
        Figure::new(
            "Rust demo plugin alone: RSS idle",
            vec![mib(rust_idle.rss_kib)],
        ),
        Vec::new(),
    );
    for &n in &options.idle_plugins {
        let plugins = plugin_dir(&dir, &format!("n{n}"), &components[..n]);
        let tasks: Vec<String> = (1..=n).map(|i| format!("{}.add", name(i))).collect();
        let (idle, used) = measure(&dir, &redis, &plugins, &cache, &tasks);
        let per = |m: Memory| {
            let extra = mib(m.rss_kib) - mib(rust_idle.rss_kib);
            vec![format!("{:.1}", extra / n as f64)]
        };
        memory.row(
            Figure::new(format!("{n} Python: RSS idle"), vec![mib(idle.rss_kib)]),
            per(idle),
        );
        memory.row(
            Figure::new(format!("{n} Python: PSS idle"), vec![mib(idle.pss_kib)]),
            Vec::new(),
        );
        memory.row(
            Figure::new(
                format!("{n} Python: RSS after one task on each"),
                vec![mib(used.rss_kib)],
            ),
            per(used),
        );
    }
    compile.print();
    memory.print();
}

/// The name of the `i`-th plugin.
fn name(i: usize) -> String {
    format!("p{i:03}")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The first `count` plugins, built (or found built), and the precompile cache kept beside
/// them (a compile of fifty takes minutes; the compile figures use empty caches of their own).
fn built(dir: &TestDir, count: usize) -> (Vec<PathBuf>, PathBuf) {
    let store = taskhost_tests::target_dir()
        .join("bench-idle-plugins")
        .join(build_key());
    std::fs::create_dir_all(&store).expect("create the store of built plugins");
    let components = (1..=count)
        .map(|i| {
            let name = name(i);
            let output = store.join(format!("{name}.wasm"));
            if !output.is_file() {
                eprintln!("bench: building Python plugin {i} of {count} ...");
                build(dir, &name, &output);
            }
            output
        })
        .collect();
    (components, store.join("cache"))
}

/// Builds the Python template named `name` into `output`.
fn build(dir: &TestDir, name: &str, output: &Path) {
    let project = dir.path().join("projects").join(name);
    write_template(dir, name, "python", &project);
    // Written aside and renamed: an interrupted bench leaves no half component behind.
    let partial = output.with_extension("partial");
    build_template(&project, &partial);
    std::fs::rename(&partial, output).expect("keep the built plugin");
}

/// A digest of what a Python plugin's build depends on in this repository (the SDK, the
/// template, the build and pre-warm code): a change to any builds the plugins again.
fn build_key() -> String {
    use std::hash::{Hash as _, Hasher as _};
    let root = taskhost_tests::root();
    let mut files = Vec::new();
    for part in [
        "plugins/sdk-python",
        "plugins/templates/python",
        "host/src/cli/build",
        "host/src/sandbox/prewarm.rs",
    ] {
        collect(&root.join(part), &mut files);
    }
    files.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in files {
        file.hash(&mut hasher);
        std::fs::read(&file).unwrap_or_default().hash(&mut hasher);
    }
    format!("{:016x}", hasher.finish())
}

/// Every file under `path` (or `path` itself), leaving out what builds and tests write.
fn collect(path: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(path) else {
        if path.is_file() {
            files.push(path.to_path_buf());
        }
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let skipped = ["__pycache__", "build", ".pytest_cache"]
            .iter()
            .any(|s| name == *s)
            || name.to_string_lossy().ends_with(".egg-info");
        if !skipped {
            collect(&path, files);
        }
    }
}

/// A plugin directory `name` holding `components` (hard links: no copies of 20 MB files).
fn plugin_dir(dir: &TestDir, name: &str, components: &[PathBuf]) -> PathBuf {
    let plugins = dir.path().join("plugin-dirs").join(name);
    std::fs::create_dir_all(&plugins).expect("create a plugin directory");
    for component in components {
        let file = component.file_name().expect("a component file name");
        let link = plugins.join(file);
        if std::fs::hard_link(component, &link).is_err() {
            std::fs::copy(component, &link).expect("place a plugin");
        }
    }
    plugins
}

/// Seconds to make the plugins in `plugins` ready with empty caches (the precompile cache and
/// Cranelift's incremental one), and with the precompile cache filled; `rounds` of each.
fn compile_times(dir: &TestDir, plugins: &Path, rounds: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut cold, mut cached) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let cache = dir.path().join(format!("compile-cache-{round}"));
        cold.push(precompile(dir, plugins, &cache));
        cached.push(precompile(dir, plugins, &cache));
    }
    (cold, cached)
}

/// Makes the plugins in `plugins` ready in the precompile cache `cache` (`taskhost plugins`,
/// as a worker would at its start); the seconds it took.
fn precompile(dir: &TestDir, plugins: &Path, cache: &Path) -> f64 {
    let listed = plugins.to_string_lossy();
    let mut command = Process::command(dir, &["plugins", &listed]);
    command.env("TASKHOST_CACHE_DIR", cache);
    let started = Instant::now();
    // Cranelift over fifty 20 MB components, when the kept cache is empty.
    let output = Process::run_command_within(dir, command, Duration::from_secs(1800));
    assert!(
        output.status.success(),
        "taskhost plugins failed: {}",
        output.stderr
    );
    started.elapsed().as_secs_f64()
}

/// The worker's memory serving `plugins` (compiled into `cache` first, so no figure holds a
/// compile): once ready and idle, and again once each of `tasks` has run once.
fn measure(
    dir: &TestDir,
    redis: &RedisServer,
    plugins: &Path,
    cache: &Path,
    tasks: &[String],
) -> (Memory, Memory) {
    redis::cmd("FLUSHALL")
        .exec(&mut redis.conn(0))
        .expect("FLUSHALL");
    precompile(dir, plugins, cache);
    let cache_arg = cache.to_string_lossy().into_owned();
    let command = Process::worker_command(
        dir,
        redis,
        plugins,
        &["-c", CONCURRENCY, "--cache-dir", &cache_arg],
    );
    let mut worker = Process::spawn(
        dir,
        &format!("worker-{}.log", uuid::Uuid::new_v4()),
        command,
    );
    worker.wait_log("worker ready");
    // What the start allocated and freed settles; a bench may wait, a test may not.
    std::thread::sleep(Duration::from_secs(1));
    let idle = Memory::of(&[worker.pid()]);
    let mut client = Client::new(redis);
    for task in tasks {
        assert_eq!(client.success(task, json!([2, 3])), json!(5), "{task}");
    }
    std::thread::sleep(Duration::from_secs(1));
    let used = Memory::of(&[worker.pid()]);
    worker.stop_with(libc::SIGTERM);
    (idle, used)
}
