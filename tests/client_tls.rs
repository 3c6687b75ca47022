//! TLS: with `tls_ca` set the client speaks TLS and trusts only that CA.

mod common;

use std::path::Path;

use bt2immu::immudb::client::{ClientError, ImmuClient, SetMode};
use bt2immu::immudb::server::{LocalImmudbOptions, LocalTls};
use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for IP 127.0.0.1 signed by it; plus an unrelated CA.
fn make_pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        let (k, c) = (format!("{ca}.key"), format!("{ca}.pem"));
        let subj = format!("/CN=bt2immu test {ca}");
        a.extend(["-keyout", &k, "-out", &c, "-days", "2", "-subj", &subj]);
        openssl(dir, &a);
    }
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir, &a);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verified_calls_over_tls_and_an_unknown_ca_is_refused() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let srv = server_with(LocalImmudbOptions {
        tls: Some(LocalTls {
            certificate: pki.path().join("server.pem"),
            private_key: pki.path().join("server.key"),
            ca: pki.path().join("ca.pem"),
        }),
        ..Default::default()
    })
    .await;

    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(srv.port(), state.path());
    cfg.tls_ca = Some(pki.path().join("ca.pem"));
    let c = ImmuClient::connect(cfg).await.unwrap();
    c.verified_set(&records("tls", 0, 5), SetMode::MustNotExist)
        .await
        .unwrap();
    assert_eq!(c.verified_get(b"tls-000004").await.unwrap().tx, 1);
    c.close().await;

    // A CA that did not sign the server's certificate: no connection, and not "tampering".
    let mut cfg = config(srv.port(), state.path());
    cfg.tls_ca = Some(pki.path().join("other-ca.pem"));
    let err = ImmuClient::connect(cfg).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Connect { .. } | ClientError::Server { .. }
        ),
        "{err}"
    );
    assert!(!err.is_tampering());
    // Plain text to a TLS server fails as well.
    let err = ImmuClient::connect(config(srv.port(), state.path()))
        .await
        .unwrap_err();
    assert!(!err.is_tampering(), "{err}");
}
