//! The precompile cache: compiled plugins on disk, keyed by the `.wasm`'s SHA-256 and the
//! engine's fingerprint, so a restart or a second worker on the machine loads a plugin in a
//! fraction of a millisecond instead of recompiling it.
//!
//! An entry is `<wasm sha256>-<engine fingerprint>.cwasm` with a `.sha256` beside it holding the
//! digest of the compiled bytes. A plugin is served mapped from its entry: its code and its
//! memory image are the file's pages (shared by every worker on the machine, reclaimable by
//! the kernel), not a private copy per plugin. An entry whose digest does not match, or that the engine
//! refuses, is logged, recompiled and rewritten — never loaded blindly. Entries are written
//! to a temporary name and renamed, so a reader never sees half of one.
//!
//! The directory holds native code the worker will run: a directory another user could write
//! (not owned by the worker's user, or writable by its group or everyone) is refused, and the
//! worker compiles every load instead.

use crate::sandbox::{PrepareError, Sandbox};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;

/// A precompile cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// Whether a load came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Compiled,
}

impl Cache {
    /// Uses `dir` (created if missing, readable and writable by this user only).
    ///
    /// # Errors
    /// When it cannot be made, or others could write into it.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        crate::sandbox::private_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The component for `wasm` (whose SHA-256 is `digest`): from the cache if a valid entry
    /// exists, else made by `compile` and stored. Blocking: run it off the async runtime's
    /// workers.
    pub fn load_or_compile(
        &self,
        sandbox: &Sandbox,
        wasm: &[u8],
        digest: &str,
        compile: impl FnOnce(&[u8]) -> Result<Component, PrepareError>,
    ) -> Result<(Component, Source), PrepareError> {
        let entry = self
            .dir
            .join(format!("{digest}-{}.cwasm", sandbox.engine_fingerprint()));
        let sum = entry.with_extension("sha256");
        if let (Ok(digest), Ok(expected)) = (file_digest(&entry), std::fs::read_to_string(&sum)) {
            if digest != expected.trim() {
                tracing::warn!(entry = %entry.display(), "precompile cache entry is corrupt; recompiling");
            } else {
                match sandbox.deserialize_file(&entry) {
                    Ok(component) => return Ok((component, Source::Cache)),
                    Err(e) => tracing::warn!(
                        entry = %entry.display(),
                        "precompile cache entry is unusable ({e}); recompiling"
                    ),
                }
            }
        }
        let component = compile(wasm)?;
        match sandbox.serialize(&component) {
            Ok(compiled) => match write_entry(&entry, &sum, &compiled) {
                // Served from the entry just written, as the next load will be: its pages are
                // the file's, not the compiler's private copy.
                Ok(()) => {
                    if let Ok(mapped) = sandbox.deserialize_file(&entry) {
                        return Ok((mapped, Source::Compiled));
                    }
                }
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), "cannot write the precompile cache: {e}");
                }
            },
            Err(e) => tracing::warn!("cannot serialize a compiled plugin for the cache: {e}"),
        }
        Ok((component, Source::Compiled))
    }
}

fn write_entry(entry: &Path, sum: &Path, compiled: &[u8]) -> std::io::Result<()> {
    let unique = format!("tmp-{}-{}", std::process::id(), uuid::Uuid::new_v4());
    let tmp_entry = entry.with_extension(&unique);
    let tmp_sum = sum.with_extension(format!("{unique}.sum"));
    {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&tmp_entry)?;
        file.write_all(compiled)?;
        // On disk before it is renamed into place: a crash leaves no entry with a digest but
        // no code, and its pages are clean, so a loader can drop and re-read them
        // (`read_in_small_pages`).
        file.sync_data()?;
    }
    std::fs::write(&tmp_sum, hex(&Sha256::digest(compiled)))?;
    // The digest goes in first: a reader that finds the new code with the old digest (or none)
    // treats the entry as corrupt and recompiles; it never trusts unverified code.
    std::fs::rename(&tmp_sum, sum)?;
    std::fs::rename(&tmp_entry, entry)
}

/// The SHA-256 of the file at `path`, in lower-case hex, read in pieces (a cache entry is tens
/// of megabytes, and it is mapped afterwards rather than kept in memory).
///
/// The read also decides how the entry's pages sit in the page cache, and so what a worker's
/// RSS counts for it: Linux (6.18 here) caches a file written or read ahead in large folios of
/// up to 2 MiB, and maps a whole folio into a process at its first touch. A plugin touching a
/// few hundred pages of its 16 MB of interpreter code and 13 MB memory image would then count
/// most of both, in every worker (an idle worker held 28 MiB per Python plugin so, 13 MiB
/// without). So pages of the entry that no process maps are dropped, and read again page by
/// page, without read-ahead: a worker maps what its plugins touch, in 64 KiB fault-around
/// steps. Pages another worker already maps stay as they are, shared.
fn file_digest(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    read_in_small_pages(&file);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}

/// Advises the kernel to drop `file`'s cached pages that no process maps (clean ones: entries
/// are synced when written) and to read it without read-ahead. Advice only: a kernel that
/// ignores it serves the same bytes.
#[allow(unsafe_code)]
fn read_in_small_pages(file: &std::fs::File) {
    use std::os::fd::AsRawFd as _;
    let fd = file.as_raw_fd();
    // SAFETY: posix_fadvise reads no memory of ours; `fd` is open for the call's duration.
    unsafe {
        libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
        libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_RANDOM);
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cache_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("taskhost-cache-perm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        super::Cache::new(&dir).expect("a new directory is the worker's alone");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let refused = super::Cache::new(&dir).expect_err("writable by everyone");
        assert!(refused.to_string().contains("chmod go-w"), "{refused}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn code_compiled_fast_is_cached_apart_from_optimised_code() {
        use crate::config::Compiler;
        use crate::sandbox::{Sandbox, SandboxOptions};
        let fingerprint = |compiler| {
            Sandbox::new(&SandboxOptions {
                max_instances: 1,
                max_memory_bytes: 1 << 20,
                max_table_elements: 1000,
                stack_bytes: 512 * 1024,
                component: crate::config::ComponentCaps::default(),
                incremental_dir: None,
                compiler,
            })
            .expect("a sandbox")
            .engine_fingerprint()
        };
        // A worker must never load what `taskhost dev` compiled with Winch for the same bytes.
        assert_ne!(
            fingerprint(Compiler::Fast),
            fingerprint(Compiler::Optimizing)
        );
    }
}
