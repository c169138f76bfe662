//! The operator's plugin commands: `taskhost plugins` (what a directory serves),
//! `taskhost deploy`, `rollback` and `deployments` (fleet deploys through the broker).

use crate::clock::now_ms;
use crate::config::Compiler;
use crate::config::{FileConfig, GrantTable, resolve::default_cache_dir};
use crate::plugins::cache::{Cache, hex};
use crate::plugins::live::Live;
use crate::plugins::{self, Plugin};
use crate::redis::fleet;
use crate::redis::{Client, Connection};
use crate::sandbox::{Sandbox, SandboxOptions, TaskDefaults, WIT_PACKAGE};
use crate::signing::{DeployRecord, SecretKey};
use anyhow::Context as _;
use clap::Args;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Broker URL [default: CELERY_BROKER_URL, else a running `taskhost dev`].
    #[arg(short = 'b', long, env = "CELERY_BROKER_URL")]
    pub broker: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The plugin file (.wasm); it is checked here before it is published.
    pub plugin: PathBuf,
    /// The plugin's name in every worker's directory [default: the file's stem].
    #[arg(long)]
    pub name: Option<String>,
    /// Sign the deploy with this secret key (from `taskhost keygen`): workers with
    /// `[fleet] trusted_keys` install only signed deploys.
    #[arg(long, env = "TASKHOST_SIGN_KEY")]
    pub sign_key: Option<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The plugin name to return to its previous deployed version.
    pub name: String,
    /// Sign the rollback (workers with trusted keys refuse an unsigned one).
    #[arg(long, env = "TASKHOST_SIGN_KEY")]
    pub sign_key: Option<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the secret key (its public key goes to the same path + `.pub`).
    pub path: PathBuf,
}

#[derive(Debug, Args)]
pub struct PluginsArgs {
    /// Directory of plugin .wasm files.
    pub dir: PathBuf,
    /// Config file whose grants apply [default: ./taskhost.toml if present].
    #[arg(long, env = "TASKHOST_CONFIG")]
    pub config: Option<PathBuf>,
}

/// A small sandbox for commands that run one plugin at a time.
pub fn local_sandbox(
    file: &FileConfig,
    grants: &GrantTable,
    compiler: Compiler,
) -> anyhow::Result<Arc<Sandbox>> {
    Ok(Arc::new(Sandbox::new(&SandboxOptions {
        max_instances: 4,
        max_memory_bytes: grants.max_memory_bytes(),
        max_table_elements: grants.max_table_elements(),
        stack_bytes: file.stack_bytes()?,
        component: file.component_caps()?,
        incremental_dir: default_cache_dir().map(|dir| dir.join("incremental")),
        compiler,
    })?))
}

/// Loads one plugin from `bytes` read from `path` (with the default precompile cache).
pub async fn load_one(
    sandbox: &Arc<Sandbox>,
    path: &Path,
    bytes: Vec<u8>,
    grants: &GrantTable,
) -> anyhow::Result<Plugin> {
    let cache = default_cache_dir().and_then(|dir| Cache::new(&dir).ok());
    plugins::load(sandbox, cache.as_ref(), path, bytes, grants)
        .await
        .map_err(|e| anyhow::anyhow!("plugin {} refused: {e}", path.display()))
}

pub async fn list_plugins(args: &PluginsArgs) -> anyhow::Result<ExitCode> {
    let (file, _) = FileConfig::load(args.config.as_deref())?;
    let grants = file.grants(&|var| std::env::var(var).ok())?;
    let sandbox = local_sandbox(&file, &grants, Compiler::Optimizing)?;
    let cache = default_cache_dir().and_then(|dir| Cache::new(&dir).ok());
    let grants = Arc::new(arc_swap::ArcSwap::from_pointee(grants));
    let live = Live::open(sandbox, cache, &args.dir, grants).await?;
    let registry = live.registry();
    for plugin in registry.plugins() {
        println!(
            "{}  version {}  wit {WIT_PACKAGE}@{}  {}",
            plugin.name,
            plugin.version,
            plugin.wit_version,
            plugin.path.display()
        );
        for task in &plugin.tasks {
            println!("    {}{}", task.name, describe_defaults(&task.defaults));
        }
    }
    let refused = live.refused();
    for (path, reason) in &refused {
        println!("{}  REFUSED: {reason}", path.display());
    }
    if registry.plugins().next().is_none() && refused.is_empty() {
        println!("no .wasm files in {}", args.dir.display());
    }
    Ok(if refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn describe_defaults(d: &TaskDefaults) -> String {
    let mut parts = Vec::new();
    let mut add = |key: &str, value: Option<String>| {
        if let Some(value) = value {
            parts.push(format!("{key}={value}"));
        }
    };
    add("queue", d.queue.clone());
    add("max_retries", d.max_retries.map(|n| n.to_string()));
    add("retry_backoff", d.retry_backoff.map(|b| b.to_string()));
    add(
        "retry_backoff_max",
        d.retry_backoff_max.map(|b| b.to_string()),
    );
    add("retry_jitter", d.retry_jitter.map(|j| j.to_string()));
    add("soft_time_limit", d.soft_time_limit.map(|t| t.to_string()));
    add("time_limit", d.time_limit.map(|t| t.to_string()));
    add("rate_limit", d.rate_limit.clone());
    if parts.is_empty() {
        String::new()
    } else {
        format!("  ({})", parts.join(", "))
    }
}

/// The broker for an operator's command: the flag or CELERY_BROKER_URL, else a running
/// `taskhost dev`.
pub async fn connect(args: &BrokerArgs) -> anyhow::Result<(Client, Connection)> {
    let url = args
        .broker
        .clone()
        .or_else(super::dev::running_broker)
        .context("no broker: pass --broker redis://HOST:PORT/DB or set CELERY_BROKER_URL")?;
    let client = crate::redis::client(&url)?;
    let conn = crate::redis::manager(&client, &url).await?;
    Ok((client, conn))
}

/// The first 12 hex digits of a digest, as operators see it.
fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// The secret key in `path`, if one was given.
fn sign_key(path: Option<&Path>) -> anyhow::Result<Option<SecretKey>> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the signing key {}", path.display()))?;
    let key = SecretKey::parse(&text).with_context(|| format!("{}", path.display()))?;
    Ok(Some(key))
}

pub async fn deploy(args: &DeployArgs) -> anyhow::Result<()> {
    let name = match &args.name {
        Some(name) => name.clone(),
        None => plugins::plugin_name(&args.plugin).to_string(),
    };
    plugins::check_name(&name)?;
    let key = sign_key(args.sign_key.as_deref())?;
    let bytes = std::fs::read(&args.plugin)
        .with_context(|| format!("cannot read {}", args.plugin.display()))?;
    // Checked here, so a plugin no worker could load is never published; the bytes checked
    // are the bytes published.
    let plugin = check(&args.plugin, bytes.clone()).await?;
    let digest = hex(&Sha256::digest(&bytes));
    let record = key
        .as_ref()
        .map(|key| DeployRecord::sign(key, &name, &digest, &plugin.version, now_ms()).to_json());
    let (client, mut conn) = connect(&args.broker).await?;
    let channel = fleet::channel(&client);
    fleet::publish(
        &mut conn,
        &channel,
        &name,
        &digest,
        &bytes,
        record.as_deref(),
    )
    .await?;
    let tasks: Vec<&str> = plugin.tasks.iter().map(|t| t.name.as_str()).collect();
    println!(
        "deployed {name} version {} (sha256 {digest}, {}), tasks: {}",
        plugin.version,
        signed_by(key.as_ref()),
        tasks.join(", ")
    );
    Ok(())
}

/// Loads `bytes` as a worker would, without grants: what every worker must be able to load.
async fn check(path: &Path, bytes: Vec<u8>) -> anyhow::Result<Plugin> {
    let grants = GrantTable::default();
    let sandbox = local_sandbox(&FileConfig::default(), &grants, Compiler::Optimizing)?;
    load_one(&sandbox, path, bytes, &grants).await
}

fn signed_by(key: Option<&SecretKey>) -> String {
    match key {
        Some(key) => format!("signed by {}", key.public()),
        None => "unsigned: workers with [fleet] trusted_keys refuse it".into(),
    }
}

pub async fn rollback(args: &RollbackArgs) -> anyhow::Result<()> {
    plugins::check_name(&args.name)?;
    let key = sign_key(args.sign_key.as_deref())?;
    let (client, mut conn) = connect(&args.broker).await?;
    let (from, to) = fleet::rollback(&mut conn, &args.name).await?;
    if let Some(key) = &key {
        let bytes = fleet::blob(&mut conn, &to)
            .await?
            .with_context(|| format!("the blob of {} is no longer stored", short(&to)))?;
        let plugin = check(Path::new(&format!("{}.wasm", args.name)), bytes).await?;
        let record = DeployRecord::sign(key, &args.name, &to, &plugin.version, now_ms());
        fleet::set_record(&mut conn, &args.name, &record.to_json()).await?;
    }
    fleet::announce(
        &mut conn,
        &fleet::channel(&client),
        &args.name,
        &to,
        "rollback",
    )
    .await?;
    println!(
        "rolled back {} from {} to {} ({})",
        args.name,
        short(&from),
        short(&to),
        signed_by(key.as_ref())
    );
    Ok(())
}

/// Writes a new key pair: the secret key (readable by its owner only) and its public key.
pub fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let key = SecretKey::generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&args.path)
        .with_context(|| {
            format!(
                "cannot create {} (it must not exist yet)",
                args.path.display()
            )
        })?;
    file.write_all(key.to_file_text().as_bytes())?;
    let public = key.public().to_string();
    let mut public_path = args.path.clone().into_os_string();
    public_path.push(".pub");
    std::fs::write(&public_path, format!("{public}\n"))?;
    println!(
        "secret key: {} (keep it private: it can deploy code to your workers)\n\
         public key: {public}\n\n\
         Trust it in every fleet worker's taskhost.toml:\n\n\
         [fleet]\ntrusted_keys = [\"{public}\"]\n\n\
         and deploy with: taskhost deploy PLUGIN.wasm --sign-key {}",
        args.path.display(),
        args.path.display()
    );
    Ok(())
}

pub async fn deployments(args: &BrokerArgs) -> anyhow::Result<()> {
    let (_, mut conn) = connect(args).await?;
    let status = fleet::deployments(&mut conn).await?;
    println!("deployed (fleet):");
    if status.deployed.is_empty() {
        println!("    nothing deployed with `taskhost deploy` yet");
    }
    for (name, (digest, kept)) in &status.deployed {
        println!(
            "    {name}  sha256 {}  ({kept} version(s) kept for rollback)",
            short(digest)
        );
    }
    println!("workers:");
    if status.workers.is_empty() {
        println!("    no running worker reports");
    }
    for (node, running) in &status.workers {
        let plugins: Vec<String> = running
            .iter()
            .map(|(plugin, version)| format!("{plugin} {version}"))
            .collect();
        println!(
            "    {node}: {}",
            if plugins.is_empty() {
                "no plugins".into()
            } else {
                plugins.join(", ")
            }
        );
    }
    Ok(())
}
