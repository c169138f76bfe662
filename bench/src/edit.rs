//! Edit to result: how long after an author saves a change to a plugin's source `taskhost dev
//! --watch` serves the new version. For each language's template (`taskhost new demo --lang
//! L`), a dev worker watches the project; each round edits `add` to return something new and
//! times from the save to the first `demo.add(2, 3)` that answers it.
//!
//!     bench/run --edit-to-result [--languages python,js] [--repeat N]
//!
//! The first round after the start also fills the compile caches (precompile and incremental)
//! a returning author has; every figure is a later round.

use crate::options::Options;
use crate::report::{Figure, Section};
use crate::workers::Lang;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use taskhost_tests::{Process, RedisServer, TestDir, taskhost_bin};

/// How long one version may take to be served before the bench gives up on it.
const LIMIT: Duration = Duration::from_secs(300);
/// Between two tries of `demo.add`: the figures' resolution, and little enough load not to
/// slow the build being timed.
const POLL: Duration = Duration::from_millis(200);

pub fn edit_to_result(options: &Options) {
    let dir = TestDir::new("bench-edit");
    let redis = RedisServer::start(&dir);
    let rounds = options.repeat.max(1);
    let mut section = Section::new(
        "edit to result: a save in the project to the new add(2, 3) served by taskhost dev --watch",
        "s",
        &[],
    );
    for lang in &options.languages {
        let seconds = rounds_of(&dir, &redis, *lang, rounds);
        section.row(Figure::new(format!("{lang} template"), seconds), Vec::new());
    }
    section.print();
}

/// The seconds of each of `rounds` edits after the first, for `lang`.
fn rounds_of(dir: &TestDir, redis: &RedisServer, lang: Lang, rounds: usize) -> Vec<f64> {
    let project = dir.path().join(format!("edit-{lang}")).join("demo");
    let plugins = dir.path().join(format!("plugins-{lang}"));
    let project_arg = project.to_string_lossy().into_owned();
    crate::workers::write_template(dir, "demo", lang.as_str(), &project);
    let plugins_arg = plugins.to_string_lossy().into_owned();
    let broker = redis.url(0);
    let mut command = Process::command(
        dir,
        &[
            "dev",
            "--watch",
            &project_arg,
            "--plugins",
            &plugins_arg,
            "--broker",
            &broker,
        ],
    );
    command.env(
        "TASKHOST_CACHE_DIR",
        taskhost_tests::target_dir().join("build-cache"),
    );
    let _dev = Process::spawn(dir, &format!("dev-{lang}.log"), command);
    eprintln!("bench: {lang}: the first build ...");
    served(dir, &broker, 5);
    let mut seconds = Vec::new();
    for round in 0..=rounds {
        let offset = 1000 * (round as i64 + 1);
        edit(&project, lang, offset);
        let saved = Instant::now();
        served(dir, &broker, 5 + offset);
        let took = saved.elapsed().as_secs_f64();
        eprintln!("bench: {lang}: edit {} served after {took:.1} s", round + 1);
        // The first edit fills the caches a returning author has.
        if round > 0 {
            seconds.push(took);
        }
    }
    seconds
}

/// Makes the template's `add` return `x + y + offset`.
fn edit(project: &Path, lang: Lang, offset: i64) {
    let (file, from) = match lang {
        Lang::Python => ("app.py", "    return x + y"),
        Lang::Js => ("app.js", "  return x + y"),
    };
    let path = project.join(file);
    let source = std::fs::read_to_string(&path).expect("read the template");
    let line = source
        .lines()
        .find(|l| l.starts_with(from))
        .expect("the template's add")
        .to_owned();
    let edited = source.replace(&line, &format!("{from} + {offset}"));
    // Written aside and renamed, as editors save.
    let tmp = project.join(format!(".{file}.saving"));
    std::fs::write(&tmp, edited).expect("write the edit");
    std::fs::rename(&tmp, &path).expect("save the edit");
}

/// Waits until `demo.add(2, 3)` answers `expected`.
fn served(dir: &TestDir, broker: &str, expected: i64) {
    let deadline = Instant::now() + LIMIT;
    let want = expected.to_string();
    while Instant::now() < deadline {
        let out = Command::new(taskhost_bin())
            .current_dir(dir.path())
            .args([
                "call",
                "demo.add",
                "--args",
                "[2, 3]",
                "--wait",
                "--timeout",
                "5",
            ])
            .args(["--broker", broker])
            .output()
            .expect("run taskhost call");
        if String::from_utf8_lossy(&out.stdout).trim() == want {
            return;
        }
        std::thread::sleep(POLL);
    }
    panic!("demo.add(2, 3) never answered {expected} within {LIMIT:?}");
}
