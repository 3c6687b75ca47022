//! Robustness: `ingest` must not invent provenance.
//!
//! Replayed output carries a pid; the shaper looks that pid up in *today's* /proc
//! (`/proc/<pid>/exe`) and stores whatever process has the pid now as the event's `exe`. For a
//! recorded capture that is invented data: the record claims an executable the line never
//! named (here: the test binary itself; by hand, e.g. the immudb server's binary).
//!
//! Reproduction: a script printing `printf("%-6d %s\n", pid, comm)`, and an input line
//! `<pid of some running process>      bash`; `bt2immu ingest --script s.bt in.txt` → the
//! record has `"exe": "<that process's binary>"`.

mod common;

use std::process::Command;

use common::{server, ADMIN_PASSWORD};

#[tokio::test(flavor = "multi_thread")]
async fn ingest_does_not_take_exe_from_todays_proc() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let pw = work.path().join("pw");
    std::fs::write(&pw, format!("{ADMIN_PASSWORD}\n")).unwrap();
    let script = work.path().join("s.bt");
    std::fs::write(
        &script,
        "BEGIN { printf(\"%-6s %s\\n\", \"PID\", \"COMM\"); }\n\
         kprobe:do_nanosleep { printf(\"%-6d %s\\n\", pid, comm); }\n",
    )
    .unwrap();
    let me = std::process::id();
    let input = work.path().join("in.txt");
    std::fs::write(&input, format!("PID    COMM\n{me:<6} bash\n")).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bt2immu"))
            .args(args)
            .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
            .arg(srv.port().to_string())
            .arg("--password-file")
            .arg(&pw)
            .arg("--state-dir")
            .arg(&state)
            .env_remove("BT2IMMU_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(&[
        "ingest",
        "--source",
        "prov",
        "--script",
        script.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = run(&["query", "--prefix", "prov:"]);
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ev = rows
        .iter()
        .find(|r| r["value"]["kind"] == "event")
        .unwrap_or_else(|| panic!("no event record: {rows:?}"));
    assert_eq!(ev["value"]["pid"], serde_json::json!(me));
    assert!(
        ev["value"].get("exe").is_none(),
        "ingest invented an exe for pid {me}: {}",
        ev["value"]
    );
}
