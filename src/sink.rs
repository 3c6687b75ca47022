//! Writing spooled records to immudb: batched, verified, acknowledged.
//!
//! A batch becomes one immudb transaction written with `verified_set` and a "key must not
//! exist" precondition on every key. Only when the proof checked does the spool learn that the
//! records are safe (`ack`). So:
//! - immudb down or slow: the sink retries with backoff, records wait in the spool, nothing is
//!   lost and nothing is acknowledged early;
//! - a replay after a crash (the records were committed but the ack was not written): the
//!   precondition fails, the sink reads each key back *verified* and accepts it only if the
//!   stored value is byte-identical to ours — otherwise that is a conflict and an alarm;
//! - any proof failure: stop at once with a tampering error; the caller exits with code 3.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::immudb::client::{ClientError, ImmuClient, SetMode};
use crate::spool::{Entry, Spool, SpoolError, SpoolReader};

#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Records per transaction (immudb allows at most 1024 entries per transaction).
    pub max_batch: usize,
    /// Bytes of keys and values per transaction (immudb's request limit is 32 MiB).
    pub max_batch_bytes: usize,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            max_batch: 500,
            max_batch_bytes: 8 * 1024 * 1024,
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub written: u64,
    pub transactions: u64,
    /// Records found already committed with identical values (a replay after a crash).
    pub already_present: u64,
    pub retries: u64,
    pub last_tx: u64,
    /// Records immudb refused (replaced by a loss notice under the same key).
    pub rejected: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("VERIFICATION FAILED — possible tampering: {0}")]
    Tampering(#[source] ClientError),
    #[error(
        "key {key} already holds a different value in immudb: the trail was altered or another \
         agent wrote under this agent's keys. The agent's own record stays in its spool \
         (<state-dir>/spool/<source>) and every start stops here: compare the two (`bt2immu \
         query --prefix '{key}'` shows the stored one), keep the spool as evidence, and move \
         it aside to resume recording (its unsent records go with it)"
    )]
    Conflict { key: String },
    #[error("immudb refuses record {key} and its loss notice: {error}")]
    Rejected { key: String, error: String },
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl SinkError {
    pub fn is_tampering(&self) -> bool {
        matches!(self, SinkError::Tampering(_) | SinkError::Conflict { .. })
    }
}

/// Errors that retrying cannot fix: bad configuration (e.g. an unreadable signing key) and
/// refused credentials.
pub fn is_permanent(e: &ClientError) -> bool {
    match e {
        ClientError::Config(_) | ClientError::InvalidRequest(_) => true,
        ClientError::Server { status, .. } => {
            matches!(
                status.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) || status.message().contains("invalid user name or password")
                || status.message().contains("not authorized")
                || status.message().contains("database does not exist")
        }
        _ => false,
    }
}

/// immudb refused the data itself (too large, bad key): sending it again cannot succeed.
fn is_rejected(e: &ClientError) -> bool {
    match e {
        ClientError::Server { status, .. } => {
            let m = status.message();
            status.code() == tonic::Code::InvalidArgument
                || m.contains("max value length exceeded")
                || m.contains("max key length exceeded")
                || m.contains("larger than max")
        }
        ClientError::InvalidRequest(_) => true,
        _ => false,
    }
}

/// What is written instead of a record immudb refuses, under the record's own key, so the
/// trail shows the gap and why.
fn rejection_notice(e: &Entry, err: &ClientError) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "v": crate::record::SCHEMA_VERSION,
        "kind": "loss",
        "cause": "record_rejected_by_immudb",
        "seq": e.seq,
        "count": 1,
        "value_len": e.value.len(),
        "value_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&e.value)),
        "error": err.to_string(),
    }))
    .expect("JSON serialises")
}

/// Where the sink stands, for progress output and shutdown decisions.
#[derive(Debug, Clone, Default)]
pub struct SinkProgress {
    pub stats: SinkStats,
    /// Last acknowledged sequence number.
    pub acked: u64,
    /// The last error while immudb was unreachable, cleared on success.
    pub failing: Option<String>,
}

/// Runs until `drain` is true and everything appended so far is acknowledged, or until
/// `abandon` is true (immudb unreachable at shutdown: what is left stays in the spool for the
/// next start).
pub async fn run(
    client: &ImmuClient,
    spool: Arc<Mutex<Spool>>,
    mut reader: SpoolReader,
    cfg: SinkConfig,
    mut drain: watch::Receiver<bool>,
    abandon: watch::Receiver<bool>,
    progress: watch::Sender<SinkProgress>,
) -> Result<SinkStats, SinkError> {
    let mut stats = SinkStats::default();
    loop {
        let batch = reader.read_batch(cfg.max_batch, cfg.max_batch_bytes)?;
        if batch.is_empty() {
            let end = { spool.lock().expect("spool lock").last_appended() };
            if *drain.borrow() && reader.position() >= end {
                return Ok(stats);
            }
            tokio::select! {
                _ = reader.wait_for_more() => {}
                _ = drain.changed() => {}
            }
            continue;
        }
        let last = batch.last().map(|e| e.seq).unwrap_or(0);
        if !write_batch(client, &batch, &cfg, &mut stats, &abandon, &progress, false).await? {
            return Ok(stats); // abandoned: records stay in the spool
        }
        spool.lock().expect("spool lock").ack(last)?;
        progress.send_modify(|p| {
            p.stats = stats.clone();
            p.acked = last;
            p.failing = None;
        });
    }
}

/// Splits a batch whose write hit existing keys into the records still to write, proving the
/// others are already in immudb byte for byte. One verified transaction read per distinct
/// transaction (a replayed batch is usually one), not one verified read per record.
/// The outer error is fatal (tampering, conflict); the inner one is worth retrying.
async fn sort_out_existing<'a>(
    client: &ImmuClient,
    pending: &[&'a Entry],
    stats: &mut SinkStats,
) -> Result<Result<Vec<&'a Entry>, ClientError>, SinkError> {
    let conflict = |e: &Entry| SinkError::Conflict {
        key: String::from_utf8_lossy(&e.key).into_owned(),
    };
    let classify = |e: ClientError| {
        if e.is_tampering() {
            Err(SinkError::Tampering(e))
        } else {
            Ok(Err(e))
        }
    };
    let mut still = Vec::new();
    let mut by_tx: std::collections::BTreeMap<u64, Vec<&'a Entry>> = Default::default();
    for &e in pending {
        let history = match client.history(&e.key).await {
            Ok(h) => h,
            Err(ClientError::KeyNotFound) => Vec::new(),
            Err(err) => return classify(err),
        };
        match history.len() {
            0 => still.push(e),
            1 => by_tx.entry(history[0].tx).or_default().push(e),
            // Our keys are written once: a second revision is an overwrite.
            _ => return Err(conflict(e)),
        }
    }
    let mut present = 0;
    for (tx, entries) in by_tx {
        let vtx = match client.verified_tx_by_id(tx).await {
            Ok(v) => v,
            Err(err) => return classify(err),
        };
        for e in entries {
            if !vtx.contains(&e.key, &e.value) {
                return Err(conflict(e));
            }
            present += 1;
        }
    }
    stats.already_present += present;
    Ok(Ok(still))
}

/// Writes one batch until it is committed and verified. Returns false if abandoned.
/// `is_notice`: the batch is a loss notice standing in for a refused record; if immudb refuses
/// that too, the key itself is the problem and the sink stops.
async fn write_batch(
    client: &ImmuClient,
    batch: &[Entry],
    cfg: &SinkConfig,
    stats: &mut SinkStats,
    abandon: &watch::Receiver<bool>,
    progress: &watch::Sender<SinkProgress>,
    is_notice: bool,
) -> Result<bool, SinkError> {
    let mut pending: Vec<&Entry> = batch.iter().collect();
    let mut backoff = cfg.retry_initial;
    while !pending.is_empty() {
        let kvs: Vec<(Vec<u8>, Vec<u8>)> = pending
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        let err = match client.verified_set(&kvs, SetMode::MustNotExist).await {
            Ok(tx) => {
                stats.written += pending.len() as u64;
                stats.transactions += 1;
                stats.last_tx = tx.id;
                return Ok(true);
            }
            Err(e) => e,
        };
        if err.is_tampering() {
            return Err(SinkError::Tampering(err));
        }
        if is_rejected(&err) {
            if pending.len() > 1 {
                // Find the record immudb refuses: write one at a time.
                tracing::warn!(error = %err, "immudb refused a batch; writing its records one by one");
                for e in pending {
                    let single = [e.clone()];
                    Box::pin(write_batch(
                        client, &single, cfg, stats, abandon, progress, false,
                    ))
                    .await?;
                }
                return Ok(true);
            }
            let e = pending[0];
            if is_notice {
                // Even the notice is refused (the key itself is the problem): stop, loudly.
                return Err(SinkError::Rejected {
                    key: String::from_utf8_lossy(&e.key).into_owned(),
                    error: err.to_string(),
                });
            }
            tracing::error!(error = %err, seq = e.seq, "immudb refuses this record; writing a loss notice under its key instead");
            let notice = Entry {
                seq: e.seq,
                key: e.key.clone(),
                value: rejection_notice(e, &err),
            };
            stats.rejected += 1;
            return Box::pin(write_batch(
                client,
                &[notice],
                cfg,
                stats,
                abandon,
                progress,
                true,
            ))
            .await;
        }
        let err = if matches!(err, ClientError::PreconditionFailed(_)) {
            // Some of these keys exist (a replay after a lost ack): keep only the ones that do
            // not, after proving that the ones that do hold exactly our bytes.
            match sort_out_existing(client, &pending, stats).await? {
                Ok(still) => {
                    pending = still;
                    continue;
                }
                // A transport error while checking: back off, then try the batch again.
                Err(e) => e,
            }
        } else {
            err
        };
        stats.retries += 1;
        let msg = err.to_string();
        tracing::warn!(error = %msg, retry_in = ?backoff, records = pending.len(), "immudb write failed; records stay in the spool");
        progress.send_modify(|p| p.failing = Some(msg.clone()));
        if *abandon.borrow() {
            return Ok(false);
        }
        let mut abandon = abandon.clone();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = abandon.wait_for(|a| *a) => return Ok(false),
        }
        backoff = (backoff * 2).min(cfg.retry_max);
    }
    Ok(true)
}
