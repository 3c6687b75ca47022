//! Robustness: damage to fsynced spool frames, and a state dir that is new to the trail.
//!
//! A damaged length field in the middle of the newest segment that points past the end of the
//! file used to be taken for a torn tail: every later, fsynced frame was cut off and the agent
//! recorded one `spool_torn_tail` loss of "count 1" while 8 records were gone. Damage that is
//! not a torn tail used to stop the agent for good; now the spool is moved aside and what
//! still reads back is sent. A wiped state dir used to number records from 1 again, which the
//! query then reported as repeated (forged) records.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bt2immu::spool::{Entry, Spool, SpoolError};
use common::{bt2immu, bt2immu_command, dead_port, server, wait_at_most};

fn entry(seq: u64) -> Entry {
    Entry {
        seq,
        key: format!("k{seq}").into_bytes(),
        value: format!("value number {seq}, fsynced long ago").into_bytes(),
    }
}

/// (offset, payload length) of every frame in a segment.
fn frames(bytes: &[u8]) -> Vec<(usize, u32)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[off..off + 4].try_into().unwrap());
        out.push((off, len));
        off += 8 + len as usize;
    }
    out
}

#[test]
fn damaged_length_mid_segment_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        // Ten separate appends: each one fsynced, as the pipeline does.
        for seq in 1..=10 {
            spool.append(&[entry(seq)]).unwrap();
        }
    }
    let seg = dir.path().join(format!("seg-{:020}.log", 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    let fr = frames(&bytes);
    assert_eq!(fr.len(), 10);
    // Frame 3 claims to run a few bytes past the end of the file.
    let (off, _) = fr[2];
    let bogus = (bytes.len() - off - 8 + 5) as u32;
    bytes[off..off + 4].copy_from_slice(&bogus.to_be_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let len_before = bytes.len() as u64;

    match Spool::open(dir.path()) {
        Err(SpoolError::Corrupted { .. }) => {}
        Ok((spool, rec)) => {
            let kept = spool.reader().read_batch(100, usize::MAX).unwrap().len();
            panic!(
                "damage in front of 8 fsynced frames was treated as a torn tail: cut {} bytes \
                 (file was {len_before}), {kept} of 10 records kept, recovery {rec:?}",
                rec.torn_bytes
            );
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The payload offsets of the frames in the segment whose value contains `needle`.
fn frame_with(bytes: &[u8], needle: &[u8]) -> Option<usize> {
    frames(bytes).into_iter().find_map(|(off, len)| {
        let payload = &bytes[off + 8..off + 8 + len as usize];
        payload
            .windows(needle.len())
            .any(|w| w == needle)
            .then_some(off + 8)
    })
}

/// Spools `lines` with `ingest` while immudb is unreachable, then kills the agent (-9) so
/// they stay unacknowledged in the spool under `state`.
fn spool_unsent(state: &Path, source: &str, lines: &[String]) {
    let mut child = bt2immu_command(&["ingest", "--source", source, "-"], dead_port(), state)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for l in lines {
        stdin.write_all(l.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
    }
    stdin.flush().unwrap();
    let seg = state
        .join("spool")
        .join(source)
        .join(format!("seg-{:020}.log", 1));
    let last = lines.last().unwrap().as_bytes();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read(&seg)
        .ok()
        .and_then(|b| frame_with(&b, last))
        .is_none()
    {
        assert!(Instant::now() < deadline, "lines never reached the spool");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
}

fn ingest_ok(port: u16, state: &Path, source: &str, input: &Path) {
    let out = bt2immu(
        &["ingest", "--source", source, input.to_str().unwrap()],
        port,
        state,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_numbers_unique(rows: &[serde_json::Value]) {
    let mut seqs: Vec<u64> = rows.iter().filter_map(|v| v["seq"].as_u64()).collect();
    let n = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "no number used twice: {seqs:?}");
}

fn trail(port: u16, state: &Path, prefix: &str) -> (std::process::Output, Vec<serde_json::Value>) {
    let q = bt2immu(&["query", "--prefix", prefix], port, state);
    let rows = String::from_utf8_lossy(&q.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["value"].clone())
        .collect();
    (q, rows)
}

/// A bit flipped in a spooled record costs that record, not the recording: the agent moves
/// the damaged spool aside, sends every record that still reads back, writes a
/// `spool_corrupted` loss record naming the lost numbers, and the query explains the gap
/// instead of calling it tampering.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_spool_is_moved_aside_and_what_reads_back_still_reaches_immudb() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let lines: Vec<String> = (1..=10)
        .map(|i| format!("spooled command {i:02}"))
        .collect();
    spool_unsent(&state, "sc", &lines);

    let seg = state.join("spool/sc").join(format!("seg-{:020}.log", 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    let hit = frame_with(&bytes, b"spooled command 03").unwrap();
    bytes[hit + 20] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();

    let empty = work.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let out = bt2immu(
        &["ingest", "--source", "sc", empty.to_str().unwrap()],
        srv.port(),
        &state,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("is damaged"), "{stderr}");
    let moved: Vec<_> = std::fs::read_dir(state.join("spool"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sc.damaged-"))
        .collect();
    assert_eq!(moved.len(), 1, "the damaged spool is kept aside");
    assert_eq!(
        std::fs::read(
            state
                .join("spool")
                .join(&moved[0])
                .join(format!("seg-{:020}.log", 1))
        )
        .unwrap(),
        bytes,
        "kept as it was found"
    );

    let (q, rows) = trail(srv.port(), &state, "sc:");
    let qerr = String::from_utf8_lossy(&q.stderr);
    assert_eq!(q.status.code(), Some(0), "{qerr}");
    assert!(qerr.contains("lost to a damaged spool"), "{qerr}");
    let got: Vec<&str> = rows.iter().filter_map(|v| v["line"].as_str()).collect();
    let want: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| !l.ends_with("03"))
        .collect();
    assert_eq!(got, want, "every record that read back, once, in order");
    let lost_seq = rows
        .iter()
        .find(|v| v["line"] == "spooled command 02")
        .unwrap()["seq"]
        .as_u64()
        .unwrap()
        + 1;
    let loss: Vec<_> = rows
        .iter()
        .filter(|v| v["cause"] == "spool_corrupted")
        .collect();
    assert_eq!(loss.len(), 1, "{rows:?}");
    assert_eq!(loss[0]["count"], 1);
    assert_eq!(
        loss[0]["lost_seqs"],
        serde_json::json!([[lost_seq, lost_seq]])
    );
    let max_seq = rows.iter().filter_map(|v| v["seq"].as_u64()).max().unwrap();
    assert_eq!(
        loss[0]["seq"].as_u64(),
        Some(max_seq),
        "numbers are not reused"
    );
}

/// A new state dir (reinstall, wiped /var/lib) must not number records from 1 again under a
/// prefix that already has them: the query would report repeated records as tampering.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_state_dir_continues_the_numbering_found_in_immudb() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in.txt");
    std::fs::write(&input, b"first install one\nfirst install two\n").unwrap();
    let first = work.path().join("state1");
    ingest_ok(srv.port(), &first, "ns", &input);
    let (_, before) = trail(srv.port(), &first, "ns:");
    let highest = before
        .iter()
        .filter_map(|v| v["seq"].as_u64())
        .max()
        .unwrap();

    std::fs::write(&input, b"second install one\n").unwrap();
    let second = work.path().join("state2");
    let out = bt2immu(
        &["ingest", "--source", "ns", input.to_str().unwrap()],
        srv.port(),
        &second,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("continue after {highest}")),
        "{stderr}"
    );

    let (q, rows) = trail(srv.port(), &second, "ns:");
    let qerr = String::from_utf8_lossy(&q.stderr);
    assert_eq!(q.status.code(), Some(0), "{qerr}");
    assert_numbers_unique(&rows);
    let new = rows
        .iter()
        .find(|v| v["line"] == "second install one")
        .unwrap();
    assert!(new["seq"].as_u64().unwrap() > highest);

    // The first state dir again (two copies, or an old backup): it too continues after what
    // immudb holds instead of reusing the numbers the second one took.
    std::fs::write(&input, b"first install again\n").unwrap();
    ingest_ok(srv.port(), &first, "ns", &input);

    // A new state dir with nothing to write: its numbers start past the last record, and it
    // must still finish (found by an adversarial pass: it waited for ever for a record that
    // would carry the skipped number).
    let empty = work.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let mut child = bt2immu_command(
        &["ingest", "--source", "ns", empty.to_str().unwrap()],
        srv.port(),
        &work.path().join("state3"),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let status = wait_at_most(&mut child, Duration::from_secs(120));
    assert_eq!(status.code(), Some(0));

    let (q, rows) = trail(srv.port(), &first, "ns:");
    let qerr = String::from_utf8_lossy(&q.stderr);
    assert_eq!(q.status.code(), Some(0), "{qerr}");
    assert_numbers_unique(&rows);
}
