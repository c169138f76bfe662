//! `taskhost build`: builds the plugin in a directory into a component, whatever its language,
//! told by the file that marks it:
//!
//! - Rust (a `Cargo.toml`): cargo for `wasm32-wasip2`, release profile ([`rust`]).
//! - Python (an `app.py`): componentize-py ([`python`]).
//! - JavaScript (an `app.js`): componentize-js, the StarlingMonkey engine ([`js`]).
//!
//! The Python and JavaScript toolchains are pinned and installed on first use under the cache
//! directory; their SDKs and WIT come from this binary ([`sdk`]), so a plugin is always built
//! against the contract of the host that builds it. The component is written beside a
//! temporary name and renamed into place, so a worker watching the output's directory never
//! loads a half-written file.

mod js;
mod python;
mod rust;
mod sdk;

use anyhow::{Context as _, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The plugin's directory.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Where to write the component [default: DIR/NAME.wasm, NAME the plugin's name: its
    /// crate's for Rust, its directory's otherwise].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

/// The languages a plugin directory can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Language {
    Rust,
    Python,
    Js,
}

/// Builds the plugin in `args.dir`; prints where the component went.
pub fn build(args: &BuildArgs) -> anyhow::Result<ExitCode> {
    let output = build_to(&args.dir, Purpose::Deploy, |name| {
        args.output
            .clone()
            .unwrap_or_else(|| args.dir.join(format!("{name}.wasm")))
    })?;
    println!("{}", output.display());
    Ok(ExitCode::SUCCESS)
}

/// Builds the plugin in `dir` into `<plugins>/NAME.wasm` for `taskhost dev --watch`; returns
/// the file. Not pre-warmed: an edit shows up seconds sooner, and a task's speed is not what
/// the author is looking at then. A Python plugin reads its sources live ([`Sources::Live`]).
pub fn build_into(dir: &Path, plugins: &Path) -> anyhow::Result<PathBuf> {
    build_to(dir, Purpose::Dev, |name| {
        plugins.join(format!("{name}.wasm"))
    })
}

/// What a build is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A plugin to deploy: an interpreted one is pre-warmed ([`prewarmed`]).
    Deploy,
    /// `taskhost dev --watch`: built sooner, and reading its sources live where it can.
    Dev,
}

/// Where a Python plugin's tasks come from when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sources {
    /// The sources as they were built.
    Built,
    /// The project's sources as they are when an instance starts, where the worker grants
    /// them ([`crate::config::grants::Grants::dev_sources`]); as built elsewhere.
    Live,
}

/// The name of the plugin built from `dir` when its build reads its sources live (a Python
/// project), for `taskhost dev` to grant it those sources.
///
/// # Errors
/// When `dir` is no plugin project.
pub fn reads_sources_live(dir: &Path) -> anyhow::Result<Option<String>> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no plugin directory {}", dir.display()))?;
    Ok(match language(&dir)? {
        Language::Python => Some(dir_name(&dir)?),
        Language::Rust | Language::Js => None,
    })
}

/// Builds the plugin in `dir` and places it where `output` says for its name.
fn build_to(
    dir: &Path,
    purpose: Purpose,
    output: impl FnOnce(&str) -> PathBuf,
) -> anyhow::Result<PathBuf> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no plugin directory {}", dir.display()))?;
    let sources = match purpose {
        Purpose::Deploy => Sources::Built,
        Purpose::Dev => Sources::Live,
    };
    let (built, interpreted) = match language(&dir)? {
        Language::Rust => (rust::build(&dir)?, false),
        Language::Python => (python::build(&dir, sources)?, true),
        Language::Js => (js::build(&dir)?, true),
    };
    let built = if interpreted && purpose == Purpose::Deploy {
        prewarmed(built)?
    } else {
        built
    };
    let output = output(&built.name);
    let placed = place(&built.component, &output);
    if built.temporary {
        let _ = std::fs::remove_file(&built.component);
    }
    placed?;
    Ok(output)
}

/// An interpreted plugin's component pre-warmed in place (`sandbox::prewarm`): the state its
/// interpreter reaches answering `version()` and `tasks()` becomes its initial state, so no
/// fresh instance pays for getting there.
fn prewarmed(built: Built) -> anyhow::Result<Built> {
    let warm = || -> anyhow::Result<()> {
        let component = std::fs::read(&built.component)
            .with_context(|| format!("cannot read {}", built.component.display()))?;
        let file = crate::config::FileConfig::default();
        let sandbox = super::fleet::local_sandbox(
            &file,
            &file.grants(&|_| None)?,
            crate::config::Compiler::Optimizing,
        )?;
        let warmed = block_on(sandbox.prewarm(&component))??;
        std::fs::write(&built.component, warmed)
            .with_context(|| format!("cannot write {}", built.component.display()))
    };
    warm().context("cannot pre-warm the plugin (instantiate it and call version() and tasks())")?;
    Ok(built)
}

/// Runs `work` to its end from a thread that is not the runtime's.
pub fn block_on<F: std::future::Future>(work: F) -> anyhow::Result<F::Output> {
    Ok(match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(work),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(work),
    })
}

/// What a language's build made.
struct Built {
    component: PathBuf,
    /// The plugin's name, for the default output file.
    name: String,
    /// The component is a temporary file, removed once placed.
    temporary: bool,
}

fn language(dir: &Path) -> anyhow::Result<Language> {
    if dir.join("Cargo.toml").is_file() {
        Ok(Language::Rust)
    } else if dir.join("app.py").is_file() {
        Ok(Language::Python)
    } else if dir.join("app.js").is_file() {
        Ok(Language::Js)
    } else {
        bail!(
            "{} holds no Cargo.toml (Rust), app.py (Python) or app.js (JavaScript): not a \
             plugin directory (`taskhost new` makes one)",
            dir.display()
        )
    }
}

/// Runs `command`, failing with `what` and its exit status unless it succeeds (its output
/// goes to the terminal, where the author reads the compiler).
fn run(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("cannot {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Makes the directory `target` once: `make` fills a staging directory beside it, which is
/// marked ready and renamed into place, so an interrupted or concurrent making never leaves a
/// half-made `target` that looks finished. `what` names it in errors.
fn made_once(
    target: &Path,
    what: &str,
    make: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if target.join(".ready").is_file() {
        return Ok(());
    }
    let parent = target.parent().context("no parent directory")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = parent.join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let made = make(&staging).and_then(|()| Ok(std::fs::write(staging.join(".ready"), "")?));
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if std::fs::rename(&staging, target).is_err() {
        // Another build finished first: use what it made.
        let _ = std::fs::remove_dir_all(&staging);
    }
    if !target.join(".ready").is_file() {
        bail!("no usable {what} at {} after making it", target.display());
    }
    Ok(())
}

/// The plugin directory's name: a Python or JavaScript plugin's name.
fn dir_name(dir: &Path) -> anyhow::Result<String> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .context("the plugin directory has no name")
}

/// A file in the temporary directory for a build's output.
fn temporary_output() -> PathBuf {
    std::env::temp_dir().join(format!("taskhost-build-{}.wasm", std::process::id()))
}

/// Copies `built` to `output` through a temporary name beside it.
fn place(built: &Path, output: &Path) -> anyhow::Result<()> {
    let name = output
        .file_name()
        .and_then(|n| n.to_str())
        .context("the output has no file name")?;
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp"));
    std::fs::copy(built, &tmp)
        .with_context(|| format!("cannot copy {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, output).with_context(|| format!("cannot write {}", output.display()))?;
    Ok(())
}
