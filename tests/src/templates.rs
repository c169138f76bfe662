//! The plugin templates of each language, as an author starts from them: written by
//! `taskhost new --lang L <lang>hello` and built by `taskhost build`, once per process.

use crate::{TestDir, target_dir, taskhost_bin};
use std::path::PathBuf;
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
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    let mut built = built
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, wasm)) = built.iter().find(|(l, _)| l == lang) {
        return wasm.clone();
    }
    let name = format!("{lang}hello");
    let dir = TestDir::new(&format!("template-{lang}"));
    let project = dir.path().join(&name);
    run(
        Command::new(taskhost_bin())
            .args(["new", &name, "--lang", lang, "--dir"])
            .arg(&project),
        &format!("taskhost new --lang {lang}"),
    );
    run(
        Command::new(taskhost_bin())
            .arg("build")
            .current_dir(&project)
            // Kept across runs: the SDK's dependencies and the toolchains install once.
            .env("CARGO_TARGET_DIR", target_dir().join("template-builds"))
            .env("TASKHOST_CACHE_DIR", target_dir().join("build-cache")),
        &format!("taskhost build of the {lang} template"),
    );
    let wasm = project.join(format!("{name}.wasm"));
    assert!(wasm.is_file(), "taskhost build wrote {}", wasm.display());
    // Kept out of the test directory, which the next run replaces.
    let kept = target_dir()
        .join("template-builds")
        .join(format!("{name}.wasm"));
    std::fs::create_dir_all(target_dir().join("template-builds")).expect("mkdir");
    std::fs::copy(&wasm, &kept).expect("keep the template's component");
    built.push((lang.to_owned(), kept.clone()));
    kept
}
