//! `taskhost dev --watch DIR`: builds the plugin in DIR into the worker's plugin directory at
//! start and again whenever its sources change; the worker's own watcher then hot-reloads it.
//! A failed build says so and leaves the running version serving. A Python plugin's dev build
//! reads its project's sources when an instance starts, so a change that its build can serve
//! needs no build: the worker only loads the same file again.

use super::{build, fleet};
use anyhow::Context as _;
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// How long sources must be left alone before a build: an editor's save is several events.
const QUIET: Duration = Duration::from_millis(300);

/// Watches `project`; dropping the watcher ends the rebuilds.
///
/// # Errors
/// When `project` cannot be watched.
pub fn rebuild_on_change(project: &Path, plugins: &Path) -> anyhow::Result<RecommendedWatcher> {
    let project = project.canonicalize()?;
    let live = build::reads_sources_live(&project)?;
    let root = project.clone();
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && changes(&event.kind)
            && event
                .paths
                .iter()
                .any(|p| p.strip_prefix(&root).is_ok_and(is_source))
        {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&project, RecursiveMode::Recursive)?;
    let plugins = plugins.to_path_buf();
    std::thread::Builder::new()
        .name("taskhost-dev-watch".into())
        .spawn(move || {
            let mut built = build_once(&project, &plugins);
            // Made at the first change that may need it, then kept: an engine and its pool.
            let mut checker = None;
            // Ends when the watcher (the sender's owner) is dropped.
            while rx.recv().is_ok() {
                while rx.recv_timeout(QUIET).is_ok() {}
                if let (Some(name), Some(file)) = (&live, &built) {
                    match serve_sources(&mut checker, name, &project, file) {
                        Ok(()) => {
                            eprintln!(
                                "taskhost dev: {} changed; the worker loads it from its sources \
                                 (no build)",
                                project.display()
                            );
                            continue;
                        }
                        Err(e) => eprintln!("taskhost dev: the change needs a build: {e:#}"),
                    }
                }
                built = build_once(&project, &plugins).or(built);
            }
        })?;
    Ok(watcher)
}

/// Builds `project` into `plugins`; the file, or `None` (said) when the build failed.
fn build_once(project: &Path, plugins: &Path) -> Option<PathBuf> {
    eprintln!("taskhost dev: building {}", project.display());
    match build::build_into(project, plugins) {
        Ok(file) => {
            eprintln!(
                "taskhost dev: built {}; the worker loads it",
                file.display()
            );
            Some(file)
        }
        Err(e) => {
            eprintln!("taskhost dev: the build failed, the running version stays: {e:#}");
            None
        }
    }
}

/// The sandbox and grants `serve_sources` loads a dev build with: the grant the worker gives.
type Checker = (
    std::sync::Arc<crate::sandbox::Sandbox>,
    crate::config::GrantTable,
);

/// Has the worker load `file` (a build of `project` that reads its sources live) again with
/// the sources as they are now, once they load here, in `checker` (made on first use). A change
/// the build's snapshot cannot serve (a module of the standard library the build never
/// imported, a syntax error) fails here, and is built.
fn serve_sources(
    checker: &mut Option<Checker>,
    name: &str,
    project: &Path,
    file: &Path,
) -> anyhow::Result<()> {
    let (sandbox, grants) = match checker {
        Some(made) => made,
        None => {
            let config = crate::config::FileConfig::default();
            let grants = config.grants(&|_| None)?.with_dev_sources(name, project);
            let sandbox = fleet::local_sandbox(&config, &grants, crate::config::Compiler::Fast)?;
            checker.insert((sandbox, grants))
        }
    };
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    build::block_on(fleet::load_one(sandbox, file, bytes, grants))??;
    // The worker reloads a dev build on any change to its file, its bytes the same.
    std::fs::File::options()
        .write(true)
        .open(file)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .with_context(|| format!("cannot touch {}", file.display()))
}

/// Whether `kind` is a change to a file: a build reads every source (an access, not a change),
/// and rebuilding for that would build forever.
fn changes(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    matches!(
        kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
    )
}

/// Whether a change to `path` (relative to the project) can change the plugin: not what builds
/// write (`target`, `node_modules`, `__pycache__`, components) nor dot-files.
fn is_source(path: &Path) -> bool {
    let skipped = |name: &str| {
        name.starts_with('.')
            || matches!(name, "target" | "node_modules" | "__pycache__")
            || name.ends_with(".wasm")
    };
    !path
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .any(skipped)
}

/// Starts `--watch` for each project.
///
/// # Errors
/// When one cannot be watched.
pub fn start(projects: &[PathBuf], plugins: &Path) -> anyhow::Result<Vec<RecommendedWatcher>> {
    projects
        .iter()
        .map(|p| rebuild_on_change(p, plugins))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_reading_the_sources_is_no_change_but_a_save_is() {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
        assert!(!changes(&EventKind::Access(AccessKind::Open(
            AccessMode::Read
        ))));
        assert!(!changes(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(changes(&EventKind::Modify(ModifyKind::Data(
            notify::event::DataChange::Any
        ))));
        assert!(changes(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(changes(&EventKind::Create(CreateKind::File)));
    }

    #[test]
    fn build_outputs_and_dot_files_are_not_sources() {
        assert!(is_source(Path::new("src/lib.rs")));
        assert!(is_source(Path::new("app.py")));
        assert!(!is_source(Path::new("target/release/x.wasm")));
        assert!(!is_source(Path::new("__pycache__/app.pyc")));
        assert!(!is_source(Path::new(".app.py.swp")));
        assert!(!is_source(Path::new("greet.wasm")));
    }
}
