//! A smoke run of the bench (a few tasks, one repeat), so it cannot rot: every section of the
//! table is printed with figures, Celery included.

use std::io::Read;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Reads `pipe` to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[test]
fn the_bench_runs_and_prints_every_section() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskhost-bench"))
        .arg("--smoke")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start taskhost-bench");
    // Read while it runs: a pipe holds 64 KiB, and a bench that fills it waits for a reader.
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the bench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the bench smoke run took over 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    assert!(
        status.success(),
        "the bench failed: {status}\n{stdout}\n{stderr}"
    );
    for section in [
        "drain throughput: 40 demo.add",
        "drain throughput: 40 demo.echo 10 KB",
        "drain throughput: 40 demo.progress (host API)",
        "latency of demo.add at 50 tasks/s",
        "memory of the whole worker",
        "start to first result",
        "scaling: demo.add drain over taskhost worker processes",
    ] {
        assert!(stdout.contains(section), "no {section:?} in:\n{stdout}");
    }
    for row in [
        "celery prefork -c 2",
        "celery threads -c 8",
        "taskhost -c 1",
        "taskhost -c 4",
        "taskhost 2 procs x -c 4",
        "taskhost -c 4 precompile cache",
        "taskhost's per-task Redis work, pipelined",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in:\n{stdout}"));
        let median: f64 = line[row.len() + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no median figure in {line:?}"));
        assert!(median > 0.0, "a zero figure in {line:?}");
    }
}
