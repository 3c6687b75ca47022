//! The pipeline without root: real bpftrace output captured on this machine goes through
//! `bt2immu ingest` into a real immudb, and comes back verified and byte-exact; a replay of
//! records that were committed but never acknowledged creates no duplicates.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bt2immu::immudb::client::SetMode;
use bt2immu::sink::{self, SinkConfig, SinkError, SinkProgress};
use bt2immu::spool::{Entry, Spool};
use common::*;
use serde_json::Value;
use tokio::sync::watch;

fn fixture(path: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn line_bytes(v: &Value) -> Vec<u8> {
    match v.get("line_b64").and_then(Value::as_str) {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        None => v["line"].as_str().unwrap().as_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ingest_of_a_real_readline_capture_stores_every_typed_line_exactly() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let pw = work.path().join("pw");
    std::fs::write(&pw, ADMIN_PASSWORD).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bt2immu"))
        .args(["ingest", "--script"])
        .arg(fixture("scripts/bashreadline.bt"))
        .arg(fixture("tests/fixtures/readline/session1.jsonl"))
        .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
        .arg(srv.port().to_string())
        .arg("--password-file")
        .arg(&pw)
        .arg("--state-dir")
        .arg(work.path().join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ingest failed: {stderr}");

    // The typed bytes, as hex per line (`EOF` for Ctrl-D), in order.
    let expected: Vec<Option<Vec<u8>>> =
        std::fs::read_to_string(fixture("tests/fixtures/readline/session1.expected"))
            .unwrap()
            .lines()
            .map(|l| (l != "EOF").then(|| hex::decode(l).unwrap()))
            .collect();

    let c = client(srv.port(), &work.path().join("reader")).await;
    let entries = c.scan_all(b"bash:", 500).await.unwrap();
    let mut lines = Vec::new();
    for e in &entries {
        let verified = c.verified_get(&e.key).await.unwrap();
        assert_eq!(verified.value, e.value);
        let v: Value = serde_json::from_slice(&e.value).unwrap();
        assert_eq!(v["v"], 1);
        if v["kind"] == "readline" {
            let eof = v.get("eof").and_then(Value::as_bool).unwrap_or(false);
            let b = line_bytes(&v);
            if !v["truncated"].as_bool().unwrap() {
                assert_eq!(v["len"].as_u64().unwrap() as usize, b.len(), "{v}");
            }
            lines.push((v["seq"].as_u64().unwrap(), (!eof).then_some(b), v));
        } else {
            assert_ne!(
                v["kind"], "raw",
                "nothing in a clean capture is left raw: {v}"
            );
        }
    }
    lines.sort_by_key(|(seq, _, _)| *seq);
    assert_eq!(lines.len(), expected.len(), "one record per typed line");
    for ((_, got, v), want) in lines.iter().zip(&expected) {
        match (got, want) {
            (Some(g), Some(w)) if v["truncated"] == true => {
                // A cut line keeps its head, its real length and its tail.
                assert!(w.starts_with(g), "head of a cut line");
                assert_eq!(v["len"].as_u64().unwrap() as usize, w.len());
                let tail = v["tail"].as_str().unwrap().as_bytes();
                assert!(w.ends_with(tail), "tail of a cut line");
            }
            _ => assert_eq!(got, want, "{v}"),
        }
    }
    // Keys are scannable by source and host and sorted in time.
    let keys: Vec<&[u8]> = entries.iter().map(|e| e.key.as_slice()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    c.close().await;
}

fn entry(seq: u64, value: &str) -> Entry {
    Entry {
        seq,
        key: format!("replay:host:{seq:016}").into_bytes(),
        value: value.as_bytes().to_vec(),
    }
}

async fn drain(
    c: &bt2immu::immudb::client::ImmuClient,
    spool: &Arc<Mutex<Spool>>,
) -> Result<sink::SinkStats, SinkError> {
    let reader = spool.lock().unwrap().reader();
    let (_drain_tx, drain_rx) = watch::channel(true);
    let (_abandon_tx, abandon_rx) = watch::channel(false);
    let (progress_tx, _progress_rx) = watch::channel(SinkProgress::default());
    sink::run(
        c,
        spool.clone(),
        reader,
        SinkConfig {
            max_batch: 64,
            ..Default::default()
        },
        drain_rx,
        abandon_rx,
        progress_tx,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_after_a_lost_ack_writes_no_duplicates_and_a_changed_value_is_an_alarm() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let c = client(srv.port(), &work.path().join("trust")).await;
    let (spool, _) = Spool::open(work.path().join("spool")).unwrap();
    let spool = Arc::new(Mutex::new(spool));
    let entries: Vec<Entry> = (1..=250)
        .map(|i| entry(i, &format!("record {i}")))
        .collect();
    spool.lock().unwrap().append(&entries).unwrap();

    // The first 100 were committed by a run that died before acknowledging them.
    let committed: Vec<(Vec<u8>, Vec<u8>)> = entries[..100]
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    c.verified_set(&committed, SetMode::MustNotExist)
        .await
        .unwrap();

    let stats = drain(&c, &spool).await.unwrap();
    assert_eq!(stats.already_present, 100);
    assert_eq!(stats.written, 150);
    assert_eq!(spool.lock().unwrap().acked(), 250);
    let stored = c.scan_all(b"replay:", 1000).await.unwrap();
    assert_eq!(stored.len(), 250, "exactly one copy of each record");
    for (s, e) in stored.iter().zip(&entries) {
        assert_eq!((&s.key, &s.value), (&e.key, &e.value));
        assert_eq!(s.revision, 1, "never written twice");
    }

    // A record whose key already holds *other* bytes: the trail was altered.
    let forged = entry(251, "forged");
    c.verified_set(
        &[(forged.key.clone(), b"something else".to_vec())],
        SetMode::Upsert,
    )
    .await
    .unwrap();
    spool.lock().unwrap().append(&[forged]).unwrap();
    let err = drain(&c, &spool).await.unwrap_err();
    assert!(matches!(err, SinkError::Conflict { .. }), "{err}");
    assert!(err.is_tampering());
    assert_eq!(spool.lock().unwrap().acked(), 250, "nothing acknowledged");
    c.close().await;
}
