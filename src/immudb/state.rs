//! The trusted state on disk: the last (tx id, Alh) proven for one database of one server.
//!
//! Every verified call proves the server's answer against this state and then moves it forward,
//! so it is the anchor of all tamper evidence and is handled accordingly:
//!
//! * one file per (server UUID, database), with names validated so that neither value can
//!   escape the directory;
//! * an exclusive OS lock (`flock`, on a separate `.lock` file) held by a [`StateGuard`] for the
//!   whole verified call, so threads *and* processes sharing a state directory serialise, as the
//!   Go SDK does;
//! * atomic replacement (temp file, fsync, rename, fsync of the directory), files 0600 in a
//!   0700 directory;
//! * a SHA-256 over all fields plus a byte-exact canonical form, so a single flipped byte anywhere
//!   in the file is reported as [`StateError::Corrupted`] and never silently accepted or reset;
//! * the store refuses to move a state backwards or to replace a state with a different hash for
//!   the same tx: either would mean the server (or someone with access to the directory) is
//!   rewriting history, which is a decision for an operator, not for code.

use crate::immudb::proof::Digest;
use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// Identifies the on-disk format; part of the checksummed bytes.
const FORMAT: &str = "bt2immu-trusted-state/1";

/// A state signature as sent by the server (`ImmutableState.signature`), kept so the state can be
/// re-checked later against a configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSignature {
    /// Uncompressed SEC1 point as sent by the server (informational; never trusted as a key).
    pub public_key: Vec<u8>,
    /// DER ECDSA signature over the state payload.
    pub signature: Vec<u8>,
}

/// The last state of a database proven by this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedState {
    /// Database name as the server reports it (lower case).
    pub db: String,
    pub tx_id: u64,
    /// Alh of `tx_id` (`H("")` for the empty database, tx 0).
    pub tx_hash: Digest,
    pub signature: Option<StateSignature>,
}

#[derive(Debug, Error)]
pub enum StateError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what} {name:?} for a state file name: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("trusted state file {path} is corrupted: {reason}")]
    Corrupted { path: PathBuf, reason: String },
    #[error(
        "refusing to move trusted state {path} backwards from tx {stored_tx_id} to tx {new_tx_id}"
    )]
    Regression {
        path: PathBuf,
        stored_tx_id: u64,
        new_tx_id: u64,
    },
    #[error(
        "refusing to replace trusted state {path}: tx {tx_id} is stored with a different hash"
    )]
    Conflict { path: PathBuf, tx_id: u64 },
    #[error("state for database {got:?} cannot be saved under the lock for {expected:?}")]
    WrongDatabase { expected: String, got: String },
    #[error("lock task failed: {0}")]
    LockTask(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A directory of trusted states. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: Arc<PathBuf>,
}

impl StateStore {
    /// Opens (creating it with mode 0700 if missing) the state directory. An existing directory is
    /// used as it is.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err("creating state directory", &dir))?;
        }
        Ok(StateStore { dir: Arc::new(dir) })
    }

    /// The directory this store writes to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the exclusive lock for (`server_uuid`, `db`), blocking until it is free. Hold the
    /// guard for the whole verified call (load, RPC, verify, save). Blocking: from async code
    /// use [`StateStore::lock_async`]. Locking the same pair twice from one thread deadlocks.
    ///
    /// `server_uuid` must be 1–64 characters of `[A-Za-z0-9_-]` (immudb's are 20-char xids);
    /// `db` must be 1–128 characters of `[a-z0-9_]`, i.e. the name as the server reports it.
    pub fn lock(&self, server_uuid: &str, db: &str) -> Result<StateGuard, StateError> {
        let guard = self.open_lock(server_uuid, db)?;
        guard
            .lock_file
            .lock_exclusive()
            .map_err(io_err("locking", &guard.lock_path))?;
        Ok(guard)
    }

    /// Like [`StateStore::lock`] but returns `Ok(None)` instead of waiting when another holder
    /// has the lock.
    pub fn try_lock(&self, server_uuid: &str, db: &str) -> Result<Option<StateGuard>, StateError> {
        let guard = self.open_lock(server_uuid, db)?;
        let got = guard
            .lock_file
            .try_lock_exclusive()
            .map_err(io_err("locking", &guard.lock_path))?;
        Ok(got.then_some(guard))
    }

    /// [`StateStore::lock`] on tokio's blocking pool, so waiting for another process does not
    /// stall the async runtime. The guard can be held across `.await`s (it is `Send`).
    pub async fn lock_async(&self, server_uuid: &str, db: &str) -> Result<StateGuard, StateError> {
        let (store, uuid, db) = (self.clone(), server_uuid.to_string(), db.to_string());
        tokio::task::spawn_blocking(move || store.lock(&uuid, &db))
            .await
            .map_err(|e| StateError::LockTask(e.to_string()))?
    }

    fn open_lock(&self, server_uuid: &str, db: &str) -> Result<StateGuard, StateError> {
        validate_uuid(server_uuid)?;
        validate_db(db)?;
        let stem = format!("{server_uuid}.{db}");
        let lock_path = self.dir.join(format!("{stem}.lock"));
        // The lock file is never deleted: removing it would let two holders lock different inodes.
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("opening lock file", &lock_path))?;
        Ok(StateGuard {
            dir: Arc::clone(&self.dir),
            server_uuid: server_uuid.to_string(),
            db: db.to_string(),
            path: self.dir.join(format!("{stem}.state")),
            lock_path,
            lock_file,
        })
    }
}

fn validate_uuid(uuid: &str) -> Result<(), StateError> {
    let bad = |reason| StateError::InvalidName {
        what: "server UUID",
        name: uuid.to_string(),
        reason,
    };
    if uuid.is_empty() || uuid.len() > 64 {
        return Err(bad("must be 1 to 64 characters"));
    }
    if !uuid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(bad("only ASCII letters, digits, '_' and '-' are allowed"));
    }
    Ok(())
}

fn validate_db(db: &str) -> Result<(), StateError> {
    let bad = |reason| StateError::InvalidName {
        what: "database name",
        name: db.to_string(),
        reason,
    };
    if db.is_empty() || db.len() > 128 {
        return Err(bad("must be 1 to 128 characters"));
    }
    if !db
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(bad(
            "only lower-case letters, digits and '_' (use the name the server reports)",
        ));
    }
    Ok(())
}

/// Exclusive access to the trusted state of one (server, database) until dropped.
#[derive(Debug)]
pub struct StateGuard {
    dir: Arc<PathBuf>,
    server_uuid: String,
    db: String,
    path: PathBuf,
    lock_path: PathBuf,
    /// Closing this descriptor (on drop) releases the flock.
    lock_file: File,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    format: String,
    server_uuid: String,
    db: String,
    tx_id: u64,
    tx_hash: String,
    signature: Option<OnDiskSignature>,
    checksum: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDiskSignature {
    public_key: String,
    signature: String,
}

/// SHA-256 over an unambiguous (length-prefixed) encoding of every field.
fn checksum(server_uuid: &str, st: &TrustedState) -> Digest {
    fn put(h: &mut Sha256, b: &[u8]) {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    }
    let mut h = Sha256::new();
    put(&mut h, FORMAT.as_bytes());
    put(&mut h, server_uuid.as_bytes());
    put(&mut h, st.db.as_bytes());
    h.update(st.tx_id.to_be_bytes());
    h.update(st.tx_hash);
    match &st.signature {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            put(&mut h, &s.public_key);
            put(&mut h, &s.signature);
        }
    }
    h.finalize().into()
}

fn encode(server_uuid: &str, st: &TrustedState) -> Vec<u8> {
    let doc = OnDisk {
        format: FORMAT.to_string(),
        server_uuid: server_uuid.to_string(),
        db: st.db.clone(),
        tx_id: st.tx_id,
        tx_hash: hex::encode(st.tx_hash),
        signature: st.signature.as_ref().map(|s| OnDiskSignature {
            public_key: hex::encode(&s.public_key),
            signature: hex::encode(&s.signature),
        }),
        checksum: hex::encode(checksum(server_uuid, st)),
    };
    serde_json::to_vec(&doc).expect("serialising plain strings and integers cannot fail")
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl StateGuard {
    /// The server UUID this guard is for.
    pub fn server_uuid(&self) -> &str {
        &self.server_uuid
    }

    /// The database this guard is for.
    pub fn db(&self) -> &str {
        &self.db
    }

    /// The state file (which may not exist yet).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the stored state: `Ok(None)` if there is none yet, `Corrupted` if the file exists
    /// but is not exactly what [`StateGuard::save`] writes for this server and database.
    pub fn load(&self) -> Result<Option<TrustedState>, StateError> {
        let raw = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("reading", &self.path)(e)),
        };
        self.decode(&raw).map(Some)
    }

    fn corrupted(&self, reason: impl Into<String>) -> StateError {
        StateError::Corrupted {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn decode(&self, raw: &[u8]) -> Result<TrustedState, StateError> {
        let doc: OnDisk = serde_json::from_slice(raw)
            .map_err(|e| self.corrupted(format!("not a state document: {e}")))?;
        if doc.format != FORMAT {
            return Err(self.corrupted(format!("unknown format {:?}", doc.format)));
        }
        if doc.server_uuid != self.server_uuid || doc.db != self.db {
            return Err(self.corrupted(format!(
                "file holds the state of server {:?} database {:?}",
                doc.server_uuid, doc.db
            )));
        }
        let hex_field = |name: &str, s: &str| {
            hex::decode(s).map_err(|e| self.corrupted(format!("{name}: {e}")))
        };
        let tx_hash: Digest = hex_field("tx_hash", &doc.tx_hash)?
            .try_into()
            .map_err(|_| self.corrupted("tx_hash is not 32 bytes"))?;
        let signature = match &doc.signature {
            None => None,
            Some(s) => Some(StateSignature {
                public_key: hex_field("public_key", &s.public_key)?,
                signature: hex_field("signature", &s.signature)?,
            }),
        };
        let st = TrustedState {
            db: doc.db.clone(),
            tx_id: doc.tx_id,
            tx_hash,
            signature,
        };
        if hex::encode(checksum(&self.server_uuid, &st)) != doc.checksum {
            return Err(self.corrupted("checksum mismatch"));
        }
        // Only the exact bytes save() writes are accepted, so that no change (whitespace, hex
        // case, escapes, field order) can hide in a file that still parses to a valid state.
        if encode(&self.server_uuid, &st) != raw {
            return Err(self.corrupted("not in canonical form"));
        }
        Ok(st)
    }

    /// Atomically replaces the stored state with `state`. Refuses (typed errors) a state for
    /// another database, a lower tx id than the stored one, a different hash for the stored tx
    /// id, and overwriting a corrupted file.
    pub fn save(&self, state: &TrustedState) -> Result<(), StateError> {
        if state.db != self.db {
            return Err(StateError::WrongDatabase {
                expected: self.db.clone(),
                got: state.db.clone(),
            });
        }
        if let Some(old) = self.load()? {
            if state.tx_id < old.tx_id {
                return Err(StateError::Regression {
                    path: self.path.clone(),
                    stored_tx_id: old.tx_id,
                    new_tx_id: state.tx_id,
                });
            }
            if state.tx_id == old.tx_id && state.tx_hash != old.tx_hash {
                return Err(StateError::Conflict {
                    path: self.path.clone(),
                    tx_id: state.tx_id,
                });
            }
        }
        let bytes = encode(&self.server_uuid, state);
        let file_name = self
            .path
            .file_name()
            .expect("state path has a file name")
            .to_string_lossy()
            .into_owned();
        let tmp = self.dir.join(format!(
            ".{file_name}.tmp-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("creating", &tmp))?;
            f.write_all(&bytes).map_err(io_err("writing", &tmp))?;
            f.sync_all().map_err(io_err("syncing", &tmp))?;
            drop(f);
            fs::rename(&tmp, &self.path).map_err(io_err("renaming into place", &self.path))?;
            File::open(self.dir.as_path())
                .and_then(|d| d.sync_all())
                .map_err(io_err("syncing directory", &self.dir))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::AtomicUsize;

    const UUID: &str = "cs6ipnvmt7c7s4ihu2ag";

    fn state(tx_id: u64, sig: bool) -> TrustedState {
        TrustedState {
            db: "defaultdb".into(),
            tx_id,
            tx_hash: crate::immudb::proof::sha256(&tx_id.to_be_bytes()),
            signature: sig.then(|| StateSignature {
                public_key: vec![4; 65],
                signature: vec![0x30, 0x45, 1, 2, 3],
            }),
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn round_trip_permissions_and_no_temp_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("states");
        let store = StateStore::new(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let g = store.lock(UUID, "defaultdb").unwrap();
        assert_eq!(g.load().unwrap(), None);
        for (tx, sig) in [(0, false), (1, true), (5, false), (5, false), (9, true)] {
            let st = state(tx, sig);
            g.save(&st).unwrap();
            assert_eq!(g.load().unwrap(), Some(st));
        }
        assert_eq!(mode(g.path()), 0o600);
        assert_eq!(mode(&g.lock_path), 0o600);
        drop(g);
        // a fresh guard (as another process would) reads the same
        let g = store.lock(UUID, "defaultdb").unwrap();
        assert_eq!(g.load().unwrap(), Some(state(9, true)));
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                format!("{UUID}.defaultdb.lock"),
                format!("{UUID}.defaultdb.state")
            ]
        );
    }

    #[test]
    fn states_are_separate_per_server_and_database() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        store
            .lock(UUID, "defaultdb")
            .unwrap()
            .save(&state(3, false))
            .unwrap();
        let mut other_db = state(1, false);
        other_db.db = "other".into();
        let g = store.lock(UUID, "other").unwrap();
        assert_eq!(g.load().unwrap(), None);
        g.save(&other_db).unwrap();
        assert_eq!(
            store
                .lock("otheruuid", "defaultdb")
                .unwrap()
                .load()
                .unwrap(),
            None
        );
        assert_eq!(
            store.lock(UUID, "defaultdb").unwrap().load().unwrap(),
            Some(state(3, false))
        );
        // a state file copied to another server's name is not accepted
        fs::copy(
            tmp.path().join(format!("{UUID}.defaultdb.state")),
            tmp.path().join("otheruuid.defaultdb.state"),
        )
        .unwrap();
        assert!(matches!(
            store.lock("otheruuid", "defaultdb").unwrap().load(),
            Err(StateError::Corrupted { .. })
        ));
        // saving another db's state under this lock is refused
        assert!(matches!(
            g.save(&state(4, false)),
            Err(StateError::WrongDatabase { .. })
        ));
    }

    #[test]
    fn every_flipped_byte_is_reported_as_corrupted() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        let g = store.lock(UUID, "defaultdb").unwrap();
        g.save(&state(42, true)).unwrap();
        let good = fs::read(g.path()).unwrap();
        let mut checked = 0;
        for i in 0..good.len() {
            for mask in [0x01u8, 0x02, 0x07, 0x20, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= mask;
                fs::write(g.path(), &bad).unwrap();
                match g.load() {
                    Err(StateError::Corrupted { .. }) => checked += 1,
                    other => panic!("byte {i} ^ {mask:#x} gave {other:?}"),
                }
                // and a corrupted state is never overwritten
                assert!(matches!(
                    g.save(&state(43, false)),
                    Err(StateError::Corrupted { .. })
                ));
            }
        }
        assert_eq!(checked, good.len() * 6);
        for cut in [0, 1, good.len() / 2, good.len() - 1] {
            fs::write(g.path(), &good[..cut]).unwrap();
            assert!(
                matches!(g.load(), Err(StateError::Corrupted { .. })),
                "cut {cut}"
            );
        }
        let mut longer = good.clone();
        longer.push(b'\n');
        fs::write(g.path(), &longer).unwrap();
        assert!(matches!(g.load(), Err(StateError::Corrupted { .. })));
        fs::write(g.path(), &good).unwrap();
        assert_eq!(g.load().unwrap(), Some(state(42, true)));
    }

    #[test]
    fn state_never_moves_backwards_or_forks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        let g = store.lock(UUID, "defaultdb").unwrap();
        g.save(&state(10, false)).unwrap();
        match g.save(&state(9, false)) {
            Err(StateError::Regression {
                stored_tx_id: 10,
                new_tx_id: 9,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let mut fork = state(10, false);
        fork.tx_hash[0] ^= 1;
        assert!(matches!(
            g.save(&fork),
            Err(StateError::Conflict { tx_id: 10, .. })
        ));
        // same state again (e.g. now with a signature) and forward moves are fine
        g.save(&state(10, true)).unwrap();
        g.save(&state(11, false)).unwrap();
        assert_eq!(g.load().unwrap().unwrap().tx_id, 11);
    }

    #[test]
    fn names_cannot_escape_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        for (uuid, db) in [
            ("../x", "defaultdb"),
            ("a/b", "defaultdb"),
            ("", "defaultdb"),
            (UUID, ""),
            (UUID, "../../etc/passwd"),
            (UUID, "a.b"),
            (UUID, "DefaultDB"),
            (UUID, "db\0"),
            ("x".repeat(65).as_str(), "defaultdb"),
            (UUID, "d".repeat(129).as_str()),
        ] {
            assert!(
                matches!(store.lock(uuid, db), Err(StateError::InvalidName { .. })),
                "{uuid:?} {db:?}"
            );
        }
        store.lock(UUID, &"d".repeat(128)).unwrap();
        // nothing was created outside the directory, nothing but the one lock inside
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn try_lock_sees_a_held_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        let g = store.lock(UUID, "defaultdb").unwrap();
        assert!(store.try_lock(UUID, "defaultdb").unwrap().is_none());
        assert!(store.try_lock(UUID, "otherdb").unwrap().is_some());
        drop(g);
        assert!(store.try_lock(UUID, "defaultdb").unwrap().is_some());
    }

    /// One read-modify-write step under the lock, with an overlap detector (a marker file created
    /// exclusively while inside) that works across threads and processes.
    fn locked_increment(store: &StateStore) {
        let g = store.lock(UUID, "defaultdb").unwrap();
        let marker = store.dir().join("inside");
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .expect("two lock holders inside at once");
        let next = g.load().unwrap().map_or(1, |s| s.tx_id + 1);
        std::thread::yield_now();
        g.save(&state(next, false)).unwrap();
        fs::remove_file(&marker).unwrap();
    }

    #[test]
    fn concurrent_threads_serialise() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        let (threads, rounds) = (6, 25);
        let done = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (store, done) = (store.clone(), Arc::clone(&done));
                std::thread::spawn(move || {
                    for _ in 0..rounds {
                        locked_increment(&store);
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(done.load(Ordering::SeqCst), threads * rounds);
        let g = store.lock(UUID, "defaultdb").unwrap();
        assert_eq!(g.load().unwrap().unwrap().tx_id, (threads * rounds) as u64);
    }

    const WORKER_ENV: &str = "BT2IMMU_STATE_WORKER_DIR";
    const WORKER_ROUNDS: u64 = 30;

    /// Runs `WORKER_ROUNDS` locked increments. Spawned as a child process (with `WORKER_ENV`) by
    /// `concurrent_processes_serialise`; run directly it works on its own directory and checks
    /// the count itself.
    #[test]
    fn process_worker() {
        let own = tempfile::tempdir().unwrap();
        let shared = std::env::var_os(WORKER_ENV);
        let dir = shared
            .clone()
            .map_or(own.path().to_path_buf(), PathBuf::from);
        let store = StateStore::new(&dir).unwrap();
        for _ in 0..WORKER_ROUNDS {
            locked_increment(&store);
        }
        if shared.is_none() {
            let g = store.lock(UUID, "defaultdb").unwrap();
            assert_eq!(g.load().unwrap().unwrap().tx_id, WORKER_ROUNDS);
        }
    }

    #[test]
    fn concurrent_processes_serialise() {
        let tmp = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let procs = 4;
        let children: Vec<_> = (0..procs)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "immudb::state::tests::process_worker",
                        "--test-threads=1",
                    ])
                    .env(WORKER_ENV, tmp.path())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "worker failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("1 passed"), "worker did not run: {stdout}");
        }
        let store = StateStore::new(tmp.path()).unwrap();
        let g = store.lock(UUID, "defaultdb").unwrap();
        assert_eq!(g.load().unwrap().unwrap().tx_id, procs * WORKER_ROUNDS);
    }

    #[tokio::test]
    async fn lock_async_waits_without_blocking_the_runtime() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        let held = store.lock(UUID, "defaultdb").unwrap();
        let s2 = store.clone();
        let waiter = tokio::spawn(async move { s2.lock_async(UUID, "defaultdb").await });
        // the runtime keeps running other work while the waiter is blocked on the lock
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        held.save(&state(1, false)).unwrap();
        drop(held);
        let g = waiter.await.unwrap().unwrap();
        assert_eq!(g.load().unwrap(), Some(state(1, false)));
    }
}
