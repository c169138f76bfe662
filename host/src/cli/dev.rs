//! The embedded default for trying taskhost: a private `redis-server` on a free loopback port,
//! owned by this process (it dies with it), and a state file so `taskhost call` on the same
//! machine finds it without being told.

use anyhow::{Context as _, bail};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process keeping nothing on disk.
pub struct PrivateRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    /// Starts `redis-server` (from PATH) on a free port and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(redis) => return Ok(redis),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    async fn try_start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port")?
            .port();
        let dir = std::env::temp_dir().join(format!("taskhost-dev-redis-{port}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        die_with_parent(&mut command);
        // A process group of its own: a terminal's Ctrl-C goes to the whole foreground group,
        // and the worker needs its Redis while it stops (returning what it holds, leaving the
        // registry); it stops the server itself afterwards.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "redis-server is not on PATH: install Redis, or point --broker at a running one"
                )
            } else {
                anyhow::anyhow!("cannot start redis-server: {e}")
            }
        })?;
        let mut redis = Self { child, port, dir };
        redis.wait_ready(Duration::from_secs(10)).await?;
        Ok(redis)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = crate::redis::client(&self.url())?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "redis-server on port {} exited at start ({status})",
                    self.port
                );
            }
            if crate::redis::answers(&client).await {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "redis-server on port {} did not answer within {timeout:?}",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The broker URL of this server (database 0).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Asks the kernel to kill the child when this process dies, however it dies, so a private
/// Redis never outlives its `taskhost dev`.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Where `taskhost dev` records its broker for `taskhost call` (`TASKHOST_DEV_STATE` overrides).
pub fn state_path() -> PathBuf {
    if let Some(path) = std::env::var_os("TASKHOST_DEV_STATE") {
        return PathBuf::from(path);
    }
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("taskhost-dev-{uid}.json"))
}

/// The state file, written while `taskhost dev` runs and removed when it stops.
pub struct StateFile(PathBuf);

impl StateFile {
    pub fn write(broker_url: &str) -> anyhow::Result<Self> {
        let path = state_path();
        let state = serde_json::json!({"broker_url": broker_url, "pid": std::process::id()});
        std::fs::write(&path, state.to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The broker of a running `taskhost dev`, if there is one.
pub fn running_broker() -> Option<String> {
    let text = std::fs::read_to_string(state_path()).ok()?;
    let state: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pid = state.get("pid")?.as_u64()?;
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return None;
    }
    state.get("broker_url")?.as_str().map(str::to_owned)
}
