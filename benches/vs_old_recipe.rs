//! bt2immu's pipeline vs the recipe it replaces, side by side in one run, against the same
//! local immudb.
//!
//! - **bt2immu**: `bt2immu ingest` of real bashreadline output (the capture in
//!   `tests/fixtures/readline/session1.jsonl`, repeated): decode, reassemble, shape, spool
//!   (fsync), verified batched writes with every proof checked.
//! - **old recipe**: what bpftrace's `system("immuclient set ...")` did — one `immuclient`
//!   process per typed line, an unverified `set`, nothing spooled.
//!
//! Prints typed lines per second for both (median of runs) and the ratio.
//! `cargo bench --bench vs_old_recipe` (needs immudb: scripts/install-immudb.sh).

use std::process::Command;
use std::time::Instant;

use bt2immu::immudb::server::{immudb_binary, LocalImmudb, LocalImmudbOptions};

const PASSWORD: &str = "Bench-Pw-1!";
const REPEAT: usize = 150;
const OLD_RECIPE_LINES: usize = 150;
const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The capture again, as if its lines had been typed later: every line id (the entry probe's
/// nsecs) moves by `r` hours, so the assembler does not take a repetition for a replay of
/// lines it has already put together.
fn with_new_line_ids(capture: &[u8], r: u64) -> Vec<u8> {
    const MARK: &[u8] = b"\"data\": \"BT2I2 ";
    let mut out = Vec::with_capacity(capture.len());
    for line in capture.split_inclusive(|&b| b == b'\n') {
        // Edited as text: bpftrace's JSON (field order, its own escapes) must stay as it is.
        let Some(at) = line.windows(MARK.len()).position(|w| w == MARK) else {
            out.extend_from_slice(line);
            continue;
        };
        let body = at + MARK.len();
        // P: kind pid tid id …; C and S: kind tid id …
        let skip = match line.get(body) {
            Some(b'P') => 3,
            Some(b'C' | b'S') => 2,
            _ => {
                out.extend_from_slice(line);
                continue;
            }
        };
        let mut start = body;
        for _ in 0..skip {
            start += line[start..].iter().position(|&b| b == b' ').unwrap() + 1;
        }
        let end = start + line[start..].iter().position(|&b| b == b' ').unwrap();
        let id: u64 = std::str::from_utf8(&line[start..end])
            .unwrap()
            .parse()
            .expect("numeric line id");
        out.extend_from_slice(&line[..start]);
        out.extend_from_slice((id + r * 3_600_000_000_000).to_string().as_bytes());
        out.extend_from_slice(&line[end..]);
    }
    out
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(LocalImmudb::start(LocalImmudbOptions {
            admin_password: Some(PASSWORD.into()),
            ..Default::default()
        }))
        .expect("starting immudb (scripts/install-immudb.sh)");
    let work = tempfile::tempdir().unwrap();
    let pw = work.path().join("pw");
    std::fs::write(&pw, PASSWORD).unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let capture = std::fs::read(root.join("tests/fixtures/readline/session1.jsonl")).unwrap();
    let typed_per_capture =
        std::fs::read_to_string(root.join("tests/fixtures/readline/session1.expected"))
            .unwrap()
            .lines()
            .count();
    let input = work.path().join("input.jsonl");
    let mut repeated = Vec::with_capacity(capture.len() * REPEAT);
    for r in 0..REPEAT {
        repeated.extend(with_new_line_ids(&capture, r as u64));
    }
    std::fs::write(&input, repeated).unwrap();
    let typed = typed_per_capture * REPEAT;

    let mut ours = Vec::new();
    let mut old = Vec::new();
    for run in 0..RUNS {
        let t0 = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_bt2immu"))
            .args(["ingest", "--script"])
            .arg(root.join("scripts/bashreadline.bt"))
            .arg(&input)
            .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
            .arg(server.port().to_string())
            .arg("--password-file")
            .arg(&pw)
            .arg("--state-dir")
            // One state dir for all runs: the agent's sequence goes on, so every run writes
            // new keys (the same capture in a fresh state dir would be a replay).
            .arg(work.path().join("state"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ingest: {stderr}");
        // Every repetition must reassemble: a raw record would mean lines were not counted.
        assert!(
            stderr.contains("(0 raw,"),
            "ingest kept raw records: {stderr}"
        );
        ours.push(typed as f64 / t0.elapsed().as_secs_f64());

        let immuclient = immudb_binary("immuclient").unwrap();
        let home = work.path().join(format!("home-{run}"));
        std::fs::create_dir_all(&home).unwrap();
        let t0 = Instant::now();
        for i in 0..OLD_RECIPE_LINES {
            let st = Command::new(&immuclient)
                .current_dir(&home)
                .env("HOME", &home)
                .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
                .arg(server.port().to_string())
                .args(["--username", "immudb", "--password", PASSWORD])
                .args(["set", &format!("old:{run}:{i}"), "echo typed line"])
                .output()
                .unwrap();
            assert!(
                st.status.success(),
                "immuclient set: {}{}",
                String::from_utf8_lossy(&st.stdout),
                String::from_utf8_lossy(&st.stderr)
            );
        }
        old.push(OLD_RECIPE_LINES as f64 / t0.elapsed().as_secs_f64());
    }
    let (o, p) = (median(ours), median(old));
    println!("typed lines/s, median of {RUNS} runs, immudb v1.11.1 on 127.0.0.1");
    println!("  bt2immu ingest (verified, spooled):      {o:>10.0}  ({typed} lines per run)");
    println!(
        "  immuclient set per line (old recipe):    {p:>10.0}  ({OLD_RECIPE_LINES} lines per run)"
    );
    println!("  ratio bt2immu / old recipe:              {:>10.1}", o / p);
}
