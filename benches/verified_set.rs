//! Verified vs. plain writes against a real local immudb (started here, on loopback).
//!
//! For batch sizes 1, 10, 100 and 1000 it measures records/s of `verified_set` (VerifiableSet,
//! every proof check, the trusted state saved with fsync) and of the unverified `set`, both as
//! one transaction per batch, and prints the median of several runs side by side with the
//! ratio. Runs alternate between the two modes so drift (server warm-up, disk) hits both alike.
//!
//! `cargo bench --bench verified_set` (needs immudb: scripts/install-immudb.sh).
//! `BT2IMMU_BENCH_RUNS` changes the number of runs (default 5).

use std::time::{Duration, Instant};

use bt2immu::immudb::client::{ClientConfig, ImmuClient, SetMode};
use bt2immu::immudb::server::{LocalImmudb, LocalImmudbOptions};

const PASSWORD: &str = "Bench-Pw-1!";
const VALUE_LEN: usize = 200;

/// Records written per run for a batch size: enough transactions to smooth out noise while
/// keeping the whole benchmark at about a minute.
fn records_per_run(batch: usize) -> usize {
    match batch {
        1 => 300,
        10 => 2_000,
        100 => 10_000,
        _ => 20_000,
    }
}

fn batch_of(run: &str, start: usize, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (start..start + n)
        .map(|i| {
            let key = format!("bench:{run}:{i:09}").into_bytes();
            let mut value = format!("{{\"seq\":{i},\"line\":\"").into_bytes();
            value.resize(VALUE_LEN - 2, b'x');
            value.extend_from_slice(b"\"}");
            (key, value)
        })
        .collect()
}

async fn run_once(client: &ImmuClient, verified: bool, batch: usize, tag: &str) -> f64 {
    let total = records_per_run(batch);
    let batches: Vec<_> = (0..total / batch)
        .map(|b| batch_of(tag, b * batch, batch))
        .collect();
    let t0 = Instant::now();
    for kvs in &batches {
        if verified {
            client
                .verified_set(kvs, SetMode::Upsert)
                .await
                .expect("verified_set");
        } else {
            client.set(kvs, SetMode::Upsert).await.expect("set");
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    (batches.len() * batch) as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let runs: usize = std::env::var("BT2IMMU_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let server = LocalImmudb::start(LocalImmudbOptions {
        admin_password: Some(PASSWORD.into()),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("starting immudb: {e}"));
    let state = std::env::temp_dir().join(format!("bt2immu-bench-state-{}", std::process::id()));
    let mut config = ClientConfig::new("127.0.0.1", server.port(), &state);
    config.password = PASSWORD.into();
    config.request_timeout = Duration::from_secs(120);
    let client = ImmuClient::connect(config).await.expect("connect");
    // Warm-up (first transaction, trusted state created).
    client
        .verified_set(&batch_of("warmup", 0, 10), SetMode::Upsert)
        .await
        .expect("warm-up");

    println!(
        "immudb {} on 127.0.0.1, synced writes, {VALUE_LEN}-byte values, median of {runs} runs",
        bt2immu::immudb::server::IMMUDB_VERSION
    );
    println!(
        "{:>6}  {:>16}  {:>16}  {:>6}",
        "batch", "verified rec/s", "plain rec/s", "ratio"
    );
    for batch in [1usize, 10, 100, 1000] {
        let (mut v, mut p) = (Vec::new(), Vec::new());
        for r in 0..runs {
            v.push(run_once(&client, true, batch, &format!("v{batch}-{r}")).await);
            p.push(run_once(&client, false, batch, &format!("p{batch}-{r}")).await);
        }
        let (v, p) = (median(v), median(p));
        println!("{batch:>6}  {v:>16.0}  {p:>16.0}  {:>6.2}", v / p);
    }
    client.close().await;
    drop(server);
    let _ = std::fs::remove_dir_all(state);
}
