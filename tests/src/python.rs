//! Python with Celery from PyPI, in a virtualenv under the target directory, created once and
//! reused by every later run.

use crate::{RedisServer, TestDir, target_dir};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// What the venv holds: the Celery the wire protocol was captured from, the Flower operators
/// watch it with, Prometheus' own parser of the metrics text format, and the OpenTelemetry SDK
/// with the Celery instrumentation a tracing Celery user runs.
const REQUIREMENTS: &[&str] = &[
    "celery[redis]==5.7.0",
    "flower==2.2.0",
    "prometheus_client==0.26.0",
    "opentelemetry-sdk==1.45.2",
    "opentelemetry-exporter-otlp-proto-http==1.45.2",
    "opentelemetry-instrumentation-celery==0.66b2",
];

/// A Celery app with the demo plugin's task names (`demo.add`, `demo.tsum`, `demo.fail`,
/// `demo.echo`), for a producer's `celery_app.py`: the producer sends, a taskhost worker runs.
pub const DEMO_CELERY_APP: &str = r#"
import os
from celery import Celery

app = Celery("demo", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])

@app.task(name="demo.add")
def add(x, y):
    return x + y

@app.task(name="demo.tsum")
def tsum(numbers):
    return sum(numbers)

@app.task(name="demo.fail")
def fail(message):
    raise RuntimeError(message)

@app.task(name="demo.echo")
def echo(value):
    return value
"#;

/// The venv's python interpreter (`python -m celery ...` runs Celery's CLI).
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(create).clone()
}

/// `python ARGS` in `dir`, for a producer on `redis` (broker db 0, backend db 1, under the names
/// the tests' snippets read and under Celery's own), importing modules from `dir`.
pub fn python_in(dir: &TestDir, redis: &RedisServer, args: &[&str]) -> Command {
    python_on(dir, &redis.url(0), &redis.url(1), args)
}

/// [`python_in`] with the broker and backend URLs given (a user's, a `rediss://` one). Both
/// names matter: Celery prefers `CELERY_BROKER_URL` over the app's own argument.
pub fn python_on(dir: &TestDir, broker: &str, backend: &str, args: &[&str]) -> Command {
    let mut command = Command::new(python());
    command
        .current_dir(dir.path())
        .args(args)
        .env("BROKER", broker)
        .env("BACKEND", backend)
        .env("CELERY_BROKER_URL", broker)
        .env("CELERY_RESULT_BACKEND", backend)
        .env("PYTHONPATH", dir.path())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    command
}

/// Runs the Python `code` after `prelude` as `producer.py` in `dir` (see [`python_in`]) and
/// returns what it printed; fails the test, with its output and `logs` (the workers' logs),
/// unless it runs to its end.
pub fn run_snippet(
    dir: &TestDir,
    redis: &RedisServer,
    prelude: &str,
    code: &str,
    logs: impl Fn() -> String,
) -> String {
    run_snippet_in(
        dir,
        python_in(dir, redis, &["producer.py"]),
        prelude,
        code,
        logs,
    )
}

/// [`run_snippet`] with a `python producer.py` command of the caller's (other URLs, say).
pub fn run_snippet_in(
    dir: &TestDir,
    python: Command,
    prelude: &str,
    code: &str,
    logs: impl Fn() -> String,
) -> String {
    dir.write(
        "producer.py",
        &format!("{prelude}\n{code}\nprint('snippet OK')\n"),
    );
    let out = crate::Process::run_command(dir, python);
    assert!(
        out.status.success() && out.stdout.contains("snippet OK"),
        "python producer failed ({}):\n{}\n{}\nworker logs:\n{}",
        out.status,
        out.stdout,
        out.stderr,
        logs()
    );
    out.stdout
}

fn create() -> PathBuf {
    // Named for what it holds, so a change of requirements makes a new one.
    let venv = target_dir().join("pyenv-celery-5.7.0-flower-2.2.0-otel-1.45.2");
    let python = venv.join("bin").join("python");
    if venv.join(".ready").exists() {
        return python;
    }
    // Build it aside and rename it into place, so an interrupted or concurrent creation never
    // leaves a half-made venv where the next run would use it. (A moved venv still works when
    // run as `bin/python -m ...`.)
    let staging = target_dir().join(format!("pyenv-staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let log = target_dir().join("pyenv-install.log");
    let run = |command: &mut Command, what: &str| {
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("cannot {what}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let _ = std::fs::write(&log, &text);
        assert!(output.status.success(), "failed to {what}:\n{text}");
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&staging),
        "create a Python venv (python3 -m venv)",
    );
    run(
        Command::new(staging.join("bin").join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(REQUIREMENTS),
        "pip install Celery, Flower, prometheus_client and OpenTelemetry from PyPI",
    );
    std::fs::write(staging.join(".ready"), REQUIREMENTS.join("\n")).expect("mark venv ready");
    if std::fs::rename(&staging, &venv).is_err() {
        // Another test binary finished first; use its venv.
        let _ = std::fs::remove_dir_all(&staging);
    }
    assert!(
        venv.join(".ready").exists(),
        "no usable venv at {}",
        venv.display()
    );
    python
}
