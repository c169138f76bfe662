//! The container image of `deploy/Containerfile`, built on this machine and run as an operator
//! would: against a Redis, a Python Celery producer's `demo.add` comes back 5, `/healthz` says
//! healthy, SIGTERM while a task runs lets it finish, the worker inside is not root, and
//! `taskhost check` runs in the image as docs/compose.md has the operator run it.
//!
//! No registry is reachable here, so the file's two bases come from local images the test
//! builds: the binary and plugins this build made (`ARTIFACTS`), and a runtime base holding
//! what the binary links, found with `ldd` (`RUNTIME`). The file itself is the one users build.
//! Podman runs it with runc and no default ulimits (`CONTAINERS_CONF`): crun refuses this
//! kind of VM's cgroups, and the default ulimits are not permitted here.

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use taskhost_tests::{
    Client, DEMO_CELERY_APP, Output, Process, RedisServer, TestDir, free_port, http_get,
    plugin_wasm, python_in, root, run_snippet_in, taskhost_bin, wait_for,
};

/// `podman ARGS`, configured for this machine.
fn podman(dir: &TestDir, args: &[&str]) -> Command {
    let conf = dir.write(
        "containers.conf",
        "[containers]\ndefault_ulimits = []\n[engine]\nruntime = \"runc\"\n",
    );
    let mut command = Command::new("podman");
    command.args(args).env("CONTAINERS_CONF", conf);
    command
}

/// Runs `podman ARGS` to completion (within `within`), which must succeed.
fn podman_ok(dir: &TestDir, args: &[&str], within: Duration) -> Output {
    let out = Process::run_command_within(dir, podman(dir, args), within);
    assert!(out.status.success(), "podman {args:?} failed: {out:?}");
    out
}

fn copy(from: &Path, to: &Path) {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).expect("create a directory");
    }
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
}

/// An image of this build's binary and plugins at `/out`, as the Containerfile's build stage
/// leaves them.
fn artifacts(dir: &TestDir, tag: &str) -> String {
    let context = dir.path().join("artifacts");
    let out = context.join("out");
    copy(&taskhost_bin(), &out.join("taskhost"));
    for plugin in ["demo", "crucible"] {
        copy(
            &plugin_wasm(plugin),
            &out.join("plugins").join(format!("{plugin}.wasm")),
        );
    }
    copy(
        &root().join("deploy/taskhost.toml"),
        &out.join("etc/taskhost.toml"),
    );
    std::fs::create_dir_all(out.join("cache")).expect("cache dir");
    std::fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY out /out\n",
    )
    .expect("write");
    let image = format!("localhost/taskhost-test-artifacts:{tag}");
    build(dir, &image, &context, &[]);
    image
}

/// A runtime base from scratch: the libraries the binary links (as `ldd` lists them) and a
/// passwd naming the non-root user, as distroless's `cc` base holds.
fn runtime_base(dir: &TestDir, tag: &str) -> String {
    let context = dir.path().join("base");
    let rootfs = context.join("rootfs");
    let ldd = Command::new("ldd")
        .arg(taskhost_bin())
        .output()
        .expect("run ldd");
    let listed = String::from_utf8_lossy(&ldd.stdout).into_owned();
    for line in listed.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux… (0x…)`.
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(path) = path {
            let real = std::fs::canonicalize(path).expect("a linked library");
            copy(&real, &rootfs.join(path.trim_start_matches('/')));
        }
    }
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc).expect("etc");
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:1000:1000:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    .expect("passwd");
    std::fs::write(etc.join("group"), "root:x:0:\nnonroot:x:1000:\n").expect("group");
    std::fs::create_dir_all(rootfs.join("tmp")).expect("tmp");
    std::fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY rootfs /\n",
    )
    .expect("write");
    let image = format!("localhost/taskhost-test-base:{tag}");
    build(dir, &image, &context, &[]);
    image
}

fn build(dir: &TestDir, image: &str, context: &Path, extra: &[&str]) {
    let context = context.to_string_lossy().into_owned();
    let mut args = vec!["build", "-q", "-t", image];
    args.extend(extra);
    args.push(&context);
    podman_ok(dir, &args, Duration::from_secs(300));
}

/// A running container, removed (with its images) when dropped.
struct Container {
    dir: PathBuf,
    name: String,
    images: Vec<String>,
}

impl Drop for Container {
    fn drop(&mut self) {
        let conf = self.dir.join("containers.conf");
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "0", &self.name])
            .env("CONTAINERS_CONF", &conf)
            .output();
        for image in &self.images {
            let _ = Command::new("podman")
                .args(["rmi", "-f", image])
                .env("CONTAINERS_CONF", &conf)
                .output();
        }
    }
}

#[test]
fn the_image_runs_a_celery_task_stays_healthy_stops_cleanly_and_is_not_root() {
    let dir = TestDir::new("container");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let artifacts = artifacts(&dir, &tag);
    let base = runtime_base(&dir, &tag);
    let image = format!("localhost/taskhost-test:{tag}");
    let file = root().join("deploy/Containerfile");
    let (file, repo) = (
        file.to_string_lossy().into_owned(),
        root().to_string_lossy().into_owned(),
    );
    let (artifacts_arg, base_arg) = (format!("ARTIFACTS={artifacts}"), format!("RUNTIME={base}"));
    podman_ok(
        &dir,
        &[
            "build",
            "-q",
            "-f",
            &file,
            "--build-arg",
            &artifacts_arg,
            "--build-arg",
            &base_arg,
            "-t",
            &image,
            &repo,
        ],
        Duration::from_secs(300),
    );
    let redis = RedisServer::start(&dir);
    let metrics = format!("127.0.0.1:{}", free_port());
    let name = format!("taskhost-test-{tag}");
    let container = Container {
        dir: dir.path().to_path_buf(),
        name: name.clone(),
        images: vec![image.clone(), artifacts, base],
    };
    podman_ok(
        &dir,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "-e",
            &format!("CELERY_BROKER_URL={}", redis.url(0)),
            "-e",
            &format!("CELERY_RESULT_BACKEND={}", redis.url(1)),
            "-e",
            &format!("TASKHOST_METRICS_ADDR={metrics}"),
            &image,
            "-c",
            "2",
            "-n",
            "container@test",
        ],
        Duration::from_secs(60),
    );
    let logs = || {
        let out = podman(&dir, &["logs", &container.name]).output();
        out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    };
    wait_for("/healthz to say healthy", || {
        http_get(&metrics, "/healthz", None).filter(|(status, _)| *status == 200)
    });
    // A Python Celery producer, as the seed's services send.
    run_snippet_in(
        &dir,
        python_in(&dir, &redis, &["producer.py"]),
        DEMO_CELERY_APP,
        "assert add.delay(2, 3).get(timeout=30) == 5",
        logs,
    );
    // The process inside runs as the image's non-root user.
    let pid = podman_ok(
        &dir,
        &["inspect", "--format", "{{.State.Pid}}", &name],
        Duration::from_secs(30),
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.stdout.trim()))
        .expect("the worker's /proc status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .expect("a Uid line");
    assert_eq!(uid, "1000", "the worker runs as uid {uid}");
    // SIGTERM while a task runs: it finishes within the grace, and the worker exits 0.
    let mut client = Client::new(&redis);
    let id = client.send("demo.sleep", json!([1500]));
    wait_for("the sleep to be taken", || {
        (client.llen("celery") == 0 && client.in_flight("container@test") == 1).then_some(())
    });
    podman_ok(
        &dir,
        &["kill", "--signal", "TERM", &name],
        Duration::from_secs(30),
    );
    let exit = podman_ok(&dir, &["wait", &name], Duration::from_secs(60));
    assert_eq!(exit.stdout.trim(), "0", "exit status; logs:\n{}", logs());
    let doc = client.state(&id);
    let finished = doc.as_ref().is_some_and(|d| d["status"] == "SUCCESS");
    assert!(
        finished || client.llen("celery") == 1,
        "the running task neither finished nor went back: {doc:?}\n{}",
        logs()
    );
    // docs/compose.md's step 2: `taskhost check` in the image, with the worker's settings.
    let checked = podman_ok(
        &dir,
        &[
            "run",
            "--rm",
            "--network",
            "host",
            "--entrypoint",
            "/usr/local/bin/taskhost",
            "-e",
            &format!("CELERY_BROKER_URL={}", redis.url(0)),
            "-e",
            &format!("CELERY_RESULT_BACKEND={}", redis.url(1)),
            &image,
            "check",
        ],
        Duration::from_secs(120),
    );
    assert!(
        checked.stdout.contains("ok    plugins"),
        "{}",
        checked.stdout
    );
    drop(container);
}
