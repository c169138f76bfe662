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
/// command fails on a preview2-shim change), keeping what its splicer makes under `SPLICED`.
///
/// The splicer rewrites the 10 MB StarlingMonkey engine for the WIT world: three quarters of a
/// build (2.9 of 4.1 s here), and the same for every build with the same engine, features and
/// WIT, whatever the app. So its result is kept, named for a digest of those inputs (the WIT
/// by its files' contents, not its path).
const BUILD_SCRIPT: &str = r"
import { createHash } from 'node:crypto';
import { closeSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync,
  rmSync, statSync, writeSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
const entry = pathToFileURL(process.env.COMPONENTIZE_JS).href;
const { componentize } = await import(entry);
const { splicer } = await import(new URL('../lib/spidermonkey-embedding-splicer.js', entry).href);
const splice = splicer.spliceBindings.bind(splicer);
function digestTree(dir, digest) {
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) digestTree(path, digest);
    else digest.update(path.slice(process.env.WIT.length)).update('\n').update(readFileSync(path));
  }
}
function writeSynced(path, bytes) {
  const fd = openSync(path, 'w', 0o600);
  try { writeSync(fd, bytes); fsyncSync(fd); } finally { closeSync(fd); }
}
// (engine, features, world, witPath, worldName, debug)
splicer.spliceBindings = (engine, ...rest) => {
  const digest = createHash('sha256').update(engine);
  digest.update(JSON.stringify(rest.filter((_, i) => i !== 2)));
  digestTree(process.env.WIT, digest);
  const kept = join(process.env.SPLICED, digest.digest('hex'));
  try {
    const made = JSON.parse(readFileSync(join(kept, 'bindings.json'), 'utf8'));
    made.wasm = readFileSync(join(kept, 'engine.wasm'));
    return made;
  } catch {}
  const made = splice(engine, ...rest);
  const staging = `${kept}.${process.pid}`;
  rmSync(staging, { recursive: true, force: true });
  mkdirSync(staging, { mode: 0o700 });
  writeSynced(join(staging, 'engine.wasm'), made.wasm);
  writeSynced(join(staging, 'bindings.json'), JSON.stringify({ ...made, wasm: undefined }));
  rmSync(kept, { recursive: true, force: true });
  renameSync(staging, kept);
  return made;
};
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
    // Its entries are code every JavaScript plugin built here runs: this user's alone.
    let spliced = cache.join("tools").join("componentize-js-spliced");
    crate::sandbox::private_dir(&spliced)
        .with_context(|| format!("cannot keep the splicer's output in {}", spliced.display()))?;
    let out = temporary_output();
    let built = run(
        Command::new("node")
            // V8's parallel garbage collectors, woken by each growth of the splicer's memory,
            // take more than they give on two cores: 4.1 s a build with them, 2.7 without.
            .args([
                "--single-threaded-gc",
                "--input-type=module",
                "-e",
                BUILD_SCRIPT,
            ])
            .env("COMPONENTIZE_JS", &toolchain)
            .env("SPLICED", &spliced)
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
