//! The cost of one trusted-state save, as the verified client pays it after every call.
//!
//! Saves 200 consecutive states under one lock (as 200 verified calls would), checks that each
//! one reads back exactly, and prints the median and 90th percentile of the save time. Run with
//! `cargo test --test state_save_timing -- --nocapture` to see the figures; the state directory
//! is created under the crate's `target/` so it is on the same file system as a real one would
//! be (not on a tmpfs, where fsync costs nothing).

use std::time::{Duration, Instant};

use bt2immu::immudb::state::{StateSignature, StateStore, TrustedState};

const UUID: &str = "cs6ipnvmt7c7s4ihu2ag";
const SAVES: u64 = 200;

fn state(tx_id: u64) -> TrustedState {
    let mut tx_hash = [0u8; 32];
    tx_hash[..8].copy_from_slice(&tx_id.to_be_bytes());
    TrustedState {
        db: "defaultdb".into(),
        tx_id,
        tx_hash,
        // the size of a real immudb signature: SEC1 P-256 key and a DER ECDSA signature
        signature: Some(StateSignature {
            public_key: vec![4; 65],
            signature: vec![0x30; 71],
        }),
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

#[test]
fn two_hundred_saves_read_back_and_are_timed() {
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let tmp = tempfile::tempdir_in(base).unwrap();
    let store = StateStore::new(tmp.path().join("states")).unwrap();
    let guard = store.lock(UUID, "defaultdb").unwrap();
    // the first save creates the file; it is not what every call pays
    guard.save(&state(1)).unwrap();
    let mut times = Vec::with_capacity(SAVES as usize);
    for tx in 2..SAVES + 2 {
        let st = state(tx);
        let t0 = Instant::now();
        guard.save(&st).unwrap();
        times.push(t0.elapsed());
        assert_eq!(guard.load().unwrap(), Some(st), "tx {tx}");
    }
    drop(guard);
    let again = store.lock(UUID, "defaultdb").unwrap();
    assert_eq!(again.load().unwrap(), Some(state(SAVES + 1)));
    times.sort();
    println!(
        "state save: {SAVES} saves, median {:?}, p90 {:?}, max {:?}",
        percentile(&times, 50),
        percentile(&times, 90),
        times[times.len() - 1]
    );
}
