//! HTTP registrations and drain state persisted across restarts, in `agent.state_file`.
//!
//! Two files: the snapshot `<file>` (`{"version": 1, "apps": [..]}`) and the journal
//! `<file>.journal`, one JSON change a line ([`Change`]). A save appends the changes of a whole
//! batch to the journal with one `write` and one `fdatasync`, so its cost grows with the batch,
//! not with the number of apps; once the journal is larger than the snapshot (and at load),
//! the snapshot is rewritten atomically (temp file in the same directory, fsync, rename, fsync
//! of the directory) and the journal emptied. Every change sets a value (an app, its absence,
//! the drain state), so replaying a journal over a snapshot that already has it (a crash
//! between the rename and the truncation) gives the same state. A last line without its
//! newline is a write that was never acknowledged (cut by a crash) and is left out. The temp
//! file is created with `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600: a symlink planted at
//! `<file>.tmp` is removed, never followed; the journal is opened with `O_NOFOLLOW`, mode 0600.
//!
//! The files decide what the agent announces and which `exec:` monitors it runs, so they are
//! trusted only when each is a regular file (not a symlink) owned by the agent's user and not
//! writable by group or others; otherwise both are moved aside (`.unsafe-<time>`) and not
//! read. Files that cannot be read as the expected format (not UTF-8, not JSON, an unknown
//! version, a bad value) are moved aside (`.corrupt-<time>`), not deleted, so an operator can
//! still recover registrations by hand. Files that failed to load and could not be moved aside
//! are never overwritten: every save is refused until they are moved or removed.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::app::{AppName, AppSpec, truncated};

/// Bumped when the format changes incompatibly. The drain fields were added compatibly: a
/// file without them loads, and an older agent ignores them.
const FORMAT_VERSION: u32 = 1;

/// The journal is folded into the snapshot once it is larger than the snapshot and than this,
/// so a save costs O(batch) and the rewrites O(apps) only every O(apps) changes.
const JOURNAL_MIN_COMPACT: u64 = 64 * 1024;

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

/// One change to what is saved: a line of the journal. Each sets a value, so applying one
/// twice is applying it once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// An HTTP registration, new or replacing the one of that name.
    Put(AppSpec),
    /// An HTTP app no longer registered.
    Remove(AppName),
    /// The whole drain state.
    Drain {
        drained: Vec<AppName>,
        host_drained: bool,
    },
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

/// What is saved, as the writer keeps it between saves.
#[derive(Debug, Default)]
struct State {
    apps: BTreeMap<AppName, AppSpec>,
    drained: Vec<AppName>,
    host_drained: bool,
}

impl State {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Put(spec) => drop(self.apps.insert(spec.name.clone(), spec.clone())),
            Change::Remove(name) => drop(self.apps.remove(name)),
            Change::Drain {
                drained,
                host_drained,
            } => {
                self.drained.clone_from(drained);
                self.host_drained = *host_drained;
            }
        }
    }

    fn from_saved(saved: &Saved) -> Self {
        Self {
            apps: saved
                .apps
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            drained: saved.drained.clone(),
            host_drained: saved.host_drained,
        }
    }

    /// The snapshot's body, in name order.
    fn encode(&self) -> serde_json::Result<Vec<u8>> {
        #[derive(Serialize)]
        struct Borrowed<'a> {
            version: u32,
            apps: Vec<&'a AppSpec>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            drained: &'a [AppName],
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            host_drained: bool,
        }
        serde_json::to_vec_pretty(&Borrowed {
            version: FORMAT_VERSION,
            apps: self.apps.values().collect(),
            drained: &self.drained,
            host_drained: self.host_drained,
        })
    }
}

/// The writer's side: what is saved, the open journal, and why saving is refused.
#[derive(Debug, Default)]
struct Inner {
    state: State,
    /// The journal, open for appending; `None` until the first save after a load or a
    /// compaction, or after an append failed (the next save compacts instead).
    journal: Option<fs::File>,
    journal_len: u64,
    snapshot_len: u64,
    /// The journal may hold a cut record (a failed append) or state not yet in the snapshot
    /// (at load): the next save writes the snapshot.
    compact: bool,
    /// Set when files failed to load and stayed in place: why.
    kept: Option<String>,
}

impl Inner {
    /// Before anything is known of the files: the first save writes the snapshot, so the
    /// journal is folded in and appends never follow a cut line.
    fn fresh() -> Self {
        Self {
            compact: true,
            ..Self::default()
        }
    }
}

/// The state file of one agent.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    journal: PathBuf,
    /// Shared by the clones the blocking threads use; one save runs at a time (the lifecycle
    /// waits for each), and it is never held across an `.await`.
    inner: Arc<Mutex<Inner>>,
    /// Tests: moving aside fails, as on a file system that refuses the rename.
    #[cfg(test)]
    fail_moves: bool,
}

impl Store {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let mut journal = path.clone().into_os_string();
        journal.push(".journal");
        Self {
            path,
            journal: PathBuf::from(journal),
            inner: Arc::new(Mutex::new(Inner::fresh())),
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
    pub async fn save_off_thread(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.save(&changes))
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

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What was saved; nothing when no file exists yet. Files that are not trusted or not
    /// readable as a state file are moved aside (an error says where); files that cannot be
    /// moved aside stay, and from then on [`Store::save`] refuses to replace them.
    pub fn load(&self) -> Result<Saved, StoreError> {
        let mut inner = self.inner();
        *inner = Inner::fresh();
        let refusal = match self.read() {
            Ok(saved) => {
                inner.state = State::from_saved(&saved);
                return Ok(saved);
            }
            Err(Ok(refusal)) => refusal,
            Err(Err((path, source))) => {
                // Not read, for a reason of the system: keep the files and never overwrite them.
                let reason = format!("cannot read {}: {source}", path.display());
                inner.kept = Some(reason.clone());
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
                inner.kept = Some(reason.clone());
                Err(StoreError::Kept {
                    path: self.path.clone(),
                    reason,
                })
            }
        }
    }

    /// The snapshot with the journal replayed over it. `Err(Ok(_))`: files to move aside.
    /// `Err(Err(_))`: not read (which file, why).
    fn read(&self) -> Result<Saved, Result<Refusal, (PathBuf, std::io::Error)>> {
        let snapshot =
            read_trusted(&self.path).map_err(|e| e.map_err(|e| (self.path.clone(), e)))?;
        let journal =
            read_trusted(&self.journal).map_err(|e| e.map_err(|e| (self.journal.clone(), e)))?;
        let corrupt = |r: String| Err(Ok(Refusal::Corrupt(r)));
        let mut state = match snapshot {
            None => State::default(),
            Some(text) => match serde_json::from_str::<StateFile>(&text) {
                Ok(f) if f.version == FORMAT_VERSION => State::from_saved(&f.saved),
                Ok(f) => return corrupt(format!("unknown format version {}", f.version)),
                Err(e) => return corrupt(truncated(&e.to_string(), 256)),
            },
        };
        // Snapshot order first (a restore checks apps in this order), then new names.
        let mut order: Vec<AppName> = state.apps.keys().cloned().collect();
        if let Some(text) = journal {
            // Only lines ended by a newline were acknowledged; a cut last line never was.
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            for (n, line) in complete.lines().enumerate() {
                match serde_json::from_str::<Change>(line) {
                    Ok(change) => {
                        if let Change::Put(spec) = &change
                            && !state.apps.contains_key(&spec.name)
                        {
                            order.push(spec.name.clone());
                        }
                        state.apply(&change);
                    }
                    Err(e) => {
                        return corrupt(format!(
                            "journal line {}: {}",
                            n + 1,
                            truncated(&e.to_string(), 256)
                        ));
                    }
                }
            }
        }
        let mut apps = state.apps;
        Ok(Saved {
            apps: order.iter().filter_map(|n| apps.remove(n)).collect(),
            drained: state.drained,
            host_drained: state.host_drained,
        })
    }

    /// Renames the snapshot and the journal (those that exist) to `<name>.<suffix>-<unix
    /// time>` (`-<n>` added if that exists); returns where the snapshot (or the journal, if
    /// only it existed) went.
    fn move_aside(&self, suffix: &str) -> std::io::Result<PathBuf> {
        #[cfg(test)]
        if self.fail_moves {
            return Err(std::io::Error::other("moves fail in this test"));
        }
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut moved = None;
        for path in [&self.journal, &self.path] {
            if fs::symlink_metadata(path).is_err() {
                continue;
            }
            let mut n = 0;
            let moved_to = loop {
                let mut name = path.clone().into_os_string();
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
            fs::rename(path, &moved_to)?;
            moved = Some(moved_to);
        }
        Ok(moved.unwrap_or_else(|| self.path.clone()))
    }

    /// Saves `changes`, in order, with one append and one `fdatasync` (or one snapshot
    /// rewrite). Refused while files that failed to load are still in place; a failed save
    /// changes nothing of what is saved.
    pub fn save(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut inner = self.inner();
        if let Some(reason) = inner.kept.as_ref() {
            let gone = |p: &Path| matches!(fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
            if gone(&self.path) && gone(&self.journal) {
                // Moved or removed by hand: saving is safe again, from nothing.
                *inner = Inner::fresh();
            } else {
                return Err(StoreError::Kept {
                    path: self.path.clone(),
                    reason: reason.clone(),
                });
            }
        }
        if !inner.compact {
            match self.append(&mut inner, changes) {
                Ok(()) => {
                    for change in changes {
                        inner.state.apply(change);
                    }
                    if inner.journal_len > inner.snapshot_len.max(JOURNAL_MIN_COMPACT) {
                        // Already durable in the journal: a failed fold only means the next
                        // save tries again.
                        inner.compact = true;
                        let _ = self.compact(&mut inner, &[]);
                    }
                    return Ok(());
                }
                // The journal may end in a cut record now: the snapshot takes this save.
                Err(e) if changes.is_empty() => return Err(e),
                Err(_) => inner.compact = true,
            }
        }
        self.compact(&mut inner, changes)
    }

    /// Appends `changes` to the journal and makes them durable.
    fn append(&self, inner: &mut Inner, changes: &[Change]) -> Result<(), StoreError> {
        let mut lines = Vec::new();
        for change in changes {
            serde_json::to_writer(&mut lines, change).map_err(|e| self.io("encode", e.into()))?;
            lines.push(b'\n');
        }
        let journal = match &mut inner.journal {
            Some(f) => f,
            slot => slot.insert(
                fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&self.journal)
                    .map_err(|source| self.io("open the journal of", source))?,
            ),
        };
        let written = journal
            .write_all(&lines)
            .and_then(|()| journal.sync_data())
            .map_err(|source| self.io("append to the journal of", source));
        if written.is_err() {
            inner.journal = None;
        }
        written?;
        inner.journal_len += lines.len() as u64;
        Ok(())
    }

    /// Writes the snapshot with `changes` applied, then empties the journal. On failure
    /// nothing of `changes` is kept.
    fn compact(&self, inner: &mut Inner, changes: &[Change]) -> Result<(), StoreError> {
        let mut next = State::default();
        let state = if changes.is_empty() {
            &inner.state
        } else {
            next.apps.clone_from(&inner.state.apps);
            next.drained.clone_from(&inner.state.drained);
            next.host_drained = inner.state.host_drained;
            for change in changes {
                next.apply(change);
            }
            &next
        };
        let body = state.encode().map_err(|e| self.io("encode", e.into()))?;
        self.write_snapshot(&body)?;
        // The snapshot has everything the journal had: empty it. Should that fail, replaying
        // the journal over the new snapshot changes nothing (every change sets a value).
        let truncated = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.journal)
            .and_then(|f| f.sync_all().map(|()| f));
        if !changes.is_empty() {
            inner.state = next;
        }
        inner.snapshot_len = body.len() as u64;
        match truncated {
            Ok(f) => {
                // Opened without O_APPEND, at offset 0 of an empty file: appends land at the end.
                inner.journal = Some(f);
                inner.journal_len = 0;
                inner.compact = false;
            }
            Err(_) => inner.journal = None,
        }
        Ok(())
    }

    /// Replaces the snapshot atomically with `body`.
    fn write_snapshot(&self, body: &[u8]) -> Result<(), StoreError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| self.io("create the directory of", source))?;
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
            f.write_all(body)?;
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

/// The text of `path` if it may be trusted; `Ok(None)`: no file. `Err(Ok(_))`: a file to move
/// aside. `Err(Err(_))`: not read.
fn read_trusted(path: &Path) -> Result<Option<String>, Result<Refusal, std::io::Error>> {
    let unsafe_ = |r: String| Err(Ok(Refusal::Unsafe(format!("{}: {r}", path.display()))));
    let link = match fs::symlink_metadata(path) {
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
        .open(path)
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
    match String::from_utf8(bytes) {
        Ok(t) => Ok(Some(t)),
        Err(e) => Err(Ok(Refusal::Corrupt(format!(
            "{}: not UTF-8 (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )))),
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

    fn name(s: &str) -> AppName {
        s.parse().unwrap()
    }

    /// The changes that save `saved` from nothing.
    fn changes(saved: &Saved) -> Vec<Change> {
        let mut changes: Vec<Change> = saved.apps.iter().cloned().map(Change::Put).collect();
        changes.push(Change::Drain {
            drained: saved.drained.clone(),
            host_drained: saved.host_drained,
        });
        changes
    }

    #[test]
    fn saves_append_to_the_journal_and_load_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = Store::new(&path);
        store.load().unwrap();
        // The first save after a load writes the snapshot; the next ones append.
        store
            .save(&[Change::Put(spec("z", "192.0.2.9/32"))])
            .unwrap();
        let snapshot = fs::read(&path).unwrap();
        for (n, vip) in [("b", "192.0.2.2/32"), ("a", "192.0.2.1/32")] {
            store.save(&[Change::Put(spec(n, vip))]).unwrap();
        }
        store.save(&[Change::Remove(name("b"))]).unwrap();
        assert_eq!(fs::read(&path).unwrap(), snapshot, "snapshot untouched");
        let journal = fs::read_to_string(dir.path().join("state.json.journal")).unwrap();
        assert_eq!(journal.lines().count(), 3, "{journal}");
        let loaded = Store::new(&path).load().unwrap();
        let names: Vec<String> = loaded.apps.iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["z", "a"], "snapshot order, then journal order");
    }

    #[test]
    fn a_cut_last_journal_line_was_never_acknowledged_and_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = Store::new(&path);
        store
            .save(&[Change::Put(spec("a", "192.0.2.1/32"))])
            .unwrap();
        store
            .save(&[Change::Put(spec("b", "192.0.2.2/32"))])
            .unwrap();
        let journal = dir.path().join("state.json.journal");
        let mut f = fs::OpenOptions::new().append(true).open(&journal).unwrap();
        f.write_all(br#"{"put":{"name":"c","vi"#).unwrap();
        let store = Store::new(&path);
        assert_eq!(store.load().unwrap().apps.len(), 2);
        // The next save folds the journal into the snapshot: nothing appends after the cut.
        store
            .save(&[Change::Put(spec("d", "192.0.2.4/32"))])
            .unwrap();
        assert_eq!(fs::read(&journal).unwrap(), b"");
        assert_eq!(Store::new(&path).load().unwrap().apps.len(), 3);
    }

    #[test]
    fn a_journal_larger_than_the_snapshot_is_folded_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = Store::new(&path);
        store.load().unwrap();
        for i in 0..2000 {
            let vip = format!("2001:db8::{i:x}/128");
            store
                .save(&[Change::Put(spec(&format!("app{i}"), &vip))])
                .unwrap();
        }
        let journal = fs::metadata(dir.path().join("state.json.journal"))
            .unwrap()
            .len();
        assert!(journal <= fs::metadata(&path).unwrap().len().max(JOURNAL_MIN_COMPACT));
        assert_eq!(Store::new(&path).load().unwrap().apps.len(), 2000);
    }

    #[test]
    fn replaying_a_journal_over_a_snapshot_that_has_it_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = Store::new(&path);
        store
            .save(&[Change::Put(spec("a", "192.0.2.1/32"))])
            .unwrap();
        let lines = [
            Change::Put(spec("b", "192.0.2.2/32")),
            Change::Remove(name("a")),
        ];
        store.save(&lines).unwrap();
        let journal = dir.path().join("state.json.journal");
        let kept = fs::read(&journal).unwrap();
        // A crash after the snapshot's rename, before the journal was emptied.
        store.compact(&mut store.inner(), &[]).unwrap();
        fs::write(&journal, kept).unwrap();
        let loaded = Store::new(&path).load().unwrap();
        assert_eq!(loaded.apps, [spec("b", "192.0.2.2/32")]);
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
        store.save(&changes(&saved)).unwrap();
        assert_eq!(store.load().unwrap(), saved);
        let saved = Saved {
            apps: apps[..1].to_vec(),
            ..Saved::default()
        };
        store
            .save(&[
                Change::Remove(name("b")),
                Change::Drain {
                    drained: vec![],
                    host_drained: false,
                },
            ])
            .unwrap();
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
        store.save(&changes(&saved)).unwrap();
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
        store.save(&[]).unwrap();
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
            let e = s.save(&[]).unwrap_err();
            assert!(matches!(e, StoreError::Kept { .. }), "{e}");
            assert!(e.to_string().contains("moved or removed by hand"), "{e}");
        }
        assert_eq!(fs::read(&path).unwrap(), b"{not json");
        // Once an operator moved it away, saving works again.
        fs::rename(&path, dir.path().join("kept-by-hand")).unwrap();
        store.save(&[]).unwrap();
        assert_eq!(store.load().unwrap(), Saved::default());
    }
}
