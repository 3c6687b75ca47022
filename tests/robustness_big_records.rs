//! Robustness: input lines whose records do not fit the limits further down the pipeline
//! (immudb / gRPC message size 32 MiB, the spool's 40 MiB frame limit).
//!
//! Found while trying to break `bt2immu ingest` with large and odd lines. Each test feeds one
//! oversized line followed by a normal one and requires that the normal one still arrives and
//! that the state dir stays usable.

mod common;

use std::path::Path;
use std::process::Output;

use common::{bt2immu, server};

fn query_lines(port: u16, state: &Path, prefix: &str) -> (Output, Vec<serde_json::Value>) {
    let out = bt2immu(
        &["query", "--prefix", prefix, "--limit", "100000"],
        port,
        state,
    );
    let rows = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect();
    (out, rows)
}

fn has_line(rows: &[serde_json::Value], line: &str) -> bool {
    rows.iter()
        .any(|r| r["value"]["line"].as_str() == Some(line))
}

/// A 6 MB line of control bytes becomes a ~36 MB JSON value (each byte is escaped as
/// `\u0001`): larger than immudb accepts. Today the sink retries that batch forever, so the
/// record and every record after it are never delivered (ingest exits 1 after 30 s, and every
/// later start is stuck on the same batch).
#[tokio::test(flavor = "multi_thread")]
async fn oversized_record_does_not_block_the_records_after_it() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let input = work.path().join("in.txt");
    let mut data = vec![0x01u8; 6_000_000];
    data.extend_from_slice(b"\nafter the big line\n");
    std::fs::write(&input, &data).unwrap();

    let out = bt2immu(
        &["ingest", "--source", "big", input.to_str().unwrap()],
        srv.port(),
        &state,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ingest failed: {stderr}");
    let (_, rows) = query_lines(srv.port(), &state, "big:");
    assert!(
        has_line(&rows, "after the big line"),
        "the line after the oversized one never reached immudb"
    );
}

/// A 12 MB line of invalid UTF-8 is stored readable (`\xff` per byte, 4x) plus base64: a
/// spool frame of ~76 MB, over the spool's own 40 MiB frame limit. The append succeeds, but
/// reading it back reports "spool is corrupted ... implausible frame length", and from then on
/// the spool cannot even be opened: the source is bricked and nothing after the line arrives.
#[tokio::test(flavor = "multi_thread")]
async fn long_invalid_utf8_line_does_not_brick_the_spool() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let input = work.path().join("in.txt");
    let mut data = vec![0xffu8; 12_000_000];
    data.extend_from_slice(b"\nafter the big line\n");
    std::fs::write(&input, &data).unwrap();

    let first = bt2immu(
        &["ingest", "--source", "ff", input.to_str().unwrap()],
        srv.port(),
        &state,
    );
    let empty = work.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let second = bt2immu(
        &["ingest", "--source", "ff", empty.to_str().unwrap()],
        srv.port(),
        &state,
    );
    let e1 = String::from_utf8_lossy(&first.stderr);
    let e2 = String::from_utf8_lossy(&second.stderr);
    assert!(
        !e1.contains("corrupted") && !e2.contains("corrupted"),
        "bt2immu corrupted its own spool:\nfirst: {e1}\nsecond: {e2}"
    );
    assert!(second.status.success(), "second start failed: {e2}");
    let (_, rows) = query_lines(srv.port(), &state, "ff:");
    assert!(has_line(&rows, "after the big line"));
}

/// Four 9 MB lines are written fine (one transaction each), but `query` scans them in pages of
/// 1000 entries, and the page (36 MB) exceeds the 32 MiB gRPC limit: the trail cannot be read
/// back with bt2immu at all ("decoded message length too large").
#[tokio::test(flavor = "multi_thread")]
async fn query_reads_back_large_records() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let input = work.path().join("in.txt");
    let mut data = Vec::new();
    for c in [b'a', b'b', b'c', b'd'] {
        data.extend(std::iter::repeat_n(c, 9_000_000));
        data.push(b'\n');
    }
    std::fs::write(&input, &data).unwrap();
    let out = bt2immu(
        &["ingest", "--source", "large", input.to_str().unwrap()],
        srv.port(),
        &state,
    );
    assert!(
        out.status.success(),
        "ingest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (q, rows) = query_lines(srv.port(), &state, "large:");
    assert!(
        q.status.success(),
        "query failed: {}",
        String::from_utf8_lossy(&q.stderr)
    );
    assert_eq!(rows.len(), 4);
}
