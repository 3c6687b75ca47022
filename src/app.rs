//! The commands behind the CLI: wiring source → pipeline → spool → sink for `run` and
//! `ingest`, plus `check` and `query`. This is the edge of the program, so errors are `anyhow`
//! with context; the exit code is decided here.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};

use crate::cli::{self, CheckArgs, ConnArgs, IngestArgs, OutputFormat, QueryArgs, RunArgs};
use crate::decode::{self, Format};
use crate::immudb::client::{ClientConfig, ImmuClient};
use crate::immudb::server::{LocalImmudb, LocalImmudbOptions};
use crate::pipeline::{Interpretation, Pipeline};
use crate::readline;
use crate::record::{self, HostContext, ScriptRef, Shaper};
use crate::script;
use crate::sink::{self, SinkConfig, SinkError, SinkProgress};
use crate::spool::{Salvage, Spool, SpoolError};
use crate::supervisor::{self, BpftraceCommand, ChildMsg, Ended, RestartPolicy};

/// Prints a message for the operator on stderr. Unlike `eprintln!`, a closed stderr (e.g.
/// `bt2immu … 2>&1 | tee log` after tee died) must not crash the agent before it flushes.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that stops quietly when stdout is closed (`bt2immu query | head`).
macro_rules! emit {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// An error that maps to a specific exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

fn exit(code: i32, message: impl Into<String>) -> anyhow::Error {
    Exit {
        code,
        message: message.into(),
    }
    .into()
}

/// An error and its causes on one line, each message once: many errors show their source in
/// their own message too, and `{:#}` would print it twice.
pub fn describe(err: &anyhow::Error) -> String {
    crate::error_text::one_line(err.as_ref())
}

/// Maps any error to the documented exit code.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if let Some(e) = err.downcast_ref::<Exit>() {
        return e.code;
    }
    if let Some(e) = err.downcast_ref::<SinkError>() {
        if e.is_tampering() {
            return cli::EXIT_VERIFICATION;
        }
    }
    if let Some(e) = err.downcast_ref::<crate::immudb::client::ClientError>() {
        if e.is_tampering() {
            return cli::EXIT_VERIFICATION;
        }
    }
    cli::EXIT_ERROR
}

/// Settings from a TOML file become environment defaults, so flags win over environment
/// variables, which win over the file.
pub fn apply_config_file(path: Option<&Path>) -> Result<()> {
    let default = Path::new("/etc/bt2immu/config.toml");
    let path = match path {
        Some(p) => p.to_path_buf(),
        None if default.exists() => default.to_path_buf(),
        None => return Ok(()),
    };
    let text = fs::read_to_string(&path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?;
    for (k, v) in table {
        let env = match k.as_str() {
            "immudb-address" => "IMMUCLIENT_IMMUDB_ADDRESS",
            "immudb-port" => "IMMUCLIENT_IMMUDB_PORT",
            "username" => "IMMUCLIENT_USERNAME",
            "password" => "IMMUCLIENT_PASSWORD",
            "password-file" => "IMMUCLIENT_PASSWORD_FILE",
            "database" => "IMMUCLIENT_DATABASE",
            "server-signing-pub-key" => "IMMUCLIENT_SERVER_SIGNING_PUB_KEY",
            "tls-ca" => "BT2IMMU_TLS_CA",
            "state-dir" => "BT2IMMU_STATE_DIR",
            "bpftrace" => "BT2IMMU_BPFTRACE",
            other => bail!("{}: unknown setting {other:?}", path.display()),
        };
        let value = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            other => bail!(
                "{}: {k} must be a string or number, not {other}",
                path.display()
            ),
        };
        if k == "immudb-port" && !value.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(exit(
                cli::EXIT_USAGE,
                format!(
                    "{}: immudb-port must be a port number (1-65535), not {value:?}",
                    path.display()
                ),
            ));
        }
        if std::env::var_os(env).is_none() {
            // SAFETY: called once at start-up, before any thread is spawned.
            unsafe { std::env::set_var(env, value) };
        }
    }
    Ok(())
}

fn read_password(conn: &ConnArgs) -> Result<Option<String>> {
    if let Some(p) = &conn.password_file {
        // A file that cannot be read is bad input, like an unreadable script (exit 2).
        let s = fs::read_to_string(p).map_err(|e| {
            exit(
                cli::EXIT_USAGE,
                format!("reading password file {}: {e}", p.display()),
            )
        })?;
        return Ok(Some(s.lines().next().unwrap_or("").to_string()));
    }
    Ok(std::env::var("IMMUCLIENT_PASSWORD").ok())
}

fn ensure_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting permissions of {}", dir.display()))?;
    Ok(())
}

/// The immudb to talk to: a configured one, or one we start ourselves.
pub struct Target {
    pub config: ClientConfig,
    pub local: Option<LocalImmudb>,
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .is_ok()
}

fn generated_password() -> String {
    let mut bytes = [0u8; 18];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    // immudb's CLIs want upper, lower, digit and symbol; base64 plus a fixed suffix has them.
    use base64::Engine as _;
    format!(
        "{}-A1a",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Decides where to write. With no address configured and nothing on 127.0.0.1:3322, starts a
/// local immudb (data and a generated admin password under the state dir).
pub async fn resolve_target(conn: &ConnArgs, allow_local: bool) -> Result<Target> {
    let mut password = read_password(conn)?;
    let mut local = None;
    let address = match &conn.immudb_address {
        Some(a) => a.clone(),
        None => {
            let local_dir = conn.state_dir.join("immudb");
            let pw_file = conn.state_dir.join("immudb-admin-password");
            if allow_local && !port_open(conn.immudb_port) {
                ensure_private_dir(&conn.state_dir)?;
                let pw = match fs::read_to_string(&pw_file) {
                    Ok(s) => s.trim().to_string(),
                    Err(_) => {
                        let pw = generated_password();
                        let mut f = fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(&pw_file)
                            .with_context(|| format!("writing {}", pw_file.display()))?;
                        use std::io::Write;
                        writeln!(f, "{pw}")?;
                        pw
                    }
                };
                say!(
                    "bt2immu: no immudb at 127.0.0.1:{port}; starting a local one (data: {}, \
                     admin password in {}); it stops when bt2immu stops",
                    local_dir.display(),
                    pw_file.display(),
                    port = conn.immudb_port
                );
                let server = LocalImmudb::start(LocalImmudbOptions {
                    data_dir: Some(local_dir),
                    port: Some(conn.immudb_port),
                    admin_password: Some(pw.clone()),
                    ..Default::default()
                })
                .await
                .context("starting a local immudb")?;
                local = Some(server);
                if password.is_none() {
                    password = Some(pw);
                }
            } else if password.is_none() && pw_file.exists() {
                // The local immudb of an earlier run, still up: use its password.
                password = Some(fs::read_to_string(&pw_file)?.trim().to_string());
            }
            "127.0.0.1".to_string()
        }
    };
    let config = ClientConfig {
        address,
        port: conn.immudb_port,
        username: conn.username.clone(),
        password: password.unwrap_or_else(|| "immudb".into()),
        database: conn.database.clone(),
        state_dir: conn.state_dir.join("trust"),
        server_signing_pub_key: conn.server_signing_pub_key.clone(),
        tls_ca: conn.tls_ca.clone(),
        ..ClientConfig::default()
    };
    Ok(Target { config, local })
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Holds the per-source spool lock for the life of the agent: two agents with the same source
/// would reuse sequence numbers.
struct SpoolLock(#[allow(dead_code)] fs::File);

fn open_spool(state_dir: &Path, source: &str) -> Result<OpenedSpool> {
    let root = state_dir.join("spool");
    ensure_private_dir(&root)?;
    let lock_path = root.join(format!("{source}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    use fs4::fs_std::FileExt;
    if !lock.try_lock_exclusive().unwrap_or(false) {
        bail!(
            "another bt2immu is already recording source {source:?} with state dir {} \
             (lock {} is held)",
            state_dir.display(),
            lock_path.display()
        );
    }
    let dir = root.join(source);
    let (spool, recovery, damaged) = match Spool::open(&dir) {
        Ok((spool, recovery)) => (spool, recovery, None),
        Err(e @ SpoolError::Corrupted { .. }) => {
            let (spool, recovery, d) = quarantine_spool(&dir, e)?;
            (spool, recovery, Some(d))
        }
        Err(e) => {
            return Err(e).with_context(|| format!("opening the spool under {}", root.display()))
        }
    };
    Ok(OpenedSpool {
        spool: Arc::new(Mutex::new(spool)),
        recovery,
        damaged,
        _lock: SpoolLock(lock),
    })
}

/// A spool ready for the pipeline, and what opening it had to repair.
struct OpenedSpool {
    spool: Arc<Mutex<Spool>>,
    recovery: crate::spool::Recovery,
    damaged: Option<DamagedSpool>,
    _lock: SpoolLock,
}

/// A spool that could not be trusted as it was, moved aside (never deleted: it is evidence,
/// and what could not be read may still be recovered by hand).
struct DamagedSpool {
    moved_to: std::path::PathBuf,
    error: String,
    salvage: Salvage,
}

impl DamagedSpool {
    /// The loss record's detail; `count` is the numbers between the acknowledgement and the
    /// highest one seen that nothing readable carries (unknown when the ack itself is gone).
    fn record(&self) -> (Option<u64>, Map<String, serde_json::Value>) {
        let s = &self.salvage;
        let count = s
            .acked
            .map(|_| s.lost.iter().map(|(a, b)| b - a + 1).sum::<u64>());
        let mut d = Map::new();
        // The query reads these to tell numbers lost to the damage from deleted records.
        d.insert(
            "lost_seqs".into(),
            json!(s.lost.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>()),
        );
        d.insert(
            "moved_to".into(),
            json!(self.moved_to.display().to_string()),
        );
        d.insert("error".into(), json!(self.error));
        d.insert("recovered".into(), json!(s.recovered));
        d.insert("unreadable_bytes".into(), json!(s.unreadable_bytes));
        d.insert(
            "detail".into(),
            json!(
                "the spool was damaged on disk; every record that reads back in order was \
                   kept, the numbers of the others are left unused"
            ),
        );
        (count, d)
    }

    fn note(&self, pipeline: &mut Pipeline) -> Result<()> {
        let (count, d) = self.record();
        match count {
            Some(n) => pipeline.note_loss("spool_corrupted", n, d)?,
            None => pipeline.note_loss_uncounted("spool_corrupted", d)?,
        }
        Ok(())
    }
}

/// Loss records for what opening the spool had to repair, so the trail shows it.
fn note_spool_repairs(
    recovery: &crate::spool::Recovery,
    damaged: Option<&DamagedSpool>,
    pipeline: &mut Pipeline,
) -> Result<()> {
    if recovery.torn_bytes > 0 {
        // Normally one record cut by a crash mid-append, but the bytes cannot say how many.
        let mut d = Map::new();
        d.insert("bytes".into(), json!(recovery.torn_bytes));
        pipeline.note_loss_uncounted("spool_torn_tail", d)?;
    }
    if let Some(d) = damaged {
        d.note(pipeline)?;
    }
    Ok(())
}

/// Moves a damaged spool aside and starts a fresh one with what can still be read from it, so
/// damage on disk costs the records it hit, never the recording. Numbers used by the damaged
/// spool are never used again.
fn quarantine_spool(
    dir: &Path,
    error: SpoolError,
) -> Result<(Spool, crate::spool::Recovery, DamagedSpool)> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let moved_to = dir.with_file_name(format!("{name}.damaged-{stamp}"));
    fs::rename(dir, &moved_to)
        .with_context(|| format!("moving the damaged spool {} aside ({error})", dir.display()))?;
    let (mut spool, _) =
        Spool::open(dir).with_context(|| format!("creating a new spool in {}", dir.display()))?;
    let mut batch = Vec::new();
    let salvage = crate::spool::salvage(&moved_to, |e| {
        batch.push(e);
        if batch.len() >= 256 {
            spool.restore(&std::mem::take(&mut batch))?;
        }
        Ok(())
    })
    .and_then(|s| spool.restore(&batch).map(|()| s))
    .and_then(|s| spool.skip_to(s.highest_seq + 1).map(|()| s))
    .with_context(|| format!("reading back the damaged spool {}", moved_to.display()))?;
    say!(
        "bt2immu: WARNING: the spool {} is damaged ({error}); moved it to {} and kept the {} \
         unacknowledged records that still read back ({} bytes unreadable); the trail gets a \
         spool_corrupted loss record",
        dir.display(),
        moved_to.display(),
        salvage.recovered,
        salvage.unreadable_bytes
    );
    let (spool, recovery) = {
        drop(spool);
        Spool::open(dir).with_context(|| format!("reopening the new spool {}", dir.display()))?
    };
    Ok((
        spool,
        recovery,
        DamagedSpool {
            moved_to,
            error: error.to_string(),
            salvage,
        },
    ))
}

/// Continues after the highest record number immudb holds for `prefix` when it is above the
/// spool's. Called at every start: another state dir (a reinstall, a second copy, a damaged
/// spool moved aside) may have numbered records under this prefix since, and reusing numbers
/// would make the trail look tampered with (two records with one seq). Best effort: capture
/// never waits long for immudb.
async fn continue_numbering(config: &ClientConfig, prefix: &str, spool: &Mutex<Spool>) {
    let look = async {
        let client = ImmuClient::connect(config.clone()).await?;
        let page = client.scan(prefix.as_bytes(), b"", 100, true).await?;
        let mut best: Option<(u64, Vec<u8>)> = None;
        for e in page {
            if e.referenced_by.is_some() {
                continue; // not a record bt2immu wrote
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&e.value) else {
                continue;
            };
            let Some(seq) = v.get("seq").and_then(|s| s.as_u64()) else {
                continue;
            };
            if record::expected_key(&v).as_deref().map(str::as_bytes) != Some(&e.key[..]) {
                continue;
            }
            if seq > crate::spool::MAX_SEQ {
                say!(
                    "bt2immu: WARNING: {} claims record number {seq}, beyond any the agent uses \
                     (forged?); numbering ignores it",
                    String::from_utf8_lossy(&e.key)
                );
                continue;
            }
            if best.as_ref().is_none_or(|(b, _)| seq > *b) {
                best = Some((seq, e.key));
            }
        }
        if let Some((_, key)) = &best {
            // The number must come from a record the server proves it holds.
            client.verified_get(key).await?;
        }
        client.close().await;
        Ok::<_, crate::immudb::client::ClientError>(best.map(|(s, _)| s))
    };
    match tokio::time::timeout(Duration::from_secs(10), look).await {
        Ok(Ok(Some(highest))) => {
            let mut spool = spool.lock().expect("spool lock");
            if highest >= spool.next_seq() {
                say!(
                    "bt2immu: record numbers continue after {highest}, the highest under \
                     {prefix} in immudb (written with another state dir, or this one is new)"
                );
                if let Err(e) = spool.skip_to(highest + 1) {
                    say!("bt2immu: WARNING: could not keep the record numbering: {e}");
                }
            }
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => say!(
            "bt2immu: WARNING: could not read the trail to continue its record numbers ({e}); \
             if this host recorded under {prefix} before with another state dir, numbers \
             restart at 1 and `bt2immu query` will report repeated records"
        ),
        Err(_) => say!(
            "bt2immu: WARNING: immudb did not answer within 10 s to continue the record \
             numbers; if this host recorded under {prefix} before with another state dir, \
             numbers restart at 1 and `bt2immu query` will report repeated records"
        ),
    }
}

/// The running sink and the switches that end it.
struct SinkTask {
    task: tokio::task::JoinHandle<Result<sink::SinkStats>>,
    drain: watch::Sender<bool>,
    abandon: watch::Sender<bool>,
    progress: watch::Receiver<SinkProgress>,
}

/// Starts the sink; connects (retrying) first, so capture goes on while immudb is down.
fn spawn_sink(config: ClientConfig, spool: Arc<Mutex<Spool>>) -> SinkTask {
    let (drain_tx, drain) = watch::channel(false);
    let (abandon_tx, abandon) = watch::channel(false);
    let (progress, progress_rx) = watch::channel(SinkProgress::default());
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        let client = loop {
            match ImmuClient::connect(config.clone()).await {
                Ok(c) => break c,
                Err(e) if e.is_tampering() => return Err(anyhow::Error::new(e)),
                // Retrying cannot fix a bad key file or wrong credentials: say so now.
                Err(e) if sink::is_permanent(&e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "cannot use immudb at {}:{} (records are kept in the spool)",
                        config.address, config.port
                    )))
                }
                Err(e) => {
                    let msg = crate::error_text::one_line(&e);
                    tracing::warn!(error = %msg, "cannot reach immudb; records stay in the spool, retrying");
                    progress.send_modify(|p| p.failing = Some(msg));
                    if *abandon.borrow() {
                        return Ok(sink::SinkStats::default());
                    }
                    let mut ab = abandon.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = ab.wait_for(|a| *a) => return Ok(sink::SinkStats::default()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        let reader = spool.lock().expect("spool lock").reader();
        let res = sink::run(
            &client,
            spool,
            reader,
            SinkConfig::default(),
            drain,
            abandon,
            progress,
        )
        .await;
        client.close().await;
        Ok(res?)
    });
    SinkTask {
        task,
        drain: drain_tx,
        abandon: abandon_tx,
        progress: progress_rx,
    }
}

/// The common tail of `run` and `ingest`: drain the sink, report, pick the exit code.
async fn finish_sink(
    sink: SinkTask,
    spool: &Arc<Mutex<Spool>>,
    drain_timeout: Duration,
) -> Result<sink::SinkStats> {
    let _ = sink.drain.send(true);
    let abandon = sink.abandon;
    let abandon_later = tokio::spawn(async move {
        tokio::time::sleep(drain_timeout).await;
        let _ = abandon.send(true);
    });
    let stats = sink.task.await.context("sink task panicked")??;
    abandon_later.abort();
    let pending = spool.lock().expect("spool lock").pending();
    if pending > 0 {
        say!(
            "bt2immu: {pending} record(s) could not be written now; they are safe in the spool \
             and will be written at the next start"
        );
    }
    Ok(stats)
}

fn progress_logger(mut rx: watch::Receiver<SinkProgress>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        let mut last = 0u64;
        loop {
            tick.tick().await;
            let p = rx.borrow_and_update().clone();
            if p.stats.written != last || p.failing.is_some() {
                tracing::info!(
                    written = p.stats.written,
                    transactions = p.stats.transactions,
                    last_tx = p.stats.last_tx,
                    failing = p.failing.as_deref().unwrap_or(""),
                    "progress"
                );
                last = p.stats.written;
            }
        }
    })
}

/// Fails with exit code 4 when the script is unsafe.
/// Reads and checks the script once; what runs is exactly the bytes that were checked (a
/// private copy), so the file cannot be swapped between the check and the run. Unsafe ⇒ exit 4.
fn checked_script(
    path: Option<&Path>,
    program: Option<&str>,
) -> Result<(String, script::ScriptInfo)> {
    let info = match (path, program) {
        (Some(p), _) => script::check_script(p).map_err(|e| match e {
            script::ScriptError::Read { .. } => {
                exit(cli::EXIT_USAGE, format!("{e}{}", subcommand_hint(p)))
            }
            other => exit(cli::EXIT_REFUSED, format!("{other}")),
        })?,
        (None, Some(prog)) => {
            script::check_program(prog).map_err(|e| exit(cli::EXIT_REFUSED, format!("{e}")))?
        }
        (None, None) => return Err(exit(cli::EXIT_USAGE, "give a script file or -e PROGRAM")),
    };
    let source = String::from_utf8(info.source.clone()).map_err(|_| {
        exit(
            cli::EXIT_USAGE,
            format!("{}: the script is not valid UTF-8", info.origin),
        )
    })?;
    Ok((source, info))
}

/// `bt2immu NAME` is read as `bt2immu run NAME`: a missing "script" that is a bare word may
/// have been meant as a subcommand (a near miss of one is left to clap, see
/// `cli::normalize_args`).
fn subcommand_hint(path: &Path) -> String {
    let name = path.to_string_lossy();
    if path.exists() || name.contains('/') || name.contains('.') {
        return String::new();
    }
    " (not a subcommand either: run, ingest, check, query)".into()
}

fn source_default(path: Option<&Path>, readline_protocol: bool) -> String {
    if readline_protocol {
        return "bash".into();
    }
    match path {
        Some(p) => record::source_for_script(p),
        None => "bpftrace".into(),
    }
}

/// bpftrace needs tracefs for tracepoints (and to detach uprobes cleanly); many hosts do not
/// mount it by default. As root, mount it where the kernel expects it.
fn ensure_tracefs() {
    let dir = Path::new("/sys/kernel/tracing");
    if dir.join("events").exists() || unsafe { libc::geteuid() } != 0 {
        return;
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("tracefs"), c("/sys/kernel/tracing"), c("tracefs"));
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call and no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        say!("bt2immu: mounted tracefs at /sys/kernel/tracing (bpftrace needs it)");
    } else {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "tracefs is not mounted and mounting it failed; tracepoint probes will not attach"
        );
    }
}

/// What the bashreadline script is rendered for: the binaries to probe (the given shells, or
/// bash from `/etc/shells`) and the line limit.
fn readline_setup(
    shells: &[std::path::PathBuf],
    max_line_bytes: usize,
) -> Result<(Vec<readline::ProbeTarget>, readline::ReadlineOptions)> {
    let shells = if shells.is_empty() {
        readline::default_shells()
    } else {
        shells.to_vec()
    };
    let targets =
        readline::locate_targets(&shells).context("finding the readline functions to probe")?;
    let opts = readline::ReadlineOptions {
        max_line_bytes,
        ..Default::default()
    };
    Ok((targets, opts))
}

pub async fn run(args: RunArgs) -> Result<i32> {
    let (source_text, info) = checked_script(args.script.as_deref(), args.program.as_deref())?;
    if unsafe { libc::geteuid() } != 0 {
        // bpftrace refuses anyone but root; saying so here beats five failed restarts.
        return Err(exit(
            cli::EXIT_ERROR,
            "`run` needs root: bpftrace attaches its probes only as root (try `sudo bt2immu …`); \
             `check`, `ingest` and `query` work without it",
        ));
    }
    let bpftrace = checked_bpftrace(&args.bpftrace)?;
    let is_readline = readline::is_readline_script(&source_text);
    let source = record::source_name(
        &args
            .source
            .clone()
            .unwrap_or_else(|| source_default(args.script.as_deref(), is_readline)),
    );
    ensure_private_dir(&args.conn.state_dir)?;
    ensure_tracefs();
    let run_dir = args.conn.state_dir.join("run");
    ensure_private_dir(&run_dir)?;

    // What to run: the bashreadline protocol is rendered for this host's binaries.
    let (format, interp, program_file, env) = if is_readline {
        let (targets, opts) = readline_setup(&args.shells, args.max_line_bytes)?;
        let rendered = readline::render_script(&source_text, &targets, &opts)
            .context("preparing the bashreadline script")?;
        for t in &targets {
            say!(
                "bt2immu: probing {} in {}",
                readline::SYMBOL,
                t.binary.display()
            );
        }
        let file = run_dir.join(format!("{source}.bt"));
        write_private(&file, rendered.as_bytes())?;
        (
            Format::Json,
            Interpretation::Readline(Box::new(readline::Assembler::new(opts.clone()))),
            file,
            readline::bpftrace_env(&opts).context("preparing the bashreadline script")?,
        )
    } else {
        let file = run_dir.join(format!("{source}.bt"));
        write_private(&file, source_text.as_bytes())?;
        let format = match args.bpftrace_format {
            OutputFormat::Json => Format::Json,
            _ => Format::Text,
        };
        (
            format,
            Interpretation::Script(Box::new(info)),
            file,
            Vec::new(),
        )
    };

    let target = resolve_target(&args.conn, true).await?;
    let OpenedSpool {
        spool,
        recovery,
        damaged,
        _lock,
    } = open_spool(&args.conn.state_dir, &source)?;
    let host = HostContext::detect().context("reading host identity")?;
    let script_ref = ScriptRef {
        path: args
            .script
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-e".into()),
        sha256: sha256_hex(source_text.as_bytes()),
    };
    continue_numbering(&target.config, &format!("{source}:{}:", host.host), &spool).await;
    let next_seq = spool.lock().expect("spool lock").next_seq();
    let shaper = Shaper::new(host, &source, Some(script_ref), next_seq);
    let key_prefix = shaper.key_prefix();
    let mut pipeline = Pipeline::new(format, interp, shaper, spool.clone(), args.stdout);
    if let Some(pid) = target.local.as_ref().and_then(|l| l.pid()) {
        pipeline.add_own_pid(pid);
    }
    note_spool_repairs(&recovery, damaged.as_ref(), &mut pipeline)?;
    // A marker that exists only while an agent runs: finding it at start means the previous
    // run was killed (or the host crashed), and the trail must say that capture stopped then.
    let running_marker = args
        .conn
        .state_dir
        .join("spool")
        .join(format!("{source}.running"));
    if let Ok(prev) = fs::read_to_string(&running_marker) {
        let mut d = Map::new();
        d.insert("previous_agent_pid".into(), json!(prev.trim()));
        d.insert(
            "detail".into(),
            json!("the previous run ended without a clean stop (killed or crashed); nothing was captured between its last record and this start"),
        );
        pipeline.note_loss("agent_crashed", 1, d)?;
    }
    write_private(&running_marker, std::process::id().to_string().as_bytes())?;
    let mut d = Map::new();
    d.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    d.insert("replaying".into(), json!(recovery.pending));
    pipeline.note("agent_started", d)?;

    let mut sink = spawn_sink(target.config.clone(), spool.clone());
    let logger = progress_logger(sink.progress.clone());

    let mut bt_args: Vec<std::ffi::OsString> = Vec::new();
    if format == Format::Json {
        bt_args.push("-f".into());
        bt_args.push("json".into());
    }
    // Local `#include "x.h"` of the original script still resolve from its directory (their
    // permissions were checked with the script).
    if let Some(dir) = args.script.as_deref().and_then(Path::parent) {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        bt_args.push("-I".into());
        bt_args.push(dir.into());
    }
    bt_args.push(program_file.clone().into());
    let cmd = BpftraceCommand::new(bpftrace, bt_args, env)?;
    let (child_tx, mut child_rx) = mpsc::channel::<ChildMsg>(1024);
    let (stop_tx, stop_rx) = watch::channel(false);
    let supervisor_task = tokio::spawn(supervisor::supervise(
        cmd,
        RestartPolicy::default(),
        child_tx,
        stop_rx,
    ));
    say!(
        "bt2immu: recording to immudb {}:{} database {} under keys {key_prefix}… \
         (Ctrl-C to stop)",
        target.config.address,
        target.config.port,
        target.config.database
    );

    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sink_running = true;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut stopping = false;
    let mut sink_failed: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            msg = child_rx.recv() => match msg {
                Some(m) => {
                    let (ready, attached) = (pipeline.counts.ready, pipeline.counts.attached);
                    pipeline.child(m)?;
                    if pipeline.counts.ready > ready {
                        say!("bt2immu: capture ready: every line typed from now on is recorded");
                    }
                    if !is_readline && pipeline.counts.attached > attached {
                        say!("bt2immu: bpftrace attached its probes: recording");
                    }
                }
                None => break,
            },
            _ = tick.tick() => pipeline.tick()?,
            _ = sigint.recv(), if !stopping => { stopping = true; say!("bt2immu: stopping (SIGINT): flushing what was captured"); let _ = stop_tx.send(true); }
            _ = sigterm.recv(), if !stopping => { stopping = true; say!("bt2immu: stopping (SIGTERM): flushing what was captured"); let _ = stop_tx.send(true); }
            res = &mut sink.task, if sink_running => {
                sink_running = false;
                // The sink only ends early on a fatal error (e.g. tampering).
                let err = match res {
                    Ok(Ok(_)) => anyhow::anyhow!("the sink stopped unexpectedly"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::anyhow!("sink task failed: {e}"),
                };
                say!("bt2immu: {}", describe(&err));
                sink_failed = Some(err);
                stopping = true;
                let _ = stop_tx.send(true);
            }
        }
    }
    let ended = supervisor_task.await.context("supervisor panicked")??;
    pipeline.finish()?;
    if let Ended::GaveUp { last_code } = ended {
        let mut d = Map::new();
        d.insert("last_exit_code".into(), json!(last_code));
        pipeline.note("bpftrace_gave_up", d)?;
    }
    let mut d = Map::new();
    d.insert("records".into(), json!(pipeline.counts.records));
    d.insert("lost_events".into(), json!(pipeline.counts.lost_events));
    d.insert(
        "own_events_left_out".into(),
        json!(pipeline.counts.own_events),
    );
    pipeline.note("agent_stopped", d)?;
    let _ = fs::remove_file(&running_marker);
    logger.abort();
    if let Some(e) = sink_failed {
        return Err(e);
    }
    let stats = finish_sink(sink, &spool, Duration::from_secs(15)).await?;
    say!(
        "bt2immu: {} records captured ({} typed lines, {} events, {} kept raw (flagged; {} of \
         them typed lines that did not arrive whole), {} events lost in the kernel, {} events of \
         bt2immu's own processes left out); {} written and verified in {} transactions (last tx \
         {}){}",
        pipeline.counts.records,
        pipeline.counts.typed_lines,
        pipeline.counts.events,
        pipeline.counts.raw,
        pipeline.counts.incomplete_lines,
        pipeline.counts.lost_events,
        pipeline.counts.own_events,
        stats.written,
        stats.transactions,
        stats.last_tx,
        if stats.already_present > 0 {
            format!(
                "; {} already in immudb from before a crash (not written twice)",
                stats.already_present
            )
        } else {
            String::new()
        }
    );
    drop(target);
    match ended {
        Ended::GaveUp { last_code } => Err(exit(
            cli::EXIT_ERROR,
            format!(
                "bpftrace kept failing ({}); see its messages above",
                match last_code {
                    Some(c) => format!("last exit code {c}"),
                    None => "last killed by a signal".into(),
                }
            ),
        )),
        Ended::Stopped => Ok(cli::EXIT_OK),
    }
}

/// Finds the bpftrace binary and, as root, refuses one that a non-root user could replace:
/// it runs as root with every capability.
fn checked_bpftrace(name: &Path) -> Result<std::path::PathBuf> {
    let path = if name.components().count() > 1 {
        name.to_path_buf()
    } else {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                exit(
                    cli::EXIT_ERROR,
                    format!(
                        "{} not found on PATH: install bpftrace (scripts/setup.sh does) or pass \
                         --bpftrace PATH",
                        name.display()
                    ),
                )
            })?
    };
    if unsafe { libc::geteuid() } == 0 {
        let problems = script::perms::path_problems(&path)
            .with_context(|| format!("checking {}", path.display()))?;
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
            return Err(exit(
                cli::EXIT_REFUSED,
                format!(
                    "refusing to run {} as root: a non-root user could replace it\n{}",
                    path.display(),
                    list.join("\n")
                ),
            ));
        }
    }
    Ok(path)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        use std::io::Write;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub async fn ingest(args: IngestArgs) -> Result<i32> {
    use tokio::io::AsyncReadExt;
    // Streamed, not slurped: `bpftrace … | bt2immu ingest -` spools each line as it arrives.
    let mut input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if args.input == Path::new("-") {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(tokio::fs::File::open(&args.input).await.map_err(|e| {
            exit(
                cli::EXIT_USAGE,
                format!("cannot read {}: {e}", args.input.display()),
            )
        })?)
    };
    // From the start: a stop while waiting for the first line must still be a clean one.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stopped = false;
    let mut buf = vec![0u8; 256 * 1024];
    // The first line (or 64 bytes) decides the format (unless given); a slow stream is not
    // held back waiting for more.
    let mut first = Vec::new();
    let mut ended = false;
    while first.len() < 64 && !first.contains(&b'\n') {
        tokio::select! {
            r = input.read(&mut buf) => match r.context("reading the input")? {
                0 => { ended = true; break }
                n => first.extend_from_slice(&buf[..n]),
            },
            _ = sigint.recv() => { say!("bt2immu: stopping (SIGINT): flushing what was read"); stopped = true; break }
            _ = sigterm.recv() => { say!("bt2immu: stopping (SIGTERM): flushing what was read"); stopped = true; break }
        }
    }
    let format = match args.format {
        OutputFormat::Json => Format::Json,
        OutputFormat::Text => Format::Text,
        OutputFormat::Auto => decode::sniff_format(&first),
    };
    let (script_text, interp) = match &args.script {
        Some(p) => {
            let text = fs::read_to_string(p).map_err(|e| {
                exit(
                    cli::EXIT_USAGE,
                    format!("cannot read script {}: {e}", p.display()),
                )
            })?;
            if readline::is_readline_script(&text) {
                (
                    Some(text),
                    Interpretation::Readline(Box::new(readline::Assembler::new(
                        readline::ReadlineOptions::default(),
                    ))),
                )
            } else {
                let info = script::analyze(text.as_bytes(), &p.display().to_string());
                (Some(text), Interpretation::Script(Box::new(info)))
            }
        }
        None => (None, Interpretation::Plain),
    };
    let is_readline = matches!(interp, Interpretation::Readline(_));
    let source = record::source_name(
        &args
            .source
            .clone()
            .unwrap_or_else(|| source_default(args.script.as_deref(), is_readline)),
    );
    ensure_private_dir(&args.conn.state_dir)?;
    let target = resolve_target(&args.conn, false).await?;
    let OpenedSpool {
        spool,
        recovery,
        damaged,
        _lock,
    } = open_spool(&args.conn.state_dir, &source)?;
    let host = HostContext::detect().context("reading host identity")?;
    let script_ref = args.script.as_ref().map(|p| ScriptRef {
        path: p.display().to_string(),
        sha256: sha256_hex(script_text.as_deref().unwrap_or("").as_bytes()),
    });
    continue_numbering(&target.config, &format!("{source}:{}:", host.host), &spool).await;
    let next_seq = spool.lock().expect("spool lock").next_seq();
    let shaper = Shaper::new(host, &source, script_ref, next_seq).replayed();
    let mut pipeline = Pipeline::new(format, interp, shaper, spool.clone(), args.stdout);
    note_spool_repairs(&recovery, damaged.as_ref(), &mut pipeline)?;
    let sink = spawn_sink(target.config.clone(), spool.clone());
    pipeline.feed(&first)?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Stopped or ended while sniffing the format: nothing more to read.
    if !stopped && !ended {
        loop {
            tokio::select! {
                r = input.read(&mut buf) => match r.context("reading the input")? {
                    0 => break,
                    n => pipeline.feed(&buf[..n])?,
                },
                _ = tick.tick() => pipeline.tick()?,
                _ = sigint.recv() => { say!("bt2immu: stopping (SIGINT): flushing what was read"); break }
                _ = sigterm.recv() => { say!("bt2immu: stopping (SIGTERM): flushing what was read"); break }
            }
        }
    }
    pipeline.finish()?;
    let stats = finish_sink(sink, &spool, Duration::from_secs(30)).await?;
    say!(
        "bt2immu: {} records from {} ({} raw, {} events lost); {} written and verified in {} \
         transactions",
        pipeline.counts.records,
        args.input.display(),
        pipeline.counts.raw,
        pipeline.counts.lost_events,
        stats.written,
        stats.transactions
    );
    let pending = spool.lock().expect("spool lock").pending();
    if pending > 0 {
        return Err(exit(
            cli::EXIT_ERROR,
            format!("{pending} records not yet written to immudb"),
        ));
    }
    Ok(cli::EXIT_OK)
}

pub fn check(args: CheckArgs) -> Result<i32> {
    let info = script::inspect_script(&args.script, script::CheckOptions::default())
        .map_err(|e| exit(cli::EXIT_USAGE, format!("{e}")))?;
    let refusal = info.ensure_safe().err();
    if args.render {
        if let Some(r) = &refusal {
            return Err(exit(cli::EXIT_REFUSED, format!("REFUSED: {r}")));
        }
        let text = fs::read_to_string(&args.script)
            .with_context(|| format!("reading {}", args.script.display()))?;
        if !readline::is_readline_script(&text) {
            return Err(exit(
                cli::EXIT_USAGE,
                "--render is for the bashreadline script; other scripts run as written",
            ));
        }
        let (targets, opts) = readline_setup(&args.shells, args.max_line_bytes)?;
        let rendered = readline::render_script(&text, &targets, &opts)
            .map_err(|e| exit(cli::EXIT_USAGE, format!("{e}")))?;
        let env: Vec<String> = readline::bpftrace_env(&opts)?
            .into_iter()
            .map(|(k, v)| format!("{k}={}", shell_escape::escape(v.into())))
            .collect();
        // The shebang stays the first line, so the output runs as a file of its own.
        let rendered = rendered.trim_end();
        let (shebang, body) = match rendered.split_once('\n') {
            Some((first, rest)) if first.starts_with("#!") => (format!("{first}\n"), rest),
            _ => (String::new(), rendered),
        };
        emit!(
            "{shebang}// Rendered by bt2immu for this host. Run by hand (root):\n//   {} bpftrace {} FILE\n{}",
            env.join(" "),
            readline::bpftrace_args().join(" "),
            body
        );
        return Ok(cli::EXIT_OK);
    }
    let text = fs::read_to_string(&args.script).unwrap_or_default();
    if readline::is_readline_script(&text) {
        return check_readline(&args, &info, refusal.as_ref());
    }
    if args.json {
        let mut v = info.describe_json();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("safe".into(), json!(refusal.is_none()));
            if let Some(r) = &refusal {
                obj.insert("refused".into(), json!(r.to_string()));
            }
        }
        emit!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        // describe() already states the verdict; a refusal adds the reasons and the fixes.
        {
            use std::io::Write as _;
            let _ = write!(std::io::stdout(), "{}", info.describe());
        }
        if let Some(r) = &refusal {
            emit!("\nREFUSED: {r}");
        }
    }
    Ok(if refusal.is_some() {
        cli::EXIT_REFUSED
    } else {
        cli::EXIT_OK
    })
}

/// What one record of the bashreadline job holds, for `check`: its printf lines are bt2immu's
/// internal protocol (BT2I2), reassembled into these.
const READLINE_RECORD_FIELDS: [(&str, &str); 6] = [
    ("line, line_b64, len, truncated", "the typed line (UTF-8; when it is not, readable, with line_b64 holding the exact bytes), its length in bytes, whether it was cut"),
    ("tail, tail_offset", "for a cut line: its last bytes and where they start"),
    ("eof", "Ctrl-D at the prompt (no line)"),
    ("executed, line_editing_off", "input that bypassed readline: run from the editor/fc/bind -x, or read with editing off"),
    ("pid, tid, ppid, uid, user, gid, loginuid, sessionid, tty, comm, exe, cgroup", "who typed it, where"),
    ("v, kind, source, host, boot_id, seq, ts, mono_ns, probe, script, script_sha256", "the record's provenance"),
];

/// `check` on the bashreadline script: the verdict and probes, then the records it gives and
/// the binaries it will probe on this host (not the internal protocol lines).
fn check_readline(
    args: &CheckArgs,
    info: &script::ScriptInfo,
    refusal: Option<&script::ScriptError>,
) -> Result<i32> {
    let targets = readline_setup(&[], readline::DEFAULT_MAX_LINE_BYTES).map(|(t, _)| t);
    if args.json {
        let mut v = info.describe_json();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("safe".into(), json!(refusal.is_none()));
            if let Some(r) = refusal {
                obj.insert("refused".into(), json!(r.to_string()));
            }
            let fields: Vec<&str> = READLINE_RECORD_FIELDS
                .iter()
                .flat_map(|(names, _)| names.split(", "))
                .collect();
            obj.insert(
                "bashreadline".into(),
                json!({
                    "record_fields": fields,
                    "probe_targets": match &targets {
                        Ok(t) => json!(t.iter().map(|t| t.to_string()).collect::<Vec<_>>()),
                        Err(e) => json!({"error": format!("{e:#}")}),
                    },
                }),
            );
        }
        emit!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let full = info.describe();
        let head = full
            .split_once("\nlines:\n")
            .map_or(full.as_str(), |(h, _)| h);
        emit!("{}", head.trim_end());
        emit!("bashreadline job: bt2immu fills in the probe addresses per binary and reassembles the\nscript's BT2I2 output into one record per typed line, with these fields:");
        for (names, what) in READLINE_RECORD_FIELDS {
            emit!("  {names}\n      {what}");
        }
        match &targets {
            Ok(t) => {
                emit!("probed on this host:");
                for t in t {
                    emit!("  {t}");
                }
            }
            Err(e) => emit!("probed on this host: nothing: {e:#}"),
        }
        emit!(
            "the script as run here: bt2immu check --render {}",
            args.script.display()
        );
        if let Some(r) = refusal {
            emit!("\nREFUSED: {r}");
        }
    }
    Ok(if refusal.is_some() {
        cli::EXIT_REFUSED
    } else {
        cli::EXIT_OK
    })
}

/// Padding made visible: a run of 16 or more of the same character is shown as
/// `[N × 'c']`, so a command after a megabyte of spaces is on the reader's screen, not pushed
/// off it.
fn condensed(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(4096));
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let mut n = 1usize;
        while chars.peek() == Some(&c) {
            chars.next();
            n += 1;
        }
        if n >= 16 {
            out.push_str(&format!("[{n} × {c:?}]"));
        } else {
            out.extend(std::iter::repeat_n(c, n));
        }
    }
    out
}

/// A line for a terminal: control characters (newline, tab, escape sequences) shown as
/// `\n`, `\t`, `\x1b`, so a recorded line cannot rewrite the reader's screen.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// [`printable`] for exact bytes: a byte that is not UTF-8 is shown as `\xNN`, the same as a
/// control character, and unlike a typed backslash (`\\`).
fn printable_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(&printable(chunk.valid()));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Scans every key under `prefix` (up to `limit`), in pages that shrink when a page of large
/// records would exceed the gRPC message limit.
async fn scan_adaptive(
    client: &ImmuClient,
    prefix: &[u8],
    limit: u64,
) -> Result<Vec<crate::immudb::client::UnverifiedEntry>> {
    let mut out = Vec::new();
    let mut seek = Vec::new();
    let mut page = 500u64;
    while (out.len() as u64) < limit {
        let want = page.min(limit - out.len() as u64);
        match client.scan(prefix, &seek, want, false).await {
            Ok(entries) => {
                let n = entries.len() as u64;
                // The server must answer in key order, under the prefix: anything else could
                // make a page skip records.
                for e in &entries {
                    let k = e.stored_key();
                    if !k.starts_with(prefix) || (!seek.is_empty() && k <= &seek[..]) {
                        return Err(exit(
                            cli::EXIT_VERIFICATION,
                            format!(
                                "VERIFICATION FAILED — immudb's scan answered {} out of key \
                                 order or outside the prefix",
                                String::from_utf8_lossy(k)
                            ),
                        ));
                    }
                    seek = k.to_vec();
                }
                out.extend(entries);
                if n < want {
                    break;
                }
            }
            Err(e) if page > 1 && e.to_string().contains("message length too large") => {
                page = (page / 4).max(1);
            }
            // The server's own integrity check failed: stored data was altered on disk.
            Err(e) if e.to_string().contains("data is corrupted") => {
                return Err(exit(
                    cli::EXIT_VERIFICATION,
                    format!(
                        "VERIFICATION FAILED — immudb reports that its stored data is corrupted \
                         (altered on disk?): {e}"
                    ),
                ))
            }
            Err(e) => return Err(anyhow::Error::new(e).context("scanning")),
        }
    }
    Ok(out)
}

/// What the database's whole history (proven, transaction by transaction, to end in the
/// trusted state) says about the keys under a prefix: what a scan cannot show.
#[derive(Default)]
struct History {
    /// Writes bt2immu never makes: a logical delete, an expiry, a non-indexable entry, a
    /// second write to a key. A scan leaves deleted and expired keys out, and a removed record
    /// replaced by a forged one under another key leaves no gap in the sequence numbers: the
    /// change itself is the evidence.
    problems: Vec<String>,
    /// Keys written more than once, with the tx of the second write (the listing names those
    /// it still shows itself).
    rewritten: Vec<(String, u64)>,
    /// Every sequence number ever written per (source, host), from the keys: a number that
    /// reached immudb was not "lost before it got there".
    written: std::collections::HashMap<(String, String), Vec<u64>>,
}

/// `source:host:time:seq` → (source, host, seq).
fn key_parts(key: &[u8]) -> Option<(String, String, u64)> {
    let key = std::str::from_utf8(key).ok()?;
    let (rest, seq) = key.rsplit_once(':')?;
    let (source, rest) = rest.split_once(':')?;
    let (host, _time) = rest.rsplit_once(':')?;
    Some((source.to_string(), host.to_string(), seq.parse().ok()?))
}

async fn read_history(client: &ImmuClient, prefix: &[u8]) -> Result<History> {
    let started = std::time::Instant::now();
    let mut reported = started;
    let mut history = History::default();
    // 16 bytes of a key's hash are enough to notice a second write without keeping the keys.
    let mut seen: std::collections::HashSet<[u8; 16]> = Default::default();
    let walked = client
        .walk_history(|header, entries| {
            if reported.elapsed() >= Duration::from_secs(5) {
                reported = std::time::Instant::now();
                say!(
                    "bt2immu: checked the history up to tx {} ({:.0} s)",
                    header.id,
                    started.elapsed().as_secs_f64()
                );
            }
            for e in entries {
                let Some(key) = e.key.strip_prefix(&[crate::immudb::proof::SET_KEY_PREFIX]) else {
                    continue;
                };
                if !key.starts_with(prefix) {
                    continue;
                }
                let shown = String::from_utf8_lossy(key);
                let md = &e.metadata;
                if md.deleted {
                    history.problems.push(format!(
                        "{shown}: deleted in tx {} (bt2immu never deletes: the record was \
                         removed after it was recorded)",
                        header.id
                    ));
                }
                if let Some(at) = md.expires_at {
                    history.problems.push(format!(
                        "{shown}: given an expiry (unix time {at}) in tx {} (bt2immu never sets \
                         one: the record was made to vanish from reads)",
                        header.id
                    ));
                }
                if md.non_indexable {
                    history.problems.push(format!(
                        "{shown}: written as non-indexable in tx {} (bt2immu never does: the \
                         entry is hidden from reads)",
                        header.id
                    ));
                }
                let digest: [u8; 32] = Sha256::digest(key).into();
                if !seen.insert(digest[..16].try_into().expect("16 bytes")) {
                    history.rewritten.push((shown.into_owned(), header.id));
                }
                if let Some((source, host, seq)) = key_parts(key) {
                    history.written.entry((source, host)).or_default().push(seq);
                }
            }
        })
        .await
        .context("checking the database's history")?;
    tracing::info!(
        transactions = walked,
        problems = history.problems.len(),
        "history checked"
    );
    Ok(history)
}

/// The records this host's agents wrote and verified that the trail no longer holds at its
/// end. The sequence check sees a deleted record only when a later one remains; the spool's
/// acknowledgement in the state dir says how far each source got, so deleting the newest
/// records is noticed too (where the query runs with the agent's state dir).
fn newest_missing(
    state_dir: &Path,
    prefix: &str,
    rows: &[(String, u64, serde_json::Value, bool)],
) -> Result<Vec<String>> {
    let spool_root = state_dir.join("spool");
    let Ok(dir) = fs::read_dir(&spool_root) else {
        return Ok(Vec::new());
    };
    let host = HostContext::detect().context("reading host identity")?.host;
    let mut problems = Vec::new();
    for ent in dir.flatten() {
        let ack_path = ent.path().join("ack");
        let Ok(text) = fs::read_to_string(&ack_path) else {
            continue;
        };
        let source = ent.file_name().to_string_lossy().into_owned();
        if source.contains(".damaged-") {
            continue; // moved aside: its numbers continue in the new spool
        }
        if !format!("{source}:{host}:").starts_with(prefix) {
            continue;
        }
        let acked: u64 = text.trim().parse().with_context(|| {
            format!(
                "{}: not a sequence number: {:?}",
                ack_path.display(),
                text.trim()
            )
        })?;
        let newest = rows
            .iter()
            .filter(|(_, _, v, _)| {
                v.get("host").and_then(|h| h.as_str()) == Some(host.as_str())
                    && v.get("source").and_then(|s| s.as_str()) == Some(source.as_str())
            })
            .filter_map(|(_, _, v, _)| v.get("seq").and_then(|s| s.as_u64()))
            .max()
            .unwrap_or(0);
        if acked > newest {
            problems.push(format!(
                "{source} on {host}: record(s) {}..={acked} were written and verified by this \
                 host's agent ({} says so) but are not in the trail: deleted (or this is not the \
                 database that agent wrote to)",
                newest + 1,
                ack_path.display()
            ));
        }
    }
    Ok(problems)
}

/// The `lost_seqs` ranges of a `spool_corrupted` loss record.
fn lost_ranges(v: &serde_json::Value) -> Vec<(u64, u64)> {
    v.get("lost_seqs")
        .and_then(|l| l.as_array())
        .map(|l| {
            l.iter()
                .filter_map(|r| Some((r.get(0)?.as_u64()?, r.get(1)?.as_u64()?)))
                .filter(|(a, b)| a <= b)
                .collect()
        })
        .unwrap_or_default()
}

/// The parts of the inclusive range `gap` that no range in `cover` includes.
fn uncovered(gap: (u64, u64), cover: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut parts = vec![gap];
    for &(ca, cb) in cover {
        parts = parts
            .into_iter()
            .flat_map(|(a, b)| {
                let mut out = Vec::new();
                if cb < a || ca > b {
                    out.push((a, b));
                } else {
                    if ca > a {
                        out.push((a, ca - 1));
                    }
                    if cb < b {
                        out.push((cb + 1, b));
                    }
                }
                out
            })
            .collect();
    }
    parts
}

pub async fn query(args: QueryArgs) -> Result<i32> {
    // The local immudb that `run` starts when none is configured stops with it; reading the
    // trail back starts it again (and stops it after).
    let has_local = args.conn.state_dir.join("immudb").is_dir();
    let target = resolve_target(&args.conn, has_local).await?;
    let client = ImmuClient::connect(target.config.clone())
        .await
        .context("connecting to immudb")?;
    // Records removed with immudb's logical delete, found in the proven history.
    let mut history = History::default();
    if args.verify {
        // Before anything is read: an empty or short answer from a rolled-back or replaced
        // server must fail here, not look like a quiet trail.
        client
            .verify_current_state()
            .await
            .context("verifying the server's state against the trusted state")?;
        history = read_history(&client, args.prefix.as_bytes()).await?;
    }
    let limit = args.limit.unwrap_or(u64::MAX);
    let entries = scan_adaptive(&client, args.prefix.as_bytes(), limit).await?;
    let total = entries.len();
    let started = std::time::Instant::now();
    let mut reported = started;
    let mut rows = Vec::new();
    // Every record is written once, under a key that must not exist, so a second revision
    // means someone wrote over it; and an agent numbers its records 1, 2, 3, … per source,
    // so a missing number means a record vanished (e.g. immudb's logical delete).
    let mut problems: Vec<String> = Vec::new();
    let mut seqs: std::collections::BTreeMap<(String, String), Vec<u64>> = Default::default();
    // Numbers the agent itself reported lost (a damaged spool): gaps, but not tampering.
    let mut explained: std::collections::BTreeMap<(String, String), Vec<(u64, u64)>> =
        Default::default();
    for (i, e) in entries.into_iter().enumerate() {
        // A long trail takes a while to verify record by record: say how far it got.
        if args.verify && reported.elapsed() >= Duration::from_secs(5) {
            reported = std::time::Instant::now();
            say!(
                "bt2immu: verified {i} of {total} records ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
        let key = String::from_utf8_lossy(&e.key).into_owned();
        let mut tampered = false;
        if let Some(r) = &e.referenced_by {
            // bt2immu never writes references; one under the prefix shows another record in
            // its place (and would shift the scan's pages past real ones).
            problems.push(format!(
                "{}: a reference to {key} (bt2immu never writes references: it makes another \
                 record appear in the trail's place)",
                String::from_utf8_lossy(r)
            ));
            tampered = true;
        }
        let value = if args.verify {
            let history = client
                .history(&e.key)
                .await
                .with_context(|| format!("reading the history of {key}"))?;
            if history.len() > 1 {
                tampered = true;
                problems.push(format!(
                    "{key}: written {} times, but bt2immu writes each record once: it was \
                     overwritten after it was recorded (showing the first, original revision)",
                    history.len()
                ));
                client.verified_get_at(&e.key, history[0].tx).await?.value
            } else {
                client.verified_get(&e.key).await?.value
            }
        } else {
            e.value
        };
        let parsed: serde_json::Value = serde_json::from_slice(&value)
            .unwrap_or_else(|_| json!({"raw": record::readable(&value)}));
        if args.verify {
            // A record's key is made of its value: a value under any other key was copied or
            // forged there.
            match record::expected_key(&parsed) {
                Some(k) if k == key => {}
                Some(k) => {
                    tampered = true;
                    problems.push(format!(
                        "{key}: holds a record whose source, host, time and seq make the key \
                         {k}: copied or forged, not written there by bt2immu"
                    ));
                }
                None => {
                    tampered = true;
                    problems.push(format!(
                        "{key}: not a record bt2immu wrote (no source, host, ts or seq): put \
                         under the trail's prefix by someone else"
                    ));
                }
            }
        }
        if let (Some(host), Some(source), Some(seq)) = (
            parsed.get("host").and_then(|v| v.as_str()),
            parsed.get("source").and_then(|v| v.as_str()),
            parsed.get("seq").and_then(|v| v.as_u64()),
        ) {
            seqs.entry((host.to_string(), source.to_string()))
                .or_default()
                .push(seq);
            if !tampered && parsed.get("cause").and_then(|c| c.as_str()) == Some("spool_corrupted")
            {
                explained
                    .entry((host.to_string(), source.to_string()))
                    .or_default()
                    .extend(lost_ranges(&parsed));
            }
        }
        rows.push((key, e.tx, parsed, tampered));
    }
    // Gaps can only be judged over everything an agent wrote: the whole trail, one source, or
    // one source on one host — not a narrower (e.g. time) prefix, nor a page cut by --limit.
    let whole_sources = args.prefix.is_empty()
        || (args.prefix.ends_with(':') && args.prefix.matches(':').count() <= 2);
    let complete = (rows.len() as u64) < limit;
    if args.verify && complete && whole_sources {
        for ((host, source), mut v) in seqs {
            v.sort_unstable();
            // Two records with one seq: the agent numbers each record once.
            for w in v.windows(2).filter(|w| w[0] == w[1]) {
                problems.push(format!(
                    "{source} on {host}: record {} appears more than once (one is not the \
                     agent's)",
                    w[0]
                ));
            }
            v.dedup();
            let cover = explained
                .get(&(host.clone(), source.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut expect = 1u64;
            for s in v {
                if s > expect {
                    for (a, b) in uncovered((expect, s - 1), cover) {
                        problems.push(format!(
                            "{source} on {host}: record(s) {a}..={b} are missing (deleted, or \
                             never written)"
                        ));
                    }
                }
                expect = s + 1;
            }
            // A number claimed lost that reached immudb was not lost: the claim is false.
            let claimed = (!cover.is_empty())
                .then(|| history.written.get(&(source.clone(), host.clone())))
                .flatten();
            if let Some(w) = claimed {
                for &n in w {
                    if cover.iter().any(|&(a, b)| (a..=b).contains(&n)) {
                        problems.push(format!(
                            "{source} on {host}: record {n} is named lost by a spool_corrupted \
                             record, but it was written to immudb: the loss record is false"
                        ));
                    }
                }
            }
            for (a, b) in cover {
                say!(
                    "bt2immu: {source} on {host}: record(s) {a}..={b} were lost to a damaged \
                     spool before they reached immudb (the agent's spool_corrupted record says \
                     so)"
                );
            }
        }
    }
    if args.verify && complete {
        problems.extend(newest_missing(&args.conn.state_dir, &args.prefix, &rows)?);
    }
    // A key written twice that the listing no longer shows (e.g. its new version expired).
    let listed: std::collections::HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    for (key, tx) in &history.rewritten {
        if !listed.contains(key.as_str()) {
            problems.push(format!(
                "{key}: written again in tx {tx}, but bt2immu writes each record once, and the \
                 key is no longer listed"
            ));
        }
    }
    problems.extend(history.problems);
    match args.format {
        cli::QueryFormat::Jsonl => {
            for (key, tx, value, tampered) in &rows {
                emit!(
                    "{}",
                    json!({"key": key, "tx": tx, "verified": args.verify && !tampered,
                           "tampered": tampered, "value": value})
                );
            }
        }
        cli::QueryFormat::Table => {
            let width = |k: &str, min: usize| {
                rows.iter()
                    .filter_map(|(_, _, v, _)| v.get(k).and_then(|x| x.as_str()))
                    .map(|x| x.chars().count())
                    .max()
                    .unwrap_or(0)
                    .clamp(min, 32)
            };
            let (uw, tw) = (width("user", 8), width("tty", 6));
            emit!(
                "{:<30} {:>7} {:>6} {:<uw$} {:<tw$} LINE",
                "TIME",
                "PID",
                "UID",
                "USER",
                "TTY"
            );
            for (_, _, v, _) in &rows {
                let g = |k: &str| {
                    v.get(k)
                        .map(|x| x.to_string().trim_matches('"').to_string())
                        .unwrap_or_default()
                };
                let exact = |name: &str| v.as_object().and_then(|m| record::get_bytes(m, name));
                let mut line = exact("line")
                    .map(|b| {
                        // An empty line and trailing spaces are invisible on a terminal.
                        let cut = v.get("truncated") == Some(&json!(true));
                        let trailing = if cut {
                            0 // the head's end is not the line's end
                        } else {
                            b.iter().rev().take_while(|&&c| c == b' ').count()
                        };
                        match (b.len(), trailing) {
                            (0, _) => "(empty line)".to_string(),
                            (_, 0) => condensed(&printable_bytes(&b)),
                            (_, n) => format!(
                                "{} [{n} trailing space{}]",
                                condensed(&printable_bytes(&b)),
                                if n == 1 { "" } else { "s" }
                            ),
                        }
                    })
                    .unwrap_or_else(|| printable(&g("event")));
                match v.get("kind").and_then(|k| k.as_str()) {
                    Some("loss") => {
                        let count = match v.get("count") {
                            Some(serde_json::Value::Null) | None => "count unknown".to_string(),
                            Some(_) => format!("count {}", g("count")),
                        };
                        line = format!("LOSS {} ({count}) {line}", g("cause"));
                        if let Some(d) = v.get("detail").and_then(|d| d.as_str()) {
                            line = format!("{line}: {}", printable(d));
                        }
                    }
                    Some("raw") => line = format!("RAW ({}) {line}", g("reason")),
                    Some("readline") if v.get("incomplete") == Some(&json!(true)) => {
                        line = format!("INCOMPLETE ({}) {line} …", g("reason"));
                    }
                    _ => {}
                }
                let flag = |k: &str| v.get(k) == Some(&json!(true));
                if flag("eof") {
                    line = "EOF (Ctrl-D: no line)".into();
                } else if flag("executed") {
                    line = format!("EXECUTED (run without readline: editor, fc or bind -x) {line}");
                } else if flag("line_editing_off") {
                    line = format!("EDITING-OFF {line}");
                }
                if v.get("truncated") == Some(&json!(true)) {
                    let tail = exact("tail").unwrap_or_default();
                    line = format!(
                        "{line} [CUT: {} bytes; bytes {}.. follow:] {}",
                        g("len"),
                        g("tail_offset"),
                        condensed(&printable_bytes(&tail))
                    );
                }
                emit!(
                    "{:<30} {:>7} {:>6} {:<uw$} {:<tw$} {}",
                    g("ts"),
                    g("pid"),
                    g("uid"),
                    g("user"),
                    g("tty"),
                    line
                );
            }
        }
    }
    client.close().await;
    if !problems.is_empty() {
        say!(
            "bt2immu: {} record(s) read; the trail was altered (see below)",
            rows.len()
        );
    } else {
        say!(
            "bt2immu: {} record(s){}",
            rows.len(),
            if args.verify {
                ", each verified; the database's history checked for deletions"
            } else {
                " (not verified: --verify false)"
            }
        );
    }
    if !complete {
        say!(
            "bt2immu: stopped at --limit {}; more records may follow (the gap check needs them \
             all: raise --limit)",
            limit
        );
    }
    if !problems.is_empty() {
        return Err(exit(
            cli::EXIT_VERIFICATION,
            format!(
                "VERIFICATION FAILED — the trail was altered:\n  {}",
                problems.join("\n  ")
            ),
        ));
    }
    Ok(cli::EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_word_that_is_no_script_is_pointed_at_the_subcommands() {
        assert!(subcommand_hint(Path::new("frobnicate")).contains("not a subcommand"));
        assert_eq!(subcommand_hint(Path::new("scripts/x.bt")), "");
    }

    #[test]
    fn only_the_part_of_a_gap_no_loss_record_explains_is_reported() {
        assert_eq!(uncovered((3, 9), &[]), vec![(3, 9)]);
        assert_eq!(uncovered((3, 9), &[(3, 9)]), vec![]);
        assert_eq!(uncovered((3, 9), &[(5, 6)]), vec![(3, 4), (7, 9)]);
        assert_eq!(uncovered((3, 9), &[(1, 4), (8, 20)]), vec![(5, 7)]);
        assert_eq!(uncovered((3, 9), &[(10, 12)]), vec![(3, 9)]);
        let v = json!({"lost_seqs": [[3, 3], [7, 5], "x", [8, 9]]});
        assert_eq!(lost_ranges(&v), vec![(3, 3), (8, 9)]);
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(13);
        let e = anyhow::Error::new(crate::immudb::client::ClientError::Io {
            context: "creating state dir /x".into(),
            source: io,
        })
        .context("connecting to immudb");
        assert_eq!(
            describe(&e),
            "connecting to immudb: creating state dir /x: Permission denied (os error 13)"
        );
    }

    #[test]
    fn padding_is_condensed_so_the_command_stays_on_screen() {
        let line = format!("{}rm -rf /tmp/x{}", " ".repeat(300_000), "#".repeat(15));
        assert_eq!(
            condensed(&printable(&line)),
            format!("[300000 × ' ']rm -rf /tmp/x{}", "#".repeat(15))
        );
        // Escaped control characters alternate `\` and a letter: no run to condense.
        assert_eq!(condensed(&printable(&"\t".repeat(20))), "\\t".repeat(20));
        assert_eq!(condensed(&printable(&" ".repeat(16))), "[16 × ' ']");
        assert_eq!(condensed(&printable(&" ".repeat(15))), " ".repeat(15));
        assert_eq!(condensed("aaaaaaaaaaaaaaaa-b"), "[16 × 'a']-b");
        assert_eq!(condensed("héééééééééééééééé!"), "h[16 × 'é']!");
        assert_eq!(condensed(""), "");
    }
}
