//! Helpers shared by the `client_*` integration tests: a real immudb per test, client configs
//! with private state dirs, re-running this test binary as a child process, and immuclient.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use bt2immu::immudb::client::{ClientConfig, ImmuClient};
use bt2immu::immudb::server::{immudb_binary, LocalImmudb, LocalImmudbOptions};

/// Password of the `immudb` user on test servers (not the default, so no CLI asks to change it).
pub const ADMIN_PASSWORD: &str = "Bt2immu-Test-1!";

/// A fresh immudb (own data dir, free port). Fails the test if immudb is not installed.
pub async fn server() -> LocalImmudb {
    server_with(LocalImmudbOptions::default()).await
}

pub async fn server_with(mut opts: LocalImmudbOptions) -> LocalImmudb {
    opts.admin_password
        .get_or_insert_with(|| ADMIN_PASSWORD.to_string());
    LocalImmudb::start(opts)
        .await
        .unwrap_or_else(|e| panic!("starting immudb: {e}"))
}

/// A client config for `port` with its trusted state in `state_dir`.
pub fn config(port: u16, state_dir: &Path) -> ClientConfig {
    let mut c = ClientConfig::new("127.0.0.1", port, state_dir);
    c.password = ADMIN_PASSWORD.into();
    c.request_timeout = Duration::from_secs(60);
    c
}

pub async fn client(port: u16, state_dir: &Path) -> ImmuClient {
    ImmuClient::connect(config(port, state_dir))
        .await
        .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"))
}

/// `n` key/value pairs `{prefix}-{i:06}` → a value with bytes that need care (NUL, newline,
/// invalid UTF-8, quotes).
pub fn records(prefix: &str, start: usize, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (start..start + n)
        .map(|i| {
            let key = format!("{prefix}-{i:06}").into_bytes();
            let mut value = format!("record {i} \"quoted\" \\ tab\t").into_bytes();
            value.extend_from_slice(&[0, b'\n', 0xff, 0xfe, (i % 251) as u8]);
            (key, value)
        })
        .collect()
}

/// Runs the `#[ignore]`d test `name` of this same test binary as a separate process with
/// `envs`, and returns its output. The child sees `BT2IMMU_TEST_CHILD=1`.
pub fn run_child(name: &str, envs: &[(&str, String)]) -> Output {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("BT2IMMU_TEST_CHILD", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("running the test binary as a child")
}

/// Spawns the child without waiting (for concurrent children).
pub fn spawn_child(name: &str, envs: &[(&str, String)]) -> std::process::Child {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("BT2IMMU_TEST_CHILD", "1")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawning the test binary as a child")
}

/// A required environment variable of a child process.
pub fn child_env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("child test needs ${name}; it is run by its parent test"))
}

/// Runs immuclient against 127.0.0.1:`port` with HOME and cwd in `home` (its token and state
/// files land there).
pub fn immuclient(port: u16, home: &Path, args: &[&str]) -> Output {
    let bin = immudb_binary("immuclient").unwrap_or_else(|e| panic!("{e}"));
    Command::new(bin)
        .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
        .arg(port.to_string())
        .args([
            "--username",
            "immudb",
            "--password",
            ADMIN_PASSWORD,
            "--database",
            "defaultdb",
        ])
        .args(args)
        .env("HOME", home)
        .env_remove("IMMUCLIENT_SERVER_SIGNING_PUB_KEY")
        .current_dir(home)
        .output()
        .expect("running immuclient")
}

/// All files of a directory (non-recursive) with their bytes, sorted by name; empty `*.lock`
/// files (created by merely taking the state lock) are left out.
pub fn snapshot_dir(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !(p.extension().is_some_and(|e| e == "lock") && p.metadata().unwrap().len() == 0)
        })
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

/// Copies a directory tree (the server must be stopped).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// The bt2immu binary set up against the test server on `port`, with the admin password in a
/// file next to `state` and nothing taken from the environment or a config file.
pub fn bt2immu_command(args: &[&str], port: u16, state: &Path) -> Command {
    let pw = state.with_extension("pw");
    std::fs::write(&pw, format!("{ADMIN_PASSWORD}\n")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bt2immu"));
    cmd.args(args)
        .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
        .arg(port.to_string())
        .arg("--password-file")
        .arg(&pw)
        .arg("--state-dir")
        .arg(state)
        .env_remove("IMMUCLIENT_IMMUDB_ADDRESS")
        .env_remove("IMMUCLIENT_IMMUDB_PORT")
        .env_remove("BT2IMMU_CONFIG");
    cmd
}

/// Runs [`bt2immu_command`] to completion.
pub fn bt2immu(args: &[&str], port: u16, state: &Path) -> Output {
    bt2immu_command(args, port, state)
        .output()
        .expect("running bt2immu")
}

/// A loopback port nothing listens on (for "immudb unreachable").
pub fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for the child; a process still there after `limit` is a hang, reported as such.
pub fn wait_at_most(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("bt2immu did not stop within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
