//! Robustness, on the real kernel: the two newest bashreadline paths that bypass readline —
//! commands bash runs from `fc`/`bind -x` (`"executed": true`, probed at `parse_and_execute`)
//! and lines an interactive bash reads with line editing off (`"line_editing_off": true`,
//! from its `read(0, …)` syscalls) — attacked from a real bash in tmux.
//!
//! Each test runs `bt2immu run scripts/bashreadline.bt --stdout` against its own throwaway
//! immudb, drives one interactive bash (`bash --norc --noprofile -i`) and looks at what that
//! shell's pid left in the trail. Every test ends the same way: line editing back on, a
//! sentinel line typed through readline, and once its record is in, one more second for
//! anything else the shell caused. After `set +o emacs` each test waits for the next prompt
//! before typing: keys typed ahead while readline still holds the terminal in raw mode keep
//! their `\r`, which the canonical-mode read that follows does not take for a line end.
//!
//! Needs root, bpftrace, tmux and the immudb binaries; fails — never skips — without them.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bt2immu::immudb::server::{LocalImmudb, LocalImmudbOptions};
use serde_json::Value;
use support::tmux::{Shell, Tmux};

const PASSWORD: &str = "Rb-bypass-pw1!";
const SCREEN_WAIT: Duration = Duration::from_secs(20);

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

/// A running agent with its own immudb; its `--stdout` records, as they arrive.
struct Capture {
    _server: LocalImmudb,
    agent: Child,
    rx: mpsc::Receiver<String>,
    records: Vec<Value>,
}

impl Capture {
    /// Starts immudb and the agent and waits until the agent says capture is ready.
    async fn start(work: &Path) -> Capture {
        let server = LocalImmudb::start(LocalImmudbOptions {
            admin_password: Some(PASSWORD.into()),
            ..Default::default()
        })
        .await
        .expect("starting immudb");
        let pw_file = work.join("pw");
        std::fs::write(&pw_file, format!("{PASSWORD}\n")).unwrap();
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
            .arg(work.join("state"))
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
        let mut c = Capture {
            _server: server,
            agent,
            rx,
            records: Vec::new(),
        };
        c.wait_for("capture_ready", &|r| r["event"] == "capture_ready");
        c
    }

    fn take(&mut self, line: &str) {
        self.records
            .push(serde_json::from_str::<Value>(line).unwrap()["value"].clone());
    }

    fn wait_for(&mut self, what: &str, pred: &dyn Fn(&Value) -> bool) {
        let start = Instant::now();
        while !self.records.iter().any(pred) {
            if let Ok(l) = self.rx.recv_timeout(Duration::from_millis(500)) {
                self.take(&l);
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "no {what} record within 90 s"
            );
        }
    }

    /// Types `echo <sentinel>` (line editing must be on), waits for its record, then one more
    /// second for whatever else the shell caused; stops the agent.
    fn finish(&mut self, sh: &Shell<'_>, sentinel: &str) {
        sh.line(&format!("echo {sentinel}"));
        let want = format!("echo {sentinel}");
        self.wait_for("sentinel", &|r| r["line"] == want.as_str());
        std::thread::sleep(Duration::from_secs(1));
        while let Ok(l) = self.rx.try_recv() {
            self.take(&l);
        }
        unsafe { libc::kill(self.agent.id() as i32, libc::SIGINT) };
        let _ = self.agent.wait();
        while let Ok(l) = self.rx.try_recv() {
            self.take(&l);
        }
    }

    /// The records of one shell process.
    fn of(&self, pid: u32) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| r["pid"] == pid as u64)
            .collect()
    }

    /// That shell's lines, for failure messages (flags appended).
    fn shown(&self, pid: u32) -> Vec<String> {
        self.of(pid)
            .iter()
            .map(|r| {
                let mut s = r["line"].to_string();
                for flag in ["executed", "executed_cut", "line_editing_off", "read_cut"] {
                    if r[flag] == true {
                        s.push_str(&format!(" [{flag}]"));
                    }
                }
                s
            })
            .collect()
    }

    fn raw_reasons(&self) -> Vec<String> {
        self.records
            .iter()
            .filter(|r| r["kind"] == "raw")
            .map(|r| r["reason"].to_string())
            .collect()
    }
}

fn editing_off_lines(c: &Capture, pid: u32) -> Vec<&str> {
    c.of(pid)
        .into_iter()
        .filter(|r| r["line_editing_off"] == true)
        .map(|r| r["line"].as_str().unwrap_or("<not utf-8>"))
        .collect()
}

fn executed_lines(c: &Capture, pid: u32) -> Vec<&str> {
    c.of(pid)
        .into_iter()
        .filter(|r| r["executed"] == true)
        .map(|r| r["line"].as_str().unwrap_or("<not utf-8>"))
        .collect()
}

/// An "editor" for `fc`: a script that writes `body` into the file it is given.
fn editor(work: &Path, name: &str, body: &[u8]) -> PathBuf {
    let content = work.join(format!("{name}.content"));
    std::fs::write(&content, body).unwrap();
    let path = work.join(format!("{name}.sh"));
    std::fs::write(
        &path,
        format!("#!/bin/sh\ncat '{}' > \"$1\"\n", content.display()),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A bash whose line editing was turned off before the agent started (or before bpftrace
/// was restarted by the supervisor) is recorded too: the script finds the shell's flags at
/// its first `getc_with_restart` call after attach. Found: they were learnt only from
/// `with_input_from_stream`, which had run before the probes attached, so such a shell's
/// lines were never recorded. The line the shell was reading when the probes attached
/// cannot be captured (its `read` began before); it leaves a raw record that says so.
#[tokio::test(flavor = "multi_thread")]
async fn lines_of_a_shell_with_editing_turned_off_before_the_agent_started_are_recorded() {
    require_root_tools();
    let work = tempfile::tempdir().unwrap();
    let tmux = Tmux::new(work.path());
    let sh = tmux.shell("early");
    sh.line("set +o emacs");
    sh.wait_for_count("READY$", 3, SCREEN_WAIT);
    let mut c = Capture::start(work.path()).await;
    sh.line("echo typed-while-read-was-in-flight");
    sh.wait_for("\ntyped-while-read-was-in-flight", SCREEN_WAIT);
    sh.line("echo typed-after-capture-ready");
    sh.wait_for("\ntyped-after-capture-ready", SCREEN_WAIT);
    sh.line("set -o emacs");
    c.finish(&sh, "sentinel-early");
    let pid = sh.pane_pid();
    assert_eq!(
        editing_off_lines(&c, pid),
        vec!["echo typed-after-capture-ready\n", "set -o emacs\n"],
        "lines typed with editing off after capture_ready are missing; the shell's records: {:?}",
        c.shown(pid)
    );
    let gap: Vec<String> = c
        .raw_reasons()
        .into_iter()
        .filter(|r| r.contains(&format!("pid {pid} ")) && r.contains("before the probes attached"))
        .collect();
    assert_eq!(
        gap.len(),
        1,
        "the line in flight at attach must leave one raw record; raw: {:?}",
        c.raw_reasons()
    );
}

/// bash reads its input with editing off 1024 bytes at a time (not a line per read, as the
/// script's header says), so a longer line becomes several records, each looking like a
/// complete line of its own: padding in front of a command puts the command into a record
/// that does not show the start of the line it belongs to.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_line_typed_with_editing_off_is_one_record() {
    require_root_tools();
    let work = tempfile::tempdir().unwrap();
    let mut c = Capture::start(work.path()).await;
    let tmux = Tmux::new(work.path());
    let sh = tmux.shell("long");
    sh.line("set +o emacs");
    sh.wait_for_count("READY$", 3, SCREEN_WAIT);
    let line = format!("echo {} LONG-END", "a".repeat(1500));
    sh.line(&line);
    sh.wait_for("aaaa LONG-END\nREADY$", SCREEN_WAIT);
    sh.line("set -o emacs");
    c.finish(&sh, "sentinel-long");
    let pid = sh.pane_pid();
    let with_a: Vec<&str> = editing_off_lines(&c, pid)
        .into_iter()
        .filter(|l| l.contains("aaaaaaaaaa"))
        .collect();
    assert_eq!(
        with_a,
        vec![format!("{line}\n")],
        "the 1514-byte line is not one record; its records' lengths: {:?}",
        with_a.iter().map(|l| l.len()).collect::<Vec<_>>()
    );
}

/// With editing off, every `read(0, …)` of the shell's own process is taken for a typed line,
/// also when a builtin reads a *file* redirected to its standard input (`read x < file`,
/// `while read …; done < file`): the file's contents land in the trail as lines typed at the
/// terminal. With editing on, they do not.
#[tokio::test(flavor = "multi_thread")]
async fn file_contents_read_by_builtins_with_editing_off_are_not_recorded_as_typed() {
    require_root_tools();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("lines.txt");
    std::fs::write(
        &file,
        "FILE-CONTENT-NOT-TYPED-1\nFILE-CONTENT-NOT-TYPED-2\n",
    )
    .unwrap();
    let mut c = Capture::start(work.path()).await;
    let tmux = Tmux::new(work.path());
    let sh = tmux.shell("file");
    sh.line("set +o emacs");
    sh.wait_for_count("READY$", 3, SCREEN_WAIT);
    sh.line(&format!("read x < {}; echo got=$x", file.display()));
    sh.wait_for("got=FILE-CONTENT-NOT-TYPED-1", SCREEN_WAIT);
    sh.line(&format!(
        "n=0; while read l; do n=$((n+1)); done < {}; echo n=$n",
        file.display()
    ));
    sh.wait_for("\nn=2", SCREEN_WAIT);
    sh.line("set -o emacs");
    c.finish(&sh, "sentinel-file");
    let pid = sh.pane_pid();
    let leaked: Vec<&Value> = c
        .of(pid)
        .into_iter()
        .filter(|r| r.to_string().contains("FILE-CONTENT-NOT-TYPED"))
        .collect();
    assert!(
        leaked.is_empty(),
        "the file read by `read` was recorded as typed; the shell's records: {:?}",
        c.shown(pid)
    );
}

/// The answer to `read -s` (a password prompt) is not recorded when line editing is on —
/// `read` without `-e` does not use readline — but it is recorded when editing is off, as a
/// typed line.
#[tokio::test(flavor = "multi_thread")]
async fn the_answer_to_read_s_is_not_recorded_with_editing_on_or_off() {
    require_root_tools();
    let work = tempfile::tempdir().unwrap();
    let mut c = Capture::start(work.path()).await;
    let tmux = Tmux::new(work.path());
    let sh = tmux.shell("secret");
    sh.line("read -s pw; echo on-len=${#pw}");
    std::thread::sleep(Duration::from_millis(300));
    sh.line("hunter2-SECRET-ON");
    sh.wait_for("on-len=17", SCREEN_WAIT);
    sh.line("set +o emacs");
    sh.wait_for_count("READY$", 4, SCREEN_WAIT);
    sh.line("read -s pw; echo off-len=${#pw}");
    std::thread::sleep(Duration::from_millis(300));
    sh.line("hunter2-SECRET-OFF");
    sh.wait_for("off-len=18", SCREEN_WAIT);
    sh.line("set -o emacs");
    c.finish(&sh, "sentinel-secret");
    let pid = sh.pane_pid();
    for secret in ["hunter2-SECRET-ON", "hunter2-SECRET-OFF"] {
        assert!(
            !c.of(pid).iter().any(|r| r.to_string().contains(secret)),
            "the answer {secret:?} to `read -s` was recorded; the shell's records: {:?}",
            c.shown(pid)
        );
    }
}

/// `read -e` uses readline even with the shell's line editing off. readline reads the
/// terminal itself, one byte per `read(0, …)`, while the shell's no_line_editing flag is set:
/// the answer is recorded through readline *and* once more as one record per keystroke.
#[tokio::test(flavor = "multi_thread")]
async fn read_e_with_editing_off_records_the_line_once() {
    require_root_tools();
    let work = tempfile::tempdir().unwrap();
    let mut c = Capture::start(work.path()).await;
    let tmux = Tmux::new(work.path());
    let sh = tmux.shell("reade");
    sh.line("set +o emacs");
    sh.wait_for_count("READY$", 3, SCREEN_WAIT);
    sh.line("read -e ee; echo ee=$ee");
    std::thread::sleep(Duration::from_millis(300));
    sh.line("typed-once");
    sh.wait_for("ee=typed-once", SCREEN_WAIT);
    sh.line("set -o emacs");
    c.finish(&sh, "sentinel-reade");
    let pid = sh.pane_pid();
    assert_eq!(
        editing_off_lines(&c, pid),
        vec!["read -e ee; echo ee=$ee\n", "set -o emacs\n"],
        "the shell's records: {:?}",
        c.shown(pid)
    );
    let through_readline = c
        .of(pid)
        .iter()
        .filter(|r| r["line"] == "typed-once")
        .count();
    assert_eq!(
        through_readline,
        1,
        "the shell's records: {:?}",
        c.shown(pid)
    );
}

/// A command from the editor longer than the script's limit is recorded cut (`executed_cut`,
/// its first EXEC_BYTES). Found: with a limit of 32768 the last partial chunk was read with
/// `str()`, which does not stop there, so the command was rejected as a `raw` record; the
/// limit is now a whole number of chunks.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_over_32_kib_from_the_editor_is_recorded_cut() {
    require_root_tools();
    let work = tempfile::tempdir().unwrap();
    let mut body: String = (0..1600)
        .map(|i| format!("echo big-{i:05} >/dev/null\n"))
        .collect();
    body.push_str("echo BIG-END\n");
    assert!(body.len() > 40_000);
    let ed = editor(work.path(), "big", body.as_bytes());
    let mut c = Capture::start(work.path()).await;
    let tmux = Tmux::new(work.path());
    let sh = tmux.shell("big");
    sh.line("echo to-be-edited");
    sh.line(&format!("EDITOR={} fc", ed.display()));
    sh.wait_for("\nBIG-END\nREADY$", Duration::from_secs(60));
    c.finish(&sh, "sentinel-big");
    let pid = sh.pane_pid();
    let executed: Vec<&Value> = c
        .of(pid)
        .into_iter()
        .filter(|r| r["executed"] == true)
        .collect();
    assert_eq!(
        executed.len(),
        1,
        "the shell's records: {:?}; raw records: {:?}",
        c.shown(pid),
        c.raw_reasons()
    );
    // The script's EXEC_BYTES: a multiple of the chunk size, so a cut command has no partial
    // chunk.
    let cap = bt2immu::readline::EXEC_MAX_BYTES as usize;
    assert_eq!(executed[0]["line"], &body[..cap]);
    assert_eq!(executed[0]["executed_cut"], true);
}

/// Only what the editor saved is what the user chose to run. While `fc_execute_file` runs,
/// every `parse_and_execute` of the shell is recorded: a file `source`d by that command
/// (its whole contents) and each `eval` string become "executed" records of their own.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_command_from_the_editor_is_recorded_not_what_it_sources_or_evals() {
    require_root_tools();
    let work = tempfile::tempdir().unwrap();
    let sourced = work.path().join("sourced.sh");
    std::fs::write(&sourced, "echo SOURCED-CONTENT-1\necho SOURCED-CONTENT-2\n").unwrap();
    let body = format!(
        "source {}; eval \"echo EVAL-\\$((40+2))\"\n",
        sourced.display()
    );
    let ed = editor(work.path(), "src", body.as_bytes());
    let mut c = Capture::start(work.path()).await;
    let tmux = Tmux::new(work.path());
    let sh = tmux.shell("nested");
    sh.line("echo to-be-edited");
    sh.line(&format!("EDITOR={} fc", ed.display()));
    sh.wait_for("\nEVAL-42\nREADY$", SCREEN_WAIT);
    c.finish(&sh, "sentinel-nested");
    let pid = sh.pane_pid();
    assert_eq!(
        executed_lines(&c, pid),
        vec![body.as_str()],
        "the shell's records: {:?}",
        c.shown(pid)
    );
}

/// The script marks "inside fc_execute_file" at its entry and clears the mark at its return.
/// When the command run from the editor is interrupted (Ctrl-C: bash longjmps past the
/// return) the mark stays for the life of the shell: from then on every `PROMPT_COMMAND`
/// and every `eval` is recorded as an executed command. (`exec` from the edited command
/// leaves the mark on the new program the same way.)
#[tokio::test(flavor = "multi_thread")]
async fn after_ctrl_c_in_a_command_from_the_editor_prompt_command_is_not_recorded() {
    require_root_tools();
    let work = tempfile::tempdir().unwrap();
    let ed = editor(work.path(), "sleep", b"sleep 30\n");
    let mut c = Capture::start(work.path()).await;
    let tmux = Tmux::new(work.path());
    let sh = tmux.shell("ctrlc");
    sh.line("PROMPT_COMMAND=': PROMPT-COMMAND-MARK'");
    sh.line(&format!("EDITOR={} fc", ed.display()));
    sh.wait_for("\nsleep 30\n", SCREEN_WAIT);
    std::thread::sleep(Duration::from_millis(500));
    sh.key("C-c");
    sh.wait_for_count("READY$", 4, SCREEN_WAIT);
    sh.line("echo after-interrupt");
    sh.line("eval 'echo typed-eval'");
    sh.wait_for("\ntyped-eval\n", SCREEN_WAIT);
    c.finish(&sh, "sentinel-ctrlc");
    let pid = sh.pane_pid();
    assert_eq!(
        executed_lines(&c, pid),
        vec!["sleep 30\n"],
        "the shell's records: {:?}",
        c.shown(pid)
    );
}

/// The word scan looks at most 4096 words (32,768 bytes) for the terminating NUL, so a
/// command of exactly 32,768 bytes — complete, nothing left out — is flagged `executed_cut`
/// (its NUL is the 32,769th byte, never looked at). 32,767 bytes is not flagged.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_of_exactly_32_kib_from_the_editor_is_not_flagged_cut() {
    require_root_tools();
    let work = tempfile::tempdir().unwrap();
    let tail = "echo EXACT-32768\n";
    let body = format!("{}\n{tail}", "#".repeat(32768 - tail.len() - 1));
    assert_eq!(body.len(), 32768);
    let ed = editor(work.path(), "exact", body.as_bytes());
    let mut c = Capture::start(work.path()).await;
    let tmux = Tmux::new(work.path());
    let sh = tmux.shell("exact");
    sh.line("echo to-be-edited");
    sh.line(&format!("EDITOR={} fc", ed.display()));
    sh.wait_for("\nEXACT-32768\nREADY$", SCREEN_WAIT);
    c.finish(&sh, "sentinel-exact");
    let pid = sh.pane_pid();
    let executed: Vec<&Value> = c
        .of(pid)
        .into_iter()
        .filter(|r| r["executed"] == true)
        .collect();
    assert_eq!(executed.len(), 1, "the shell's records: {:?}", c.shown(pid));
    assert_eq!(executed[0]["line"], body.as_str());
    assert!(
        executed[0].get("executed_cut").is_none(),
        "a whole 32768-byte command is flagged cut: {}",
        executed[0]["len"]
    );
}
