//! Robustness, on the real kernel: bash's `edit-and-execute-command` (C-x C-e in emacs mode,
//! `v` in vi command mode; bound by default) runs a command without readline ever finishing
//! a line. bash calls `rl_newline`, writes the line to a file, runs `fc -e "$EDITOR"` on it and
//! executes what the editor saved, then resets readline's state (`rl_done = 0`): readline's
//! `readline_internal_teardown`, the function the capture probes, never runs. Neither the text
//! typed at the prompt nor the command executed appeared in the trail. Now the script also
//! probes bash's `parse_and_execute` under `fc_execute_file`, and for `bind -x` commands; and
//! the terminal reads of an interactive bash whose line editing is off (`set +o emacs`).
//!
//! Reproduction (as root, `bt2immu run scripts/bashreadline.bt --stdout` running): in an
//! interactive bash, `export EDITOR=/tmp/ed.sh` (a script that writes
//! `echo EDITED > /tmp/ran` into its argument), type `echo typed-then-edited`, press C-x C-e.
//! `/tmp/ran` is created; the trail has the `export` line and nothing else.
//!
//! Needs root, bpftrace, tmux and the immudb binaries; fails — never skips — without them.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bt2immu::immudb::server::{LocalImmudb, LocalImmudbOptions};
use serde_json::Value;
use support::tmux::Tmux;

const PASSWORD: &str = "Rl-edit-pw1!";

fn require_root_tools() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (bpftrace attaches uprobes); run it with sudo"
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

#[tokio::test(flavor = "multi_thread")]
async fn commands_run_from_the_editor_from_bind_x_and_with_line_editing_off_are_recorded() {
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

    // The "editor": replaces the line with a command that leaves a mark when it runs.
    let ran = work.path().join("ran");
    let editor = work.path().join("editor.sh");
    std::fs::write(
        &editor,
        format!(
            "#!/bin/sh\necho 'echo EDITED-BY-EDITOR > {}' > \"$1\"\n",
            ran.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&editor, std::fs::Permissions::from_mode(0o755)).unwrap();

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bashreadline.bt");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_bt2immu"))
        .arg("run")
        .arg(&script)
        .args(["--shell", "/bin/bash"])
        .args(["--immudb-address", "127.0.0.1", "--immudb-port"])
        .arg(server.port().to_string())
        .arg("--password-file")
        .arg(&pw_file)
        .arg("--state-dir")
        .arg(work.path().join("state"))
        .arg("--stdout")
        .env_remove("BT2IMMU_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting bt2immu");
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = agent.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut records: Vec<Value> = Vec::new();
    let wait_for = |what: &str, pred: &dyn Fn(&Value) -> bool, records: &mut Vec<Value>| {
        let start = Instant::now();
        while !records.iter().any(pred) {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
                records.push(serde_json::from_str::<Value>(&l).unwrap()["value"].clone());
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "no {what} record within 90 s"
            );
        }
    };
    wait_for(
        "capture_ready",
        &|r| r["event"] == "capture_ready",
        &mut records,
    );

    let tmux = Tmux::new(work.path());
    let sh = tmux.shell("edit");
    sh.line(&format!("export EDITOR={}", editor.display()));
    sh.keys_literal("echo typed-then-edited");
    sh.key("C-x");
    sh.key("C-e");
    let start = Instant::now();
    while !ran.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the edited command did not run; screen:\n{}",
            sh.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A key bound to a shell command runs it without any line being accepted either.
    sh.line("bind -x '\"\\C-t\": echo BOUND-KEY-RAN'");
    sh.key("C-t");
    sh.wait_for("\nBOUND-KEY-RAN", Duration::from_secs(20));
    // Line editing off: bash reads its terminal without readline until it is back on.
    sh.line("set +o emacs");
    sh.line("echo typed-without-readline");
    sh.wait_for("\ntyped-without-readline", Duration::from_secs(20));
    sh.line("set -o emacs");
    sh.line("echo after-the-editor");
    wait_for(
        "after-the-editor",
        &|r| r["line"] == "echo after-the-editor",
        &mut records,
    );
    // Anything about the edited line would have come before the next line's record.
    std::thread::sleep(Duration::from_secs(1));
    while let Ok(l) = rx.try_recv() {
        records.push(serde_json::from_str::<Value>(&l).unwrap()["value"].clone());
    }
    unsafe { libc::kill(agent.id() as i32, libc::SIGINT) };
    let _ = agent.wait();

    let pid = sh.pane_pid() as u64;
    let mentions = |needle: &str| {
        records
            .iter()
            .any(|r| r["pid"] == pid && r.to_string().contains(needle))
    };
    assert!(
        mentions("export EDITOR="),
        "the shell's lines were not captured at all"
    );
    let executed: Vec<&Value> = records
        .iter()
        .filter(|r| r["pid"] == pid && r["executed"] == true)
        .collect();
    let shown = || {
        records
            .iter()
            .filter(|r| r["pid"] == pid)
            .map(|r| r["line"].to_string())
            .collect::<Vec<_>>()
    };
    // What the editor saved is what ran: it is recorded exactly, as an executed command.
    let edited = format!("echo EDITED-BY-EDITOR > {}\n", ran.display());
    assert!(
        executed.iter().any(|r| r["line"] == edited.as_str()),
        "the command run from the editor (C-x C-e) left no record; the shell's records: {:?}",
        shown()
    );
    assert!(
        executed.iter().any(|r| r["line"] == "echo BOUND-KEY-RAN"),
        "the bind -x command left no record; the shell's records: {:?}",
        shown()
    );
    // The lines read with editing off: exactly as read (newline included), flagged, once; and
    // the line typed after editing is back on comes once, through readline.
    let noedit: Vec<&str> = records
        .iter()
        .filter(|r| r["pid"] == pid && r["line_editing_off"] == true)
        .map(|r| r["line"].as_str().unwrap())
        .collect();
    assert_eq!(
        noedit,
        vec!["echo typed-without-readline\n", "set -o emacs\n"],
        "the shell's records: {:?}",
        shown()
    );
    let after: Vec<&Value> = records
        .iter()
        .filter(|r| r["pid"] == pid && r["line"] == "echo after-the-editor")
        .collect();
    assert_eq!(after.len(), 1, "the shell's records: {:?}", shown());
    assert!(after[0].get("line_editing_off").is_none());
    for r in &executed {
        assert_eq!(r["kind"], "readline");
        assert_eq!(r["uid"], 0);
        assert!(
            r["probe"].as_str().unwrap().ends_with(":parse_and_execute"),
            "{r}"
        );
        assert_eq!(r["len"], r["line"].as_str().unwrap().len());
    }
}
