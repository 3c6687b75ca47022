//! Robustness: stopping cleanly when the terminal side goes away.
//!
//! Found by a fresh-user trial: `bt2immu -v run … 2>&1 | tee log` and Ctrl-C kills tee before
//! bt2immu; the log then writes into a broken pipe, the tracing writer panicked ("failed
//! printing to stderr: Broken pipe") and the agent died (exit 1) without its flush and stop
//! records. Found while testing that: `ingest -` on a pipe died of a SIGINT that came before
//! 64 bytes had arrived, and after a SIGINT it hung until its stdin was closed.
//!
//! The `run` test needs root and bpftrace; it fails — never skips — without them.

mod common;

use std::io::Write as _;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{bt2immu, bt2immu_command, dead_port, server, wait_at_most};

fn sigint(child: &Child) {
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn run_stops_cleanly_when_its_log_pipe_is_closed() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (bpftrace); run it with sudo"
    );
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let mut agent = bt2immu_command(
        &[
            "-v",
            "run",
            "--source",
            "lp",
            "-e",
            "BEGIN { printf(\"ready\\n\"); } interval:ms:200 { printf(\"tick %d\\n\", 1); }",
        ],
        srv.port(),
        &state,
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Read the log until the capture runs, then close it, like a killed tee.
    let mut stderr = agent.stderr.take().unwrap();
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&log).contains("recording to immudb") {
        assert!(
            Instant::now() < deadline,
            "never started: {}",
            String::from_utf8_lossy(&log)
        );
        let n = std::io::Read::read(&mut stderr, &mut chunk).unwrap();
        assert!(n > 0, "log ended: {}", String::from_utf8_lossy(&log));
        log.extend_from_slice(&chunk[..n]);
    }
    std::thread::sleep(Duration::from_secs(2));
    drop(stderr);
    std::thread::sleep(Duration::from_secs(2));
    sigint(&agent);
    let status = wait_at_most(&mut agent, Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "no clean stop: {status}");

    // The stop made it into the trail: the agent flushed and wrote its stop record.
    let q = bt2immu(&["query", "--prefix", "lp:"], srv.port(), &state);
    assert_eq!(
        q.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&q.stderr)
    );
    let events: Vec<String> = String::from_utf8_lossy(&q.stdout)
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["value"]["event"].as_str().map(String::from)
        })
        .collect();
    assert!(events.iter().any(|e| e == "agent_stopped"), "{events:?}");
}

#[test]
fn ingest_from_a_pipe_stops_on_sigint_with_its_records_kept() {
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let mut child = bt2immu_command(&["ingest", "--source", "cw", "-"], dead_port(), &state)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads the warnings of the unreachable immudb.
    drop(child.stderr.take());
    let mut stdin = child.stdin.take().unwrap();
    // One short line: less than the 64 bytes the format sniffing used to wait for.
    stdin.write_all(b"kept in the spool\n").unwrap();
    stdin.flush().unwrap();
    let seg = state.join("spool/cw").join(format!("seg-{:020}.log", 1));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read(&seg)
        .unwrap_or_default()
        .windows(17)
        .any(|w| w == b"kept in the spool")
    {
        assert!(
            Instant::now() < deadline,
            "the line never reached the spool"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    if let Some(status) = child.try_wait().unwrap() {
        panic!("bt2immu died while logging into a closed pipe: {status}");
    }
    // stdin stays open: the stop must not wait for its end.
    sigint(&child);
    let status = wait_at_most(&mut child, Duration::from_secs(120));
    drop(stdin);
    // ingest's job is to write: records left in the spool are exit 1 (not a signal death).
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(std::fs::read(&seg)
        .unwrap()
        .windows(17)
        .any(|w| w == b"kept in the spool"));
}
