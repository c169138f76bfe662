//! Plugins written in Python or JavaScript, built as their authors build them (`taskhost
//! build`), once per process: the templates of each language (`taskhost new --lang L
//! <lang>hello`) and the source test plugins under `tests/plugins/` (`probe-py`, `probe-js`).

use crate::{TestDir, root, target_dir, taskhost_bin};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Runs `command` to its end; fails with `what` unless it succeeds.
fn run(command: &mut Command, what: &str) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot {what}: {e}"));
    assert!(status.success(), "{what} failed: {status}");
}

/// The component of the `lang` template (`rust`, `python`, `js`), the plugin `<lang>hello`.
pub fn template_wasm(lang: &str) -> PathBuf {
    built_once(&format!("template-{lang}"), |dir| {
        let name = format!("{lang}hello");
        let project = dir.path().join(&name);
        run(
            Command::new(taskhost_bin())
                .args(["new", &name, "--lang", lang, "--dir"])
                .arg(&project),
            &format!("taskhost new --lang {lang}"),
        );
        (project, name)
    })
}

/// The component of the source test plugin `tests/plugins/<name>` (an `app.py` or `app.js`).
pub fn source_plugin_wasm(name: &str) -> PathBuf {
    built_once(name, |dir| {
        let project = dir.path().join(name);
        copy_dir(&root().join("tests").join("plugins").join(name), &project);
        (project, name.to_owned())
    })
}

/// Builds, once per process, the project `make` writes (returning its directory and the
/// plugin's name) with `taskhost build`; returns the component, kept outside the test
/// directory (which the next run replaces).
fn built_once(key: &str, make: impl FnOnce(&TestDir) -> (PathBuf, String)) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    let mut built = built
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, wasm)) = built.iter().find(|(k, _)| k == key) {
        return wasm.clone();
    }
    let dir = TestDir::new(key);
    let (project, name) = make(&dir);
    run(
        Command::new(taskhost_bin())
            .arg("build")
            .current_dir(&project)
            // Kept across runs: the SDK's dependencies and the toolchains install once.
            .env("CARGO_TARGET_DIR", target_dir().join("template-builds"))
            .env("TASKHOST_CACHE_DIR", target_dir().join("build-cache")),
        &format!("taskhost build of {key}"),
    );
    let wasm = project.join(format!("{name}.wasm"));
    assert!(wasm.is_file(), "taskhost build wrote {}", wasm.display());
    let kept = target_dir()
        .join("template-builds")
        .join(format!("{name}.wasm"));
    std::fs::create_dir_all(target_dir().join("template-builds")).expect("mkdir");
    std::fs::copy(&wasm, &kept).expect("keep the built component");
    built.push((key.to_owned(), kept.clone()));
    kept
}

/// Copies the files of `from` (not its subdirectories) into a new directory `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the project directory");
    for entry in std::fs::read_dir(from).expect("read the test plugin's directory") {
        let entry = entry.expect("directory entry");
        if entry.file_type().expect("file type").is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy a source file");
        }
    }
}
