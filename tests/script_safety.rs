//! The safety check: unsafe builtins are refused with file:line:col, and (as root) a script
//! that a non-root user could modify is refused with the fix to apply.

use bt2immu::script::{
    analyze, check_program, check_script, inspect_script, CheckOptions, PermIssue, ScriptError,
};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;

fn unsafe_whats(src: &str) -> Vec<String> {
    analyze(src.as_bytes(), "t.bt")
        .unsafe_uses
        .iter()
        .map(|u| format!("{}@{}", u.what, u.pos))
        .collect()
}

#[test]
fn unsafe_builtins_are_found_with_positions() {
    let src = "BEGIN {\n  system(\"id\");\n}\nkprobe:f { if (1) { signal(9); } override(0); }\n\
               uprobe:/bin/x:f { signal_thread(\"KILL\"); write_user(arg0, \"x\", 1); }\n";
    assert_eq!(
        unsafe_whats(src),
        [
            "system()@2:3",
            "signal()@4:21",
            "override()@4:34",
            "signal_thread()@5:19",
            "write_user()@5:42"
        ]
    );
    // In predicates, macro/fn bodies (0.22+/0.24+) and #define aliases too.
    assert_eq!(unsafe_whats("k:f /system(\"x\")/ {}"), ["system()@1:6"]);
    assert_eq!(
        unsafe_whats("macro m() { system(\"x\") }"),
        ["system()@1:13"]
    );
    assert_eq!(
        unsafe_whats("#define RUN system\nBEGIN { RUN(\"x\") }"),
        ["`system`@1:13"]
    );
}

#[test]
fn look_alikes_are_not_unsafe() {
    let src = r#"
// system("in a comment")
struct sig_info { int signal; int override; };
/* signal(9) */
tracepoint:syscalls:sys_enter_kill {
    printf("system(%d) signal\n", curtask->signal->nr_threads);
    @system[pid] = args.sig; $override = 1;
}
kprobe:vfs_read+0x10 { }
kretprobe:do_sys_open { }
"#;
    assert_eq!(unsafe_whats(src), Vec::<String>::new());
}

#[test]
fn bare_address_kprobes_are_unsafe() {
    assert_eq!(
        unsafe_whats("kprobe:0xffffffff81000000 { }\nkr:123 {}"),
        ["kprobe:0xffffffff81000000@1:1", "kr:123@2:1"]
    );
}

#[test]
fn refusal_names_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.bt");
    std::fs::write(&path, "BEGIN\n{\n\tsystem(\"rm -rf /\");\n}\n").unwrap();
    let err = check_script(&path).unwrap_err();
    assert!(matches!(err, ScriptError::Unsafe { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{}:3:2: system()", path.display())),
        "{msg}"
    );
    assert!(msg.contains("--unsafe"), "{msg}");
}

#[test]
fn inline_programs_are_checked_too() {
    let err = check_program("BEGIN { system(\"id\") }").unwrap_err();
    assert!(
        err.to_string().contains("-e program:1:9: system()"),
        "{err}"
    );
    let ok = check_program("BEGIN { printf(\"%d\\n\", 1) }").unwrap();
    assert_eq!(ok.probes.len(), 1);
}

#[test]
fn missing_file_is_a_read_error() {
    let err = check_script(Path::new("/nonexistent/x.bt")).unwrap_err();
    assert!(matches!(err, ScriptError::Read { .. }), "{err}");
}

/// On real files (the tests run as root, like bt2immu): a clean script passes, and each way a
/// non-root user could change it is named with its fix.
#[test]
fn permissions_on_real_files() {
    let opts = CheckOptions {
        check_permissions: true,
    };
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let sub = dir.path().join("scripts");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = sub.join("ok.bt");
    std::fs::write(&script, "BEGIN { printf(\"hi\\n\"); }\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    chown(&script, Some(0), Some(0)).unwrap();

    let info = inspect_script(&script, opts).unwrap();
    assert!(info.permissions_checked);
    assert_eq!(info.permission_problems, []);

    // World-writable script.
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o666)).unwrap();
    let info = inspect_script(&script, opts).unwrap();
    assert_eq!(info.permission_problems.len(), 1);
    assert_eq!(info.permission_problems[0].issue, PermIssue::WorldWritable);
    assert_eq!(
        info.permission_problems[0].fix(),
        format!("chmod o-w {}", script.display())
    );
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();

    // Owned by a user, in a directory a group can write to.
    chown(&script, Some(1000), None).unwrap();
    chown(&sub, None, Some(1000)).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o775)).unwrap();
    let info = inspect_script(&script, opts).unwrap();
    let found: Vec<_> = info
        .permission_problems
        .iter()
        .map(|p| (p.path.clone(), p.issue.clone()))
        .collect();
    assert_eq!(
        found,
        [
            (script.clone(), PermIssue::OwnedByNonRoot { uid: 1000 }),
            (sub.clone(), PermIssue::GroupWritable { gid: 1000 }),
        ]
    );
    let err = info.ensure_safe().unwrap_err().to_string();
    assert!(
        err.contains(&format!("chown root {}", script.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!("chmod g-w {}", sub.display())),
        "{err}"
    );

    // A symlink from a safe place to the script: the real location is checked too.
    chown(&script, Some(0), None).unwrap();
    let link = dir.path().join("link.bt");
    std::os::unix::fs::symlink(&script, &link).unwrap();
    let info = inspect_script(&link, opts).unwrap();
    assert_eq!(
        info.permission_problems.len(),
        1,
        "{:?}",
        info.permission_problems
    );
    assert_eq!(info.permission_problems[0].path, sub);

    // A local #include is part of the program.
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
    chown(&sub, None, Some(0)).unwrap();
    let header = sub.join("defs.h");
    std::fs::write(&header, "#define N 1\n").unwrap();
    std::fs::set_permissions(&header, std::fs::Permissions::from_mode(0o646)).unwrap();
    std::fs::write(
        &script,
        "#include \"defs.h\"\nBEGIN { printf(\"%d\\n\", N); }\n",
    )
    .unwrap();
    let info = inspect_script(&script, opts).unwrap();
    assert_eq!(
        info.permission_problems.len(),
        1,
        "{:?}",
        info.permission_problems
    );
    assert_eq!(info.permission_problems[0].path, header);
}
