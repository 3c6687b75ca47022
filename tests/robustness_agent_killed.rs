//! Robustness, on the real kernel: bt2immu killed with SIGKILL (or by the OOM killer) takes
//! its bpftrace with it. Found by an adversarial pass: bpftrace lived on with PPID 1 and its
//! probes attached until its next write hit the closed pipe, next to the bpftrace of the
//! agent started after the crash.
//!
//! Needs root, bpftrace and the immudb binaries; fails — never skips — without them.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{server, ADMIN_PASSWORD};

/// The pids of `pid`'s children (of any of its threads: tokio starts bpftrace from a worker).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        out.extend(
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .split_whitespace()
                .map(|p| p.parse::<u32>().unwrap()),
        );
    }
    out
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn bpftrace_does_not_outlive_a_killed_agent() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (bpftrace); run it with sudo"
    );
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let pw = work.path().join("pw");
    std::fs::write(&pw, format!("{ADMIN_PASSWORD}\n")).unwrap();
    // A program that stays quiet: nothing makes bpftrace write (and find the pipe closed).
    let mut agent = Command::new(env!("CARGO_BIN_EXE_bt2immu"))
        .args([
            "run",
            "-e",
            "BEGIN { printf(\"started %lu\\n\", nsecs); } interval:s:3600 { printf(\"hour\\n\"); }",
            "--immudb-address",
            "127.0.0.1",
            "--immudb-port",
        ])
        .arg(srv.port().to_string())
        .arg("--password-file")
        .arg(&pw)
        .arg("--state-dir")
        .arg(work.path().join("state"))
        .arg("--stdout")
        .env_remove("BT2IMMU_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting bt2immu");
    let stdout = agent.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    // The record of bpftrace's BEGIN line: bpftrace is up and attached.
    loop {
        let line = lines
            .next()
            .expect("bt2immu ended before bpftrace printed")
            .unwrap();
        if line.contains("\"line\":\"started ") {
            break;
        }
    }
    let bpftrace: Vec<u32> = children(agent.id())
        .into_iter()
        .filter(|&p| comm(p).as_deref() == Some("bpftrace"))
        .collect();
    assert_eq!(bpftrace.len(), 1, "one bpftrace child: {bpftrace:?}");
    let bpftrace = bpftrace[0];

    unsafe { libc::kill(agent.id() as i32, libc::SIGKILL) };
    agent.wait().unwrap();
    let start = Instant::now();
    // Gone, or a zombie waiting for init to reap it.
    let alive = || {
        std::fs::read_to_string(format!("/proc/{bpftrace}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    };
    while alive() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !alive(),
        "bpftrace {bpftrace} still runs {:?} after its agent was killed",
        start.elapsed()
    );
}
