//! Building a Python plugin (`app.py`): componentize-py, pinned, installed from PyPI into a venv
//! under the cache directory on first use, with the Python SDK this binary carries.

use super::{Built, Sources, dir_name, made_once, run, sdk, temporary_output};
use std::path::Path;
use std::process::Command;

/// The componentize-py release Python plugins are built with (it bundles CPython).
const COMPONENTIZE_PY: &str = "0.25.1";

/// Builds a Python plugin (`app.py` in `dir`), named for its directory. `sources` says where
/// its tasks come from at run time.
pub(super) fn build(dir: &Path, sources: Sources) -> anyhow::Result<Built> {
    let name = dir_name(dir)?;
    let cache = sdk::cache()?;
    let mut componentize = componentize_py(&cache.join("tools"))?;
    let sdk = sdk::written(&cache.join("sdk"))?;
    let out = temporary_output();
    // A live build's app is the SDK's `taskhost_dev`, which imports the author's `app`.
    let app = match sources {
        Sources::Built => "app",
        Sources::Live => "taskhost_dev",
    };
    componentize
        .arg("-q")
        .arg("-d")
        .arg(sdk.join("wit"))
        .args(["-w", "sdk-plugin", "componentize", app, "-p"])
        .arg(dir)
        .arg("-p")
        .arg(sdk.join("python"));
    if sources == Sources::Live {
        componentize.arg("-p").arg(sdk.join("python-dev"));
    }
    run(
        componentize
            .arg("-o")
            .arg(&out)
            // Its own venv's site-packages would otherwise be searched for the app's imports.
            .env_remove("VIRTUAL_ENV"),
        "componentize-py",
    )?;
    Ok(Built {
        component: out,
        name,
        temporary: true,
    })
}

/// componentize-py, installed once into a venv of its own under `tools`: a command running
/// it through the venv's Python (the venv is made aside and renamed, which breaks the
/// shebang of its scripts but not `bin/python`).
fn componentize_py(tools: &Path) -> anyhow::Result<Command> {
    let venv = tools.join(format!("componentize-py-{COMPONENTIZE_PY}"));
    made_once(&venv, "componentize-py venv", |staging| {
        eprintln!(
            "installing componentize-py {COMPONENTIZE_PY} from PyPI (once) into {}",
            venv.display()
        );
        run(
            Command::new("python3").args(["-m", "venv"]).arg(staging),
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
        )
    })?;
    let mut command = Command::new(venv.join("bin").join("python"));
    command.args([
        "-c",
        "import sys; from componentize_py import script; \
         sys.argv[0] = 'componentize-py'; sys.exit(script())",
    ]);
    Ok(command)
}
