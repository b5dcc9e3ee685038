//! The last key set fetched from the API server, on disk, so that a restart while the API server
//! is away still validates tokens.
//!
//! Written atomically (a new file of mode 0600 in the same directory, synced, renamed over the
//! old one, the directory synced): a crash leaves the old set or the new one, never half of
//! either. Blocking file I/O: call it from a blocking thread.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// The file name of the key set in the state directory.
pub const FILE_NAME: &str = "jwks.json";

/// Which step of reading or writing the key set failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating the state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("renaming {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The key set's place on disk.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        KeyStore { dir: dir.into() }
    }

    /// The key set's file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Replaces the stored key set with `json`, atomically, readable by root only.
    pub fn save(&self, json: &[u8]) -> Result<(), StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| StoreError::CreateDir {
                path: self.dir.clone(),
                source,
            })?;
        let path = self.path();
        let tmp = self
            .dir
            .join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        let written = write_new(&tmp, json);
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Write { path: tmp, source });
        }
        if let Err(source) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Rename {
                from: tmp,
                to: path,
                source,
            });
        }
        // The rename itself is durable only once the directory is.
        fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| StoreError::Write {
                path: self.dir.clone(),
                source,
            })
    }

    /// The stored key set; `None` when there is none yet.
    pub fn load(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path();
        match fs::read(&path) {
            Ok(json) => Ok(Some(json)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Read { path, source }),
        }
    }
}

/// Writes `bytes` to a new file at `path` (mode 0600, replacing a stale one) and syncs it.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "jwks-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saves_atomically_with_mode_0600_and_loads_back() -> Result<(), StoreError> {
        let dir = temp_dir();
        let store = KeyStore::new(dir.join("state"));
        assert!(store.load()?.is_none(), "nothing stored yet");
        store.save(br#"{"keys":[1]}"#)?;
        store.save(br#"{"keys":[2]}"#)?;
        assert_eq!(store.load()?.as_deref(), Some(&br#"{"keys":[2]}"#[..]));
        let mode = fs::metadata(store.path())
            .map_err(|source| StoreError::Read {
                path: store.path(),
                source,
            })?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key set is root's only");
        let names: Vec<_> = fs::read_dir(dir.join("state"))
            .map_err(|source| StoreError::Read {
                path: dir.clone(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(FILE_NAME)],
            "no temporary file left"
        );
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }
}
