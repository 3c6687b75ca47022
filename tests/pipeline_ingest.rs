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

/// The exact bytes of a field stored with `record::put_bytes`: the string, or `<name>_b64`
/// when the bytes are not UTF-8.
fn field_bytes(v: &Value, name: &str) -> Option<Vec<u8>> {
    match v.get(format!("{name}_b64")).and_then(Value::as_str) {
        Some(b64) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        ),
        None => v
            .get(name)
            .and_then(Value::as_str)
            .map(|s| s.as_bytes().to_vec()),
    }
}

/// Whether a line of `len` bytes is stored cut with a head of `head` bytes: only when its tail
/// (the last 65,600 bytes of whole 200-byte chunks, and the partial one) starts after the
/// head's end; otherwise head and tail meet and the line is whole.
fn is_cut(len: usize, head: usize) -> bool {
    len - len % 200 > head + 65_600
}

/// Ingests a capture of `scripts/bashreadline.bt` (rendered with a head of `head` bytes)
/// into a fresh immudb, reads every record back verified, and compares the typed lines with
/// the capture's `.expected` file, byte for byte.
async fn ingest_and_check(session: &str, head: usize) {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let pw = work.path().join("pw");
    std::fs::write(&pw, ADMIN_PASSWORD).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bt2immu"))
        .args(["ingest", "--script"])
        .arg(fixture("scripts/bashreadline.bt"))
        .arg(fixture(&format!("tests/fixtures/readline/{session}.jsonl")))
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
    let expected: Vec<Option<Vec<u8>>> = std::fs::read_to_string(fixture(&format!(
        "tests/fixtures/readline/{session}.expected"
    )))
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
            lines.push((v["seq"].as_u64().unwrap(), v));
        } else {
            assert_ne!(
                v["kind"], "raw",
                "nothing in a clean capture is left raw: {v}"
            );
        }
    }
    lines.sort_by_key(|(seq, _)| *seq);
    assert_eq!(lines.len(), expected.len(), "one record per typed line");
    let mut cut = 0;
    for (i, ((_, v), want)) in lines.iter().zip(&expected).enumerate() {
        let what = format!("{session} line {}", i + 1);
        let line = field_bytes(v, "line").expect("a line field");
        assert_eq!(
            v.get("line_cut"),
            None,
            "{what}: the record keeps the whole head"
        );
        let Some(want) = want else {
            assert_eq!(v["eof"], true, "{what}: {v}");
            assert!(line.is_empty() && v["len"] == 0, "{what}: {v}");
            continue;
        };
        assert_eq!(v.get("eof"), None, "{what}");
        assert_eq!(
            v["len"].as_u64().unwrap() as usize,
            want.len(),
            "{what}: len"
        );
        if !is_cut(want.len(), head) {
            assert_eq!(v["truncated"], false, "{what}");
            assert!(line == *want, "{what}: bytes differ");
            assert_eq!(v.get("tail"), None, "{what}");
            assert_eq!(v.get("tail_offset"), None, "{what}");
        } else {
            // A cut line keeps its head, its real length and its tail, at the offset the
            // protocol defines.
            cut += 1;
            assert_eq!(v["truncated"], true, "{what}");
            assert!(line == want[..head], "{what}: head differs");
            let t0 = want.len() - want.len() % 200 - 65_600;
            assert_eq!(v["tail_offset"].as_u64(), Some(t0 as u64), "{what}");
            let tail = field_bytes(v, "tail").expect("a cut line has a tail");
            assert!(tail == want[t0..], "{what}: tail differs");
        }
    }
    assert_eq!(
        cut,
        expected
            .iter()
            .flatten()
            .filter(|w| is_cut(w.len(), head))
            .count()
    );
    // Keys are scannable by source and host and sorted in time.
    let keys: Vec<&[u8]> = entries.iter().map(|e| e.key.as_slice()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    c.close().await;
}

/// Many small cases and two cut lines (rendered with `--max-line-bytes 16384`; ingest's
/// assembler has the default limit and learns the layout from the capture's B record).
#[tokio::test(flavor = "multi_thread")]
async fn ingest_of_a_real_readline_capture_stores_every_typed_line_exactly() {
    ingest_and_check("session1", 16_400).await;
}

/// A 300,000-byte line captured whole with the default limit.
#[tokio::test(flavor = "multi_thread")]
async fn ingest_of_a_300_kb_typed_line_stores_it_whole() {
    ingest_and_check("session2", 1_048_600).await;
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

/// `query --format table` on a real capture: what a person reading the trail sees. Padding is
/// condensed, a cut line shows its length and its tail, Ctrl-D is named, control characters
/// are escaped, and every record was verified.
#[tokio::test(flavor = "multi_thread")]
async fn the_table_shows_every_typed_line_readably() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let script = fixture("scripts/bashreadline.bt");
    let capture = fixture("tests/fixtures/readline/session1.jsonl");
    let out = bt2immu(
        &[
            "ingest",
            "--script",
            script.to_str().unwrap(),
            capture.to_str().unwrap(),
        ],
        srv.port(),
        &state,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = bt2immu(
        &["query", "--prefix", "bash:", "--format", "table"],
        srv.port(),
        &state,
    );
    let table = String::from_utf8_lossy(&q.stdout);
    let err = String::from_utf8_lossy(&q.stderr);
    assert_eq!(q.status.code(), Some(0), "{err}");
    let rows: Vec<&str> = table.lines().collect();
    assert!(
        rows[0].starts_with("TIME") && rows[0].ends_with("LINE"),
        "{table}"
    );
    let typed: Vec<&str> = rows
        .iter()
        .filter(|r| r.contains(" pts/"))
        .map(|r| r.split_once(" pts/").unwrap().1.split_once("  ").unwrap().1)
        .collect();
    let expected_lines =
        std::fs::read_to_string(fixture("tests/fixtures/readline/session1.expected"))
            .unwrap()
            .lines()
            .count();
    assert_eq!(typed.len(), expected_lines, "{table}");
    // Typed backslashes are doubled; bytes that are not UTF-8 and control characters are
    // \xNN; so the two cannot be confused.
    for want in [
        r#"echo "a \\"quoted\\" \\\\ back\\slash" 'single $HOME' \\\\n"#,
        r": invalid \xff\xfe end",
        r": two\nlines\ttab\x01ctl",
        "[300 × ' ']: padded command",
        "EOF (Ctrl-D: no line)",
        "(empty line)",
        // Cut lines: head, length, where the tail starts, tail; padding condensed in both.
        "[20000 × ' ']: rm -rf /tmp/x",
        "[16400 × ' '] [CUT: 100318 bytes; bytes 34600.. follow:] [65400 × ' ']: rm -rf /tmp/y; #[300 × 'z']",
    ] {
        assert!(typed.contains(&want), "{want:?} not in {typed:#?}");
    }
    let n = rows.len() - 1;
    assert!(
        err.contains(&format!("{n} record(s), each verified")),
        "{err}"
    );
}
