//! The main job end to end, on the real kernel: `bt2immu run scripts/bashreadline.bt` while
//! real interactive bash shells (driven through tmux) are typed into; then every typed line is
//! read back from a real immudb, verified, and compared byte for byte.
//!
//! Needs root, bpftrace, tmux and the immudb binaries (`scripts/setup.sh` installs them). It
//! fails — never skips — when any of them is missing.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bt2immu::immudb::client::{ClientConfig, ImmuClient};
use bt2immu::immudb::server::{immudb_binary, LocalImmudb, LocalImmudbOptions};
use serde_json::Value;
use support::tmux::Tmux;

const PASSWORD: &str = "E2e-test-pw1!";
/// The default line limit as the script applies it: 1 MiB rounded up to whole chunks.
const HEAD_BYTES: usize = bt2immu::readline::DEFAULT_MAX_LINE_BYTES
    .div_ceil(bt2immu::readline::CHUNK)
    * bt2immu::readline::CHUNK;

/// Where the stored tail of a cut line of `len` bytes starts (the script's tail program).
fn tail_offset(len: usize) -> usize {
    let full_end = len - len % bt2immu::readline::CHUNK;
    let tail = bt2immu::readline::TAIL_BYTES;
    if full_end > HEAD_BYTES + tail {
        full_end - tail
    } else {
        HEAD_BYTES
    }
}

fn require_root_tools() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the end-to-end test needs root (bpftrace attaches uprobes); run it with sudo"
    );
    for tool in ["bpftrace", "tmux"] {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "{tool} is not installed; run scripts/setup.sh");
    }
}

/// A line for a failure message: long lines as their length and their two ends.
fn shown(l: &[u8]) -> String {
    if l.len() <= 300 {
        return format!("{:?}", String::from_utf8_lossy(l));
    }
    format!(
        "{} bytes {:?} … {:?}",
        l.len(),
        String::from_utf8_lossy(&l[..100]),
        String::from_utf8_lossy(&l[l.len() - 100..])
    )
}

fn bytes_of(v: &Value, name: &str) -> Vec<u8> {
    if let Some(b64) = v.get(format!("{name}_b64")).and_then(Value::as_str) {
        return base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("valid base64");
    }
    v.get(name)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("record without {name}: {}", v["seq"]))
        .as_bytes()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn typed_lines_land_in_immudb_exactly_once_byte_exact_and_verified() {
    require_root_tools();
    let work = tempfile::tempdir().unwrap();
    let server = LocalImmudb::start(LocalImmudbOptions {
        admin_password: Some(PASSWORD.into()),
        ..Default::default()
    })
    .await
    .expect("starting immudb");
    let pw_file = work.path().join("pw");
    std::fs::write(&pw_file, format!("{PASSWORD}\n")).unwrap();
    let state_dir = work.path().join("state");

    let tmux = Tmux::new(work.path());
    let a = tmux.shell("a");
    let b = tmux.shell("b");
    // Typed before bpftrace attaches; Enter comes after: the line must still be captured.
    a.keys_literal("echo first-after-attach");

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bashreadline.bt");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_bt2immu"))
        .arg("run")
        .arg(&script)
        .arg("--immudb-address")
        .arg("127.0.0.1")
        .arg("--immudb-port")
        .arg(server.port().to_string())
        .arg("--password-file")
        .arg(&pw_file)
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--stdout")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bt2immu");
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = agent.stdout.take().unwrap();
    let stdout_tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = stdout_tx.send(line);
        }
    });
    let stderr = agent.stderr.take().unwrap();
    let stderr_log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let log2 = stderr_log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log2.lock().unwrap().push_str(&line);
            log2.lock().unwrap().push('\n');
        }
    });
    // Wait until the script's BEGIN says every probe is attached (bpftrace's own
    // "attached" comes before the large programs are verified and loaded).
    let start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains("capture_ready") => break,
            Ok(_) => {}
            Err(_) => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "bpftrace did not attach within 60 s; bt2immu stderr:\n{}",
            stderr_log.lock().unwrap()
        );
    }

    let mut expect_a: Vec<Vec<u8>> = Vec::new();
    let mut expect_b: Vec<Vec<u8>> = Vec::new();
    a.enter();
    expect_a.push(b"echo first-after-attach".to_vec());

    let quotes = r#"echo 'single' "double \"esc\"" back\\slash $'\t' "#;
    a.line(quotes);
    expect_a.push(quotes.as_bytes().to_vec());

    let mut long = String::from(": ");
    // Balanced: no quote or trailing backslash may open a continuation line.
    let pattern = "0123456789abcdef-ABCDEFGHIJ_%+=,.@^~/";
    while long.len() < 5000 {
        long.push_str(pattern);
    }
    long.truncate(5000);
    a.line(&long);
    expect_a.push(long.clone().into_bytes());

    let padded = format!("{}echo padded-command", " ".repeat(300));
    a.line(&padded);
    expect_a.push(padded.into_bytes());

    // Padding in front of a command: 300 KB is below the default 1 MiB limit, stored whole.
    let far = format!("{}echo padded-far", " ".repeat(300_000));
    a.paste(far.as_bytes(), work.path());
    a.enter();
    a.wait_for("\npadded-far", Duration::from_secs(60));
    expect_a.push(far.into_bytes());

    // Longer than the limit: stored cut, and the command is in the stored tail.
    let beyond = format!(
        "{}echo padded-beyond; #{}",
        " ".repeat(1_150_000),
        "z".repeat(1000)
    );
    a.paste(beyond.as_bytes(), work.path());
    a.enter();
    a.wait_for("\npadded-beyond", Duration::from_secs(120));
    expect_a.push(beyond.into_bytes());

    // An edited history entry: readline reverts the history copy when the line is accepted,
    // which changes its idea of the length after the fact; the edited line is what counts.
    a.line("echo history-edit-XYZ");
    expect_a.push(b"echo history-edit-XYZ".to_vec());
    a.key("Up");
    for _ in 0..3 {
        a.key("BSpace");
    }
    a.keys_literal("ok");
    a.enter();
    expect_a.push(b"echo history-edit-ok".to_vec());

    let utf8 = "echo café 日本語 😀";
    a.line(utf8);
    expect_a.push(utf8.as_bytes().to_vec());

    a.keys_literal("echo ");
    a.keys_hex(&[0xff, 0xfe, 0x80]);
    a.keys_literal(" end");
    a.enter();
    expect_a.push(b"echo \xff\xfe\x80 end".to_vec());

    // readline's quoted insert: C-v C-j puts a newline into the line itself.
    a.keys_literal("echo 'a");
    a.key("C-v");
    a.key("C-j");
    a.keys_literal("b'");
    a.enter();
    expect_a.push(b"echo 'a\nb'".to_vec());

    a.keys_literal("echo tab");
    a.key("C-v");
    a.key("Tab");
    a.keys_literal("here");
    a.enter();
    expect_a.push(b"echo tab\there".to_vec());

    a.enter();
    expect_a.push(Vec::new());
    a.enter();
    expect_a.push(Vec::new());

    // Two shells typing at once.
    for i in 1..=12 {
        let la = format!("echo A-{i}");
        let lb = format!("echo B-{i} $((6*7))");
        a.line(&la);
        b.line(&lb);
        expect_a.push(la.into_bytes());
        expect_b.push(lb.into_bytes());
    }
    a.line("echo DONE-A");
    expect_a.push(b"echo DONE-A".to_vec());
    b.line("echo DONE-B");
    expect_b.push(b"echo DONE-B".to_vec());
    a.wait_for("\nDONE-A", Duration::from_secs(30));
    b.wait_for("\nDONE-B", Duration::from_secs(30));
    let total = expect_a.len() + expect_b.len();
    assert!(total >= 30, "the test types at least 30 lines ({total})");

    // Give the last events a moment to travel, then stop the agent like an operator would.
    std::thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(agent.id() as i32, libc::SIGINT) };
    let status = agent.wait().unwrap();
    let log = stderr_log.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "bt2immu exit; stderr:\n{log}");

    // Read everything back through the verified client.
    let client = ImmuClient::connect(ClientConfig {
        address: "127.0.0.1".into(),
        port: server.port(),
        username: "immudb".into(),
        password: PASSWORD.into(),
        database: "defaultdb".into(),
        state_dir: work.path().join("reader-trust"),
        ..ClientConfig::default()
    })
    .await
    .unwrap();
    let entries = client.scan_all(b"bash:", 1000).await.unwrap();
    let mut by_pid: BTreeMap<u64, Vec<(String, Value)>> = BTreeMap::new();
    for e in &entries {
        let verified = client.verified_get(&e.key).await.expect("verified read");
        assert_eq!(verified.value, e.value);
        let v: Value = serde_json::from_slice(&e.value).unwrap();
        if v["kind"] != "readline" {
            continue;
        }
        let key = String::from_utf8(e.key.clone()).unwrap();
        by_pid
            .entry(v["pid"].as_u64().unwrap())
            .or_default()
            .push((key, v));
    }
    for (shell, expected) in [(&a, &expect_a), (&b, &expect_b)] {
        let pid = shell.pane_pid() as u64;
        let got = by_pid.get(&pid).unwrap_or_else(|| {
            panic!(
                "no records for shell {} (pid {pid}); have pids {:?}",
                shell.name,
                by_pid.keys()
            )
        });
        // Keys sort in time order; the agent's seq gives capture order.
        let mut got = got.clone();
        got.sort_by_key(|(_, v)| v["seq"].as_u64().unwrap());
        // A cut line is compared as what the record promises: its head, its exact length, and
        // its tail from `tail_offset` to the end.
        let lines: Vec<Vec<u8>> = got
            .iter()
            .map(|(_, v)| {
                let mut l = bytes_of(v, "line");
                if v["truncated"] == true {
                    let off = v["tail_offset"].as_u64().unwrap() as usize;
                    assert!(off >= l.len(), "tail overlaps the head: {off}");
                    l.resize(off, b'?');
                    l.extend(bytes_of(v, "tail"));
                }
                l
            })
            .collect();
        let expected: Vec<Vec<u8>> = expected
            .iter()
            .map(|e| {
                if e.len() <= HEAD_BYTES {
                    return e.clone();
                }
                let off = tail_offset(e.len());
                let mut x = e[..HEAD_BYTES].to_vec();
                x.resize(off, b'?');
                x.extend_from_slice(&e[off..]);
                x
            })
            .collect();
        assert_eq!(
            lines.len(),
            expected.len(),
            "shell {}: got {} lines, expected {}:\n{:#?}",
            shell.name,
            lines.len(),
            expected.len(),
            lines.iter().map(|l| shown(l)).collect::<Vec<_>>()
        );
        for (i, (g, e)) in lines.iter().zip(expected.iter()).enumerate() {
            assert!(
                g == e,
                "shell {} line {i}: got {} expected {}",
                shell.name,
                shown(g),
                shown(e)
            );
        }
        let tty = shell.pane_tty();
        for (key, v) in &got {
            assert!(key.starts_with("bash:"), "{key}");
            assert_eq!(v["uid"], 0, "{key}");
            assert_eq!(v["user"], "root", "{key}");
            let len = v["len"].as_u64().unwrap() as usize;
            if len > HEAD_BYTES {
                assert_eq!(v["truncated"], true, "{key}");
                assert_eq!(bytes_of(v, "line").len(), HEAD_BYTES, "{key}");
                let tail = bytes_of(v, "tail");
                assert!(
                    String::from_utf8_lossy(&tail).contains("echo padded-beyond"),
                    "the command is not in the tail of the cut line"
                );
                assert_eq!(
                    v["tail_offset"].as_u64().unwrap() as usize + tail.len(),
                    len
                );
            } else {
                assert_eq!(v["truncated"], false, "{key}");
                assert_eq!(len, bytes_of(v, "line").len(), "{key}");
            }
            assert_eq!(
                format!("/dev/{}", v["tty"].as_str().unwrap()),
                tty,
                "tty of {key}"
            );
            assert!(v["ppid"].as_u64().unwrap() > 0, "{key}");
            assert_eq!(v["comm"], "bash", "{key}");
        }
    }
    client.close().await;

    // immudb's own client reads and verifies what bt2immu wrote.
    let (first_key, _) = &by_pid[&(a.pane_pid() as u64)][0];
    let immuclient = immudb_binary("immuclient").unwrap();
    let home = work.path().join("immuclient-home");
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(&immuclient)
        .current_dir(&home)
        .env("HOME", &home)
        .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
        .arg(server.port().to_string())
        .args([
            "--username",
            "immudb",
            "--password",
            PASSWORD,
            "--database",
            "defaultdb",
        ])
        .args(["safeget", first_key])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "immuclient safeget failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("first-after-attach"), "{text}");
    assert!(
        text.lines().any(|l| l.replace(' ', "") == "verified:true"),
        "immuclient did not verify:\n{text}"
    );
}
