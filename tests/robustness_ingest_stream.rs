//! Robustness: `bpftrace -f json x.bt | bt2immu ingest -` (the example in `bt2immu --help`).
//!
//! `ingest` reads stdin *to the end* before decoding anything (src/app.rs `read_to_end`), so
//! with a live bpftrace on the other side of the pipe nothing reaches the spool or immudb while
//! it runs, memory grows without bound, and stopping it (SIGTERM, Ctrl-C, a crash, OOM) loses
//! every line captured so far — nothing was ever made durable.
//!
//! Reproduction: `(for i in $(seq 50); do echo "piped line $i"; sleep 0.1; done; sleep 30) |
//! bt2immu ingest … -`; after 8 s the spool directory does not even exist and `query` finds
//! 0 records; `kill -TERM` the ingest and the 50 lines are gone.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{server, ADMIN_PASSWORD};

fn spooled_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_stdin_is_spooled_while_the_pipe_is_open() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let pw = work.path().join("pw");
    std::fs::write(&pw, format!("{ADMIN_PASSWORD}\n")).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_bt2immu"))
        .args(["ingest", "--source", "stream"])
        .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
        .arg(srv.port().to_string())
        .arg("--password-file")
        .arg(&pw)
        .arg("--state-dir")
        .arg(&state)
        .arg("-")
        .env_remove("BT2IMMU_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..50 {
        writeln!(stdin, "streamed line {i}").unwrap();
    }
    stdin.flush().unwrap();

    // The pipe stays open, as it does with a running bpftrace.
    let spool = state.join("spool").join("stream");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut bytes = 0;
    while Instant::now() < deadline {
        bytes = spooled_bytes(&spool);
        if bytes > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(stdin);
    assert!(
        bytes > 0,
        "10 s after 50 lines were written to ingest's stdin, none of them is in the spool"
    );
}
