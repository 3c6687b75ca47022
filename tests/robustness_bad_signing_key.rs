//! Robustness: a configuration error is reported as such, at once.
//!
//! A `--server-signing-pub-key` file that is not a PEM public key (garbage, or the private key
//! by mistake) is a configuration error that no retry can fix. Today the sink treats it like an
//! unreachable server: it logs "cannot reach immudb; records stay in the spool, retrying" with
//! backoff — `ingest` gives up only after its 30 s drain timeout with "N records not yet
//! written", and `run` keeps capturing into the spool forever without ever writing.
//!
//! Reproduction: `echo garbage > bad.pub; bt2immu ingest --server-signing-pub-key bad.pub
//! --immudb-address 127.0.0.1 … in.txt` → 30 s of "cannot reach immudb" warnings, exit 1.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{server, ADMIN_PASSWORD};

#[tokio::test(flavor = "multi_thread")]
async fn unparsable_signing_key_fails_fast_with_a_clear_error() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let pw = work.path().join("pw");
    std::fs::write(&pw, format!("{ADMIN_PASSWORD}\n")).unwrap();
    let key = work.path().join("bad.pub");
    std::fs::write(&key, b"garbage\n").unwrap();
    let input = work.path().join("in.txt");
    std::fs::write(&input, b"one\ntwo\n").unwrap();

    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_bt2immu"))
        .args(["ingest", "--source", "key"])
        .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
        .arg(srv.port().to_string())
        .arg("--password-file")
        .arg(&pw)
        .arg("--state-dir")
        .arg(&state)
        .arg("--server-signing-pub-key")
        .arg(&key)
        .arg(&input)
        .env_remove("BT2IMMU_CONFIG")
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("bad.pub"), "{stderr}");
    assert!(
        !stderr.contains("cannot reach immudb"),
        "a bad key file is reported as an unreachable server: {stderr}"
    );
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} to report a configuration error"
    );
}
