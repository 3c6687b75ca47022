//! Robustness: `Lost N events` counts near u64::MAX.
//!
//! bpftrace text output is ambiguous by nature: any script line shaped like `Lost N events` is
//! read as a loss report (HACKING.md). Two of them whose counts add up past u64::MAX make the
//! pipeline's counter overflow: in a debug build `bt2immu ingest` panics ("attempt to add with
//! overflow", src/pipeline.rs `lost`), exit code 101, and the records of that input chunk never
//! reach the spool; a release build wraps the counter silently and reports a wrong total.
//!
//! Reproduction: `printf 'Lost 18446744073709551615 events\nLost 1 events\nafter\n' >
//! x.txt; bt2immu ingest x.txt …` → panic.

mod common;

use std::process::Command;

use common::{server, ADMIN_PASSWORD};

#[tokio::test(flavor = "multi_thread")]
async fn huge_lost_counts_do_not_panic_and_are_all_recorded() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let pw = work.path().join("pw");
    std::fs::write(&pw, format!("{ADMIN_PASSWORD}\n")).unwrap();
    let input = work.path().join("in.txt");
    std::fs::write(
        &input,
        b"Lost 18446744073709551615 events\nLost 1 events\nafter\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bt2immu"))
            .args(args)
            .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
            .arg(srv.port().to_string())
            .arg("--password-file")
            .arg(&pw)
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_BACKTRACE", "0")
            .env_remove("BT2IMMU_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(&["ingest", "--source", "lost", input.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "bt2immu panicked: {stderr}");
    assert!(out.status.success(), "{stderr}");

    let q = run(&["query", "--prefix", "lost:"]);
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses = rows.iter().filter(|r| r["value"]["kind"] == "loss").count();
    assert_eq!(losses, 2, "both loss lines must become loss records");
    assert!(rows.iter().any(|r| r["value"]["line"] == "after"));
}
