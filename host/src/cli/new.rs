//! `taskhost new`: writes a ready-to-build plugin project from the templates this binary
//! carries (`plugins/templates`, which the tests build and run as they are written here).

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The languages `new` writes a project in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name: its file name, its crate's, and the prefix of its task names (the
    /// operator's default grant is NAME.*). Lower-case letters, digits, `-` and `_`.
    pub name: String,
    /// The language of the project: rust, python or js (JavaScript).
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    pub lang: Lang,
    /// The directory to write [default: ./NAME]; it must not exist yet, or be empty.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The taskhost-sdk crate a Rust project depends on [default: the SDK of the source tree
    /// this taskhost was built from].
    #[arg(long)]
    pub sdk_path: Option<PathBuf>,
}

const PYTHON: &[(&str, &str)] = &[
    (
        "app.py",
        include_str!("../../../plugins/templates/python/app.py"),
    ),
    (
        "test_app.py",
        include_str!("../../../plugins/templates/python/test_app.py"),
    ),
    (
        ".gitignore",
        include_str!("../../../plugins/templates/python/.gitignore"),
    ),
];

const JS: &[(&str, &str)] = &[
    (
        "app.js",
        include_str!("../../../plugins/templates/js/app.js"),
    ),
    (
        ".gitignore",
        include_str!("../../../plugins/templates/js/.gitignore"),
    ),
    (
        "app.test.js",
        include_str!("../../../plugins/templates/js/app.test.js"),
    ),
    // For the author's editor and tests; `taskhost build` uses the SDK of the host that
    // builds.
    (
        "taskhost.js",
        include_str!("../../../plugins/sdk-js/taskhost.js"),
    ),
    (
        "taskhost-testing.js",
        include_str!("../../../plugins/sdk-js/taskhost-testing.js"),
    ),
];

const RUST: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../../plugins/templates/rust/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../../plugins/templates/rust/src/lib.rs"),
    ),
    (
        ".gitignore",
        include_str!("../../../plugins/templates/rust/.gitignore"),
    ),
];

/// Writes the project; prints its directory and what to do next.
pub fn new(args: &NewArgs) -> anyhow::Result<ExitCode> {
    check_name(&args.name)?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    let occupied = std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some());
    if occupied {
        bail!(
            "{} exists and is not empty: pick another --dir",
            dir.display()
        );
    }
    let (files, sdk) = match args.lang {
        Lang::Python => (PYTHON, String::new()),
        Lang::Js => (JS, String::new()),
        Lang::Rust => (RUST, rust_sdk(args.sdk_path.as_deref())?),
    };
    for (path, template) in files {
        let text = template
            .replace("{{name}}", &args.name)
            .replace("{{sdk_path}}", &sdk);
        let file = dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    }
    println!("{}", dir.display());
    let language = match args.lang {
        Lang::Rust => "Rust",
        Lang::Python => "Python",
        Lang::Js => "JavaScript",
    };
    eprintln!(
        "a {language} plugin in {}: `cd {} && taskhost build`, then \
         `taskhost exec {}.wasm {}.add --args '[2, 3]'`",
        dir.display(),
        dir.display(),
        args.name,
        args.name
    );
    Ok(ExitCode::SUCCESS)
}

/// A plugin name is a file stem, a crate name and a task-name prefix at once.
fn check_name(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !first_ok || !rest_ok || name.len() > 64 {
        bail!(
            "{name:?} cannot name a plugin: use a lower-case letter, then lower-case letters, \
             digits, `-` or `_` (at most 64)"
        );
    }
    Ok(())
}

/// The taskhost-sdk crate's directory, as an absolute path for Cargo.toml.
fn rust_sdk(given: Option<&Path>) -> anyhow::Result<String> {
    let sdk = match given {
        Some(path) => path.to_path_buf(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk"),
    };
    let sdk = sdk.canonicalize().with_context(|| {
        format!(
            "the Rust SDK is not at {} (taskhost-sdk is not on crates.io yet): pass \
             --sdk-path with the plugins/sdk directory of a taskhost clone",
            sdk.display()
        )
    })?;
    if !sdk.join("Cargo.toml").is_file() {
        bail!(
            "{} holds no Cargo.toml: not the taskhost-sdk crate",
            sdk.display()
        );
    }
    Ok(sdk.to_string_lossy().replace('\\', "/"))
}
