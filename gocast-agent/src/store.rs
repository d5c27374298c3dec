//! HTTP registrations and drain state persisted across restarts, in `agent.state_file`.
//!
//! Written atomically (temp file in the same directory, fsync, rename, fsync of the directory),
//! so a crash leaves the old file or the new one, never half of one. A file that cannot be
//! parsed is moved aside, not deleted, so an operator can still recover registrations by hand.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::app::{AppName, AppSpec};

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

/// The state file of one agent.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
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

    /// What was saved; nothing when the file does not exist yet.
    pub fn load(&self) -> Result<Saved, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Saved::default()),
            Err(source) => return Err(self.io("read", source)),
        };
        let reason = match serde_json::from_str::<StateFile>(&text) {
            Ok(f) if f.version == FORMAT_VERSION => return Ok(f.saved),
            Ok(f) => format!("unknown format version {}", f.version),
            Err(e) => e.to_string(),
        };
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut moved_to = self.path.clone().into_os_string();
        moved_to.push(format!(".corrupt-{stamp}"));
        let moved_to = PathBuf::from(moved_to);
        fs::rename(&self.path, &moved_to).map_err(|source| self.io("move aside", source))?;
        Err(StoreError::Corrupt {
            path: self.path.clone(),
            reason,
            moved_to,
        })
    }

    /// Replaces what is saved.
    pub fn save(&self, saved: &Saved) -> Result<(), StoreError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(|source| self.io("create the directory of", source))?;
        let body = serde_json::to_vec_pretty(&StateFile {
            version: FORMAT_VERSION,
            saved: saved.clone(),
        })
        .map_err(|e| self.io("encode", e.into()))?;
        let mut tmp_name = self.path.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
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
}
