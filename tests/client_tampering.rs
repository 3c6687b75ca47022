//! Tampering is caught, reported as tampering, and never changes the trusted state on disk:
//! a rolled-back server, a different server on the same address, a flipped byte in the state
//! file, and states signed with another key than the pinned one.

mod common;

use std::path::Path;

use bt2immu::immudb::client::{ClientError, SetMode};
use bt2immu::immudb::server::LocalImmudbOptions;
use common::*;

/// The single `*.state` file in a state dir.
fn state_file(dir: &Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "state"))
        .collect();
    assert_eq!(
        files.len(),
        1,
        "expected one state file in {}: {files:?}",
        dir.display()
    );
    files[0].clone()
}

fn assert_tampering(r: Result<impl std::fmt::Debug, ClientError>, what: &str) -> ClientError {
    let err = r.expect_err(what);
    assert!(
        err.is_tampering(),
        "{what}: not reported as tampering: {err}"
    );
    err
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_of_the_server_data_is_detected() {
    let data = tempfile::tempdir().unwrap();
    let early = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut srv = server_with(LocalImmudbOptions {
        data_dir: Some(data.path().join("d")),
        ..Default::default()
    })
    .await;
    let c = client(srv.port(), state.path()).await;
    c.verified_set(&records("a", 0, 10), SetMode::MustNotExist)
        .await
        .unwrap();

    // Keep a copy of the data as it is now, then write more.
    srv.stop().unwrap();
    copy_tree(srv.data_dir(), &early.path().join("d"));
    srv.start_again().await.unwrap();
    for i in 0..3 {
        c.verified_set(&records("b", i * 10, 10), SetMode::MustNotExist)
            .await
            .unwrap();
    }
    let trusted = c.trusted_state().await.unwrap().unwrap();

    // Put the early copy back (same server identity, older history).
    srv.stop().unwrap();
    std::fs::remove_dir_all(srv.data_dir()).unwrap();
    copy_tree(&early.path().join("d"), srv.data_dir());
    srv.start_again().await.unwrap();
    let before = snapshot_dir(state.path());

    // The same client (its session is gone with the old process, so it re-opens one).
    let err = assert_tampering(c.verified_get(b"a-000000").await, "read after rollback");
    assert!(
        matches!(err, ClientError::ServerStateOlder { server_tx, local_tx }
            if local_tx == trusted.0 && server_tx < local_tx),
        "{err}"
    );
    assert_tampering(
        c.verified_set(&records("c", 0, 1), SetMode::MustNotExist)
            .await,
        "write after rollback",
    );
    assert_eq!(snapshot_dir(state.path()), before, "state dir changed");

    // The rolled-back server writes a different history past our trusted tx: the proofs
    // cannot link it to our state.
    let other_state = tempfile::tempdir().unwrap();
    let other = client(srv.port(), other_state.path()).await;
    for i in 0..5 {
        other
            .set(&records("fork", i * 10, 10), SetMode::Upsert)
            .await
            .unwrap();
    }
    assert!(other.current_state().await.unwrap().tx_id > trusted.0);
    let err = assert_tampering(c.verified_get(b"a-000000").await, "read of forked history");
    assert!(
        matches!(
            err,
            ClientError::Verification { .. } | ClientError::Inconsistent(_)
        ),
        "{err}"
    );
    assert_eq!(snapshot_dir(state.path()), before, "state dir changed");
}

#[tokio::test(flavor = "multi_thread")]
async fn another_server_on_the_same_address_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let mut first = server().await;
    let port = first.port();
    let c = client(port, state.path()).await;
    c.verified_set(&records("x", 0, 5), SetMode::MustNotExist)
        .await
        .unwrap();
    first.stop().unwrap();

    // A new data dir means a new server identity, on the very same port.
    let _second = server_with(LocalImmudbOptions {
        port: Some(port),
        ..Default::default()
    })
    .await;
    let before = snapshot_dir(state.path());

    let err = assert_tampering(
        bt2immu::immudb::client::ImmuClient::connect(config(port, state.path())).await,
        "connect to a different server",
    );
    assert!(
        matches!(err, ClientError::ServerIdentityChanged { .. }),
        "{err}"
    );
    // The connected client notices too when it re-opens its session.
    let err = assert_tampering(c.verified_get(b"x-000000").await, "existing client");
    assert!(
        matches!(err, ClientError::ServerIdentityChanged { .. }),
        "{err}"
    );
    assert_eq!(snapshot_dir(state.path()), before, "state dir changed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_byte_in_the_state_file_is_refused() {
    let srv = server().await;
    let state = tempfile::tempdir().unwrap();
    let c = client(srv.port(), state.path()).await;
    c.verified_set(&records("f", 0, 5), SetMode::MustNotExist)
        .await
        .unwrap();
    let path = state_file(state.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let before = snapshot_dir(state.path());

    let err = assert_tampering(
        c.verified_get(b"f-000000").await,
        "read with a corrupted state",
    );
    assert!(matches!(err, ClientError::StateCorrupted(_)), "{err}");
    let err = assert_tampering(
        c.verified_set(&records("g", 0, 1), SetMode::MustNotExist)
            .await,
        "write with a corrupted state",
    );
    assert!(matches!(err, ClientError::StateCorrupted(_)), "{err}");
    assert_eq!(snapshot_dir(state.path()), before, "state dir changed");
}

/// A fresh P-256 key pair made with openssl, as immudb's docs do: `<name>.key` (SEC1 PEM,
/// for `--signingKey`) and `<name>.pub` (PKIX PEM, for the client).
fn key_pair(dir: &Path, name: &str) {
    let key = dir.join(format!("{name}.key"));
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key_s = key.to_str().unwrap();
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        key_s,
    ]);
    let pub_path = dir.join(format!("{name}.pub"));
    run(&[
        "ec",
        "-in",
        key_s,
        "-pubout",
        "-out",
        pub_path.to_str().unwrap(),
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn states_signed_with_another_key_are_refused() {
    let keys = tempfile::tempdir().unwrap();
    key_pair(keys.path(), "server");
    key_pair(keys.path(), "other");
    let priv_path = keys.path().join("server.key");

    let signed = server_with(LocalImmudbOptions {
        signing_key: Some(priv_path),
        ..Default::default()
    })
    .await;

    // The right key: verified calls work, and states are signed.
    let good_state = tempfile::tempdir().unwrap();
    let mut cfg = config(signed.port(), good_state.path());
    cfg.server_signing_pub_key = Some(keys.path().join("server.pub"));
    let good = bt2immu::immudb::client::ImmuClient::connect(cfg)
        .await
        .unwrap();
    good.verified_set(&records("s", 0, 5), SetMode::MustNotExist)
        .await
        .unwrap();
    good.verified_get(b"s-000001").await.unwrap();
    assert!(good.current_state().await.unwrap().signature.is_some());

    // Another pinned key: refused, nothing saved.
    let bad_state = tempfile::tempdir().unwrap();
    let mut cfg = config(signed.port(), bad_state.path());
    cfg.server_signing_pub_key = Some(keys.path().join("other.pub"));
    let bad = bt2immu::immudb::client::ImmuClient::connect(cfg)
        .await
        .unwrap();
    let before = snapshot_dir(bad_state.path());
    let err = assert_tampering(bad.verified_get(b"s-000001").await, "wrong key, read");
    assert!(matches!(err, ClientError::Signature(_)), "{err}");
    let err = assert_tampering(
        bad.verified_set(&records("t", 0, 1), SetMode::MustNotExist)
            .await,
        "wrong key, write",
    );
    assert!(matches!(err, ClientError::Signature(_)), "{err}");
    assert_eq!(snapshot_dir(bad_state.path()), before, "state dir changed");

    // Once a key is pinned, an unsigned server is refused as well; its trusted state (built
    // without a pinned key) stays as it was.
    let unsigned = server().await;
    let state = tempfile::tempdir().unwrap();
    let plain = client(unsigned.port(), state.path()).await;
    plain
        .verified_set(&records("u", 0, 2), SetMode::MustNotExist)
        .await
        .unwrap();
    let before = snapshot_dir(state.path());
    let mut cfg = config(unsigned.port(), state.path());
    cfg.server_signing_pub_key = Some(keys.path().join("server.pub"));
    let pinned = bt2immu::immudb::client::ImmuClient::connect(cfg)
        .await
        .unwrap();
    let err = assert_tampering(
        pinned
            .verified_set(&records("u", 10, 1), SetMode::MustNotExist)
            .await,
        "unsigned server",
    );
    assert!(matches!(err, ClientError::Signature(_)), "{err}");
    assert_eq!(snapshot_dir(state.path()), before, "state dir changed");
}
