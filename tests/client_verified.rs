//! Verified writes and reads against a real immudb: 1,000 records in batches, each batch one
//! verified transaction, every record read back verified, the trusted state on disk advancing,
//! and a separate process picking that state up.

mod common;

use bt2immu::immudb::client::{ClientError, SetMode};
use common::*;

const BATCH: usize = 100;
const TOTAL: usize = 1000;

#[tokio::test(flavor = "multi_thread")]
async fn thousand_records_verified_and_state_carries_over_to_a_new_process() {
    let srv = server().await;
    let state = tempfile::tempdir().unwrap();
    let c = client(srv.port(), state.path()).await;
    assert_eq!(c.trusted_state().await.unwrap(), None);

    let mut last_tx = 0;
    for start in (0..TOTAL).step_by(BATCH) {
        let batch = records("rec", start, BATCH);
        let hdr = c.verified_set(&batch, SetMode::MustNotExist).await.unwrap();
        assert_eq!(hdr.nentries as usize, BATCH);
        assert!(
            hdr.id > last_tx,
            "tx ids must grow: {} after {last_tx}",
            hdr.id
        );
        // The trusted state on disk is now exactly this transaction.
        let (tx, alh) = c.trusted_state().await.unwrap().expect("state saved");
        assert_eq!((tx, alh), (hdr.id, hdr.alh().unwrap()));
        last_tx = hdr.id;
    }

    for (k, v) in records("rec", 0, TOTAL) {
        let e = c.verified_get(&k).await.unwrap();
        assert_eq!((e.key, e.value), (k, v));
    }
    // A read of an old tx leaves the trusted state where it was.
    assert_eq!(c.trusted_state().await.unwrap().unwrap().0, last_tx);

    // Scan sees every record; each scanned record proves with a verified read at its tx.
    let scanned = c.scan_all(b"rec-", 128).await.unwrap();
    assert_eq!(scanned.len(), TOTAL);
    let first = &scanned[0];
    let at = c.verified_get_at(&first.key, first.tx).await.unwrap();
    assert_eq!(at.value, first.value);
    let vtx = c.verified_tx_by_id(first.tx).await.unwrap();
    assert!(vtx.contains(&first.key, &first.value));
    assert!(!vtx.contains(&first.key, b"something else"));

    // A replay of a written batch is refused as a whole, and recognisable as such.
    let err = c
        .verified_set(&records("rec", 0, 3), SetMode::MustNotExist)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::PreconditionFailed(_)), "{err}");
    assert!(!err.is_tampering());
    assert!(matches!(
        c.verified_get(b"no-such-key").await,
        Err(ClientError::KeyNotFound)
    ));
    c.close().await;

    // A new process with the same state dir starts from our state and moves it on.
    let out = run_child(
        "child_continues_from_trusted_state",
        &[
            ("BT2IMMU_TEST_PORT", srv.port().to_string()),
            ("BT2IMMU_TEST_STATE", state.path().display().to_string()),
            ("BT2IMMU_TEST_EXPECT_TX", last_tx.to_string()),
        ],
    );
    assert!(
        out.status.success(),
        "child failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let c2 = client(srv.port(), state.path()).await;
    let (tx, _) = c2.trusted_state().await.unwrap().unwrap();
    assert_eq!(
        tx,
        last_tx + 1,
        "the child's write must have advanced the shared state"
    );
    let e = c2.verified_get(b"from-child").await.unwrap();
    assert_eq!(e.value, b"hello from another process");
    c2.close().await;
}

/// Run as a child process by the test above.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "helper: run as a child process by thousand_records_verified_and_state_carries_over_to_a_new_process"]
async fn child_continues_from_trusted_state() {
    let port: u16 = child_env("BT2IMMU_TEST_PORT").parse().unwrap();
    let state = std::path::PathBuf::from(child_env("BT2IMMU_TEST_STATE"));
    let expect: u64 = child_env("BT2IMMU_TEST_EXPECT_TX").parse().unwrap();
    let c = client(port, &state).await;
    assert_eq!(c.trusted_state().await.unwrap().unwrap().0, expect);
    let e = c.verified_get(b"rec-000999").await.unwrap();
    assert_eq!(e.tx, expect);
    let hdr = c
        .verified_set(
            &[(
                b"from-child".to_vec(),
                b"hello from another process".to_vec(),
            )],
            SetMode::MustNotExist,
        )
        .await
        .unwrap();
    assert_eq!(hdr.id, expect + 1);
    c.close().await;
}

/// The server drops sessions after 2 s here; the client opens a new one and retries, so callers
/// never see "session not found".
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_session_is_reopened_transparently() {
    let srv = server_with(bt2immu::immudb::server::LocalImmudbOptions {
        extra_args: vec![
            "--max-session-age-time=2s".into(),
            "--sessions-guard-check-interval=500ms".into(),
        ],
        ..Default::default()
    })
    .await;
    let state = tempfile::tempdir().unwrap();
    let c = client(srv.port(), state.path()).await;
    c.verified_set(&records("s", 0, 3), SetMode::MustNotExist)
        .await
        .unwrap();
    for round in 1..=2 {
        tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
        let hdr = c
            .verified_set(&records("s", round * 3, 3), SetMode::MustNotExist)
            .await
            .unwrap_or_else(|e| panic!("write after session expiry {round}: {e}"));
        assert_eq!(hdr.id, round as u64 + 1);
    }
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    assert_eq!(c.verified_get(b"s-000000").await.unwrap().tx, 1);
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    assert_eq!(c.scan_all(b"s-", 10).await.unwrap().len(), 9);
    c.close().await;
}
