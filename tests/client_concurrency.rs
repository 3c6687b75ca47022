//! Several client processes write to one server at the same time, every write and read
//! verified: three share one state dir (serialised by the state file lock), two have their own
//! (each proves against its own, soon outdated, state). No false alarm, nothing lost.

mod common;

use bt2immu::immudb::client::SetMode;
use common::*;

const WRITES: usize = 15;
const BATCH: usize = 10;

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_processes_verify_without_false_alarms() {
    let srv = server().await;
    let shared = tempfile::tempdir().unwrap();
    let own: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut dirs: Vec<std::path::PathBuf> = vec![shared.path().into(); 3];
    dirs.extend(own.iter().map(|d| d.path().to_path_buf()));

    let children: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            spawn_child(
                "child_writer",
                &[
                    ("BT2IMMU_TEST_PORT", srv.port().to_string()),
                    ("BT2IMMU_TEST_STATE", dir.display().to_string()),
                    ("BT2IMMU_TEST_WRITER", i.to_string()),
                ],
            )
        })
        .collect();
    // Meanwhile, this process writes too, through two clients sharing a third state dir.
    let mine = tempfile::tempdir().unwrap();
    let a = client(srv.port(), mine.path()).await;
    let b = client(srv.port(), mine.path()).await;
    let (ra, rb) = tokio::join!(
        async {
            for w in 0..WRITES {
                a.verified_set(&records("p-a", w * BATCH, BATCH), SetMode::MustNotExist)
                    .await?;
            }
            Ok::<_, bt2immu::immudb::client::ClientError>(())
        },
        async {
            for w in 0..WRITES {
                b.verified_set(&records("p-b", w * BATCH, BATCH), SetMode::MustNotExist)
                    .await?;
            }
            Ok::<_, bt2immu::immudb::client::ClientError>(())
        }
    );
    ra.unwrap();
    rb.unwrap();

    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "writer {i} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Every record of every writer is there, verified, and the transactions add up.
    let check_state = tempfile::tempdir().unwrap();
    let check = client(srv.port(), check_state.path()).await;
    for i in 0..dirs.len() {
        let prefix = format!("w{i}");
        let got = check
            .scan_all(format!("{prefix}-").as_bytes(), 100)
            .await
            .unwrap();
        assert_eq!(got.len(), WRITES * BATCH, "records of writer {i}");
        let e = check.verified_get(&got[got.len() - 1].key).await.unwrap();
        assert_eq!(e.value, got[got.len() - 1].value);
    }
    let total_txs = (dirs.len() + 2) * WRITES;
    let state = check.current_state().await.unwrap();
    assert_eq!(state.tx_id as usize, total_txs);
}

/// One writer process; run by the test above.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "helper: run as a child process by concurrent_processes_verify_without_false_alarms"]
async fn child_writer() {
    let port: u16 = child_env("BT2IMMU_TEST_PORT").parse().unwrap();
    let state = std::path::PathBuf::from(child_env("BT2IMMU_TEST_STATE"));
    let me = child_env("BT2IMMU_TEST_WRITER");
    let c = client(port, &state).await;
    let prefix = format!("w{me}");
    for w in 0..WRITES {
        let batch = records(&prefix, w * BATCH, BATCH);
        c.verified_set(&batch, SetMode::MustNotExist)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "writer {me}, write {w}: {e} (tampering: {})",
                    e.is_tampering()
                )
            });
        // Read one back (often older than the state by now: proves backwards).
        let (k, v) = &batch[w % BATCH];
        let e = c
            .verified_get(k)
            .await
            .unwrap_or_else(|e| panic!("writer {me}, read {w}: {e}"));
        assert_eq!(&e.value, v);
    }
    c.close().await;
}
