//! Running bpftrace as a child process: start it with a fixed, safe command line, hand its
//! stdout bytes to the pipeline as they come, log its stderr, restart it with backoff when it
//! dies, and stop it cleanly (SIGINT, so END probes run and its output is complete) on shutdown.
//!
//! Every start and every exit is reported to the pipeline, which turns them into records: a
//! window in which bpftrace was not running is a gap in the trail, and the trail must show it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

/// How to start bpftrace. Never contains `--unsafe`: [`BpftraceCommand::new`] refuses it.
#[derive(Debug, Clone)]
pub struct BpftraceCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("refusing to run bpftrace with {0:?}: bt2immu never runs bpftrace in unsafe mode")]
    Unsafe(String),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

impl BpftraceCommand {
    pub fn new(
        program: PathBuf,
        args: Vec<OsString>,
        env: Vec<(String, String)>,
    ) -> Result<Self, SupervisorError> {
        // bpftrace has no short form of --unsafe, so the long flag is the only way in.
        if let Some(a) = args.iter().find(|a| a.to_string_lossy() == "--unsafe") {
            return Err(SupervisorError::Unsafe(a.to_string_lossy().into_owned()));
        }
        Ok(BpftraceCommand { program, args, env })
    }
}

/// What the child did, in order.
#[derive(Debug)]
pub enum ChildMsg {
    Started {
        pid: u32,
        attempt: u32,
    },
    Stdout(Vec<u8>),
    /// One line bpftrace wrote to stderr (without the newline).
    Stderr(Vec<u8>),
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        ran_for: Duration,
        /// True when we asked it to stop.
        requested: bool,
    },
}

/// Restart policy: exponential backoff, reset after a run that lasted long enough.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// A run this long counts as healthy and resets the backoff.
    pub healthy_after: Duration,
    /// Give up after this many quick failures in a row (e.g. a script that never compiles).
    pub max_quick_failures: u32,
    /// How long to wait for bpftrace to exit after SIGINT before killing it.
    pub stop_grace: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(30),
            max_quick_failures: 5,
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// Why supervision ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown was requested and bpftrace stopped.
    Stopped,
    /// bpftrace kept failing right after start; the last exit code is given.
    GaveUp { last_code: Option<i32> },
}

/// The line bpftrace 0.17 prints on every start on hosts with a low memlock limit; harmless.
fn is_harmless_stderr(line: &[u8]) -> bool {
    let s = String::from_utf8_lossy(line);
    s.contains("RLIMIT_MEMLOCK") || s.trim().is_empty()
}

/// Runs bpftrace until `shutdown` turns true, restarting it when it dies.
pub async fn supervise(
    cmd: BpftraceCommand,
    policy: RestartPolicy,
    out: mpsc::Sender<ChildMsg>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Ended, SupervisorError> {
    let mut attempt = 0u32;
    let mut backoff = policy.initial;
    let mut quick_failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return Ok(Ended::Stopped);
        }
        attempt += 1;
        let started = Instant::now();
        let mut child = spawn(&cmd)?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(pid, attempt, "bpftrace started");
        let _ = out.send(ChildMsg::Started { pid, attempt }).await;

        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let out_stdout = out.clone();
        let stdout_task = tokio::spawn(async move {
            let mut r = stdout;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out_stdout
                            .send(ChildMsg::Stdout(buf[..n].to_vec()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
        let out_stderr = out.clone();
        let stderr_task = tokio::spawn(async move {
            let mut r = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if line.last() == Some(&b'\n') {
                            line.pop();
                        }
                        if is_harmless_stderr(&line) {
                            tracing::debug!(line = %String::from_utf8_lossy(&line), "bpftrace");
                            continue;
                        }
                        tracing::warn!(line = %String::from_utf8_lossy(&line), "bpftrace stderr");
                        let _ = out_stderr.send(ChildMsg::Stderr(line.clone())).await;
                    }
                }
            }
        });

        let mut requested = false;
        let status = tokio::select! {
            s = child.wait() => s,
            _ = wait_true(&mut shutdown) => {
                requested = true;
                stop_child(&mut child, policy.stop_grace).await
            }
        };
        // Drain the pipes completely before reporting the exit, so no output is lost.
        let _ = stdout_task.await;
        let _ = stderr_task.await;
        let ran_for = started.elapsed();
        let (code, signal) = match &status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                (s.code(), s.signal())
            }
            Err(_) => (None, None),
        };
        if requested {
            tracing::info!(?code, "bpftrace stopped");
        } else {
            tracing::warn!(?code, ?signal, ?ran_for, "bpftrace exited");
        }
        let _ = out
            .send(ChildMsg::Exited {
                code,
                signal,
                ran_for,
                requested,
            })
            .await;
        if requested || *shutdown.borrow() {
            return Ok(Ended::Stopped);
        }
        if ran_for >= policy.healthy_after {
            backoff = policy.initial;
            quick_failures = 0;
        } else {
            quick_failures += 1;
            if quick_failures >= policy.max_quick_failures {
                return Ok(Ended::GaveUp { last_code: code });
            }
        }
        tracing::info!(?backoff, "restarting bpftrace");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = wait_true(&mut shutdown) => return Ok(Ended::Stopped),
        }
        backoff = (backoff * 2).min(policy.max);
    }
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            // Sender gone: nobody can ask us to stop any more; wait forever.
            std::future::pending::<()>().await;
        }
    }
}

fn spawn(cmd: &BpftraceCommand) -> Result<Child, SupervisorError> {
    let mut c = Command::new(&cmd.program);
    c.args(&cmd.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in &cmd.env {
        c.env(k, v);
    }
    // bpftrace must not get the terminal's SIGINT directly: we forward it ourselves after
    // deciding how to drain, so put it in its own process group.
    c.process_group(0);
    // If bt2immu dies (kill -9, OOM), bpftrace must not run on unwatched, its probes still
    // attached, next to the bpftrace of the agent started after it.
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other(
                    "bt2immu exited while starting bpftrace",
                ));
            }
            Ok(())
        });
    }
    c.spawn().map_err(|source| SupervisorError::Spawn {
        program: cmd.program.display().to_string(),
        source,
    })
}

/// SIGINT (bpftrace runs END and flushes), then SIGKILL after the grace period.
async fn stop_child(
    child: &mut Child,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on the child's pid, which we own and have not reaped yet.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            tracing::warn!("bpftrace did not stop within {grace:?}; killing it");
            if let Some(pid) = child.id() {
                // Its whole process group: a helper it left behind would keep stdout open
                // and the drain would never end.
                // SAFETY: kill(2) on the process group we created for the child.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            let _ = child.start_kill();
            child.wait().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> BpftraceCommand {
        BpftraceCommand::new("/bin/sh".into(), vec!["-c".into(), script.into()], vec![]).unwrap()
    }

    async fn collect(mut rx: mpsc::Receiver<ChildMsg>) -> Vec<ChildMsg> {
        let mut v = Vec::new();
        while let Some(m) = rx.recv().await {
            v.push(m);
        }
        v
    }

    #[test]
    fn unsafe_flag_is_refused() {
        let e = BpftraceCommand::new("bpftrace".into(), vec!["--unsafe".into()], vec![]);
        assert!(matches!(e, Err(SupervisorError::Unsafe(_))));
    }

    #[tokio::test]
    async fn output_is_complete_and_a_dying_child_is_restarted_then_given_up() {
        let (tx, rx) = mpsc::channel(64);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let policy = RestartPolicy {
            initial: Duration::from_millis(10),
            max_quick_failures: 3,
            ..Default::default()
        };
        let ended = supervise(
            sh("printf 'a\\nb'; echo oops >&2; exit 7"),
            policy,
            tx,
            stop_rx,
        )
        .await
        .unwrap();
        assert_eq!(ended, Ended::GaveUp { last_code: Some(7) });
        let msgs = collect(rx).await;
        let starts = msgs
            .iter()
            .filter(|m| matches!(m, ChildMsg::Started { .. }))
            .count();
        assert_eq!(starts, 3);
        let stdout: Vec<u8> = msgs
            .iter()
            .filter_map(|m| match m {
                ChildMsg::Stdout(b) => Some(b.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(stdout, b"a\nba\nba\nb".to_vec());
        assert!(msgs
            .iter()
            .any(|m| matches!(m, ChildMsg::Stderr(l) if l == b"oops")));
        assert!(msgs.iter().any(|m| matches!(
            m,
            ChildMsg::Exited {
                code: Some(7),
                requested: false,
                ..
            }
        )));
    }

    #[tokio::test]
    async fn shutdown_sends_sigint_and_waits_for_the_final_output() {
        let (tx, rx) = mpsc::channel(64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let cmd = sh("trap 'echo drained; exit 0' INT; echo ready; while :; do sleep 0.05; done");
        let task = tokio::spawn(supervise(cmd, RestartPolicy::default(), tx, stop_rx));
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop_tx.send(true).unwrap();
        assert_eq!(task.await.unwrap().unwrap(), Ended::Stopped);
        let msgs = collect(rx).await;
        let stdout: Vec<u8> = msgs
            .iter()
            .filter_map(|m| match m {
                ChildMsg::Stdout(b) => Some(b.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(String::from_utf8_lossy(&stdout), "ready\ndrained\n");
        assert!(msgs.iter().any(|m| matches!(
            m,
            ChildMsg::Exited {
                code: Some(0),
                requested: true,
                ..
            }
        )));
    }

    #[test]
    fn memlock_line_is_quiet() {
        assert!(is_harmless_stderr(
            b"ERROR: Unknown error -1: couldn't set RLIMIT_MEMLOCK for bpftrace."
        ));
        assert!(!is_harmless_stderr(b"Lost 5 events"));
    }
}
