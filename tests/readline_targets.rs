//! Finding what to probe (real ELF files on this machine) and rendering the script.

use std::path::{Path, PathBuf};
use std::process::Command;

use bt2immu::readline::{
    self, elf_info, locate_targets, render_script, ProbeTarget, ReadlineError, ReadlineOptions,
};

fn template() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bashreadline.bt"))
        .unwrap()
}

#[test]
fn debian_bash_has_readline_built_in() {
    let t = locate_targets(&[PathBuf::from("/bin/bash")]).unwrap();
    assert_eq!(
        t,
        vec![ProbeTarget {
            binary: std::fs::canonicalize("/bin/bash").unwrap(),
            symbol: "readline_internal_teardown".into()
        }]
    );
    let info = elf_info(Path::new("/bin/bash")).unwrap();
    assert!(info.functions.iter().any(|f| f == "readline"));
    assert!(
        !info.needed.iter().any(|n| n.contains("readline")),
        "{:?}",
        info.needed
    );
}

#[test]
fn libreadline_exports_both_symbols() {
    let lib = readline::find_library("libreadline.so.8").expect("libreadline8 installed");
    let info = elf_info(&lib).unwrap();
    for s in readline::SYMBOLS {
        assert!(
            info.functions.iter().any(|f| f == s),
            "{s} in {}",
            lib.display()
        );
    }
    assert!(
        info.needed.iter().any(|n| n.starts_with("libtinfo")),
        "{:?}",
        info.needed
    );
}

/// A shell that links libreadline dynamically (as on Arch or Alpine): the probe goes into
/// the library.
#[test]
fn dynamically_linked_readline_is_followed_to_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("rl.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n#include <readline/readline.h>\n\
         int main(void) { char *l = readline(\"> \"); return l == 0; }\n",
    )
    .unwrap();
    let exe = dir.path().join("mini-bash");
    let st = Command::new("cc")
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg("-lreadline")
        .status()
        .unwrap();
    assert!(st.success(), "cc -lreadline (needs libreadline-dev)");
    let info = elf_info(&exe).unwrap();
    assert!(
        info.needed.iter().any(|n| n == "libreadline.so.8"),
        "{:?}",
        info.needed
    );
    assert!(
        !info.functions.iter().any(|f| f == "readline"),
        "readline is UND in the program"
    );

    let t = locate_targets(&[exe]).unwrap();
    let lib = readline::find_library("libreadline.so.8").unwrap();
    assert_eq!(
        t,
        vec![ProbeTarget {
            binary: lib,
            symbol: "readline_internal_teardown".into()
        }]
    );
}

#[test]
fn same_file_under_two_names_is_probed_once_and_missing_shells_are_skipped() {
    let t = locate_targets(&[
        PathBuf::from("/bin/bash"),
        PathBuf::from("/usr/bin/bash"),
        PathBuf::from("/nonexistent/bash"),
    ])
    .unwrap();
    assert_eq!(t.len(), 1);
}

#[test]
fn nothing_to_probe_is_an_error_that_says_why() {
    let err = locate_targets(&[PathBuf::from("/bin/dash")]).unwrap_err();
    assert!(matches!(err, ReadlineError::NoTargets(_)));
    let msg = err.to_string();
    assert!(
        msg.contains("dash") && msg.contains("no readline function"),
        "{msg}"
    );
    let err = locate_targets(&[PathBuf::from("/nonexistent/bash")]).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn default_shells_are_bash_only() {
    let shells = readline::default_shells();
    assert!(!shells.is_empty());
    for s in &shells {
        let real = std::fs::canonicalize(s).unwrap();
        assert!(
            real.file_name()
                .unwrap()
                .to_string_lossy()
                .ends_with("bash"),
            "{s:?}"
        );
    }
    let mut reals: Vec<_> = shells
        .iter()
        .map(|s| std::fs::canonicalize(s).unwrap())
        .collect();
    reals.dedup();
    assert_eq!(reals.len(), shells.len());
}

#[test]
fn template_is_the_protocol_and_renders_for_two_targets() {
    let tpl = template();
    assert!(readline::is_readline_script(&tpl));
    assert!(!readline::is_readline_script(
        "BEGIN { printf(\"hi\\n\"); }"
    ));
    let targets = vec![
        ProbeTarget {
            binary: "/usr/bin/bash".into(),
            symbol: "readline_internal_teardown".into(),
        },
        ProbeTarget {
            binary: "/usr/lib/x86_64-linux-gnu/libreadline.so.8.2".into(),
            symbol: "readline".into(),
        },
    ];
    let opts = ReadlineOptions {
        max_line_bytes: 4000,
        ..Default::default()
    };
    let out = render_script(&tpl, &targets, &opts).unwrap();
    let both = "uretprobe:/usr/bin/bash:readline_internal_teardown,\n\
                uretprobe:/usr/lib/x86_64-linux-gnu/libreadline.so.8.2:readline\n{";
    assert_eq!(
        out.matches(both).count(),
        3,
        "head, scan and provenance programs"
    );
    assert!(!out.contains("uretprobe:/bin/bash:"));
    assert!(
        out.contains("\n#define HEAD_CHUNKS 30\n"),
        "4000 bytes = 30 chunks of 134"
    );
    assert_eq!(out.lines().count(), tpl.lines().count() + 3);
}

#[test]
fn render_refuses_bad_input() {
    let tpl = template();
    let ok = vec![ProbeTarget {
        binary: "/usr/bin/bash".into(),
        symbol: "readline".into(),
    }];
    let d = ReadlineOptions::default();
    for bad in ["/tmp/my bash", "/x:y", "/a,b", "relative/bash"] {
        let t = vec![ProbeTarget {
            binary: bad.into(),
            symbol: "readline".into(),
        }];
        assert!(
            matches!(
                render_script(&tpl, &t, &d),
                Err(ReadlineError::UnsafeTarget(_))
            ),
            "{bad}"
        );
    }
    assert!(render_script(&tpl, &[], &d).is_err());
    assert!(matches!(
        render_script("uretprobe:/bin/bash:readline { }", &ok, &d),
        Err(ReadlineError::NotReadlineScript)
    ));
    let too_big = ReadlineOptions {
        max_line_bytes: 123 * 134 + 1,
        ..Default::default()
    };
    assert!(matches!(
        render_script(&tpl, &ok, &too_big),
        Err(ReadlineError::LimitOutOfRange(_))
    ));
    let max = ReadlineOptions {
        max_line_bytes: 123 * 134,
        ..Default::default()
    };
    assert!(render_script(&tpl, &ok, &max)
        .unwrap()
        .contains("#define HEAD_CHUNKS 123\n"));
    let no_marker = tpl.replace("// bt2immu:targets", "// x");
    assert!(matches!(
        render_script(&no_marker, &ok, &d),
        Err(ReadlineError::NoTargetMarker)
    ));
}

#[test]
fn env_sets_the_string_size_the_script_needs() {
    let env = readline::bpftrace_env(&ReadlineOptions::default());
    assert!(env.contains(&("BPFTRACE_STRLEN".to_string(), "136".to_string())));
    assert!(template().contains("#define STRIDE 134\n"));
}
