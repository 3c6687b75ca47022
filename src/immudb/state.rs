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
//! * files 0600 in a 0700 directory;
//! * every byte of the file is covered by a SHA-256 or must be zero, and only the exact bytes the
//!   writer produces are accepted, so a single flipped byte anywhere in the file is reported as
//!   [`StateError::Corrupted`] and never silently accepted, reset or worked around;
//! * the store refuses to move a state backwards or to replace a state with a different hash for
//!   the same tx: either would mean the server (or someone with access to the directory) is
//!   rewriting history, which is a decision for an operator, not for code.
//!
//! # Why two slots, written in place
//!
//! The state is saved after every verified call, so its cost is paid per call. Replacing the
//! file (temp file, fsync, rename, fsync of the directory) costs file system journal commits
//! each time. Instead the file has a fixed size and holds two *slots*, at offset 0 and at the
//! next 4096-byte boundary after the slot length; each slot is one 512-byte sector holding a
//! generation counter, the state and a SHA-256 over the whole slot (its zero padding included).
//! A save overwrites the slot with the *older* generation and calls `fdatasync`: the file's size
//! and blocks never change, so that is one data write and a cache flush, without a journal
//! commit. (The file is created by writing every byte, not by `fallocate` or a sparse
//! `set_len`, so no later write has to allocate a block or convert an unwritten extent.)
//!
//! A slot is one aligned sector and devices write a sector atomically, so a crash leaves either
//! the old or the new content in the slot being written, and the other slot is never touched by
//! that save. A checksum failure is therefore not a plausible crash artefact: it is reported as
//! corruption (naming the slot, and whether the other one is intact, so an operator can decide),
//! never repaired by falling back to the other slot. Both slots must always be valid, their
//! generations consecutive and each in its own slot (even in slot 0, odd in slot 1), and the
//! older one must not hold a later or a conflicting state.
//!
//! The file is written whole, atomically (temp file, fsync, rename, fsync of the directory), only
//! when it is created, when it is in the legacy format, when it is not a private regular file as
//! this module creates it (mode 0600, one link, owned by us, not a symlink), or when a state does
//! not fit one sector (only possible with an unverified server signature far larger than
//! immudb's ECDSA P-256 ones; such files get larger slots and are always replaced whole, because
//! a multi-sector write in place could tear).
//!
//! # Legacy format
//!
//! Files written before the slot format (`bt2immu-trusted-state/1`, canonical JSON with a
//! checksum) are still read, with the same strictness, and replaced by a slot file on the next
//! save, so an existing trust anchor survives the upgrade.

use crate::immudb::proof::Digest;
use fs4::fs_std::FileExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt, FileExt as _, MetadataExt as _, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// Identifies the legacy JSON format; part of its checksummed bytes.
const LEGACY_FORMAT: &str = "bt2immu-trusted-state/1";

/// First bytes of every slot: bt2immu trusted state, format 2.
const MAGIC: [u8; 8] = *b"BT2ITS02";
/// The unit a device writes atomically, and the slot length for every real state.
const SECTOR: usize = 512;
/// Slots start on page boundaries so that writing one never rewrites the other's page.
const PAGE: usize = 4096;
const HASH_LEN: usize = 32;
/// Magic, slot length (u32), generation, tx id (u64 each) and tx hash.
const FIXED_LEN: usize = 8 + 4 + 8 + 8 + 32;
/// Largest slot accepted: a real state needs well under one sector.
const MAX_SLOT_LEN: usize = 1 << 20;

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
    #[error(
        "refusing to save a trusted state of {len} bytes (at most {max}): its signature is not \
         one immudb makes"
    )]
    TooLarge { len: usize, max: usize },
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

// ---------------------------------------------------------------------------------------------
// Slot format

/// Bytes a slot needs for `st` (before rounding up to whole sectors).
fn slot_content_len(server_uuid: &str, st: &TrustedState) -> usize {
    let sig = st
        .signature
        .as_ref()
        .map_or(0, |s| 4 + s.public_key.len() + 4 + s.signature.len());
    FIXED_LEN + 1 + server_uuid.len() + 1 + st.db.len() + 1 + sig + HASH_LEN
}

/// The slot length for `st`: whole sectors, [`SECTOR`] for every state immudb produces.
fn slot_len_for(server_uuid: &str, st: &TrustedState) -> Result<usize, StateError> {
    let len = slot_content_len(server_uuid, st).div_ceil(SECTOR) * SECTOR;
    if len > MAX_SLOT_LEN {
        return Err(StateError::TooLarge {
            len,
            max: MAX_SLOT_LEN,
        });
    }
    Ok(len)
}

/// Distance between the two slots (and the size of each half of the file).
fn stride(slot_len: usize) -> usize {
    slot_len.div_ceil(PAGE) * PAGE
}

/// One slot, `slot_len` bytes: magic, slot length, generation, tx id, tx hash, server UUID and
/// database (u8 length each), signature (flag byte, then u32 length and bytes of key and
/// signature), zeros, and the SHA-256 of everything before it. Integers are big-endian.
fn encode_slot(slot_len: usize, generation: u64, server_uuid: &str, st: &TrustedState) -> Vec<u8> {
    assert!(
        slot_content_len(server_uuid, st) <= slot_len,
        "slot length checked by the caller"
    );
    let mut b = Vec::with_capacity(slot_len);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&(slot_len as u32).to_be_bytes());
    b.extend_from_slice(&generation.to_be_bytes());
    b.extend_from_slice(&st.tx_id.to_be_bytes());
    b.extend_from_slice(&st.tx_hash);
    // Both names were validated (at most 64 and 128 bytes) before any state is encoded.
    b.push(server_uuid.len() as u8);
    b.extend_from_slice(server_uuid.as_bytes());
    b.push(st.db.len() as u8);
    b.extend_from_slice(st.db.as_bytes());
    match &st.signature {
        None => b.push(0),
        Some(s) => {
            b.push(1);
            // Below MAX_SLOT_LEN, so the lengths fit in a u32.
            b.extend_from_slice(&(s.public_key.len() as u32).to_be_bytes());
            b.extend_from_slice(&s.public_key);
            b.extend_from_slice(&(s.signature.len() as u32).to_be_bytes());
            b.extend_from_slice(&s.signature);
        }
    }
    b.resize(slot_len - HASH_LEN, 0);
    let sum = Sha256::digest(&b);
    b.extend_from_slice(&sum);
    b
}

/// A whole slot file: the state in generations `generation - 1` and `generation`, each in its
/// own slot, the rest zero.
fn encode_file(slot_len: usize, generation: u64, server_uuid: &str, st: &TrustedState) -> Vec<u8> {
    let stride = stride(slot_len);
    let mut file = vec![0u8; 2 * stride];
    for g in [generation - 1, generation] {
        let at = (g % 2) as usize * stride;
        file[at..at + slot_len].copy_from_slice(&encode_slot(slot_len, g, server_uuid, st));
    }
    file
}

/// Reads the fields of a slot in order; every read past the end is an error.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("{what} runs past the end of the slot"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<usize, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    fn text(&mut self, what: &str) -> Result<String, String> {
        let n = self.u8(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
    fn bytes(&mut self, what: &str) -> Result<Vec<u8>, String> {
        let n = self.u32(what)?;
        Ok(self.take(n, what)?.to_vec())
    }
}

/// A decoded slot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    generation: u64,
    state: TrustedState,
}

/// What a state file holds.
#[derive(Debug)]
enum Stored {
    Legacy(TrustedState),
    /// The newer of the two slots, and the slot length.
    Slots {
        newest: Slot,
        slot_len: usize,
    },
}

impl Stored {
    fn state(&self) -> &TrustedState {
        match self {
            Stored::Legacy(st) => st,
            Stored::Slots { newest, .. } => &newest.state,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Legacy format (read only)

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
fn legacy_checksum(server_uuid: &str, st: &TrustedState) -> Digest {
    fn put(h: &mut Sha256, b: &[u8]) {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    }
    let mut h = Sha256::new();
    put(&mut h, LEGACY_FORMAT.as_bytes());
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

/// The exact bytes the legacy writer produced; used to accept only its canonical form.
fn encode_legacy(server_uuid: &str, st: &TrustedState) -> Vec<u8> {
    let doc = OnDisk {
        format: LEGACY_FORMAT.to_string(),
        server_uuid: server_uuid.to_string(),
        db: st.db.clone(),
        tx_id: st.tx_id,
        tx_hash: hex::encode(st.tx_hash),
        signature: st.signature.as_ref().map(|s| OnDiskSignature {
            public_key: hex::encode(&s.public_key),
            signature: hex::encode(&s.signature),
        }),
        checksum: hex::encode(legacy_checksum(server_uuid, st)),
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
    /// but is not exactly what [`StateGuard::save`] (or the legacy writer) writes for this server
    /// and database.
    pub fn load(&self) -> Result<Option<TrustedState>, StateError> {
        Ok(self.load_stored()?.map(|stored| stored.state().clone()))
    }

    /// Opens (following a symlink, as a reader always has) and decodes the state file.
    /// `O_NONBLOCK` only matters for a FIFO planted under the name: opening it must not hang.
    fn load_stored(&self) -> Result<Option<Stored>, StateError> {
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path);
        let mut file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", &self.path)(e)),
        };
        self.read_stored(&mut file).map(Some)
    }

    fn corrupted(&self, reason: impl Into<String>) -> StateError {
        StateError::Corrupted {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Reads and decodes an open state file (refusing anything but a regular file, so a FIFO
    /// or device planted under the name cannot hang or feed the reader).
    fn read_stored(&self, file: &mut File) -> Result<Stored, StateError> {
        let meta = file.metadata().map_err(io_err("inspecting", &self.path))?;
        if !meta.is_file() {
            return Err(self.corrupted("not a regular file"));
        }
        let mut raw = Vec::with_capacity(meta.len().min(2 * MAX_SLOT_LEN as u64) as usize);
        file.read_to_end(&mut raw)
            .map_err(io_err("reading", &self.path))?;
        self.decode(&raw)
    }

    fn decode(&self, raw: &[u8]) -> Result<Stored, StateError> {
        if raw.starts_with(&MAGIC) {
            self.decode_slots(raw)
        } else if raw.first() == Some(&b'{') {
            self.decode_legacy(raw).map(Stored::Legacy)
        } else {
            Err(self.corrupted("neither the slot format nor the legacy JSON format"))
        }
    }

    fn decode_slots(&self, raw: &[u8]) -> Result<Stored, StateError> {
        let Some(len_field) = raw.get(8..12) else {
            return Err(self.corrupted(format!("truncated to {} bytes", raw.len())));
        };
        let slot_len = u32::from_be_bytes(len_field.try_into().expect("4 bytes")) as usize;
        if slot_len < SECTOR || slot_len % SECTOR != 0 || slot_len > MAX_SLOT_LEN {
            return Err(self.corrupted(format!("invalid slot length {slot_len}")));
        }
        let stride = stride(slot_len);
        if raw.len() != 2 * stride {
            return Err(self.corrupted(format!(
                "{} bytes long, a file with {slot_len}-byte slots has {}",
                raw.len(),
                2 * stride
            )));
        }
        let slot = |i: usize| -> Result<Slot, String> {
            let half = &raw[i * stride..(i + 1) * stride];
            if half[slot_len..].iter().any(|&b| b != 0) {
                return Err("the padding after it is not zero".into());
            }
            let s = self.decode_slot(&half[..slot_len])?;
            if s.generation % 2 != i as u64 {
                return Err(format!(
                    "generation {} belongs in the other slot",
                    s.generation
                ));
            }
            Ok(s)
        };
        let (a, b) = match (slot(0), slot(1)) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => {
                let describe = |i: usize, r: &Result<Slot, String>| match r {
                    Ok(s) => format!(
                        "slot {i} is intact (generation {}, tx {})",
                        s.generation, s.state.tx_id
                    ),
                    Err(e) => format!("slot {i}: {e}"),
                };
                return Err(self.corrupted(format!("{}; {}", describe(0, &a), describe(1, &b))));
            }
        };
        let (older, newer) = if a.generation < b.generation {
            (a, b)
        } else {
            (b, a)
        };
        if older.generation.checked_add(1) != Some(newer.generation) {
            return Err(self.corrupted(format!(
                "slot generations {} and {} are not consecutive",
                older.generation, newer.generation
            )));
        }
        if older.state.tx_id > newer.state.tx_id
            || (older.state.tx_id == newer.state.tx_id
                && older.state.tx_hash != newer.state.tx_hash)
        {
            return Err(self.corrupted(format!(
                "the older slot (tx {}) is not an earlier state of the newer one (tx {})",
                older.state.tx_id, newer.state.tx_id
            )));
        }
        Ok(Stored::Slots {
            newest: newer,
            slot_len,
        })
    }

    /// Decodes one slot; the error is the reason it is not valid.
    fn decode_slot(&self, b: &[u8]) -> Result<Slot, String> {
        if !b.starts_with(&MAGIC) {
            return Err("bad magic".into());
        }
        let (body, sum) = b.split_at(b.len() - HASH_LEN);
        if Sha256::digest(body)[..] != *sum {
            return Err("checksum mismatch".into());
        }
        let mut f = Fields(&body[MAGIC.len()..]);
        if f.u32("slot length")? != b.len() {
            return Err("slot length field differs from the file's".into());
        }
        let generation = f.u64("generation")?;
        let tx_id = f.u64("tx id")?;
        let tx_hash: Digest = f.take(32, "tx hash")?.try_into().expect("32 bytes");
        let server_uuid = f.text("server UUID")?;
        let db = f.text("database")?;
        let signature = match f.u8("signature flag")? {
            0 => None,
            1 => Some(StateSignature {
                public_key: f.bytes("public key")?,
                signature: f.bytes("signature")?,
            }),
            other => return Err(format!("signature flag {other}")),
        };
        if server_uuid != self.server_uuid || db != self.db {
            return Err(format!(
                "it holds the state of server {server_uuid:?} database {db:?}"
            ));
        }
        let state = TrustedState {
            db,
            tx_id,
            tx_hash,
            signature,
        };
        // Only the exact bytes encode_slot writes are accepted (zero padding included).
        if encode_slot(b.len(), generation, &self.server_uuid, &state) != b {
            return Err("not in canonical form".into());
        }
        Ok(Slot { generation, state })
    }

    fn decode_legacy(&self, raw: &[u8]) -> Result<TrustedState, StateError> {
        let doc: OnDisk = serde_json::from_slice(raw)
            .map_err(|e| self.corrupted(format!("not a state document: {e}")))?;
        if doc.format != LEGACY_FORMAT {
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
        if hex::encode(legacy_checksum(&self.server_uuid, &st)) != doc.checksum {
            return Err(self.corrupted("checksum mismatch"));
        }
        // Only the exact bytes the legacy writer wrote are accepted, so that no change
        // (whitespace, hex case, escapes, field order) can hide in a file that still parses.
        if encode_legacy(&self.server_uuid, &st) != raw {
            return Err(self.corrupted("not in canonical form"));
        }
        Ok(st)
    }

    /// Opens the state file for an in-place save without following a symlink: `Ok(None)` if
    /// there is no file, `Ok(Some((None, stored)))` if it cannot be written in place.
    #[allow(clippy::type_complexity)]
    fn open_for_save(&self) -> Result<Option<(Option<File>, Stored)>, StateError> {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path);
        match opened {
            Ok(mut f) => {
                let stored = self.read_stored(&mut f)?;
                Ok(Some((Some(f), stored)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            // A symlink, or a file we may not write (say, made read-only by hand): read it as
            // load() does; the save then replaces it, as a rename always did.
            Err(e)
                if e.raw_os_error() == Some(libc::ELOOP)
                    || e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Ok(self.load_stored()?.map(|stored| (None, stored)))
            }
            Err(e) => Err(io_err("opening", &self.path)(e)),
        }
    }

    /// Stores `state`. Refuses (typed errors) a state for another database, a lower tx id than
    /// the stored one, a different hash for the stored tx id, and overwriting a corrupted file.
    ///
    /// Normally one sector is written in place and synced (see the module docs); the file is
    /// replaced whole, atomically, when it is created or is not as this module writes it.
    pub fn save(&self, state: &TrustedState) -> Result<(), StateError> {
        if state.db != self.db {
            return Err(StateError::WrongDatabase {
                expected: self.db.clone(),
                got: state.db.clone(),
            });
        }
        let existing = self.open_for_save()?;
        if let Some((_, stored)) = &existing {
            let old = stored.state();
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
        let slot_len = slot_len_for(&self.server_uuid, state)?;
        let generation = match &existing {
            Some((_, Stored::Slots { newest, .. })) => newest
                .generation
                .checked_add(1)
                .ok_or_else(|| self.corrupted("generation counter exhausted"))?,
            _ => 1,
        };
        if let Some((Some(file), Stored::Slots { slot_len: old, .. })) = &existing {
            if *old == SECTOR && slot_len == SECTOR && self.is_private(file)? {
                let at = (generation % 2) * stride(SECTOR) as u64;
                let bytes = encode_slot(SECTOR, generation, &self.server_uuid, state);
                file.write_all_at(&bytes, at)
                    .map_err(io_err("writing", &self.path))?;
                return file.sync_data().map_err(io_err("syncing", &self.path));
            }
        }
        self.replace(&encode_file(slot_len, generation, &self.server_uuid, state))
    }

    /// Whether an existing file is one this module could have created: mode 0600, one link,
    /// owned by us. Anything else is replaced rather than written in place, so a loosened mode
    /// or a hard link elsewhere never sees later states.
    fn is_private(&self, file: &File) -> Result<bool, StateError> {
        let meta = file.metadata().map_err(io_err("inspecting", &self.path))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        Ok(meta.mode() & 0o7777 == 0o600 && meta.nlink() == 1 && meta.uid() == euid)
    }

    /// Atomically replaces (or creates) the state file: temp file, fsync, rename, fsync dir.
    fn replace(&self, bytes: &[u8]) -> Result<(), StateError> {
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
            f.write_all(bytes).map_err(io_err("writing", &tmp))?;
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
        let mut inode = None;
        for (tx, sig) in [(0, false), (1, true), (5, false), (5, false), (9, true)] {
            let st = state(tx, sig);
            g.save(&st).unwrap();
            assert_eq!(g.load().unwrap(), Some(st));
            // created once, then written in place: same inode, same size
            let meta = fs::metadata(g.path()).unwrap();
            assert_eq!(meta.len(), 2 * PAGE as u64);
            assert_eq!(*inode.get_or_insert(meta.ino()), meta.ino(), "tx {tx}");
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

    const MASKS: [u8; 6] = [0x01, 0x02, 0x07, 0x20, 0x80, 0xff];

    fn is_corrupted<T: std::fmt::Debug>(r: Result<T, StateError>) -> bool {
        matches!(r, Err(StateError::Corrupted { .. }))
    }

    #[test]
    fn every_flipped_byte_is_reported_as_corrupted() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        let g = store.lock(UUID, "defaultdb").unwrap();
        // the slots hold different states (tx 41 and 42), the newer one with a signature
        for tx in 40..=42 {
            g.save(&state(tx, tx == 42)).unwrap();
        }
        let good = fs::read(g.path()).unwrap();
        assert_eq!(good.len(), 2 * PAGE);
        // Every byte (slots, their checksums, the zero padding) under every mask, through the
        // decoder load() and save() use; neither slot is ever taken as a fallback.
        let mut checked = 0;
        for i in 0..good.len() {
            for mask in MASKS {
                let mut bad = good.clone();
                bad[i] ^= mask;
                match g.decode(&bad) {
                    Err(StateError::Corrupted { .. }) => checked += 1,
                    other => panic!("byte {i} ^ {mask:#x} gave {other:?}"),
                }
            }
        }
        assert_eq!(checked, good.len() * MASKS.len());
        // On disk, in both slots and in the padding: load() reports it, save() refuses to
        // overwrite it, and the file is left exactly as it was.
        let edges = [
            0,
            8,
            SECTOR - 1,
            SECTOR,
            PAGE - 1,
            PAGE,
            PAGE + SECTOR - 1,
            2 * PAGE - 1,
        ];
        for i in (0..good.len()).step_by(61).chain(edges) {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            fs::write(g.path(), &bad).unwrap();
            assert!(is_corrupted(g.load()), "byte {i}");
            assert!(is_corrupted(g.save(&state(43, false))), "byte {i}");
            assert_eq!(fs::read(g.path()).unwrap(), bad, "byte {i}");
        }
        for cut in [0, 1, 11, 12, SECTOR, PAGE, PAGE + SECTOR, good.len() - 1] {
            fs::write(g.path(), &good[..cut]).unwrap();
            assert!(is_corrupted(g.load()), "cut {cut}");
        }
        for extra in [0u8, b'\n'] {
            let mut longer = good.clone();
            longer.push(extra);
            fs::write(g.path(), &longer).unwrap();
            assert!(is_corrupted(g.load()), "extra {extra}");
        }
        fs::write(g.path(), &good).unwrap();
        assert_eq!(g.load().unwrap(), Some(state(42, true)));
    }

    /// Decodes both halves of a slot file with 512-byte slots.
    fn slots(g: &StateGuard) -> [Slot; 2] {
        let raw = fs::read(g.path()).unwrap();
        assert_eq!(raw.len(), 2 * PAGE);
        [0, PAGE].map(|at| g.decode_slot(&raw[at..at + SECTOR]).unwrap())
    }

    #[test]
    fn a_save_overwrites_the_older_slot() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        let g = store.lock(UUID, "defaultdb").unwrap();
        g.save(&state(7, false)).unwrap();
        // a new file holds the state twice, generations 0 and 1
        let [s0, s1] = slots(&g);
        assert_eq!((s0.generation, s1.generation), (0, 1));
        assert_eq!((&s0.state, &s1.state), (&state(7, false), &state(7, false)));
        for (generation, tx) in [(2u64, 8u64), (3, 9), (4, 12)] {
            let before = slots(&g);
            g.save(&state(tx, true)).unwrap();
            let after = slots(&g);
            let (new, kept) = ((generation % 2) as usize, (1 - generation % 2) as usize);
            assert_eq!(after[new].generation, generation);
            assert_eq!(after[new].state, state(tx, true));
            assert_eq!(after[kept], before[kept], "the newer slot is never touched");
        }
    }

    /// A slot file whose slots are each valid (checksummed, canonical) but do not fit together.
    #[test]
    fn slots_that_disagree_are_corrupted() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        let g = store.lock(UUID, "defaultdb").unwrap();
        let file = |a: (u64, TrustedState), b: (u64, TrustedState)| {
            let mut raw = vec![0u8; 2 * PAGE];
            raw[..SECTOR].copy_from_slice(&encode_slot(SECTOR, a.0, UUID, &a.1));
            raw[PAGE..PAGE + SECTOR].copy_from_slice(&encode_slot(SECTOR, b.0, UUID, &b.1));
            raw
        };
        let mut fork = state(5, false);
        fork.tx_hash[0] ^= 1;
        let mut other_db = state(5, false);
        other_db.db = "other".into();
        let bad = [
            (
                "generations not consecutive",
                file((2, state(4, false)), (5, state(5, false))),
            ),
            (
                "generations in the wrong slots",
                file((3, state(4, false)), (4, state(5, false))),
            ),
            (
                "same generation twice",
                file((2, state(5, false)), (2, state(5, false))),
            ),
            (
                "older slot ahead",
                file((2, state(6, false)), (3, state(5, false))),
            ),
            ("older slot forked", file((2, fork), (3, state(5, false)))),
            (
                "a slot of another db",
                file((2, other_db), (3, state(5, false))),
            ),
        ];
        // and the same pair that is fine, to show the files are otherwise well formed
        fs::write(g.path(), file((2, state(4, false)), (3, state(5, false)))).unwrap();
        assert_eq!(g.load().unwrap(), Some(state(5, false)));
        for (what, raw) in bad {
            fs::write(g.path(), &raw).unwrap();
            assert!(is_corrupted(g.load()), "{what}");
            assert!(is_corrupted(g.save(&state(6, false))), "{what}");
            assert_eq!(fs::read(g.path()).unwrap(), raw, "{what}");
        }
    }

    #[test]
    fn a_legacy_file_is_read_strictly_and_converted_on_save() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        let g = store.lock(UUID, "defaultdb").unwrap();
        let legacy = encode_legacy(UUID, &state(42, true));
        assert_eq!(legacy[0], b'{');
        fs::write(g.path(), &legacy).unwrap();
        assert_eq!(g.load().unwrap(), Some(state(42, true)));
        for i in 0..legacy.len() {
            for mask in MASKS {
                let mut bad = legacy.clone();
                bad[i] ^= mask;
                assert!(is_corrupted(g.decode(&bad)), "byte {i} ^ {mask:#x}");
            }
        }
        let mut other = legacy.clone();
        other.push(b'\n');
        assert!(is_corrupted(g.decode(&other)));
        // the legacy state is the anchor: no regression, no fork, and the file is untouched
        assert!(matches!(
            g.save(&state(41, false)),
            Err(StateError::Regression { .. })
        ));
        let mut fork = state(42, false);
        fork.tx_hash[0] ^= 1;
        assert!(matches!(g.save(&fork), Err(StateError::Conflict { .. })));
        assert_eq!(fs::read(g.path()).unwrap(), legacy);
        // the next save writes the slot format
        g.save(&state(43, false)).unwrap();
        let raw = fs::read(g.path()).unwrap();
        assert!(raw.starts_with(&MAGIC));
        assert_eq!(raw.len(), 2 * PAGE);
        assert_eq!(g.load().unwrap(), Some(state(43, false)));
        assert_eq!(mode(g.path()), 0o600);
    }

    #[test]
    fn an_oversized_signature_gets_larger_slots_written_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path()).unwrap();
        let g = store.lock(UUID, "defaultdb").unwrap();
        let big = |tx: u64, len: usize| {
            let mut st = state(tx, true);
            st.signature.as_mut().unwrap().signature = vec![0x30; len];
            st
        };
        g.save(&state(1, true)).unwrap();
        for (tx, len) in [(2, 5000), (3, 5000), (4, 500)] {
            let ino = fs::metadata(g.path()).unwrap().ino();
            g.save(&big(tx, len)).unwrap();
            assert_eq!(g.load().unwrap(), Some(big(tx, len)));
            let meta = fs::metadata(g.path()).unwrap();
            assert_ne!(
                meta.ino(),
                ino,
                "tx {tx}: a multi-sector slot is never written in place"
            );
            let slot_len = slot_len_for(UUID, &big(tx, len)).unwrap();
            assert!(slot_len > SECTOR);
            assert_eq!(meta.len(), 2 * stride(slot_len) as u64);
            assert_eq!(mode(g.path()), 0o600);
        }
        // back to a normal state: one-sector slots again, then written in place
        g.save(&state(5, true)).unwrap();
        let meta = fs::metadata(g.path()).unwrap();
        assert_eq!(meta.len(), 2 * PAGE as u64);
        g.save(&state(6, true)).unwrap();
        assert_eq!(fs::metadata(g.path()).unwrap().ino(), meta.ino());
        assert_eq!(g.load().unwrap(), Some(state(6, true)));
        // a state no immudb makes is refused, and the stored one kept
        let before = fs::read(g.path()).unwrap();
        assert!(matches!(
            g.save(&big(7, MAX_SLOT_LEN)),
            Err(StateError::TooLarge { .. })
        ));
        assert_eq!(fs::read(g.path()).unwrap(), before);
    }

    #[test]
    fn a_file_that_is_not_private_is_replaced_not_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("s")).unwrap();
        let g = store.lock(UUID, "defaultdb").unwrap();
        g.save(&state(1, false)).unwrap();

        // a mode changed by hand (loosened, or read-only) is put right
        for (tx, changed) in [(2, 0o644), (2, 0o400)] {
            fs::set_permissions(g.path(), fs::Permissions::from_mode(changed)).unwrap();
            g.save(&state(tx, false)).unwrap();
            assert_eq!(mode(g.path()), 0o600, "{changed:o}");
            assert_eq!(g.load().unwrap(), Some(state(tx, false)));
        }

        // a hard link elsewhere keeps the old content
        let link = tmp.path().join("hardlink");
        fs::hard_link(g.path(), &link).unwrap();
        let linked = fs::read(&link).unwrap();
        g.save(&state(3, false)).unwrap();
        assert_eq!(fs::read(&link).unwrap(), linked);
        assert_eq!(fs::metadata(g.path()).unwrap().nlink(), 1);
        assert_eq!(g.load().unwrap(), Some(state(3, false)));

        // a symlink is read through (as always) but replaced, not written through
        let target = tmp.path().join("target");
        fs::rename(g.path(), &target).unwrap();
        std::os::unix::fs::symlink(&target, g.path()).unwrap();
        let target_bytes = fs::read(&target).unwrap();
        assert_eq!(g.load().unwrap(), Some(state(3, false)));
        assert!(matches!(
            g.save(&state(2, false)),
            Err(StateError::Regression { .. })
        ));
        g.save(&state(4, false)).unwrap();
        assert_eq!(fs::read(&target).unwrap(), target_bytes);
        assert!(fs::symlink_metadata(g.path())
            .unwrap()
            .file_type()
            .is_file());
        assert_eq!(g.load().unwrap(), Some(state(4, false)));

        // a FIFO under the name neither hangs nor is taken for a state
        fs::remove_file(g.path()).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(g.path())
            .status()
            .unwrap();
        assert!(status.success());
        assert!(is_corrupted(g.load()));
        assert!(is_corrupted(g.save(&state(5, false))));
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
