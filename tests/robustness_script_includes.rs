//! Robustness: `#include <…>` headers are compiled into the program bpftrace runs as root, but
//! only `#include "…"` headers get the "only root can modify it" check.
//!
//! `bt2immu run` passes `-I <script dir>` to bpftrace, so `#include <evil.h>` finds a header
//! next to the script, and `#include </any/abs/path.h>` finds any file. A header that every
//! user may write (0666, or in a world-writable directory) changes what runs as root — the
//! exact thing the permission check is there to refuse (README: "A script ... that a non-root
//! user could modify, is refused with exit code 4"). Today `bt2immu check` says "safe to run".
//!
//! Reproduction (root): `mkdir d; printf '#define EVIL printf("forged\\n")\n' > d/evil.h;
//! chmod 666 d/evil.h; printf '#include <evil.h>\nBEGIN { EVIL; exit(); }\n' > d/x.bt;
//! bt2immu check d/x.bt` → exit 0; `bpftrace -I d d/x.bt` prints "forged".

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bt2immu::script::{inspect_script, CheckOptions};

fn problems_for(script: &Path) -> Vec<String> {
    let info = inspect_script(
        script,
        CheckOptions {
            check_permissions: true,
        },
    )
    .unwrap();
    info.permission_problems
        .iter()
        .map(|p| p.to_string())
        .collect()
}

fn setup(dir: &Path, include_line: &str) -> std::path::PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let header = dir.join("evil.h");
    std::fs::write(&header, b"#define EVIL printf(\"forged\\n\")\n").unwrap();
    std::fs::set_permissions(&header, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = dir.join("x.bt");
    std::fs::write(
        &script,
        format!("{include_line}\nBEGIN {{ EVIL; exit(); }}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    script
}

#[test]
fn quoted_include_of_a_world_writable_header_is_a_problem() {
    // This one holds today; it is the reference for the two below.
    let dir = tempfile::tempdir().unwrap();
    let script = setup(dir.path(), "#include \"evil.h\"");
    let p = problems_for(&script);
    assert!(p.iter().any(|s| s.contains("evil.h")), "{p:?}");
}

#[test]
fn angle_include_of_a_world_writable_header_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let script = setup(dir.path(), "#include <evil.h>");
    let p = problems_for(&script);
    assert!(
        p.iter().any(|s| s.contains("evil.h")),
        "world-writable header not reported: {p:?}"
    );
}

#[test]
fn absolute_angle_include_of_a_world_writable_header_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let hdir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(hdir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let header = hdir.path().join("evil.h");
    std::fs::write(&header, b"#define EVIL printf(\"forged\\n\")\n").unwrap();
    std::fs::set_permissions(&header, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = setup(dir.path(), &format!("#include <{}>", header.display()));
    let p = problems_for(&script);
    assert!(
        p.iter().any(|s| s.contains("evil.h")),
        "world-writable header not reported: {p:?}"
    );
}
