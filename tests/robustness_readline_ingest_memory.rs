//! Robustness: `bt2immu ingest --script scripts/bashreadline.bt` of hostile or damaged
//! output — many `P` records whose chunks never come — must not cost memory out of proportion
//! to the input.
//!
//! Measured by hand: 100,000 such records (12.5 MB) took 515 MB peak RSS, 200,000 (25 MB)
//! took 976 MB: ~5 KB per record, 40 times the input. The assembler keeps ~0.9 KB per line
//! in flight, with no bound on how many lines may be in flight; then `flush_stale` (or
//! `finish`) gives all of them up in one go and the pipeline shapes and spools them as one
//! batch of 100,000 records. 100,000 lines that *complete* (or 100,000 garbage lines) stay at
//! ~35 MB.
//!
//! Needs the immudb binaries (`scripts/install-immudb.sh`); fails without them.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{server, ADMIN_PASSWORD};

const ORPHANS: u64 = 60_000;
/// Generous: ten times the input, three times what ingesting as many ordinary records costs.
const LIMIT_KB: u64 = 128 * 1024;

fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn orphan_p_records_do_not_blow_up_memory() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let mut input = String::from("BT2I2 B 200 1048600 65600\n");
    for i in 0..ORPHANS {
        let tid = 100_000 + i;
        input.push_str(&format!(
            "BT2I2 P {tid} {tid} {i} 1 0 1000 1 0 0 4294967295 4294967295 1 \
             uprobe:/usr/bin/bash:readline_internal_teardown pts9 bash\n"
        ));
    }
    let file = work.path().join("orphans.txt");
    std::fs::write(&file, &input).unwrap();
    let pw = work.path().join("pw");
    std::fs::write(&pw, format!("{ADMIN_PASSWORD}\n")).unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bashreadline.bt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bt2immu"))
        .args(["ingest", "-f", "text", "--script", script])
        .args(["--source", "orphans"])
        .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
        .arg(srv.port().to_string())
        .arg("--password-file")
        .arg(&pw)
        .arg("--state-dir")
        .arg(work.path().join("state"))
        .arg(&file)
        .env_remove("BT2IMMU_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    let start = Instant::now();
    let status = loop {
        if let Some(kb) = peak_rss_kb(pid) {
            peak = peak.max(kb);
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "ingest did not finish within 300 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "ingest failed: {stderr}");
    // Every orphan is accounted for as a flagged record.
    assert!(
        stderr.contains(&format!("({ORPHANS} raw,")),
        "not every line in flight was flagged: {stderr}"
    );
    assert!(
        peak <= LIMIT_KB,
        "ingesting {ORPHANS} P records without chunks ({} KB of input) peaked at {peak} KB of \
         memory (limit {LIMIT_KB} KB)",
        input.len() / 1024
    );
}
