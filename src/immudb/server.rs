//! Starting and stopping a real immudb process on loopback.
//!
//! Used by the integration tests (every test gets its own server, data dir and port) and by
//! `bt2immu run`, which starts a local immudb when nothing listens on 127.0.0.1:3322. The server
//! is isolated from the machine it runs on: it listens on 127.0.0.1 only, the pgsql, metrics and
//! web servers are off (so it opens no other port), and `HOME` points at its data dir (immudb
//! reads `$HOME/immudb.toml` if one exists). It is stopped on drop, so a panicking test leaks
//! neither the process nor the port.

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::immudb::proto::immu_service_client::ImmuServiceClient;

/// The immudb release the project is tested against (and `scripts/install-immudb.sh` builds).
pub const IMMUDB_VERSION: &str = "v1.11.1";

/// Environment variable naming a directory that holds `immudb`, `immuclient`, `immuadmin`.
pub const BIN_DIR_ENV: &str = "BT2IMMU_IMMUDB_BIN";

/// How many lines of the server's output we keep for error messages.
const TAIL_LINES: usize = 60;

/// How long a stopping server gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Errors from finding, starting or stopping a local immudb.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "`{name}` not found (looked in {searched}); build it with scripts/install-immudb.sh \
         or point ${BIN_DIR_ENV} at a directory that holds it"
    )]
    BinaryNotFound { name: String, searched: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("immudb exited during startup ({status}); last output:\n{tail}")]
    Exited { status: ExitStatus, tail: String },
    #[error("immudb did not answer Health within {after:?}; last output:\n{tail}")]
    Timeout { after: Duration, tail: String },
    #[error("immudb is not running")]
    NotRunning,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let context = context.into();
    move |source| ServerError::Io { context, source }
}

/// Finds one of immudb's binaries (`immudb`, `immuclient`, `immuadmin`): in `$BT2IMMU_IMMUDB_BIN`
/// if that is set (and only there, so a stale copy on PATH cannot sneak in), else in
/// `~/.cache/bt2immu/immudb-v1.11.1/bin`, else on `PATH`.
pub fn immudb_binary(name: &str) -> Result<PathBuf, ServerError> {
    let mut searched = Vec::new();
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|d| !d.is_empty()) {
        let p = Path::new(&dir).join(name);
        if is_executable(&p) {
            return Ok(p);
        }
        return Err(ServerError::BinaryNotFound {
            name: name.into(),
            searched: format!("${BIN_DIR_ENV}={}", Path::new(&dir).display()),
        });
    }
    if let Some(home) = std::env::var_os("HOME") {
        let dir = Path::new(&home)
            .join(".cache/bt2immu")
            .join(format!("immudb-{IMMUDB_VERSION}"))
            .join("bin");
        let p = dir.join(name);
        if is_executable(&p) {
            return Ok(p);
        }
        searched.push(dir.display().to_string());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if is_executable(&p) {
                return Ok(p);
            }
        }
        searched.push("PATH".into());
    }
    Err(ServerError::BinaryNotFound {
        name: name.into(),
        searched: searched.join(", "),
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// How to start a [`LocalImmudb`]. `Default` gives a fresh temporary data dir, a free port, the
/// default `immudb`/`immudb` credentials and no signing key.
#[derive(Debug, Clone)]
pub struct LocalImmudbOptions {
    /// Data dir to use (created if missing, kept on drop). `None`: a private temporary dir that
    /// is removed when the server is dropped.
    pub data_dir: Option<PathBuf>,
    /// Port on 127.0.0.1. `None`: pick a free one.
    pub port: Option<u16>,
    /// Password of the `immudb` superuser, applied when the system database is created.
    pub admin_password: Option<String>,
    /// PEM file with an ECDSA (P-256) private key: the server then signs every state it sends.
    pub signing_key: Option<PathBuf>,
    /// Where the binaries are; `None`: [`immudb_binary`]'s search.
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for the server to answer `Health`.
    pub startup_timeout: Duration,
    /// Serve gRPC over TLS with this certificate and key (PEM); `ca` is what the readiness
    /// probe trusts.
    pub tls: Option<LocalTls>,
    /// Further command-line arguments, appended last.
    pub extra_args: Vec<String>,
}

/// Server-side TLS files for [`LocalImmudbOptions::tls`] (PEM).
#[derive(Debug, Clone)]
pub struct LocalTls {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub ca: PathBuf,
}

impl Default for LocalImmudbOptions {
    fn default() -> Self {
        Self {
            data_dir: None,
            port: None,
            admin_password: None,
            signing_key: None,
            bin_dir: None,
            startup_timeout: Duration::from_secs(30),
            tls: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running immudb child process. Dropping it stops the server (SIGTERM, then SIGKILL after a
/// grace period) and removes its data dir if it was a temporary one.
pub struct LocalImmudb {
    opts: LocalImmudbOptions,
    binary: PathBuf,
    data_dir: PathBuf,
    port: u16,
    temp_root: Option<PathBuf>,
    child: Option<Child>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl std::fmt::Debug for LocalImmudb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalImmudb")
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("pid", &self.pid())
            .finish()
    }
}

impl LocalImmudb {
    /// Starts immudb and waits until it answers `Health`.
    pub async fn start(opts: LocalImmudbOptions) -> Result<Self, ServerError> {
        let binary = match &opts.bin_dir {
            Some(dir) => {
                let p = dir.join("immudb");
                if !is_executable(&p) {
                    return Err(ServerError::BinaryNotFound {
                        name: "immudb".into(),
                        searched: dir.display().to_string(),
                    });
                }
                p
            }
            None => immudb_binary("immudb")?,
        };
        let (data_dir, temp_root) = match &opts.data_dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .map_err(io_err(format!("creating data dir {}", d.display())))?;
                (d.clone(), None)
            }
            None => {
                let root = make_temp_dir()?;
                let data = root.join("data");
                std::fs::create_dir(&data)
                    .map_err(io_err(format!("creating data dir {}", data.display())))?;
                (data, Some(root))
            }
        };
        let mut server = Self {
            port: opts.port.unwrap_or(0),
            opts,
            binary,
            data_dir,
            temp_root,
            child: None,
            tail: Arc::new(Mutex::new(VecDeque::new())),
        };
        // A port picked by us can be taken by someone else between our probe and immudb's bind;
        // then immudb exits at once and we try another one.
        let attempts = if server.opts.port.is_some() { 1 } else { 3 };
        let mut last = None;
        for _ in 0..attempts {
            if server.opts.port.is_none() {
                server.port = free_port()?;
            }
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(e @ ServerError::Exited { .. })
                    if e.to_string().contains("address already in use") =>
                {
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ServerError::NotRunning))
    }

    /// The port on 127.0.0.1 the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always `127.0.0.1`.
    pub fn address(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The gRPC endpoint, `http://127.0.0.1:PORT` (`https` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's data dir (`--dir`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines the server printed (stdout and stderr interleaved).
    pub fn output_tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Stops the server (SIGTERM, SIGKILL after a grace period) and waits for it to exit. The
    /// data dir is kept, so [`start_again`](Self::start_again) serves the same data.
    pub fn stop(&mut self) -> Result<(), ServerError> {
        if let Some(child) = self.child.take() {
            terminate(child).map_err(io_err("stopping immudb"))?;
        }
        Ok(())
    }

    /// Starts the server again on the same data dir and port after [`stop`](Self::stop).
    pub async fn start_again(&mut self) -> Result<(), ServerError> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn_and_wait().await
    }

    /// Stop, then start again on the same data dir and port.
    pub async fn restart(&mut self) -> Result<(), ServerError> {
        self.stop()?;
        self.start_again().await
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--dir")
            .arg(&self.data_dir)
            .args(["--address", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args([
                "--pgsql-server=false",
                "--metrics-server=false",
                "--web-server=false",
            ]);
        if let Some(pw) = &self.opts.admin_password {
            // Through the environment (immudb's twin of --admin-password), never argv: any
            // local user can read a command line in `ps`, only root can read the environment.
            cmd.env("IMMUDB_ADMIN_PASSWORD", pw);
        }
        if let Some(key) = &self.opts.signing_key {
            cmd.arg("--signingKey").arg(key);
        }
        if let Some(tls) = &self.opts.tls {
            cmd.arg("--certificate")
                .arg(&tls.certificate)
                .arg("--pkey")
                .arg(&tls.private_key);
        }
        cmd.args(&self.opts.extra_args)
            .env("HOME", &self.data_dir)
            .current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group: a Ctrl-C at the terminal goes to bt2immu, which must still be
        // able to flush into this server before stopping it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    async fn spawn_and_wait(&mut self) -> Result<(), ServerError> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut child = self
            .command()
            .spawn()
            .map_err(io_err(format!("starting {}", self.binary.display())))?;
        if let Some(out) = child.stdout.take() {
            collect_tail(out, self.tail.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect_tail(err, self.tail.clone());
        }
        self.child = Some(child);

        let deadline = Instant::now() + self.opts.startup_timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().map_err(io_err("waiting for immudb"))? {
                    self.child = None;
                    // Let the reader threads drain the pipes.
                    std::thread::sleep(Duration::from_millis(50));
                    return Err(ServerError::Exited {
                        status,
                        tail: self.output_tail(),
                    });
                }
            }
            if health_ok(self.port, self.opts.tls.as_ref()).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail = self.output_tail();
                let _ = self.stop();
                return Err(ServerError::Timeout {
                    after: self.opts.startup_timeout,
                    tail,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for LocalImmudb {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Some(root) = self.temp_root.take() {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

/// One unauthenticated `Health` call with a short timeout.
async fn health_ok(port: u16, tls: Option<&LocalTls>) -> bool {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let Ok(mut endpoint) =
        tonic::transport::Endpoint::from_shared(format!("{scheme}://127.0.0.1:{port}"))
    else {
        return false;
    };
    if let Some(tls) = tls {
        let Ok(ca) = std::fs::read(&tls.ca) else {
            return false;
        };
        let cfg = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("127.0.0.1");
        let Ok(e) = endpoint.tls_config(cfg) else {
            return false;
        };
        endpoint = e;
    }
    let endpoint = endpoint
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2));
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let mut client = ImmuServiceClient::new(channel);
    matches!(client.health(()).await, Ok(r) if r.get_ref().status)
}

/// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL.
fn terminate(mut child: Child) -> std::io::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain kill(2) on our own child's pid; the child has not been reaped yet (try_wait
    // above returned None and nobody else waits on it), so the pid cannot have been reused.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// Reads a child's output on a thread and keeps the last [`TAIL_LINES`] lines; also forwards
/// them to `tracing` at debug level.
fn collect_tail(pipe: impl Read + Send + 'static, tail: Arc<Mutex<VecDeque<String>>>) {
    std::thread::spawn(move || {
        let reader = BufReader::new(pipe);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            tracing::debug!(target: "bt2immu::immudb::server", "{line}");
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
}

/// A port that was free a moment ago. Ports handed out by this process are remembered so two
/// servers started at the same time in one process never get the same one.
fn free_port() -> Result<u16, ServerError> {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    for _ in 0..50 {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(io_err("probing for a free port"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("probing for a free port"))?
            .port();
        if given.lock().unwrap_or_else(|p| p.into_inner()).insert(port) {
            return Ok(port);
        }
    }
    Err(ServerError::Io {
        context: "probing for a free port".into(),
        source: std::io::Error::other("no unused port found"),
    })
}

/// A fresh private (0700) directory under the system temp dir.
fn make_temp_dir() -> Result<PathBuf, ServerError> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!("bt2immu-immudb-{}-{n}-{nanos}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
        }
    }
    Err(ServerError::Io {
        context: "creating a temporary data dir".into(),
        source: std::io::Error::other("too many collisions"),
    })
}
