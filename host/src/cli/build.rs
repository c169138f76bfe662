//! `taskhost build`: builds the plugin in a directory into a component, whatever its language.
//!
//! - Rust (a `Cargo.toml`): cargo for `wasm32-wasip2` (the target is added with rustup when
//!   missing), release profile.
//! - Python (an `app.py`): componentize-py, pinned, installed from PyPI into a venv under the
//!   cache directory on first use, with the Python SDK and WIT this binary carries (so a plugin
//!   is always built against the contract of the host that builds it).
//!
//! The component is written beside a temporary name and renamed into place, so a worker
//! watching the output's directory never loads a half-written file.

use anyhow::{Context as _, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The componentize-py release Python plugins are built with (it bundles CPython).
const COMPONENTIZE_PY: &str = "0.25.1";

/// The Python SDK and its WIT world, as this binary was built with them.
const PYTHON_SDK: &[(&str, &str)] = &[
    (
        "taskhost/__init__.py",
        include_str!("../../../plugins/sdk-python/taskhost/__init__.py"),
    ),
    (
        "taskhost/http.py",
        include_str!("../../../plugins/sdk-python/taskhost/http.py"),
    ),
    (
        "wit/world.wit",
        include_str!("../../../plugins/sdk-python/wit/world.wit"),
    ),
    (
        "wit/deps/plugin.wit",
        include_str!("../../../wit/plugin.wit"),
    ),
    (
        "wit/deps/cli.wit",
        include_str!("../../../plugins/sdk-python/wit/deps/cli.wit"),
    ),
    (
        "wit/deps/clocks.wit",
        include_str!("../../../plugins/sdk-python/wit/deps/clocks.wit"),
    ),
    (
        "wit/deps/filesystem.wit",
        include_str!("../../../plugins/sdk-python/wit/deps/filesystem.wit"),
    ),
    (
        "wit/deps/http.wit",
        include_str!("../../../plugins/sdk-python/wit/deps/http.wit"),
    ),
    (
        "wit/deps/io.wit",
        include_str!("../../../plugins/sdk-python/wit/deps/io.wit"),
    ),
    (
        "wit/deps/random.wit",
        include_str!("../../../plugins/sdk-python/wit/deps/random.wit"),
    ),
    (
        "wit/deps/sockets.wit",
        include_str!("../../../plugins/sdk-python/wit/deps/sockets.wit"),
    ),
];

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

/// The languages a plugin directory can be in, told by the file that marks each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Language {
    Rust,
    Python,
}

/// Builds the plugin in `args.dir`; prints where the component went.
pub fn build(args: &BuildArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("no plugin directory {}", args.dir.display()))?;
    let language = language(&dir)?;
    let (built, name) = match language {
        Language::Rust => rust(&dir)?,
        Language::Python => python(&dir)?,
    };
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| dir.join(format!("{name}.wasm")));
    let placed = place(&built, &output);
    if language == Language::Python {
        // componentize-py's output, in the temporary directory.
        let _ = std::fs::remove_file(&built);
    }
    placed?;
    println!("{}", output.display());
    Ok(ExitCode::SUCCESS)
}

fn language(dir: &Path) -> anyhow::Result<Language> {
    if dir.join("Cargo.toml").is_file() {
        Ok(Language::Rust)
    } else if dir.join("app.py").is_file() {
        Ok(Language::Python)
    } else {
        bail!(
            "{} holds no Cargo.toml (Rust) or app.py (Python): not a plugin directory \
             (`taskhost new` makes one)",
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

/// Builds a Rust plugin: the component cargo wrote, and the crate's name.
fn rust(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    if let Ok(out) = installed
        && !String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "wasm32-wasip2")
    {
        eprintln!("adding the wasm32-wasip2 target (rustup target add wasm32-wasip2)");
        run(
            Command::new("rustup").args(["target", "add", "wasm32-wasip2"]),
            "add the wasm32-wasip2 target",
        )?;
    }
    let manifest = dir.join("Cargo.toml");
    let metadata = Command::new("cargo")
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .context("cannot run cargo (is Rust installed?)")?;
    if !metadata.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&metadata.stderr)
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).context("cargo metadata printed no JSON")?;
    let (name, lib) = crate_names(&metadata, &manifest)?;
    let target_dir = metadata["target_directory"]
        .as_str()
        .context("cargo metadata names no target directory")?;
    run(
        Command::new("cargo")
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "-p",
                &name,
            ])
            .arg("--manifest-path")
            .arg(&manifest),
        "cargo build",
    )?;
    let built = Path::new(target_dir)
        .join("wasm32-wasip2")
        .join("release")
        .join(format!("{lib}.wasm"));
    Ok((built, name))
}

/// The package of `manifest` in cargo's metadata: its name, and its library's (the file cargo
/// writes). A plugin is a `cdylib`.
fn crate_names(metadata: &serde_json::Value, manifest: &Path) -> anyhow::Result<(String, String)> {
    let manifest = manifest.canonicalize()?;
    let package = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            p["manifest_path"]
                .as_str()
                .and_then(|m| Path::new(m).canonicalize().ok())
                .is_some_and(|m| m == manifest)
        })
        .with_context(|| format!("{} declares no package", manifest.display()))?;
    let name = package["name"].as_str().unwrap_or_default().to_owned();
    let lib = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| {
            t["crate_types"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"))
        })
        .and_then(|t| t["name"].as_str())
        .with_context(|| {
            format!(
                "{name} has no cdylib library: a plugin's Cargo.toml needs \
                 [lib] crate-type = [\"cdylib\"]"
            )
        })?;
    Ok((name, lib.replace('-', "_")))
}

/// Builds a Python plugin (`app.py` in `dir`): the component, and the directory's name.
fn python(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("the plugin directory has no name")?
        .to_owned();
    let cache = crate::config::resolve::default_cache_dir()
        .context("no cache directory: set TASKHOST_CACHE_DIR or HOME")?;
    let mut componentize = componentize_py(&cache.join("tools"))?;
    let sdk = python_sdk(&cache.join("sdk"))?;
    let out = std::env::temp_dir().join(format!("taskhost-build-{}.wasm", std::process::id()));
    run(
        componentize
            .arg("-q")
            .arg("-d")
            .arg(sdk.join("wit"))
            .args(["-w", "python-plugin", "componentize", "app", "-p"])
            .arg(dir)
            .arg("-p")
            .arg(&sdk)
            .arg("-o")
            .arg(&out)
            // Its own venv's site-packages would otherwise be searched for the app's imports.
            .env_remove("VIRTUAL_ENV"),
        "componentize-py",
    )?;
    Ok((out, name))
}

/// componentize-py, installed once into a venv of its own under `tools`: a command running
/// it through the venv's Python (the venv is made aside and renamed, which breaks the
/// shebang of its scripts but not `bin/python`).
fn componentize_py(tools: &Path) -> anyhow::Result<Command> {
    let venv = tools.join(format!("componentize-py-{COMPONENTIZE_PY}"));
    let python = venv.join("bin").join("python");
    let command = || {
        let mut command = Command::new(&python);
        command.args([
            "-c",
            "import sys; from componentize_py import script; \
             sys.argv[0] = 'componentize-py'; sys.exit(script())",
        ]);
        command
    };
    if venv.join(".ready").is_file() {
        return Ok(command());
    }
    eprintln!(
        "installing componentize-py {COMPONENTIZE_PY} from PyPI (once) into {}",
        venv.display()
    );
    std::fs::create_dir_all(tools).with_context(|| format!("cannot create {}", tools.display()))?;
    // Made aside and renamed into place: an interrupted install never looks finished.
    let staging = tools.join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&staging),
        "create a venv (python3 -m venv; on Debian: apt-get install python3-venv)",
    )?;
    run(
        Command::new(staging.join("bin").join("python")).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("componentize-py=={COMPONENTIZE_PY}"),
        ]),
        "pip install componentize-py",
    )?;
    std::fs::write(staging.join(".ready"), COMPONENTIZE_PY)?;
    if std::fs::rename(&staging, &venv).is_err() {
        // Another build finished first: use its venv.
        let _ = std::fs::remove_dir_all(&staging);
    }
    if !venv.join(".ready").is_file() {
        bail!(
            "no usable venv at {} after installing componentize-py",
            venv.display()
        );
    }
    Ok(command())
}

/// The SDK this binary carries, written once under `root` in a directory named for its
/// contents.
fn python_sdk(root: &Path) -> anyhow::Result<PathBuf> {
    use sha2::Digest as _;
    let mut digest = sha2::Sha256::new();
    for (path, text) in PYTHON_SDK {
        digest.update(path.as_bytes());
        digest.update(text.as_bytes());
    }
    let digest: String = digest.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let sdk = root.join(format!("python-{digest}"));
    if sdk.join(".ready").is_file() {
        return Ok(sdk);
    }
    let staging = root.join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    for (path, text) in PYTHON_SDK {
        let file = staging.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    }
    std::fs::write(staging.join(".ready"), "")?;
    if std::fs::rename(&staging, &sdk).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(sdk)
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
