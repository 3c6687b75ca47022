//! A verified immudb client over gRPC (tonic).
//!
//! Every verified call checks the server's answer against the trusted state kept on disk
//! ([`super::state`]) with the pure proof checks of [`super::proof`], and only then moves the
//! trusted state forward. It is stricter than immudb's Go SDK (spec §2.10):
//!
//! * the transaction's `eH` is recomputed from the raw entries the server returns, and every
//!   entry we wrote or read must be among them with exactly our key, value and metadata (the
//!   server's metadata is never taken on trust) and a `vLen` that fits the value;
//! * the header in the transaction and the one in the dual proof must be identical;
//! * with no trusted state yet the dual proof (source = target) is still checked and, for tx 1,
//!   linked to the empty database;
//! * a pinned server key makes a missing signature an error, and the key embedded in responses is
//!   never used;
//! * a server whose state is behind ours (rollback) or that has another identity than the one
//!   recorded for its address is an error, never a reason to reset.
//!
//! A failed check never overwrites the trusted state. Verified calls are serialised per
//! (state dir, server, database) inside the process (a mutex) and across processes (the state
//! store's file lock), so concurrent writers always prove against the latest state.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{Mutex as AsyncMutex, RwLock};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use super::proof::{self, Digest, KvMetadata, TxEntry, TxHeader, VerifyError};
use super::proto;
use super::proto::immu_service_client::ImmuServiceClient;
use super::state::{StateError, StateGuard, StateSignature, StateStore, TrustedState};

/// Largest gRPC message we accept or send: the server's own receive limit (32 MiB).
const MAX_MESSAGE: usize = 32 * 1024 * 1024;
/// Sessions expire after 2 minutes idle by default; ping well inside that.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(30);
/// Largest page the server returns for Scan/History.
const MAX_PAGE: u64 = 2500;

/// Where and how to connect. Field names follow immuclient's flags.
#[derive(Clone)]
pub struct ClientConfig {
    pub address: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub database: String,
    /// Directory of the trusted state and the server identity records.
    pub state_dir: PathBuf,
    /// PKIX PEM public key of the server's signing key. When set, every state must be signed by
    /// it (an unsigned state is an error).
    pub server_signing_pub_key: Option<PathBuf>,
    /// PEM CA certificate: connect with TLS and trust only this CA.
    pub tls_ca: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .field("state_dir", &self.state_dir)
            .field("server_signing_pub_key", &self.server_signing_pub_key)
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

impl Default for ClientConfig {
    /// immudb's defaults: `127.0.0.1:3322`, `immudb`/`immudb`, `defaultdb`; trusted state in
    /// [`default_state_dir`].
    fn default() -> Self {
        Self::new("127.0.0.1", 3322, default_state_dir())
    }
}

/// `$XDG_STATE_HOME/bt2immu/trust`, else `~/.local/state/bt2immu/trust`, else `./.bt2immu-trust`.
pub fn default_state_dir() -> PathBuf {
    let non_empty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").and_then(non_empty) {
        return d.join("bt2immu/trust");
    }
    if let Some(h) = std::env::var_os("HOME").and_then(non_empty) {
        return h.join(".local/state/bt2immu/trust");
    }
    PathBuf::from(".bt2immu-trust")
}

impl ClientConfig {
    /// immudb's defaults (`immudb`/`immudb`, `defaultdb`) for a server at `address:port`.
    pub fn new(address: impl Into<String>, port: u16, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            address: address.into(),
            port,
            username: "immudb".into(),
            password: "immudb".into(),
            database: "defaultdb".into(),
            state_dir: state_dir.into(),
            server_signing_pub_key: None,
            tls_ca: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// What a write does when a key already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetMode {
    /// Write a new revision of the key.
    Upsert,
    /// Every key carries a `keyMustNotExist` precondition: the whole transaction is refused
    /// ([`ClientError::PreconditionFailed`]) if any key exists, so a replay cannot duplicate.
    MustNotExist,
    /// A new revision that expires at the given Unix time. bt2immu never writes one; tests
    /// use it to play someone who makes a record vanish from reads without deleting it.
    UpsertExpiring(i64),
}

/// Errors of the client. [`is_tampering`](Self::is_tampering) separates "the server (or the
/// local state) cannot be trusted" from ordinary transport and server errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A proof or hash check failed.
    #[error("verification failed ({what}): {source}")]
    Verification {
        what: String,
        #[source]
        source: VerifyError,
    },
    /// The server's answer contradicts the request or itself (wrong key, value, metadata, ...).
    #[error("verification failed: {0}")]
    Inconsistent(String),
    /// The server is behind the trusted state: data was rolled back or replaced.
    #[error("server state (tx {server_tx}) is older than the trusted state (tx {local_tx}): possible rollback")]
    ServerStateOlder { server_tx: u64, local_tx: u64 },
    /// Another server answers at an address we have a record for.
    #[error("server at {address} has identity {got}, but {recorded} was recorded for it (record: {record})")]
    ServerIdentityChanged {
        address: String,
        recorded: String,
        got: String,
        record: PathBuf,
    },
    /// The trusted state on disk does not pass its checksum, or a new state contradicts it.
    #[error("trusted state is corrupted: {0}")]
    StateCorrupted(#[source] StateError),
    /// Missing or invalid state signature with a pinned key.
    #[error("state signature: {0}")]
    Signature(String),

    /// `SetMode::MustNotExist` and a key exists (the transaction was not written).
    #[error("precondition failed (a key already exists): {0}")]
    PreconditionFailed(String),
    #[error("key not found")]
    KeyNotFound,
    // The status is shown here rather than as a `source`, so error chains do not say it twice.
    #[error("{op}: {} (gRPC {:?})", status.message(), status.code())]
    Server { op: &'static str, status: Status },
    /// The transport error's whole cause chain is in `detail`: tonic's own messages repeat
    /// ("transport error: transport error: tcp connect error: ...") when chained as sources.
    #[error("connecting to {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("trusted state: {0}")]
    State(#[source] StateError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Config(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// True when the error means the server or the local trusted state cannot be trusted (the
    /// caller should raise an alarm), false for transport, server and usage errors.
    pub fn is_tampering(&self) -> bool {
        matches!(
            self,
            Self::Verification { .. }
                | Self::Inconsistent(_)
                | Self::ServerStateOlder { .. }
                | Self::ServerIdentityChanged { .. }
                | Self::StateCorrupted(_)
                | Self::Signature(_)
        )
    }
}

fn verification(what: impl Into<String>) -> impl FnOnce(VerifyError) -> ClientError {
    let what = what.into();
    move |source| ClientError::Verification { what, source }
}

fn inconsistent(msg: impl Into<String>) -> ClientError {
    ClientError::Inconsistent(msg.into())
}

fn state_error(e: StateError) -> ClientError {
    match e {
        StateError::Corrupted { .. }
        | StateError::Regression { .. }
        | StateError::Conflict { .. } => ClientError::StateCorrupted(e),
        other => ClientError::State(other),
    }
}

/// An entry read with [`ImmuClient::verified_get`]: key, value and metadata are proven to be in
/// transaction `tx`, whose header is proven consistent with the trusted state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedEntry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub metadata: KvMetadata,
    pub tx: u64,
    /// Revision number as reported by the server (not covered by any proof).
    pub revision: u64,
    /// The verified header of `tx` (its `ts` is the commit time).
    pub header: TxHeader,
}

/// A transaction read with [`ImmuClient::verified_tx_by_id`]: its header is proven consistent
/// with the trusted state and its raw entries hash to the header's `eH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedTx {
    pub header: TxHeader,
    /// Raw entries; keys carry the server's prefix byte (`0x00` for plain KVs).
    pub entries: Vec<TxEntry>,
}

impl VerifiedTx {
    /// Whether this transaction holds the plain KV `key = value` (no metadata): a way to verify a
    /// record found by an unverified [`ImmuClient::scan`].
    pub fn contains(&self, key: &[u8], value: &[u8]) -> bool {
        let stored_key = proof::plain_key(key);
        let h = proof::sha256(&proof::plain_value(value));
        self.entries.iter().any(|e| {
            e.key == stored_key
                && e.h_value == h
                && e.metadata.is_empty()
                && usize::try_from(e.v_len).ok() == Some(value.len() + 1)
        })
    }
}

/// An entry from [`ImmuClient::scan`] or [`ImmuClient::history`]. **Not verified**: use
/// [`ImmuClient::verified_get_at`] or [`VerifiedTx::contains`] to prove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnverifiedEntry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub tx: u64,
    pub revision: u64,
    pub metadata: Option<KvMetadata>,
    /// Set when the entry was reached through a reference: the reference's own key. immudb
    /// then reports the *referenced* key and value in `key` and `value`, so the key where the
    /// entry sits in the scan's order is this one.
    pub referenced_by: Option<Vec<u8>>,
}

impl UnverifiedEntry {
    /// The key under which the server stores this entry (the reference's, for a reference):
    /// what scan order and paging are about.
    pub fn stored_key(&self) -> &[u8] {
        self.referenced_by.as_deref().unwrap_or(&self.key)
    }
}

/// The server's current state as it reports it (`CurrentState`); its signature is checked
/// when a key is pinned, but it is not proven against the trusted state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub db: String,
    pub tx_id: u64,
    pub tx_hash: Digest,
    /// Present when the server signs its states (`--signingKey`).
    pub signature: Option<StateSignature>,
}

/// The session currently in use.
#[derive(Debug, Clone)]
struct Session {
    id: MetadataValue<tonic::metadata::Ascii>,
    server_uuid: String,
}

struct Inner {
    config: ClientConfig,
    grpc: ImmuServiceClient<Channel>,
    session: RwLock<Option<Session>>,
    /// The database name as the server reports it (lower case); part of the signed payload.
    db: String,
    store: StateStore,
    pub_key: Option<p256::ecdsa::VerifyingKey>,
    verify_lock: Arc<AsyncMutex<()>>,
    keepalive: StdMutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A connection with an open session to one database of one immudb server. Cheap to clone
/// (clones share the session and the verification lock).
#[derive(Clone)]
pub struct ImmuClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ImmuClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImmuClient")
            .field("address", &self.inner.config.address)
            .field("port", &self.inner.config.port)
            .field("db", &self.inner.db)
            .finish()
    }
}

/// The trusted point verified calls prove against: `(tx, Alh(tx))`; `(0, H(""))` for an empty
/// database.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Anchor {
    tx_id: u64,
    alh: Digest,
    /// The server's signature of this state, kept for later audits.
    signature: Option<StateSignature>,
}

impl Anchor {
    fn same_point(&self, other: &Anchor) -> bool {
        (self.tx_id, self.alh) == (other.tx_id, other.alh)
    }
}

/// One mutex per (state dir, server, database) for the whole process, so that independent
/// clients in one process serialise their verified calls without blocking on the file lock.
fn process_lock(dir: &Path, uuid: &str, db: &str) -> Arc<AsyncMutex<()>> {
    type Locks = StdMutex<HashMap<(PathBuf, String, String), Arc<AsyncMutex<()>>>>;
    static LOCKS: OnceLock<Locks> = OnceLock::new();
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut map = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.entry((dir, uuid.to_string(), db.to_string()))
        .or_default()
        .clone()
}

impl ImmuClient {
    /// Connects, opens a session, checks the server's identity against the record for its
    /// address (recording it on first contact) and starts the keep-alive task.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let pub_key = match &config.server_signing_pub_key {
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|source| ClientError::Io {
                    context: format!("reading server signing key {}", path.display()),
                    source,
                })?;
                Some(proof::parse_public_key_pem(&pem).map_err(|e| {
                    ClientError::Config(format!("server signing key {}: {e}", path.display()))
                })?)
            }
            None => None,
        };
        {
            use std::os::unix::fs::DirBuilderExt as _;
            // Private from the start: the trusted state and identity records are security data.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.state_dir)
                .map_err(|source| ClientError::Io {
                    context: format!("creating state dir {}", config.state_dir.display()),
                    source,
                })?;
        }
        let channel = connect_channel(&config).await?;
        let grpc = ImmuServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);

        let session = open_session(&grpc, &config).await?;
        check_identity(&config, &session.server_uuid)?;

        // The name the server uses for the database (it lower-cases it) is what it signs.
        let mut req = tonic::Request::new(());
        req.metadata_mut().insert("sessionid", session.id.clone());
        let state = grpc
            .clone()
            .current_state(req)
            .await
            .map_err(|status| ClientError::Server {
                op: "CurrentState",
                status,
            })?
            .into_inner();
        let db = state.db.clone();
        if db.is_empty() {
            return Err(inconsistent("CurrentState names no database"));
        }
        let store = StateStore::new(&config.state_dir).map_err(state_error)?;
        let verify_lock = process_lock(&config.state_dir, &session.server_uuid, &db);
        let inner = Arc::new(Inner {
            config,
            grpc,
            session: RwLock::new(Some(session)),
            db,
            store,
            pub_key,
            verify_lock,
            keepalive: StdMutex::new(None),
        });
        let handle = tokio::spawn(keepalive_loop(Arc::downgrade(&inner)));
        *inner.keepalive.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(Self { inner })
    }

    /// The database name as the server reports it.
    pub fn database(&self) -> &str {
        &self.inner.db
    }

    /// The server's identity (from `OpenSession`).
    pub async fn server_uuid(&self) -> Option<String> {
        self.inner
            .session
            .read()
            .await
            .as_ref()
            .map(|s| s.server_uuid.clone())
    }

    /// Closes the session and stops the keep-alive task (best effort: a session that cannot be
    /// closed expires on the server). Later calls open a new session.
    pub async fn close(&self) {
        if let Some(h) = self
            .inner
            .keepalive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            h.abort();
        }
        let session = self.inner.session.write().await.take();
        if let Some(s) = session {
            let mut req = tonic::Request::new(());
            req.metadata_mut().insert("sessionid", s.id);
            if let Err(status) = self.inner.grpc.clone().close_session(req).await {
                tracing::debug!("immudb CloseSession failed: {status}");
            }
        }
    }

    /// `Health` (no session needed).
    pub async fn health(&self) -> Result<bool, ClientError> {
        let r = self
            .inner
            .grpc
            .clone()
            .health(())
            .await
            .map_err(|status| ClientError::Server {
                op: "Health",
                status,
            })?;
        Ok(r.into_inner().status)
    }

    /// The trusted state on disk for this server and database, as `(tx id, Alh)`; `None`
    /// before the first verified call. Takes the same locks as a verified call.
    pub async fn trusted_state(&self) -> Result<Option<(u64, Digest)>, ClientError> {
        let _in_process = self.inner.verify_lock.lock().await;
        let guard = self.lock_state().await?;
        let loaded = guard.load().map_err(state_error)?;
        loaded
            .map(|t| self.anchor_from_trusted(&t).map(|a| (a.tx_id, a.alh)))
            .transpose()
    }

    /// The server's current state; its signature is checked if a key is pinned.
    pub async fn current_state(&self) -> Result<ServerState, ClientError> {
        let s = self
            .call("CurrentState", (), |mut c, r| async move {
                c.current_state(r).await
            })
            .await?
            .into_inner();
        let tx_hash = proof::digest_from_slice("CurrentState.txHash", &s.tx_hash)
            .map_err(verification("CurrentState"))?;
        if s.db != self.inner.db {
            return Err(inconsistent(format!(
                "CurrentState is for database {:?}, expected {:?}",
                s.db, self.inner.db
            )));
        }
        let signature = self.check_signature(s.tx_id, &tx_hash, s.signature.as_ref())?;
        Ok(ServerState {
            db: s.db,
            tx_id: s.tx_id,
            tx_hash,
            signature,
        })
    }

    /// Proves that the server's current state extends the trusted one (no rollback, same
    /// history) and makes it the trusted state; returns its tx id. A read that returns no
    /// records proves nothing by itself: this is what makes an empty answer trustworthy.
    pub async fn verify_current_state(&self) -> Result<u64, ClientError> {
        let server = self.current_state().await?;
        if let Some((local_tx, _)) = self.trusted_state().await? {
            if server.tx_id < local_tx {
                return Err(ClientError::ServerStateOlder {
                    server_tx: server.tx_id,
                    local_tx,
                });
            }
        }
        if server.tx_id > 0 {
            self.verified_tx_by_id(server.tx_id).await?;
        }
        Ok(server.tx_id)
    }

    /// Reads every transaction from the first to the trusted one and proves they are the
    /// database's whole, unaltered history: tx 1 starts from `H("")`, each header's prevAlh
    /// is the Alh of the one before, each transaction's entries hash to its eH, and the last
    /// Alh is the trusted state's. `visit` sees each transaction: what a scan cannot show —
    /// logically deleted keys, every revision — is there. Call
    /// [`verify_current_state`](Self::verify_current_state) first to walk up to the server's
    /// present. Returns how many transactions were walked.
    pub async fn walk_history<F>(&self, mut visit: F) -> Result<u64, ClientError>
    where
        F: FnMut(&TxHeader, &[TxEntry]),
    {
        let Some((last, last_alh)) = self.trusted_state().await? else {
            return Ok(0);
        };
        let mut prev_alh: Digest = <sha2::Sha256 as sha2::Digest>::digest(b"").into();
        for id in 1..=last {
            let req = proto::TxRequest {
                tx: id,
                ..Default::default()
            };
            let tx = self
                .call("TxById", req, |mut c, r| async move { c.tx_by_id(r).await })
                .await?
                .into_inner();
            let (header, entries) = tx_from_proto(&tx)?;
            if header.id != id {
                return Err(inconsistent(format!(
                    "asked for tx {id}, got tx {}",
                    header.id
                )));
            }
            if header.prev_alh != prev_alh {
                return Err(inconsistent(format!(
                    "tx {id} does not follow tx {}: its prevAlh is not that transaction's Alh \
                     (the history was rewritten)",
                    id - 1
                )));
            }
            proof::verify_tx_entries(&header, &entries).map_err(verification("tx entries"))?;
            prev_alh = header.alh().map_err(verification("tx header"))?;
            visit(&header, &entries);
        }
        if prev_alh != last_alh {
            return Err(inconsistent(format!(
                "the history up to tx {last} does not end in the trusted state's Alh"
            )));
        }
        Ok(last)
    }

    /// Unverified write of many KVs in one transaction (for benchmarks). Returns the tx id.
    pub async fn set(&self, kvs: &[(Vec<u8>, Vec<u8>)], mode: SetMode) -> Result<u64, ClientError> {
        let req = set_request(kvs, mode)?;
        let hdr = self
            .call("Set", req, |mut c, r| async move { c.set(r).await })
            .await?
            .into_inner();
        Ok(hdr.id)
    }

    /// Writes many KVs in **one** transaction and verifies it: the entries are exactly ours and
    /// the transaction extends the trusted state. Returns the verified header.
    pub async fn verified_set(
        &self,
        kvs: &[(Vec<u8>, Vec<u8>)],
        mode: SetMode,
    ) -> Result<TxHeader, ClientError> {
        let set_request = set_request(kvs, mode)?;
        self.with_trusted_state(move |this, anchor| async move {
            let req = proto::VerifiableSetRequest {
                set_request: Some(set_request),
                prove_since_tx: anchor.tx_id,
            };
            let resp = this
                .verified_rpc(&anchor, "VerifiableSet", req, |mut c, r| async move {
                    c.verifiable_set(r).await
                })
                .await?;
            let (header, target) = this.verify_set(&resp, kvs, &anchor)?;
            Ok((header, target))
        })
        .await
    }

    /// Reads the latest value of `key`, verified.
    pub async fn verified_get(&self, key: &[u8]) -> Result<VerifiedEntry, ClientError> {
        self.verified_get_at(key, 0).await
    }

    /// Reads `key` as written in transaction `at_tx` (0: latest), verified.
    pub async fn verified_get_at(
        &self,
        key: &[u8],
        at_tx: u64,
    ) -> Result<VerifiedEntry, ClientError> {
        if key.is_empty() {
            return Err(ClientError::InvalidRequest("empty key".into()));
        }
        self.with_trusted_state(move |this, anchor| async move {
            let req = proto::VerifiableGetRequest {
                key_request: Some(proto::KeyRequest {
                    key: key.to_vec(),
                    at_tx,
                    ..Default::default()
                }),
                prove_since_tx: anchor.tx_id,
            };
            let resp = this
                .verified_rpc(&anchor, "VerifiableGet", req, |mut c, r| async move {
                    c.verifiable_get(r).await
                })
                .await?;
            this.verify_get(&resp, key, at_tx, &anchor)
        })
        .await
    }

    /// Reads transaction `tx` with all its raw entries, verified.
    pub async fn verified_tx_by_id(&self, tx: u64) -> Result<VerifiedTx, ClientError> {
        if tx == 0 {
            return Err(ClientError::InvalidRequest("tx ids start at 1".into()));
        }
        self.with_trusted_state(move |this, anchor| async move {
            let req = proto::VerifiableTxRequest {
                tx,
                prove_since_tx: anchor.tx_id,
                // Unset spec: the server returns every entry raw, which is what eH needs.
                entries_spec: None,
                ..Default::default()
            };
            let resp = this
                .verified_rpc(&anchor, "VerifiableTxById", req, |mut c, r| async move {
                    c.verifiable_tx_by_id(r).await
                })
                .await?;
            let vtx = resp
                .tx
                .as_ref()
                .ok_or_else(|| inconsistent("no tx in answer"))?;
            let (header, entries) = tx_from_proto(vtx)?;
            proof::verify_tx_entries(&header, &entries).map_err(verification("tx entries"))?;
            if header.id != tx {
                return Err(inconsistent(format!(
                    "asked for tx {tx}, got tx {}",
                    header.id
                )));
            }
            let target = this.verify_read_dual(&resp, &header, &anchor)?;
            Ok((VerifiedTx { header, entries }, target))
        })
        .await
    }

    /// One page of keys starting with `prefix` (after `seek_key`, exclusive, if not empty), at
    /// most `limit` (0: the server's maximum, 2500). **Not verified.**
    pub async fn scan(
        &self,
        prefix: &[u8],
        seek_key: &[u8],
        limit: u64,
        desc: bool,
    ) -> Result<Vec<UnverifiedEntry>, ClientError> {
        let req = proto::ScanRequest {
            prefix: prefix.to_vec(),
            seek_key: seek_key.to_vec(),
            limit: limit.min(MAX_PAGE),
            desc,
            inclusive_seek: false,
            ..Default::default()
        };
        let entries = self
            .call("Scan", req, |mut c, r| async move { c.scan(r).await })
            .await?
            .into_inner();
        Ok(entries.entries.into_iter().map(unverified).collect())
    }

    /// Every key starting with `prefix` in ascending order, fetched in pages of `page_size`.
    /// **Not verified.**
    pub async fn scan_all(
        &self,
        prefix: &[u8],
        page_size: u64,
    ) -> Result<Vec<UnverifiedEntry>, ClientError> {
        let page_size = page_size.clamp(1, MAX_PAGE);
        let mut all: Vec<UnverifiedEntry> = Vec::new();
        let mut seek = Vec::new();
        loop {
            let page = self.scan(prefix, &seek, page_size, false).await?;
            let n = page.len() as u64;
            if let Some(last) = page.last() {
                seek = last.stored_key().to_vec();
            }
            all.extend(page);
            if n < page_size {
                return Ok(all);
            }
        }
    }

    /// Every revision of `key`, oldest first. **Not verified.**
    pub async fn history(&self, key: &[u8]) -> Result<Vec<UnverifiedEntry>, ClientError> {
        let mut all = Vec::new();
        loop {
            let req = proto::HistoryRequest {
                key: key.to_vec(),
                offset: all.len() as u64,
                limit: MAX_PAGE as i32,
                desc: false,
                since_tx: 0,
            };
            let page = self
                .call("History", req, |mut c, r| async move { c.history(r).await })
                .await?
                .into_inner()
                .entries;
            let n = page.len() as u64;
            all.extend(page.into_iter().map(unverified));
            if n < MAX_PAGE {
                return Ok(all);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Trusted state around one verified call

    /// Runs one verified call: takes the process mutex and the state file lock, loads the
    /// trusted state (or takes the server's current state on first use), runs `f` with it and
    /// saves the new state `f` returns. Nothing is saved if `f` fails.
    async fn with_trusted_state<'a, T, F, Fut>(&'a self, f: F) -> Result<T, ClientError>
    where
        F: FnOnce(&'a Self, Anchor) -> Fut,
        Fut: Future<Output = Result<(T, Anchor), ClientError>> + 'a,
    {
        let _in_process = self.inner.verify_lock.lock().await;
        let guard = self.lock_state().await?;
        let loaded = guard.load().map_err(state_error)?;
        let anchor = match &loaded {
            Some(t) => self.anchor_from_trusted(t)?,
            None => self.first_anchor().await?,
        };
        let (out, target) = f(self, anchor.clone()).await?;
        if loaded.is_none() || !target.same_point(&anchor) {
            guard
                .save(&self.trusted_from_anchor(target))
                .map_err(state_error)?;
        }
        Ok(out)
    }

    /// The state file lock for this server and database (taken off the async threads).
    async fn lock_state(&self) -> Result<StateGuard, ClientError> {
        let uuid = self.session().await?.server_uuid;
        self.inner
            .store
            .lock_async(&uuid, &self.inner.db)
            .await
            .map_err(state_error)
    }

    /// Trust on first use: the server's current (signed, if a key is pinned) state.
    async fn first_anchor(&self) -> Result<Anchor, ClientError> {
        let s = self.current_state().await?;
        if s.tx_id == 0 && s.tx_hash != proof::sha256(b"") {
            return Err(inconsistent("empty database with a non-empty state hash"));
        }
        Ok(Anchor {
            tx_id: s.tx_id,
            alh: s.tx_hash,
            signature: s.signature,
        })
    }

    fn anchor_from_trusted(&self, t: &TrustedState) -> Result<Anchor, ClientError> {
        if t.db != self.inner.db {
            return Err(inconsistent(format!(
                "trusted state is for database {:?}, not {:?}",
                t.db, self.inner.db
            )));
        }
        Ok(Anchor {
            tx_id: t.tx_id,
            alh: t.tx_hash,
            signature: t.signature.clone(),
        })
    }

    fn trusted_from_anchor(&self, a: Anchor) -> TrustedState {
        TrustedState {
            db: self.inner.db.clone(),
            tx_id: a.tx_id,
            tx_hash: a.alh,
            signature: a.signature,
        }
    }

    /// A session-authenticated call for a verified operation: maps "illegal state" (we asked
    /// to prove since a tx the server does not have) to a rollback error when the server is
    /// behind us, and checks the signature of the returned state if a key is pinned.
    async fn verified_rpc<M, R, F, Fut>(
        &self,
        anchor: &Anchor,
        op: &'static str,
        msg: M,
        f: F,
    ) -> Result<R, ClientError>
    where
        M: Clone,
        F: Fn(ImmuServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        match self.call(op, msg, f).await {
            Ok(r) => Ok(r.into_inner()),
            Err(ClientError::Server { op, status })
                if status.message().contains("illegal state") =>
            {
                let server = self.current_state().await?;
                if server.tx_id < anchor.tx_id {
                    Err(ClientError::ServerStateOlder {
                        server_tx: server.tx_id,
                        local_tx: anchor.tx_id,
                    })
                } else {
                    Err(ClientError::Server { op, status })
                }
            }
            Err(e) => Err(e),
        }
    }

    fn check_signature(
        &self,
        tx_id: u64,
        tx_hash: &Digest,
        sig: Option<&proto::Signature>,
    ) -> Result<Option<StateSignature>, ClientError> {
        let sig = sig.filter(|s| !s.signature.is_empty());
        if let Some(key) = &self.inner.pub_key {
            let s = sig.ok_or_else(|| {
                ClientError::Signature(format!("state at tx {tx_id} is not signed"))
            })?;
            proof::verify_state_signature(key, &self.inner.db, tx_id, tx_hash, &s.signature)
                .map_err(|e| ClientError::Signature(e.to_string()))?;
        }
        Ok(sig.map(|s| StateSignature {
            public_key: s.public_key.clone(),
            signature: s.signature.clone(),
        }))
    }

    // ---------------------------------------------------------------------------------------
    // The checks

    fn verify_set(
        &self,
        resp: &proto::VerifiableTx,
        kvs: &[(Vec<u8>, Vec<u8>)],
        anchor: &Anchor,
    ) -> Result<(TxHeader, Anchor), ClientError> {
        let tx = resp
            .tx
            .as_ref()
            .ok_or_else(|| inconsistent("no tx in answer"))?;
        let (header, entries) = tx_from_proto(tx)?;
        // eH recomputed from the raw entries, nentries == len(entries).
        let digests =
            proof::verify_tx_entries(&header, &entries).map_err(verification("tx entries"))?;
        if entries.len() != kvs.len() {
            return Err(inconsistent(format!(
                "wrote {} entries, tx {} holds {}",
                kvs.len(),
                header.id,
                entries.len()
            )));
        }
        let by_key: HashMap<&[u8], usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key.as_slice(), i))
            .collect();
        let no_md = KvMetadata::default();
        for (k, v) in kvs {
            let stored_key = proof::plain_key(k);
            let i = *by_key
                .get(stored_key.as_slice())
                .ok_or_else(|| inconsistent(format!("tx {} lacks key {}", header.id, show(k))))?;
            let e = &entries[i];
            if e.metadata != no_md {
                return Err(inconsistent(format!(
                    "key {}: server added metadata {:?}",
                    show(k),
                    e.metadata
                )));
            }
            if usize::try_from(e.v_len).ok() != Some(v.len() + 1) {
                return Err(inconsistent(format!(
                    "key {}: vLen {} for a value of {} bytes",
                    show(k),
                    e.v_len,
                    v.len()
                )));
            }
            let want = proof::entry_spec_digest(
                header.version,
                &stored_key,
                &no_md,
                &proof::plain_value(v),
            )
            .map_err(verification("entry digest"))?;
            if digests[i] != want {
                return Err(inconsistent(format!(
                    "key {}: stored value differs from the value written",
                    show(k)
                )));
            }
        }
        let dual = dual_from_proto(resp.dual_proof.as_ref())?;
        if dual.target_tx_header != header {
            return Err(inconsistent(
                "tx header and dual proof target header differ",
            ));
        }
        let alh = header.alh().map_err(verification("tx header"))?;
        if header.id <= anchor.tx_id {
            return Err(inconsistent(format!(
                "new tx {} is not after the trusted tx {}",
                header.id, anchor.tx_id
            )));
        }
        self.verify_dual_from(&dual, anchor, (header.id, alh), &header)?;
        let signature = self.check_signature(header.id, &alh, resp.signature.as_ref())?;
        Ok((
            header.clone(),
            Anchor {
                tx_id: header.id,
                alh,
                signature,
            },
        ))
    }

    fn verify_get(
        &self,
        resp: &proto::VerifiableEntry,
        key: &[u8],
        at_tx: u64,
        anchor: &Anchor,
    ) -> Result<(VerifiedEntry, Anchor), ClientError> {
        let entry = resp
            .entry
            .as_ref()
            .ok_or_else(|| inconsistent("no entry in answer"))?;
        if entry.referenced_by.is_some() {
            return Err(ClientError::InvalidRequest(format!(
                "key {} is a reference; references are not supported",
                show(key)
            )));
        }
        if entry.key != key {
            return Err(inconsistent(format!(
                "asked for key {}, got {}",
                show(key),
                show(&entry.key)
            )));
        }
        let v_tx = if at_tx != 0 { at_tx } else { entry.tx };
        if entry.tx != v_tx {
            return Err(inconsistent(format!(
                "asked for key at tx {v_tx}, entry is from tx {}",
                entry.tx
            )));
        }
        let vtx = resp
            .verifiable_tx
            .as_ref()
            .ok_or_else(|| inconsistent("no verifiable tx in answer"))?;
        let tx = vtx
            .tx
            .as_ref()
            .ok_or_else(|| inconsistent("no tx in answer"))?;
        let (header, entries) = tx_from_proto(tx)?;
        if header.id != v_tx {
            return Err(inconsistent(format!(
                "entry is from tx {v_tx}, proof is for tx {}",
                header.id
            )));
        }
        let digests =
            proof::verify_tx_entries(&header, &entries).map_err(verification("tx entries"))?;
        let md = kv_md(entry.metadata.as_ref());
        if md.deleted {
            return Err(ClientError::KeyNotFound);
        }
        let stored_key = proof::plain_key(key);
        let want = proof::entry_spec_digest(
            header.version,
            &stored_key,
            &md,
            &proof::plain_value(&entry.value),
        )
        .map_err(verification("entry digest"))?;
        let i = entries
            .iter()
            .position(|e| e.key == stored_key)
            .ok_or_else(|| inconsistent(format!("tx {v_tx} lacks key {}", show(key))))?;
        if digests[i] != want
            || entries[i].metadata != md
            || usize::try_from(entries[i].v_len).ok() != Some(entry.value.len() + 1)
        {
            return Err(inconsistent(format!(
                "key {}: value or metadata differ from what tx {v_tx} holds",
                show(key)
            )));
        }
        // The server's own inclusion proof must agree as well.
        let inc = resp
            .inclusion_proof
            .as_ref()
            .ok_or_else(|| inconsistent("no inclusion proof"))?;
        let inc = proof::InclusionProof {
            leaf: inc.leaf,
            width: inc.width,
            terms: proof::digests_from_slices("inclusionProof", &inc.terms)
                .map_err(verification("inclusion proof"))?,
        };
        if i64::from(inc.width) != i64::from(header.nentries) {
            return Err(inconsistent("inclusion proof width differs from nentries"));
        }
        proof::verify_htree_inclusion(&inc, &want, &header.eh)
            .map_err(verification("entry inclusion"))?;

        let target = self.verify_read_dual(vtx, &header, anchor)?;
        Ok((
            VerifiedEntry {
                key: key.to_vec(),
                value: entry.value.clone(),
                metadata: md,
                tx: v_tx,
                revision: entry.revision,
                header,
            },
            target,
        ))
    }

    /// The dual proof of a read of tx `header.id`: from the trusted state to that tx, or from
    /// that tx to the trusted state if it is older. Returns the new trusted state.
    fn verify_read_dual(
        &self,
        vtx: &proto::VerifiableTx,
        header: &TxHeader,
        anchor: &Anchor,
    ) -> Result<Anchor, ClientError> {
        let dual = dual_from_proto(vtx.dual_proof.as_ref())?;
        let alh = header.alh().map_err(verification("tx header"))?;
        let target = if anchor.tx_id <= header.id {
            if dual.target_tx_header != *header {
                return Err(inconsistent(
                    "tx header and dual proof target header differ",
                ));
            }
            self.verify_dual_from(&dual, anchor, (header.id, alh), header)?;
            Anchor {
                tx_id: header.id,
                alh,
                signature: None,
            }
        } else {
            if dual.source_tx_header != *header {
                return Err(inconsistent(
                    "tx header and dual proof source header differ",
                ));
            }
            proof::verify_dual(&dual, header.id, anchor.tx_id, &alh, &anchor.alh).map_err(
                verification(format!("dual proof {} -> {}", header.id, anchor.tx_id)),
            )?;
            anchor.clone()
        };
        let signature = self.check_signature(target.tx_id, &target.alh, vtx.signature.as_ref())?;
        Ok(Anchor {
            signature: signature.or(target.signature),
            ..target
        })
    }

    /// Dual proof from the trusted state to `(t, alh)`. With no trusted tx yet the server proves
    /// from the target to itself: check that proof anyway, and link tx 1 to the empty database.
    fn verify_dual_from(
        &self,
        dual: &proof::DualProof,
        anchor: &Anchor,
        (t, alh): (u64, Digest),
        header: &TxHeader,
    ) -> Result<(), ClientError> {
        if anchor.tx_id == 0 {
            if dual.source_tx_header != *header {
                return Err(inconsistent(
                    "proof from an empty state must start at the tx itself",
                ));
            }
            proof::verify_dual(dual, t, t, &alh, &alh)
                .map_err(verification(format!("dual proof {t} -> {t}")))?;
            if t == 1 && header.prev_alh != anchor.alh {
                return Err(inconsistent("tx 1 does not follow the empty database"));
            }
            Ok(())
        } else {
            proof::verify_dual(dual, anchor.tx_id, t, &anchor.alh, &alh)
                .map_err(verification(format!("dual proof {} -> {t}", anchor.tx_id)))
        }
    }

    // ---------------------------------------------------------------------------------------
    // Sessions and calls

    async fn session(&self) -> Result<Session, ClientError> {
        if let Some(s) = self.inner.session.read().await.as_ref() {
            return Ok(s.clone());
        }
        self.reopen_session(None).await
    }

    /// Opens a new session unless someone else already replaced `failed`. The server must keep
    /// its identity.
    async fn reopen_session(&self, failed: Option<&Session>) -> Result<Session, ClientError> {
        let mut slot = self.inner.session.write().await;
        if let (Some(cur), Some(failed)) = (slot.as_ref(), failed) {
            if cur.id != failed.id {
                return Ok(cur.clone());
            }
        }
        let old_uuid = slot.as_ref().map(|s| s.server_uuid.clone());
        let new = open_session(&self.inner.grpc, &self.inner.config).await?;
        let recorded = match old_uuid {
            Some(u) => u,
            None => {
                check_identity(&self.inner.config, &new.server_uuid)?;
                new.server_uuid.clone()
            }
        };
        if new.server_uuid != recorded {
            return Err(ClientError::ServerIdentityChanged {
                address: address_of(&self.inner.config),
                recorded,
                got: new.server_uuid,
                record: identity_path(&self.inner.config),
            });
        }
        *slot = Some(new.clone());
        Ok(new)
    }

    /// One session-authenticated unary call; on "session not found" (the session expired) a new
    /// session is opened and the call retried once.
    async fn call<M, R, F, Fut>(
        &self,
        op: &'static str,
        msg: M,
        f: F,
    ) -> Result<tonic::Response<R>, ClientError>
    where
        M: Clone,
        F: Fn(ImmuServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let session = self.session().await?;
        let mut req = tonic::Request::new(msg.clone());
        req.metadata_mut().insert("sessionid", session.id.clone());
        match f(self.inner.grpc.clone(), req).await {
            Ok(r) => Ok(r),
            Err(status) if is_session_lost(&status) => {
                let session = self.reopen_session(Some(&session)).await?;
                let mut req = tonic::Request::new(msg);
                req.metadata_mut().insert("sessionid", session.id);
                f(self.inner.grpc.clone(), req)
                    .await
                    .map_err(|status| map_status(op, status))
            }
            Err(status) => Err(map_status(op, status)),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = self
            .keepalive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            h.abort();
        }
    }
}

fn is_session_lost(status: &Status) -> bool {
    status.message().contains("session not found")
}

fn map_status(op: &'static str, status: Status) -> ClientError {
    let msg = status.message();
    if msg.contains("precondition failed") {
        ClientError::PreconditionFailed(msg.to_string())
    } else if msg.contains("key not found") && status.code() != Code::Unauthenticated {
        ClientError::KeyNotFound
    } else {
        ClientError::Server { op, status }
    }
}

/// Pings the session while the client lives; a failed ping is logged, the next call re-opens.
async fn keepalive_loop(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(KEEPALIVE_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let session = inner.session.read().await.clone();
        let Some(session) = session else { continue };
        let mut req = tonic::Request::new(());
        req.metadata_mut().insert("sessionid", session.id);
        if let Err(status) = inner.grpc.clone().keep_alive(req).await {
            tracing::debug!("immudb keep-alive failed: {status}");
        }
    }
}

async fn connect_channel(config: &ClientConfig) -> Result<Channel, ClientError> {
    let scheme = if config.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let host = if config.address.contains(':') {
        format!("[{}]", config.address)
    } else {
        config.address.clone()
    };
    let uri = format!("{scheme}://{host}:{}", config.port);
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| ClientError::Config(format!("address {uri}: {e}")))?
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .tcp_nodelay(true);
    if let Some(ca) = &config.tls_ca {
        let pem = std::fs::read(ca).map_err(|source| ClientError::Io {
            context: format!("reading CA certificate {}", ca.display()),
            source,
        })?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(config.address.clone());
        endpoint = endpoint.tls_config(tls).map_err(|e| ClientError::Connect {
            address: address_of(config),
            detail: crate::error_text::one_line(&e),
        })?;
    }
    endpoint.connect().await.map_err(|e| ClientError::Connect {
        address: address_of(config),
        detail: crate::error_text::one_line(&e),
    })
}

async fn open_session(
    grpc: &ImmuServiceClient<Channel>,
    config: &ClientConfig,
) -> Result<Session, ClientError> {
    let resp = grpc
        .clone()
        .open_session(proto::OpenSessionRequest {
            username: config.username.as_bytes().to_vec(),
            password: config.password.as_bytes().to_vec(),
            database_name: config.database.clone(),
        })
        .await
        .map_err(|status| ClientError::Server {
            op: "OpenSession",
            status,
        })?
        .into_inner();
    if resp.server_uuid.is_empty() {
        return Err(inconsistent("server sent no identity (serverUUID)"));
    }
    let id = MetadataValue::try_from(resp.session_id.as_str())
        .map_err(|_| inconsistent("session id is not valid header text"))?;
    Ok(Session {
        id,
        server_uuid: resp.server_uuid,
    })
}

fn address_of(config: &ClientConfig) -> String {
    format!("{}:{}", config.address, config.port)
}

/// `<state_dir>/identity-<hex of SHA-256("host:port"), first 16 bytes>.json`.
fn identity_path(config: &ClientConfig) -> PathBuf {
    let h = proof::sha256(address_of(config).as_bytes());
    config
        .state_dir
        .join(format!("identity-{}.json", hex::encode(&h[..16])))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct IdentityRecord {
    server_uuid: String,
    server_address: String,
}

/// The server identity recorded for this address must match; on first contact it is recorded
/// (atomically). Like the Go SDK's identity file, removing it is a deliberate operator action.
fn check_identity(config: &ClientConfig, uuid: &str) -> Result<(), ClientError> {
    let path = identity_path(config);
    let io = |context: String| move |source| ClientError::Io { context, source };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let rec: IdentityRecord = serde_json::from_slice(&bytes).map_err(|e| {
                inconsistent(format!(
                    "identity record {} unreadable: {e}",
                    path.display()
                ))
            })?;
            if rec.server_uuid != uuid {
                return Err(ClientError::ServerIdentityChanged {
                    address: address_of(config),
                    recorded: rec.server_uuid,
                    got: uuid.to_string(),
                    record: path,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let rec = IdentityRecord {
                server_uuid: uuid.to_string(),
                server_address: address_of(config),
            };
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            let json = serde_json::to_vec_pretty(&rec).expect("plain struct serialises");
            let written = (|| {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io(format!("writing {}", tmp.display())))?;
                f.write_all(&json)
                    .and_then(|_| f.sync_all())
                    .map_err(io(format!("writing {}", tmp.display())))?;
                std::fs::rename(&tmp, &path).map_err(io(format!("writing {}", path.display())))
            })();
            // A failed attempt (e.g. a full disk) must not leave the file that makes every
            // retry fail with "File exists".
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written
        }
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and conversions from prost types to the plain types of `proof`

fn set_request(
    kvs: &[(Vec<u8>, Vec<u8>)],
    mode: SetMode,
) -> Result<proto::SetRequest, ClientError> {
    if kvs.is_empty() {
        return Err(ClientError::InvalidRequest("nothing to write".into()));
    }
    if kvs.iter().any(|(k, _)| k.is_empty()) {
        return Err(ClientError::InvalidRequest("empty key".into()));
    }
    let preconditions = match mode {
        SetMode::Upsert | SetMode::UpsertExpiring(_) => Vec::new(),
        SetMode::MustNotExist => kvs
            .iter()
            .map(|(k, _)| proto::Precondition {
                precondition: Some(proto::precondition::Precondition::KeyMustNotExist(
                    proto::precondition::KeyMustNotExistPrecondition { key: k.clone() },
                )),
            })
            .collect(),
    };
    Ok(proto::SetRequest {
        k_vs: kvs
            .iter()
            .map(|(k, v)| proto::KeyValue {
                key: k.clone(),
                value: v.clone(),
                metadata: match mode {
                    SetMode::UpsertExpiring(at) => Some(proto::KvMetadata {
                        expiration: Some(proto::Expiration { expires_at: at }),
                        ..Default::default()
                    }),
                    _ => None,
                },
            })
            .collect(),
        no_wait: false,
        preconditions,
    })
}

fn kv_md(md: Option<&proto::KvMetadata>) -> KvMetadata {
    match md {
        None => KvMetadata::default(),
        Some(m) => KvMetadata {
            deleted: m.deleted,
            expires_at: m.expiration.as_ref().map(|e| e.expires_at),
            non_indexable: m.non_indexable,
        },
    }
}

fn header_from_proto(
    h: Option<&proto::TxHeader>,
    what: &'static str,
) -> Result<TxHeader, ClientError> {
    let h = h.ok_or_else(|| inconsistent(format!("{what} missing")))?;
    let md = h.metadata.as_ref();
    Ok(TxHeader {
        id: h.id,
        prev_alh: proof::digest_from_slice("prevAlh", &h.prev_alh).map_err(verification(what))?,
        ts: h.ts,
        version: h.version,
        nentries: h.nentries,
        eh: proof::digest_from_slice("eH", &h.e_h).map_err(verification(what))?,
        bl_tx_id: h.bl_tx_id,
        bl_root: proof::digest_from_slice("blRoot", &h.bl_root).map_err(verification(what))?,
        metadata: proof::TxMetadata {
            truncated_tx_id: md.map_or(0, |m| m.truncated_tx_id),
            extra: md.map(|m| m.extra.clone()).unwrap_or_default(),
        },
    })
}

fn tx_from_proto(tx: &proto::Tx) -> Result<(TxHeader, Vec<TxEntry>), ClientError> {
    let header = header_from_proto(tx.header.as_ref(), "tx header")?;
    let entries = tx
        .entries
        .iter()
        .map(|e| {
            Ok(TxEntry {
                key: e.key.clone(),
                h_value: proof::digest_from_slice("hValue", &e.h_value)
                    .map_err(verification("tx entry"))?,
                v_len: e.v_len,
                metadata: kv_md(e.metadata.as_ref()),
            })
        })
        .collect::<Result<Vec<_>, ClientError>>()?;
    Ok((header, entries))
}

fn dual_from_proto(d: Option<&proto::DualProof>) -> Result<proof::DualProof, ClientError> {
    let d = d.ok_or_else(|| inconsistent("no dual proof in answer"))?;
    let terms = |what: &'static str, t: &[Vec<u8>]| {
        proof::digests_from_slices(what, t).map_err(verification("dual proof"))
    };
    Ok(proof::DualProof {
        source_tx_header: header_from_proto(
            d.source_tx_header.as_ref(),
            "dual proof source header",
        )?,
        target_tx_header: header_from_proto(
            d.target_tx_header.as_ref(),
            "dual proof target header",
        )?,
        inclusion_proof: terms("inclusionProof", &d.inclusion_proof)?,
        consistency_proof: terms("consistencyProof", &d.consistency_proof)?,
        target_bl_tx_alh: if d.target_bl_tx_alh.is_empty() {
            [0u8; 32]
        } else {
            proof::digest_from_slice("targetBlTxAlh", &d.target_bl_tx_alh)
                .map_err(verification("dual proof"))?
        },
        last_inclusion_proof: terms("lastInclusionProof", &d.last_inclusion_proof)?,
        linear_proof: d
            .linear_proof
            .as_ref()
            .map(|l| {
                Ok::<_, ClientError>(proof::LinearProof {
                    source_tx_id: l.source_tx_id,
                    target_tx_id: l.target_tx_id,
                    terms: terms("linearProof", &l.terms)?,
                })
            })
            .transpose()?,
        linear_advance_proof: d
            .linear_advance_proof
            .as_ref()
            .map(|l| {
                Ok::<_, ClientError>(proof::LinearAdvanceProof {
                    linear_proof_terms: terms("linearAdvanceProof", &l.linear_proof_terms)?,
                    inclusion_proofs: l
                        .inclusion_proofs
                        .iter()
                        .map(|p| terms("linearAdvanceProof.inclusion", &p.terms))
                        .collect::<Result<_, _>>()?,
                })
            })
            .transpose()?,
    })
}

fn unverified(e: proto::Entry) -> UnverifiedEntry {
    UnverifiedEntry {
        metadata: e.metadata.as_ref().map(|m| kv_md(Some(m))),
        referenced_by: e.referenced_by.map(|r| r.key),
        key: e.key,
        value: e.value,
        tx: e.tx,
        revision: e.revision,
    }
}

/// A key for error messages: text if printable, else hex; cut at 64 bytes.
fn show(key: &[u8]) -> String {
    let k = &key[..key.len().min(64)];
    let more = if key.len() > 64 { "…" } else { "" };
    match std::str::from_utf8(k) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}{more}"),
        _ => format!("0x{}{more}", hex::encode(k)),
    }
}
