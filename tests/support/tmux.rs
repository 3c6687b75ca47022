//! Driving real interactive bash shells through tmux, for the end-to-end tests.
//!
//! Each `Shell` is a tmux session on a private socket running `bash --norc --noprofile -i`
//! on its own pty, so readline is live exactly as for a person at a terminal.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Tmux {
    socket: PathBuf,
}

pub struct Shell<'a> {
    tmux: &'a Tmux,
    pub name: String,
}

impl Tmux {
    pub fn new(dir: &Path) -> Tmux {
        Tmux {
            socket: dir.join("tmux.sock"),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("running tmux");
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts an interactive bash in a new session, with a plain prompt and no history
    /// expansion, and waits until it shows its prompt.
    pub fn shell(&self, name: &str) -> Shell<'_> {
        self.run(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "200",
            "-y",
            "50",
            "env",
            "-i",
            "TERM=xterm",
            "LANG=C.UTF-8",
            "HOME=/root",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PS1=READY$ ",
            "HISTFILE=/dev/null",
            "/bin/bash",
            "--norc",
            "--noprofile",
            "-i",
        ]);
        let sh = Shell {
            tmux: self,
            name: name.into(),
        };
        sh.wait_for("READY$", Duration::from_secs(10));
        // No history expansion; 8-bit input taken as bytes, not as Meta key chords (otherwise
        // readline turns \xff into "backward-kill-word").
        sh.keys_literal(
            "set +H; bind 'set convert-meta off'; bind 'set input-meta on'; bind 'set output-meta on'",
        );
        sh.enter();
        sh.wait_for_count("READY$", 2, Duration::from_secs(10));
        sh
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

impl Shell<'_> {
    /// Types text exactly as given (no key-name interpretation).
    pub fn keys_literal(&self, text: &str) {
        self.tmux.run(&["send-keys", "-t", &self.name, "-l", text]);
    }

    /// Types raw bytes (any value, including invalid UTF-8).
    pub fn keys_hex(&self, bytes: &[u8]) {
        let mut args = vec![
            "send-keys".to_string(),
            "-t".into(),
            self.name.clone(),
            "-H".into(),
        ];
        args.extend(bytes.iter().map(|b| format!("{b:02x}")));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.tmux.run(&refs);
    }

    /// Pastes bytes through a tmux buffer (bash's bracketed paste inserts them as they are):
    /// far faster than typing for lines of hundreds of kilobytes.
    pub fn paste(&self, bytes: &[u8], scratch: &Path) {
        let file = scratch.join(format!("paste-{}", self.name));
        std::fs::write(&file, bytes).expect("writing the paste buffer");
        let buf = format!("paste-{}", self.name);
        self.tmux
            .run(&["load-buffer", "-b", &buf, &file.to_string_lossy()]);
        self.tmux
            .run(&["paste-buffer", "-b", &buf, "-d", "-t", &self.name]);
    }

    /// Presses a named key (`Enter`, `C-v`, `C-j`, `Tab`).
    pub fn key(&self, key: &str) {
        self.tmux.run(&["send-keys", "-t", &self.name, key]);
    }

    pub fn enter(&self) {
        self.key("Enter");
    }

    /// Types a line and presses Enter.
    pub fn line(&self, text: &str) {
        self.keys_literal(text);
        self.enter();
    }

    pub fn pane_pid(&self) -> u32 {
        self.tmux
            .run(&["display-message", "-p", "-t", &self.name, "#{pane_pid}"])
            .trim()
            .parse()
            .expect("pane pid")
    }

    /// The pty device, e.g. `/dev/pts/3`.
    pub fn pane_tty(&self) -> String {
        self.tmux
            .run(&["display-message", "-p", "-t", &self.name, "#{pane_tty}"])
            .trim()
            .to_string()
    }

    pub fn screen(&self) -> String {
        self.tmux
            .run(&["capture-pane", "-p", "-J", "-S", "-2000", "-t", &self.name])
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        self.wait_for_count(needle, 1, timeout)
    }

    pub fn wait_for_count(&self, needle: &str, count: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if screen.matches(needle).count() >= count {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "shell {} did not show {needle:?} x{count} within {timeout:?}; screen:\n{screen}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
