//! Bad input on the command line is exit code 2 with a message naming what was wrong, before
//! anything is started (found by an adversarial pass: these were exit 1).

use std::process::Command;

fn bt2immu(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bt2immu"))
        .args(args)
        .env_remove("BT2IMMU_CONFIG")
        .env_remove("IMMUCLIENT_PASSWORD")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn out_of_range_line_limits_are_usage_errors() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bashreadline.bt");
    for bad in ["0", "2097601", "99999999", "lots"] {
        let (code, err) = bt2immu(&["run", "--max-line-bytes", bad, script]);
        assert_eq!(code, Some(2), "--max-line-bytes {bad}: {err}");
        assert!(err.contains("--max-line-bytes"), "{err}");
        let (code, err) = bt2immu(&["check", "--render", "--max-line-bytes", bad, script]);
        assert_eq!(code, Some(2), "check --max-line-bytes {bad}: {err}");
    }
}

#[test]
fn an_unreadable_password_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-password");
    let (code, err) = bt2immu(&[
        "query",
        "--immudb-address",
        "127.0.0.1",
        "--immudb-port",
        "1",
        "--password-file",
        missing.to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("reading password file {}", missing.display())),
        "{err}"
    );
}

#[test]
fn a_bad_port_in_the_config_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("config.toml");
    for bad in [
        "immudb-port = 70000",
        "immudb-port = \"x\"",
        "immudb-port = 0",
    ] {
        std::fs::write(&conf, bad).unwrap();
        let (code, err) = bt2immu(&["query", "--config", conf.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(
            err.contains(&format!(
                "{}: immudb-port must be a port number",
                conf.display()
            )),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_mistyped_subcommand_is_not_just_a_missing_script() {
    let (code, err) = bt2immu(&["qurey", "--prefix", "bash:"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("'query'"), "{err}");
    let (code, err) = bt2immu(&["frobnicate"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a subcommand either"), "{err}");
}

/// `run` as a user other than root stops at once with the reason, instead of restarting a
/// bpftrace that cannot attach (found by a fresh-user trial).
#[test]
fn run_without_root_says_it_needs_root() {
    use std::os::unix::process::CommandExt as _;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bashreadline.bt");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bt2immu"));
    cmd.args(["run", script, "--state-dir"])
        .arg(dir.path().join("state"))
        .env_remove("BT2IMMU_CONFIG");
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(65534).gid(65534); // nobody
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("`run` needs root"), "{err}");
    assert!(!err.contains("restart"), "{err}");
}

#[test]
fn port_zero_is_a_usage_error() {
    let (code, err) = bt2immu(&[
        "query",
        "--immudb-address",
        "127.0.0.1",
        "--immudb-port",
        "0",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--immudb-port"), "{err}");
}
