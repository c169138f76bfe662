//! Building a Rust plugin: cargo, for `wasm32-wasip2` (added with rustup when missing).

use super::{Built, run};
use anyhow::{Context as _, bail};
use std::path::Path;
use std::process::Command;

/// Builds a Rust plugin: the component cargo wrote, named for its crate.
pub(super) fn build(dir: &Path) -> anyhow::Result<Built> {
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
    Ok(Built {
        component: built,
        name,
        temporary: false,
    })
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
