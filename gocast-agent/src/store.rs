//! HTTP registrations and drain state persisted across restarts, in `agent.state_file`.
//!
//! Written atomically (temp file in the same directory, fsync, rename, fsync of the directory),
//! so a crash leaves the old file or the new one, never half of one. The temp file is created
//! with `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600: a symlink planted at `<file>.tmp` is removed,
//! never followed.
//!
//! The file decides what the agent announces and which `exec:` monitors it runs, so it is
//! trusted only when it is a regular file (not a symlink) owned by the agent's user and not
//! writable by group or others; any other file is moved aside (`.unsafe-<time>`) and not read.
//! A file that cannot be read as the expected format (not UTF-8, not JSON, an unknown version,
//! a bad value) is moved aside (`.corrupt-<time>`), not deleted, so an operator can still recover
//! registrations by hand. A file that failed to load and could not be moved aside is never
//! overwritten: every save is refused until it is moved or removed.

use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::app::{AppName, AppSpec, truncated};

/// Bumped when the format changes incompatibly. The drain fields were added compatibly: a
/// file without them loads, and an older agent ignores them.
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt ({reason}); moved aside to {moved_to}")]
    Corrupt {
        path: PathBuf,
        reason: String,
        moved_to: PathBuf,
    },
    /// The file could have been written by someone else than the agent: not read at all.
    #[error("state file {path} is not trusted ({reason}); moved aside to {moved_to}, not read")]
    Unsafe {
        path: PathBuf,
        reason: String,
        moved_to: PathBuf,
    },
    /// The file failed to load and could not be moved aside: saves are refused until an
    /// operator moves or removes it, so its registrations are not overwritten.
    #[error(
        "state file {path} cannot be loaded ({reason}) and was not moved aside: it is kept, and \
         nothing is saved until it is moved or removed by hand"
    )]
    Kept { path: PathBuf, reason: String },
}

/// What the state file keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The HTTP registrations.
    pub apps: Vec<AppSpec>,
    /// Apps drained by name (any source): a restart during maintenance does not re-announce them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drained: Vec<AppName>,
    /// The whole host is drained.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_drained: bool,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    #[serde(flatten)]
    saved: Saved,
}

/// Why a file was not loaded: moved aside as unsafe or as corrupt.
enum Refusal {
    Unsafe(String),
    Corrupt(String),
}

/// The state file of one agent.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    /// Set when a file failed to load and stayed in place: why. Shared by the clones the
    /// blocking threads use.
    kept: Arc<Mutex<Option<String>>>,
    /// Tests: moving aside fails, as on a file system that refuses the rename.
    #[cfg(test)]
    fail_moves: bool,
}

impl Store {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            kept: Arc::default(),
            #[cfg(test)]
            fail_moves: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`Store::load`] on a blocking thread, so the caller's task keeps running.
    pub async fn load_off_thread(&self) -> Result<Saved, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.load())
            .await
            .unwrap_or_else(|e| Err(self.io_error("read", e)))
    }

    /// [`Store::save`] on a blocking thread, so the caller's task keeps running.
    pub async fn save_off_thread(&self, saved: Saved) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.save(&saved))
            .await
            .unwrap_or_else(|e| Err(self.io_error("write", e)))
    }

    fn io_error(&self, op: &'static str, e: tokio::task::JoinError) -> StoreError {
        StoreError::Io {
            op,
            path: self.path.clone(),
            source: std::io::Error::other(e),
        }
    }

    /// What was saved; nothing when the file does not exist yet. A file that is not trusted
    /// or not readable as a state file is moved aside (an error says where); one that cannot
    /// be moved aside stays, and from then on [`Store::save`] refuses to replace it.
    pub fn load(&self) -> Result<Saved, StoreError> {
        let refusal = match self.read() {
            Ok(Some(saved)) => return Ok(saved),
            Ok(None) => return Ok(Saved::default()),
            Err(Ok(refusal)) => refusal,
            Err(Err(source)) => {
                // Not read, for a reason of the system: keep the file and never overwrite it.
                let reason = format!("cannot read it: {source}");
                self.keep(&reason);
                return Err(StoreError::Kept {
                    path: self.path.clone(),
                    reason,
                });
            }
        };
        let (suffix, reason) = match &refusal {
            Refusal::Unsafe(r) => ("unsafe", r.clone()),
            Refusal::Corrupt(r) => ("corrupt", r.clone()),
        };
        match self.move_aside(suffix) {
            Ok(moved_to) => {
                let path = self.path.clone();
                Err(match refusal {
                    Refusal::Unsafe(_) => StoreError::Unsafe {
                        path,
                        reason,
                        moved_to,
                    },
                    Refusal::Corrupt(_) => StoreError::Corrupt {
                        path,
                        reason,
                        moved_to,
                    },
                })
            }
            Err(e) => {
                let reason = format!("{reason}; moving it aside failed: {e}");
                self.keep(&reason);
                Err(StoreError::Kept {
                    path: self.path.clone(),
                    reason,
                })
            }
        }
    }

    /// `Ok(None)`: no file. `Err(Ok(_))`: a file to move aside. `Err(Err(_))`: not read.
    fn read(&self) -> Result<Option<Saved>, Result<Refusal, std::io::Error>> {
        let unsafe_ = |r: String| Err(Ok(Refusal::Unsafe(r)));
        let corrupt = |r: String| Err(Ok(Refusal::Corrupt(r)));
        let link = match fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Err(e)),
        };
        if link.file_type().is_symlink() {
            return unsafe_("it is a symbolic link".to_owned());
        }
        if !link.file_type().is_file() {
            return unsafe_("it is not a regular file".to_owned());
        }
        // O_NOFOLLOW and the checks again on the open file: it may have been swapped since.
        // O_NONBLOCK: a FIFO swapped in does not hang the start.
        let mut file = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return unsafe_("it is a symbolic link".to_owned());
            }
            Err(e) => return Err(Err(e)),
        };
        let meta = file.metadata().map_err(Err)?;
        if !meta.file_type().is_file() {
            return unsafe_("it is not a regular file".to_owned());
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return unsafe_(format!(
                "owned by uid {}, not by the agent's uid {me}",
                meta.uid()
            ));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return unsafe_(format!("writable by group or others (mode {mode:04o})"));
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(Err)?;
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                return corrupt(format!(
                    "not UTF-8 (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ));
            }
        };
        match serde_json::from_str::<StateFile>(&text) {
            Ok(f) if f.version == FORMAT_VERSION => Ok(Some(f.saved)),
            Ok(f) => corrupt(format!("unknown format version {}", f.version)),
            Err(e) => corrupt(truncated(&e.to_string(), 256)),
        }
    }

    /// Renames the file to `<file>.<suffix>-<unix time>` (`-<n>` added if that exists).
    fn move_aside(&self, suffix: &str) -> std::io::Result<PathBuf> {
        #[cfg(test)]
        if self.fail_moves {
            return Err(std::io::Error::other("moves fail in this test"));
        }
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut n = 0;
        let moved_to = loop {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{suffix}-{stamp}"));
            if n > 0 {
                name.push(format!("-{n}"));
            }
            let candidate = PathBuf::from(name);
            if fs::symlink_metadata(&candidate).is_err() {
                break candidate;
            }
            n += 1;
        };
        fs::rename(&self.path, &moved_to)?;
        Ok(moved_to)
    }

    fn keep(&self, reason: &str) {
        *self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.to_owned());
    }

    /// Replaces what is saved. Refused while a file that failed to load is still in place.
    pub fn save(&self, saved: &Saved) -> Result<(), StoreError> {
        {
            let mut kept = self
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(reason) = kept.as_ref() {
                match fs::symlink_metadata(&self.path) {
                    // Moved or removed by hand: saving is safe again.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => *kept = None,
                    _ => {
                        return Err(StoreError::Kept {
                            path: self.path.clone(),
                            reason: reason.clone(),
                        });
                    }
                }
            }
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| self.io("create the directory of", source))?;
        let body = serde_json::to_vec_pretty(&StateFile {
            version: FORMAT_VERSION,
            saved: saved.clone(),
        })
        .map_err(|e| self.io("encode", e.into()))?;
        let mut tmp_name = self.path.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let create = || {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
        };
        let mut f = match create() {
            Ok(f) => f,
            // A leftover of a crash, or something planted (a symlink): unlink it (never
            // followed) and try once more.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp).map_err(|source| self.io("remove the stale", source))?;
                create().map_err(|source| self.io("create the temporary file for", source))?
            }
            Err(source) => return Err(self.io("create the temporary file for", source)),
        };
        let mut write = || -> std::io::Result<()> {
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            // The rename itself is durable only once the directory is synced.
            fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&tmp);
            self.io("write", source)
        })
    }

    fn io(&self, op: &'static str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, vip: &str) -> AppSpec {
        AppSpec {
            name: name.parse().unwrap(),
            vip: vip.parse().unwrap(),
            monitors: vec![
                "port:tcp:80".parse().unwrap(),
                "exec:test -e /x:y".parse().unwrap(),
            ],
            nats: vec!["tcp:80:8080".parse().unwrap()],
            communities: vec!["65000:1".parse().unwrap(), "1:2:3".parse().unwrap()],
            nat_dest: None,
            passive_health: false,
        }
    }

    #[test]
    fn saved_registrations_load_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("sub/state.json"));
        assert_eq!(store.load().unwrap(), Saved::default());
        let apps = vec![spec("a", "192.0.2.1/32"), spec("b", "2001:db8::1/128")];
        let saved = Saved {
            apps: apps.clone(),
            drained: vec!["b".parse().unwrap()],
            host_drained: true,
        };
        store.save(&saved).unwrap();
        assert_eq!(store.load().unwrap(), saved);
        let saved = Saved {
            apps: apps[..1].to_vec(),
            ..Saved::default()
        };
        store.save(&saved).unwrap();
        assert_eq!(store.load().unwrap(), saved);
        assert!(!dir.path().join("sub/state.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, "{not json").unwrap();
        let e = Store::new(&path).load().unwrap_err();
        let StoreError::Corrupt { moved_to, .. } = &e else {
            panic!("{e}")
        };
        assert!(moved_to.exists() && !path.exists());
        assert!(e.to_string().contains("corrupt"), "{e}");
        // Next start: no file, no registrations, no error.
        assert_eq!(Store::new(&path).load().unwrap(), Saved::default());
    }

    #[test]
    fn invalid_values_inside_the_file_count_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(
            &path,
            r#"{"version":1,"apps":[{"name":"a","vip":"127.0.0.1/32","monitors":[]}]}"#,
        )
        .unwrap();
        assert!(matches!(
            Store::new(&path).load(),
            Err(StoreError::Corrupt { .. })
        ));
    }
    /// A state file the agent would have written: owner and mode as its own.
    fn write_state(path: &Path, body: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::write(path, body).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn aside(dir: &Path, kind: &str) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(&format!(".{kind}-")))
            .collect()
    }

    #[test]
    fn a_symlink_at_the_temp_path_is_removed_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let target = dir.path().join("victim");
        fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("state.json.tmp")).unwrap();
        let store = Store::new(&path);
        let saved = Saved {
            apps: vec![spec("a", "192.0.2.1/32")],
            ..Saved::default()
        };
        store.save(&saved).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file(), "{meta:?}");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(store.load().unwrap(), saved);
    }

    #[test]
    fn a_file_others_can_write_is_moved_aside_and_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let good = serde_json::to_vec(&StateFile {
            version: FORMAT_VERSION,
            saved: Saved {
                apps: vec![spec("a", "192.0.2.1/32")],
                ..Saved::default()
            },
        })
        .unwrap();
        for mode in [0o666, 0o620, 0o602] {
            write_state(&path, &good, mode);
            let e = Store::new(&path).load().unwrap_err();
            let StoreError::Unsafe { moved_to, .. } = &e else {
                panic!("{mode:o}: {e}")
            };
            assert!(moved_to.exists() && !path.exists(), "{mode:o}");
            assert!(e.to_string().contains("writable by group or others"), "{e}");
            fs::remove_file(moved_to).unwrap();
        }
        // Mode 0644 is the agent's own file: read.
        write_state(&path, &good, 0o644);
        assert_eq!(Store::new(&path).load().unwrap().apps.len(), 1);
    }

    #[test]
    fn a_symlink_as_the_state_file_is_moved_aside_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let target = dir.path().join("elsewhere.json");
        write_state(&target, br#"{"version":1,"apps":[]}"#, 0o600);
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let e = Store::new(&path).load().unwrap_err();
        assert!(
            matches!(&e, StoreError::Unsafe { reason, .. } if reason.contains("symbolic link")),
            "{e}"
        );
        assert!(fs::symlink_metadata(&path).is_err() && target.exists());
    }

    #[test]
    fn a_file_that_is_not_utf8_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_state(&path, b"{\"version\":1,\"apps\":[\xff\xfe]}", 0o600);
        let store = Store::new(&path);
        let e = store.load().unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt { reason, .. } if reason.contains("not UTF-8")),
            "{e}"
        );
        assert_eq!(aside(dir.path(), "corrupt").len(), 1);
        assert!(!path.exists());
        store.save(&Saved::default()).unwrap();
        assert_eq!(store.load().unwrap(), Saved::default());
    }

    #[test]
    fn a_huge_bad_name_gives_a_short_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let name = "x".repeat(1 << 20);
        let body = format!(
            r#"{{"version":1,"apps":[{{"name":"{name}","vip":"192.0.2.1/32","monitors":[]}}]}}"#
        );
        write_state(&path, body.as_bytes(), 0o600);
        let e = Store::new(&path).load().unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().len() < 1024, "{} bytes", e.to_string().len());
    }

    #[test]
    fn a_file_that_failed_to_load_and_stayed_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_state(&path, b"{not json", 0o600);
        let mut store = Store::new(&path);
        store.fail_moves = true;
        let e = store.load().unwrap_err();
        assert!(matches!(e, StoreError::Kept { .. }), "{e}");
        let clone = store.clone();
        for s in [&store, &clone] {
            let e = s.save(&Saved::default()).unwrap_err();
            assert!(matches!(e, StoreError::Kept { .. }), "{e}");
            assert!(e.to_string().contains("moved or removed by hand"), "{e}");
        }
        assert_eq!(fs::read(&path).unwrap(), b"{not json");
        // Once an operator moved it away, saving works again.
        fs::rename(&path, dir.path().join("kept-by-hand")).unwrap();
        store.save(&Saved::default()).unwrap();
        assert_eq!(store.load().unwrap(), Saved::default());
    }
}
