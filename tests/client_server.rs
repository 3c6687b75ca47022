//! `LocalImmudb`: a real immudb starts, answers, restarts on the same data, several run at once,
//! and nothing is left behind when it is dropped.

use std::time::Duration;

use bt2immu::immudb::proto::immu_service_client::ImmuServiceClient;
use bt2immu::immudb::server::{LocalImmudb, LocalImmudbOptions};

async fn health(port: u16) -> bool {
    let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(300))
        .connect()
        .await
    else {
        return false;
    };
    matches!(ImmuServiceClient::new(ch).health(()).await, Ok(r) if r.get_ref().status)
}

fn process_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; look at its state too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.split_whitespace().nth(2).is_some_and(|st| st != "Z"),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_restart_and_cleanup() {
    let a = LocalImmudb::start(LocalImmudbOptions::default())
        .await
        .unwrap();
    let mut b = LocalImmudb::start(LocalImmudbOptions::default())
        .await
        .unwrap();
    assert_ne!(a.port(), b.port());
    assert!(health(a.port()).await && health(b.port()).await);
    let ident = std::fs::read(b.data_dir().join("immudb.identifier")).unwrap();

    b.restart().await.unwrap();
    assert!(health(b.port()).await);
    // Same data dir, so the same server identity.
    assert_eq!(
        std::fs::read(b.data_dir().join("immudb.identifier")).unwrap(),
        ident
    );

    let (pid, port, dir) = (a.pid().unwrap(), a.port(), a.data_dir().to_path_buf());
    drop(a);
    assert!(!process_alive(pid), "immudb {pid} still running after drop");
    assert!(!health(port).await, "port {port} still answers after drop");
    assert!(
        !dir.exists(),
        "temporary data dir {} left behind",
        dir.display()
    );
    assert!(
        health(b.port()).await,
        "dropping one server must not affect another"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_failure_reports_server_output() {
    let opts = LocalImmudbOptions {
        extra_args: vec!["--no-such-flag".into()],
        ..Default::default()
    };
    let err = LocalImmudb::start(opts).await.unwrap_err().to_string();
    assert!(err.contains("exited during startup"), "{err}");
    assert!(
        err.contains("no-such-flag"),
        "server output missing from: {err}"
    );
}
