//! Building a JavaScript plugin (`app.js`): componentize-js (the StarlingMonkey engine, which
//! ships inside its npm package), installed with npm under the cache directory on first use,
//! its whole tree pinned by the lock this binary carries. Never `--aot`: weval downloads a
//! binary at first use.

use super::{Built, dir_name, made_once, run, sdk, temporary_output};
use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The componentize-js release JavaScript plugins are built with (its tree: the lock).
const COMPONENTIZE_JS: &str = "0.23.0";

/// Calls componentize-js's API (its `componentize` works offline where the `jco componentize`
/// command fails on a preview2-shim change).
const BUILD_SCRIPT: &str = r"
import { writeFile } from 'node:fs/promises';
import { pathToFileURL } from 'node:url';
const { componentize } = await import(pathToFileURL(process.env.COMPONENTIZE_JS).href);
const { component } = await componentize({
  sourcePath: process.env.SOURCE,
  witPath: process.env.WIT,
  worldName: 'sdk-plugin',
});
await writeFile(process.env.OUT, component);
";

/// Builds a JavaScript plugin (`app.js` in `dir`, beside the SDK as `taskhost.js`), named for
/// its directory.
pub(super) fn build(dir: &Path) -> anyhow::Result<Built> {
    let name = dir_name(dir)?;
    let cache = sdk::cache()?;
    let sdk = sdk::written(&cache.join("sdk"))?;
    let toolchain = componentize_js(&cache.join("tools"), &sdk.join("js").join("toolchain"))?;
    // The app and its modules, with the SDK this host carries as ./taskhost.js.
    let staging = std::env::temp_dir().join(format!("taskhost-build-js-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    copy_sources(dir, &staging)?;
    std::fs::copy(
        sdk.join("js").join("taskhost.js"),
        staging.join("taskhost.js"),
    )
    .context("cannot place the SDK beside the app")?;
    let out = temporary_output();
    let built = run(
        Command::new("node")
            .args(["--input-type=module", "-e", BUILD_SCRIPT])
            .env("COMPONENTIZE_JS", &toolchain)
            .env("SOURCE", staging.join("app.js"))
            .env("WIT", sdk.join("wit"))
            .env("OUT", &out),
        "componentize-js (node)",
    );
    let _ = std::fs::remove_dir_all(&staging);
    built?;
    Ok(Built {
        component: out,
        name,
        temporary: true,
    })
}

/// Copies the plugin's sources (every file but components, `node_modules` and dot-files) to
/// `to`.
fn copy_sources(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text.starts_with('.') || text == "node_modules" || text.ends_with(".wasm") {
            continue;
        }
        let (source, target) = (entry.path(), to.join(&name));
        if entry.file_type()?.is_dir() {
            copy_sources(&source, &target)?;
        } else {
            std::fs::copy(&source, &target)
                .with_context(|| format!("cannot copy {}", source.display()))?;
        }
    }
    Ok(())
}

/// componentize-js's entry module, installed once (`npm ci` from the carried lock) under
/// `tools`.
fn componentize_js(tools: &Path, lock: &Path) -> anyhow::Result<PathBuf> {
    let prefix = tools.join(format!("componentize-js-{COMPONENTIZE_JS}"));
    let entry = prefix
        .join("node_modules")
        .join("@bytecodealliance")
        .join("componentize-js")
        .join("src")
        .join("componentize.js");
    made_once(&prefix, "componentize-js install", |staging| {
        eprintln!(
            "installing componentize-js {COMPONENTIZE_JS} from npm (once) into {}",
            prefix.display()
        );
        for file in ["package.json", "package-lock.json"] {
            std::fs::copy(lock.join(file), staging.join(file))
                .with_context(|| format!("cannot copy the toolchain's {file}"))?;
        }
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(staging),
            "npm ci (is Node.js with npm installed?)",
        )
    })?;
    if !entry.is_file() {
        bail!(
            "componentize-js is not at {} after installing it",
            entry.display()
        );
    }
    Ok(entry)
}
