//! Robustness: reading the trail back after someone with write access to the database (the
//! immudb admin, or anyone holding the agent's own credentials) changed or dropped a record.
//!
//! immudb keeps every revision, so such a change is *detectable*; the promise in the README is
//! that nobody "can change or drop a recorded command without it being noticed". Found:
//! `bt2immu query` showed the forged latest revision as `"verified": true` and silently left
//! out logically deleted keys, exiting 0 in both cases; and a deleted *newest* record left no
//! gap in the sequence numbers to see.

mod common;

use std::path::Path;
use std::process::Output;

use bt2immu::immudb::client::SetMode;
use bt2immu::immudb::server::LocalImmudbOptions;
use common::{bt2immu, client, copy_tree, immuclient, server, server_with};

fn rows(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Ingests three lines and returns the keys in seq order.
fn ingest_three(port: u16, work: &Path, state: &Path) -> Vec<String> {
    let input = work.join("in.txt");
    std::fs::write(&input, b"rm -rf /important\nsecond\nthird\n").unwrap();
    let out = bt2immu(
        &["ingest", "--source", "qt", input.to_str().unwrap()],
        port,
        state,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = bt2immu(&["query", "--prefix", "qt:"], port, state);
    assert!(q.status.success());
    let mut r = rows(&q);
    r.sort_by_key(|v| v["value"]["seq"].as_u64());
    assert_eq!(r.len(), 3);
    r.iter()
        .map(|v| v["key"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn query_notices_an_overwritten_record() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let keys = ingest_three(srv.port(), work.path(), &state);

    // The database admin writes a second revision of the first record.
    let forger_state = work.path().join("forger");
    let c = client(srv.port(), &forger_state).await;
    let forged =
        br#"{"v":1,"kind":"event","source":"qt","seq":1,"line":"ls","fields":{},"probe":""}"#;
    c.verified_set(
        &[(keys[0].clone().into_bytes(), forged.to_vec())],
        SetMode::Upsert,
    )
    .await
    .unwrap();
    c.close().await;

    let q = bt2immu(&["query", "--prefix", "qt:"], srv.port(), &state);
    let out = String::from_utf8_lossy(&q.stdout);
    let shows_original = out.contains("rm -rf /important");
    assert!(
        !q.status.success() || shows_original,
        "query presented the forged revision as the verified record and exited 0:\n{out}"
    );
}

/// Deletes `key` the way a database admin can: immudb's logical deletion, with immuclient.
fn admin_deletes(port: u16, work: &Path, key: &str) {
    let home = work.join("ic");
    std::fs::create_dir_all(&home).unwrap();
    let login = immuclient(port, &home, &["login", "immudb"]);
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    let del = immuclient(port, &home, &["delete", key]);
    let del_out = String::from_utf8_lossy(&del.stdout).to_string();
    assert!(
        del_out.contains("deleted"),
        "immuclient delete failed: {del_out} {}",
        String::from_utf8_lossy(&del.stderr)
    );
}

/// The newest record leaves no gap behind it when deleted: the agent's spool acknowledgement
/// in the state dir says how far the trail must go.
#[tokio::test(flavor = "multi_thread")]
async fn query_notices_that_the_newest_record_was_deleted() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let keys = ingest_three(srv.port(), work.path(), &state);
    admin_deletes(srv.port(), work.path(), &keys[2]);

    let q = bt2immu(&["query", "--prefix", "qt:"], srv.port(), &state);
    let err = String::from_utf8_lossy(&q.stderr);
    assert_eq!(q.status.code(), Some(3), "stderr: {err}");
    assert!(
        err.contains("record(s) 3..=3 were written and verified") && err.contains("deleted"),
        "{err}"
    );
    assert_eq!(rows(&q).len(), 2);

    // A prefix that leaves the source out claims nothing about it.
    let other = bt2immu(&["query", "--prefix", "zz:"], srv.port(), &state);
    assert_eq!(
        other.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn query_notices_a_deleted_record() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let keys = ingest_three(srv.port(), work.path(), &state);

    // The database admin deletes the first record (immudb's logical deletion).
    admin_deletes(srv.port(), work.path(), &keys[0]);

    let q = bt2immu(&["query", "--prefix", "qt:"], srv.port(), &state);
    let out = String::from_utf8_lossy(&q.stdout);
    let err = String::from_utf8_lossy(&q.stderr).to_lowercase();
    let noticed = !q.status.success()
        || out.contains(&keys[0])
        || err.contains("deleted")
        || err.contains("missing")
        || err.contains("gap");
    assert!(
        noticed,
        "query silently dropped the deleted record {}:\nstdout: {out}\nstderr: {err}",
        keys[0]
    );
}

/// A server rolled back to before the records were written answers a query with nothing at
/// all. Found: `query --prefix qt:` then said "0 record(s), each verified" and exited 0,
/// because no record was read to carry a proof; the server's state is now proved against the
/// trusted state before anything is listed.
#[tokio::test(flavor = "multi_thread")]
async fn query_of_a_rolled_back_server_that_returns_nothing_is_a_verification_failure() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let early = work.path().join("early");
    let state = work.path().join("state");
    let mut srv = server_with(LocalImmudbOptions {
        data_dir: Some(data.clone()),
        ..Default::default()
    })
    .await;
    srv.stop().unwrap();
    copy_tree(&data, &early);
    srv.start_again().await.unwrap();
    ingest_three(srv.port(), work.path(), &state);

    // The early copy back: same server identity, none of the records.
    srv.stop().unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    copy_tree(&early, &data);
    srv.start_again().await.unwrap();

    for prefix in ["qt:", "nothing-here:"] {
        let q = bt2immu(&["query", "--prefix", prefix], srv.port(), &state);
        let err = String::from_utf8_lossy(&q.stderr);
        assert_eq!(q.status.code(), Some(3), "prefix {prefix}: {err}");
        assert!(err.contains("older than the trusted state"), "{err}");
        assert!(q.stdout.is_empty(), "nothing is listed from such a server");
    }
}

/// The attack an adversarial pass found: delete a record and write a forged one with the
/// same sequence number under a key a few nanoseconds away. The sequence has no gap and the
/// forged key has one revision; the deletion in the database's history gives it away.
#[tokio::test(flavor = "multi_thread")]
async fn query_notices_a_record_deleted_and_replaced_by_a_forgery() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let keys = ingest_three(srv.port(), work.path(), &state);

    // The original value of the second record, with its line changed.
    let q = bt2immu(&["query", "--prefix", "qt:"], srv.port(), &state);
    let original = rows(&q)
        .into_iter()
        .find(|r| r["key"] == keys[1].as_str())
        .unwrap()["value"]
        .clone();
    assert_eq!(original["line"], "second");
    let mut forged = original.clone();
    forged["line"] = "harmless-replacement".into();
    let z = keys[1].find("Z:").unwrap();
    let mut forged_key = keys[1].clone().into_bytes();
    forged_key[z - 1] = if forged_key[z - 1] == b'0' {
        b'1'
    } else {
        b'0'
    };

    admin_deletes(srv.port(), work.path(), &keys[1]);
    let c = client(srv.port(), &work.path().join("forger")).await;
    c.verified_set(
        &[(forged_key.clone(), serde_json::to_vec(&forged).unwrap())],
        SetMode::MustNotExist,
    )
    .await
    .unwrap();
    c.close().await;

    let q = bt2immu(&["query", "--prefix", "qt:"], srv.port(), &state);
    let err = String::from_utf8_lossy(&q.stderr);
    assert_eq!(q.status.code(), Some(3), "the forgery passed: {err}");
    assert!(
        err.contains(&format!("{}: deleted in tx", keys[1])),
        "the deletion is named: {err}"
    );
}

/// Records put under the trail's prefix by someone else (found by an adversarial pass: they
/// were listed as verified): a copy of a real value under another key, a value that is no
/// bt2immu record at all, and a well-formed forgery that repeats a real record's seq.
#[tokio::test(flavor = "multi_thread")]
async fn query_flags_records_that_bt2immu_did_not_write() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let keys = ingest_three(srv.port(), work.path(), &state);
    let q = bt2immu(&["query", "--prefix", "qt:"], srv.port(), &state);
    let second = rows(&q)
        .into_iter()
        .find(|r| r["key"] == keys[1].as_str())
        .unwrap()["value"]
        .clone();
    let host = second["host"].as_str().unwrap().to_string();

    // A forgery made consistent with its key: same seq, a time 1 ns later.
    let mut forged = second.clone();
    forged["line"] = "forged".into();
    let ts = second["ts"].as_str().unwrap();
    let later = format!("{}{}Z", &ts[..ts.len() - 2], {
        let d = ts.as_bytes()[ts.len() - 2];
        if d == b'9' {
            '8'
        } else {
            (d + 1) as char
        }
    });
    forged["ts"] = later.clone().into();
    let forged_key = bt2immu::record::expected_key(&forged).unwrap();
    assert_ne!(forged_key, keys[1]);
    let copy_key = format!("qt:{host}:20000101T000000.000000000Z:0000000000000099");
    let foreign_key = format!("qt:{host}:zzz");

    let c = client(srv.port(), &work.path().join("forger")).await;
    c.verified_set(
        &[
            (
                forged_key.clone().into_bytes(),
                serde_json::to_vec(&forged).unwrap(),
            ),
            (
                copy_key.clone().into_bytes(),
                serde_json::to_vec(&second).unwrap(),
            ),
            (
                foreign_key.clone().into_bytes(),
                b"{\"line\":\"hello\"}".to_vec(),
            ),
        ],
        SetMode::MustNotExist,
    )
    .await
    .unwrap();
    c.close().await;

    let q = bt2immu(&["query", "--prefix", "qt:"], srv.port(), &state);
    let err = String::from_utf8_lossy(&q.stderr);
    assert_eq!(q.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!(
            "{copy_key}: holds a record whose source, host, time and seq make the key {}",
            keys[1]
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{foreign_key}: not a record bt2immu wrote")),
        "{err}"
    );
    assert!(
        err.contains("qt on ") && err.contains(": record 2 appears more than once"),
        "{err}"
    );
    let listed = rows(&q);
    let flagged: Vec<&str> = listed
        .iter()
        .filter(|r| r["tampered"] == true)
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(flagged.len(), 2, "{flagged:?}");
    assert!(flagged.contains(&copy_key.as_str()) && flagged.contains(&foreign_key.as_str()));
}

/// A record made to vanish from reads by a new revision that expires (no delete marker), and
/// a forged `spool_corrupted` loss record that names its number as lost (found by an
/// adversarial pass: the query said "each verified" and exit 0). The newest record expired
/// the same way must be noticed from any machine, without the agent's state dir.
#[tokio::test(flavor = "multi_thread")]
async fn query_notices_records_made_to_expire_and_a_forged_loss_record() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let keys = ingest_three(srv.port(), work.path(), &state);
    let q = bt2immu(&["query", "--prefix", "qt:"], srv.port(), &state);
    let all = rows(&q);
    let value_of = |k: &str| all.iter().find(|r| r["key"] == k).unwrap()["value"].clone();
    let second = value_of(&keys[1]);
    let third = value_of(&keys[2]);
    let host = second["host"].as_str().unwrap().to_string();

    // The same value again, expiring in 2 s: the key is then gone from scans and gets.
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 2;
    let loss = serde_json::json!({
        "v": 1, "kind": "loss", "source": "qt", "host": host, "seq": 50,
        "ts": "2099-01-01T00:00:00.000000000Z", "cause": "spool_corrupted", "count": 1,
        "lost_seqs": [[second["seq"].as_u64().unwrap(), second["seq"].as_u64().unwrap()]],
    });
    let loss_key = bt2immu::record::expected_key(&loss).unwrap();
    let c = client(srv.port(), &work.path().join("forger")).await;
    for (k, v) in [(&keys[1], &second), (&keys[2], &third)] {
        c.set(
            &[(k.clone().into_bytes(), serde_json::to_vec(v).unwrap())],
            SetMode::UpsertExpiring(expires),
        )
        .await
        .unwrap();
    }
    c.verified_set(
        &[(loss_key.into_bytes(), serde_json::to_vec(&loss).unwrap())],
        SetMode::MustNotExist,
    )
    .await
    .unwrap();
    c.close().await;
    std::thread::sleep(std::time::Duration::from_secs(4));

    // From another machine: a fresh state dir (no spool acknowledgement to compare with).
    let elsewhere = work.path().join("elsewhere");
    let q = bt2immu(&["query", "--prefix", "qt:"], srv.port(), &elsewhere);
    let err = String::from_utf8_lossy(&q.stderr);
    assert_eq!(
        q.status.code(),
        Some(3),
        "the vanished records passed: {err}"
    );
    for k in [&keys[1], &keys[2]] {
        assert!(err.contains(&format!("{k}: given an expiry")), "{k}: {err}");
    }
    assert!(
        err.contains(&format!(
            "record {} is named lost by a spool_corrupted record, but it was written",
            second["seq"]
        )),
        "{err}"
    );
    assert!(!err.contains("each verified"), "{err}");
}

/// A reference under the prefix (found by an adversarial pass): immudb's scan follows it and
/// reports the referenced key and value, and paging after that key skipped the real records
/// in between — a forged record took the place of real one 500 with exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn query_notices_a_reference_that_puts_a_forgery_in_a_records_place() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let input = work.path().join("in.txt");
    let lines: Vec<String> = (1..=600).map(|i| format!("cmd number {i}")).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = bt2immu(
        &["ingest", "--source", "rf", input.to_str().unwrap()],
        srv.port(),
        &state,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = bt2immu(&["query", "--prefix", "rf:"], srv.port(), &state);
    assert_eq!(q.status.code(), Some(0));
    let all = rows(&q);
    let by_line = |l: &str| {
        all.iter()
            .find(|r| r["value"]["line"] == l)
            .unwrap()
            .clone()
    };
    let r499 = by_line("cmd number 499");
    let r500 = by_line("cmd number 500");

    // A forgery consistent with its key (record 500's time + 1 ns), and a reference that
    // sorts right after record 499 — the 500th key, the last of the query's first page.
    let mut forged = r500["value"].clone();
    forged["line"] = "ls -la".into();
    let ts = forged["ts"].as_str().unwrap().to_string();
    let last = ts.as_bytes()[ts.len() - 2];
    let bumped = if last == b'9' { b'8' } else { last + 1 } as char;
    forged["ts"] = format!("{}{bumped}Z", &ts[..ts.len() - 2]).into();
    let forged_key = bt2immu::record::expected_key(&forged).unwrap();
    let c = client(srv.port(), &work.path().join("forger")).await;
    c.verified_set(
        &[(
            forged_key.clone().into_bytes(),
            serde_json::to_vec(&forged).unwrap(),
        )],
        SetMode::MustNotExist,
    )
    .await
    .unwrap();
    c.close().await;
    let ref_key = format!("{}x", r499["key"].as_str().unwrap());
    let home = work.path().join("ic");
    std::fs::create_dir_all(&home).unwrap();
    assert!(immuclient(srv.port(), &home, &["login", "immudb"])
        .status
        .success());
    let r = immuclient(srv.port(), &home, &["reference", &ref_key, &forged_key]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    for dir in [state.clone(), work.path().join("elsewhere")] {
        let q = bt2immu(&["query", "--prefix", "rf:"], srv.port(), &dir);
        let err = String::from_utf8_lossy(&q.stderr);
        assert_eq!(q.status.code(), Some(3), "the reference passed: {err}");
        assert!(
            err.contains(&format!("{ref_key}: a reference to {forged_key}")),
            "{err}"
        );
        let got = rows(&q);
        assert!(
            got.iter().any(|r| r["value"]["line"] == "cmd number 500"),
            "the real record 500 is still listed"
        );
    }
}
