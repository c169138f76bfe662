//! Cranelift's incremental compilation cache, on disk: each compiled function kept under a
//! digest of its IR, so that compiling a component whose functions mostly did not change (a
//! Python plugin after an edit of `app.py`: the interpreter's ten thousand functions are the
//! same, only the snapshot's data differs) compiles only what changed. It lives beside the
//! precompile cache (`<cache>/incremental/`), one file per function, written aside and renamed
//! into place.
//!
//! Its entries are native code the worker will run, so the directory must be this user's
//! alone, as the precompile cache's ([`private_dir`]).

use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// The store wasmtime reads and writes through.
#[derive(Debug)]
pub struct DiskStore {
    dir: PathBuf,
}

impl DiskStore {
    /// The store in `dir` (created if missing); refused if others could write there.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        private_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, key: &[u8]) -> PathBuf {
        let name: String = Sha256::digest(key)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.dir.join(&name[..2]).join(&name[2..])
    }
}

impl wasmtime::CacheStore for DiskStore {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        std::fs::read(self.path(key)).ok().map(Cow::Owned)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let path = self.path(key);
        let Some(parent) = path.parent() else {
            return false;
        };
        let tmp = path.with_extension(format!("tmp-{}-{}", std::process::id(), fastrand::u64(..)));
        let written = std::fs::create_dir_all(parent)
            .and_then(|()| std::fs::write(&tmp, &value))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.is_ok()
    }
}

/// Creates `dir` (and its parents) readable and writable by this user only, or checks that an
/// existing one is: a directory of native code another user could write is refused.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not this user's alone (owner uid {}, mode {:o}): its entries are code \
                 the worker would run; chmod go-w it, or choose another --cache-dir",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o777
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::DiskStore;
    use wasmtime::CacheStore as _;

    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir =
            std::env::temp_dir().join(format!("taskhost-incremental-perm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let refused = DiskStore::new(&dir).expect_err("native code others could have written");
        assert_eq!(
            refused.kind(),
            std::io::ErrorKind::PermissionDenied,
            "{refused}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stored_function_is_found_again_and_an_unknown_key_is_not() {
        let dir = std::env::temp_dir().join(format!("taskhost-incremental-{}", std::process::id()));
        let store = DiskStore::new(&dir).expect("a private directory");
        assert!(store.insert(b"key", b"compiled".to_vec()));
        assert_eq!(store.get(b"key").as_deref(), Some(&b"compiled"[..]));
        assert_eq!(store.get(b"other").as_deref(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
