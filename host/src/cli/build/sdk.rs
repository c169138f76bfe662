//! The SDKs, toolchain lock and WIT this binary carries, written once under the cache directory
//! in a directory named for their contents.

use anyhow::Context as _;
use std::path::{Path, PathBuf};

/// The Python and JavaScript SDKs, the toolchain lock for JavaScript, and the WIT world both
/// build for, as this binary was built with them (written under the cache directory when a
/// build needs them).
const SDK_FILES: &[(&str, &str)] = &[
    (
        "python/taskhost/__init__.py",
        include_str!("../../../../plugins/sdk-python/taskhost/__init__.py"),
    ),
    (
        "python/taskhost/http.py",
        include_str!("../../../../plugins/sdk-python/taskhost/http.py"),
    ),
    (
        "python/taskhost/canvas.py",
        include_str!("../../../../plugins/sdk-python/taskhost/canvas.py"),
    ),
    (
        "python/taskhost/_host.py",
        include_str!("../../../../plugins/sdk-python/taskhost/_host.py"),
    ),
    (
        "python/taskhost/_wasi_http.py",
        include_str!("../../../../plugins/sdk-python/taskhost/_wasi_http.py"),
    ),
    (
        "python/taskhost/trace.py",
        include_str!("../../../../plugins/sdk-python/taskhost/trace.py"),
    ),
    (
        "python/taskhost/_double.py",
        include_str!("../../../../plugins/sdk-python/taskhost/_double.py"),
    ),
    (
        "python/taskhost/testing.py",
        include_str!("../../../../plugins/sdk-python/taskhost/testing.py"),
    ),
    (
        "python-dev/taskhost_dev.py",
        include_str!("../../../../plugins/sdk-python/dev/taskhost_dev.py"),
    ),
    (
        "js/taskhost.js",
        include_str!("../../../../plugins/sdk-js/taskhost.js"),
    ),
    (
        "js/toolchain/package.json",
        include_str!("../../../../plugins/sdk-js/toolchain/package.json"),
    ),
    (
        "js/toolchain/package-lock.json",
        include_str!("../../../../plugins/sdk-js/toolchain/package-lock.json"),
    ),
    (
        "wit/deps/plugin.wit",
        include_str!("../../../../wit/plugin.wit"),
    ),
    (
        "wit/world.wit",
        include_str!("../../../../plugins/sdk-wit/world.wit"),
    ),
    (
        "wit/deps/cli.wit",
        include_str!("../../../../plugins/sdk-wit/deps/cli.wit"),
    ),
    (
        "wit/deps/clocks.wit",
        include_str!("../../../../plugins/sdk-wit/deps/clocks.wit"),
    ),
    (
        "wit/deps/filesystem.wit",
        include_str!("../../../../plugins/sdk-wit/deps/filesystem.wit"),
    ),
    (
        "wit/deps/http.wit",
        include_str!("../../../../plugins/sdk-wit/deps/http.wit"),
    ),
    (
        "wit/deps/io.wit",
        include_str!("../../../../plugins/sdk-wit/deps/io.wit"),
    ),
    (
        "wit/deps/random.wit",
        include_str!("../../../../plugins/sdk-wit/deps/random.wit"),
    ),
    (
        "wit/deps/sockets.wit",
        include_str!("../../../../plugins/sdk-wit/deps/sockets.wit"),
    ),
    (
        "wit/deps/otel/world.wit",
        include_str!("../../../../wit/otel/deps/otel/world.wit"),
    ),
    (
        "wit/deps/otel/types.wit",
        include_str!("../../../../wit/otel/deps/otel/types.wit"),
    ),
    (
        "wit/deps/otel/tracing.wit",
        include_str!("../../../../wit/otel/deps/otel/tracing.wit"),
    ),
    (
        "wit/deps/clocks-0.2.0/wall-clock.wit",
        include_str!("../../../../wit/otel/deps/clocks/wall-clock.wit"),
    ),
];

/// The cache directory builds keep their toolchains and SDKs in.
pub(super) fn cache() -> anyhow::Result<PathBuf> {
    crate::config::resolve::default_cache_dir()
        .context("no cache directory: set TASKHOST_CACHE_DIR or HOME")
}

/// The SDKs, lock and WIT this binary carries, written once under `root` in a directory
/// named for their contents.
pub(super) fn written(root: &Path) -> anyhow::Result<PathBuf> {
    use sha2::Digest as _;
    let mut digest = sha2::Sha256::new();
    for (path, text) in SDK_FILES {
        digest.update(path.as_bytes());
        digest.update(text.as_bytes());
    }
    let digest: String = digest.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let sdk = root.join(digest);
    super::made_once(&sdk, "SDK", |staging| {
        for (path, text) in SDK_FILES {
            let file = staging.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            std::fs::write(&file, text)
                .with_context(|| format!("cannot write {}", file.display()))?;
        }
        Ok(())
    })?;
    Ok(sdk)
}
