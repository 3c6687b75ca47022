//! Interoperability with immudb's own client: what bt2immu writes passes `immuclient safeget`
//! (immuclient's verified read, with its own trusted state), and what `immuclient safeset`
//! writes passes our `verified_get`.

mod common;

use bt2immu::immudb::client::SetMode;
use common::*;

fn text(out: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The value of `field:` in immuclient's output.
fn field<'a>(stdout: &'a str, name: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn immuclient_verifies_what_we_wrote_and_we_verify_what_it_wrote() {
    let srv = server().await;
    let state = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let c = client(srv.port(), state.path()).await;

    // Ours → immuclient. Several batches so immuclient has to prove across transactions.
    let mut written = Vec::new();
    for b in 0..3 {
        let batch: Vec<(Vec<u8>, Vec<u8>)> = (0..5)
            .map(|i| {
                (
                    format!("ours:{b}:{i}").into_bytes(),
                    format!("value {b}/{i} with spaces and \"quotes\"").into_bytes(),
                )
            })
            .collect();
        let hdr = c.verified_set(&batch, SetMode::MustNotExist).await.unwrap();
        written.extend(batch.into_iter().map(|kv| (kv, hdr.id)));
    }
    for ((k, v), tx) in &written {
        let k = std::str::from_utf8(k).unwrap();
        let out = immuclient(srv.port(), home.path(), &["safeget", k]);
        let t = text(&out);
        assert!(out.status.success(), "immuclient safeget {k}: {t}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(field(&stdout, "verified"), Some("true"), "{t}");
        assert_eq!(field(&stdout, "key"), Some(k), "{t}");
        assert_eq!(
            field(&stdout, "value").map(str::as_bytes),
            Some(v.as_slice()),
            "{t}"
        );
        assert_eq!(field(&stdout, "tx"), Some(tx.to_string().as_str()), "{t}");
    }

    // immuclient → ours, interleaved with our own writes.
    let out = immuclient(
        srv.port(),
        home.path(),
        &["safeset", "theirs:1", "written by immuclient"],
    );
    assert!(out.status.success(), "immuclient safeset: {}", text(&out));
    c.verified_set(&[(b"ours:after".to_vec(), b"x".to_vec())], SetMode::Upsert)
        .await
        .unwrap();
    let out = immuclient(
        srv.port(),
        home.path(),
        &["safeset", "theirs:2", "second one"],
    );
    assert!(out.status.success(), "immuclient safeset: {}", text(&out));

    let e = c.verified_get(b"theirs:1").await.unwrap();
    assert_eq!(e.value, b"written by immuclient");
    let e2 = c.verified_get(b"theirs:2").await.unwrap();
    assert_eq!(e2.value, b"second one");
    assert!(e2.tx > e.tx);
    // The whole transaction immuclient wrote verifies too.
    let vtx = c.verified_tx_by_id(e2.tx).await.unwrap();
    assert!(vtx.contains(b"theirs:2", b"second one"));
    c.close().await;
}
