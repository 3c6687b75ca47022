//! Finding what to probe (real ELF files on this machine, checked against `nm -D`) and
//! rendering `scripts/bashreadline.bt` for the targets found.

use std::path::{Path, PathBuf};
use std::process::Command;

use bt2immu::readline::{
    self, elf_info, locate_targets, render_script, ProbeTarget, ReadlineError, ReadlineOptions,
    CHUNK, MAX_LINE_BYTES, MAX_PARTS, PART_BYTES, TAIL_BYTES,
};

fn template() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bashreadline.bt"))
        .unwrap()
}

/// The values `nm -D --defined-only` reports for the three symbols the script reads, with
/// their nm types: (teardown, rl_end, rl_line_buffer).
fn nm_values(path: &Path) -> ProbeTarget {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(path)
        .output()
        .expect("running nm (binutils)");
    assert!(out.status.success(), "nm -D {}", path.display());
    let text = String::from_utf8(out.stdout).unwrap();
    let find = |name: &str, types: &[&str]| -> u64 {
        let hits: Vec<u64> = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[2] == name).then(|| {
                    assert!(
                        types.contains(&f[1]),
                        "{name} is {l:?} in {}",
                        path.display()
                    );
                    u64::from_str_radix(f[0], 16).unwrap()
                })
            })
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "{name} in nm -D {}: {hits:?}",
            path.display()
        );
        hits[0]
    };
    // bash's own functions and flags for input that bypasses readline: probed in the file
    // that defines them (bash itself; never libreadline).
    let defines = |name: &str| {
        text.lines().any(|l| {
            l.split_whitespace().collect::<Vec<_>>()[..]
                == [l.split_whitespace().next().unwrap_or(""), "T", name]
        })
    };
    let binary = std::fs::canonicalize(path).unwrap();
    ProbeTarget {
        teardown: find("readline_internal_teardown", &["T", "t"]),
        rl_end: find("rl_end", &["B", "b", "D", "d"]),
        rl_line_buffer: find("rl_line_buffer", &["B", "b", "D", "d"]),
        shell: (defines("parse_and_execute")
            && defines("fc_execute_file")
            && defines("getc_with_restart"))
        .then(|| readline::ShellTarget {
            path: binary.clone(),
            with_input_from_stream: find("with_input_from_stream", &["T", "t"]),
            getc_with_restart: find("getc_with_restart", &["T", "t"]),
            no_line_editing: find("no_line_editing", &["B", "b", "D", "d"]),
            interactive_shell: find("interactive_shell", &["B", "b", "D", "d"]),
        }),
        binary,
    }
}

/// Compiles a C program in `dir` (with `cc`, extra arguments after the source).
fn cc(dir: &Path, name: &str, source: &str, args: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let exe = dir.join(name);
    let st = Command::new("cc")
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .args(args)
        .status()
        .expect("running cc");
    assert!(st.success(), "cc {name}.c {args:?}");
    exe
}

fn target(binary: &str, teardown: u64, rl_end: u64, rl_line_buffer: u64) -> ProbeTarget {
    ProbeTarget {
        binary: binary.into(),
        teardown,
        rl_end,
        rl_line_buffer,
        shell: None,
    }
}

fn opts(max_line_bytes: usize) -> ReadlineOptions {
    ReadlineOptions {
        max_line_bytes,
        ..Default::default()
    }
}

#[test]
fn debian_bash_has_readline_built_in_at_the_values_nm_reports() {
    let t = locate_targets(&[PathBuf::from("/bin/bash")]).unwrap();
    let want = nm_values(Path::new("/bin/bash"));
    assert_eq!(want.binary, Path::new("/usr/bin/bash"));
    assert_eq!(t, vec![want]);
    // Distinct, non-zero values: three different places in the binary.
    let t = &t[0];
    assert!(t.teardown != 0 && t.rl_end != 0 && t.rl_line_buffer != 0);
    assert!(t.rl_end != t.rl_line_buffer);
    let info = elf_info(Path::new("/bin/bash")).unwrap();
    assert!(
        !info.needed.iter().any(|n| n.contains("readline")),
        "{:?}",
        info.needed
    );
    // The data symbols are objects, not functions, and the other way round.
    assert!(info
        .objects
        .iter()
        .any(|(n, v)| n == "rl_end" && *v == t.rl_end));
    assert!(!info.functions.iter().any(|(n, _)| n == "rl_end"));
    assert!(!info
        .objects
        .iter()
        .any(|(n, _)| n == "readline_internal_teardown"));
}

/// A shell that links libreadline dynamically (as on Arch or Alpine): the probe goes into
/// the library, with the library's own symbol values.
#[test]
fn dynamically_linked_readline_is_followed_to_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let exe = cc(
        dir.path(),
        "mini-bash",
        "#include <stdio.h>\n#include <readline/readline.h>\n\
         int main(void) { char *l = readline(\"> \"); return l == 0; }\n",
        &["-lreadline"],
    );
    let info = elf_info(&exe).unwrap();
    assert!(
        info.needed.iter().any(|n| n == "libreadline.so.8"),
        "{:?}",
        info.needed
    );
    assert!(
        info.target(&exe).is_none(),
        "the program itself defines none of readline's symbols"
    );

    let lib = readline::find_library("libreadline.so.8").expect("libreadline8 installed");
    assert_eq!(lib, std::fs::canonicalize(&lib).unwrap());
    let t = locate_targets(&[exe]).unwrap();
    assert_eq!(t, vec![nm_values(&lib)]);
    assert_ne!(t[0], nm_values(Path::new("/bin/bash")));
}

#[test]
fn same_file_under_two_names_is_probed_once_and_missing_shells_are_skipped() {
    let t = locate_targets(&[
        PathBuf::from("/bin/bash"),
        PathBuf::from("/usr/bin/bash"),
        PathBuf::from("/nonexistent/bash"),
    ])
    .unwrap();
    assert_eq!(t, vec![nm_values(Path::new("/usr/bin/bash"))]);
}

#[test]
fn nothing_to_probe_is_an_error_that_says_why() {
    let err = locate_targets(&[PathBuf::from("/bin/true")]).unwrap_err();
    let ReadlineError::NoTargets(msg) = &err else {
        panic!("{err:?}")
    };
    assert!(
        msg.contains("/usr/bin/true") && msg.contains("readline_internal_teardown"),
        "{msg}"
    );

    let err = locate_targets(&[PathBuf::from("/nonexistent/bash")]).unwrap_err();
    assert!(
        matches!(&err, ReadlineError::NoTargets(m) if m.contains("/nonexistent/bash: does not exist")),
        "{err}"
    );
    let err = locate_targets(&[]).unwrap_err();
    assert!(
        matches!(&err, ReadlineError::NoTargets(m) if m.contains("no shells given")),
        "{err}"
    );
}

/// A binary with readline's function but not all of its data: nothing the script could read
/// the line from, and the error names exactly what is missing.
#[test]
fn a_binary_without_the_data_symbols_is_not_a_target_and_the_error_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let exe = cc(
        dir.path(),
        "half-readline",
        "int rl_end;\nint readline_internal_teardown(int eof) { return eof + rl_end; }\n\
         int main(int argc, char **argv) { (void)argv; return readline_internal_teardown(argc); }\n",
        &["-rdynamic"],
    );
    let info = elf_info(&exe).unwrap();
    assert!(info.defines("readline_internal_teardown"));
    assert!(info.target(&exe).is_none());
    let err = locate_targets(std::slice::from_ref(&exe)).unwrap_err();
    let ReadlineError::NoTargets(msg) = &err else {
        panic!("{err:?}")
    };
    assert!(msg.contains(&*exe.to_string_lossy()), "{msg}");
    assert!(msg.contains("does not export rl_line_buffer"), "{msg}");
    assert!(!msg.contains("rl_end"), "rl_end is there: {msg}");

    // Not an ELF file at all: an error about that file, not a panic or an empty list.
    let script = dir.path().join("not-elf");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let err = locate_targets(&[script]).unwrap_err();
    assert!(matches!(err, ReadlineError::Elf { .. }), "{err:?}");
}

#[test]
fn default_shells_are_bash_only_one_per_file() {
    let shells = readline::default_shells();
    assert!(!shells.is_empty());
    let reals: Vec<PathBuf> = shells
        .iter()
        .map(|s| std::fs::canonicalize(s).unwrap())
        .collect();
    for r in &reals {
        assert!(
            r.file_name().unwrap().to_string_lossy().ends_with("bash"),
            "{r:?}"
        );
    }
    let mut unique = reals.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), reals.len(), "{shells:?}");
    assert!(reals.contains(&PathBuf::from("/usr/bin/bash")));
}

/// The template's constants are the library's: a mismatch would make the assembler expect
/// other chunks than the script prints, or the perf buffer too small.
#[test]
fn template_constants_match_the_library() {
    let tpl = template();
    assert!(readline::is_readline_script(&tpl));
    assert!(!readline::is_readline_script(
        "BEGIN { printf(\"hi\\n\"); }"
    ));
    let define = |name: &str| -> usize {
        let hits: Vec<usize> = tpl
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("#define {name} ")))
            .map(|v| v.trim().parse().unwrap())
            .collect();
        assert_eq!(hits.len(), 1, "#define {name}");
        hits[0]
    };
    assert_eq!(define("CHUNK"), CHUNK);
    assert_eq!(define("PART_BYTES"), PART_BYTES);
    assert_eq!(define("PART_CHUNKS") * CHUNK, PART_BYTES);
    assert_eq!(define("TAIL_BYTES"), TAIL_BYTES);
    assert_eq!(define("TAIL_CHUNKS") * CHUNK, TAIL_BYTES);
    assert_eq!(define("RENDERED"), 0);
    assert_eq!(
        define("HEAD_BYTES"),
        ReadlineOptions::default().head_bytes().unwrap()
    );
    assert_eq!(MAX_LINE_BYTES, MAX_PARTS * PART_BYTES);
    assert_eq!(readline::STRLEN, CHUNK, "buf() reads one chunk");
}

/// The programs of a script: (attach point lines, body lines), split at column-0 braces.
fn programs(script: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let mut out = Vec::new();
    let mut attach: Vec<String> = Vec::new();
    let mut body: Option<Vec<String>> = None;
    for l in script.lines() {
        match &mut body {
            Some(b) => {
                if l == "}" {
                    out.push((std::mem::take(&mut attach), body.take().unwrap()));
                } else {
                    b.push(l.to_string());
                }
            }
            None => {
                if l == "{" {
                    body = Some(Vec::new());
                } else if !l.trim().is_empty() && !l.starts_with("//") && !l.starts_with('#') {
                    attach.push(l.to_string());
                }
            }
        }
    }
    assert!(body.is_none() && attach.is_empty(), "unterminated program");
    out
}

/// Identifiers in code (comments removed).
fn idents(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap();
    code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn render_writes_one_entry_per_target_and_one_head_program_per_part() {
    let tpl = template();
    let mut bash = target("/usr/bin/bash", 0xc5800, 0x13e358, 0x13e1e0);
    bash.shell = Some(readline::ShellTarget {
        path: "/usr/bin/bash".into(),
        with_input_from_stream: 0x33be0,
        getc_with_restart: 0x33a40,
        no_line_editing: 0x134920,
        interactive_shell: 0x134978,
    });
    let targets = vec![
        bash,
        target(
            "/usr/lib/x86_64-linux-gnu/libreadline.so.8.2",
            0x2a3b0,
            0x4c2d0,
            0x4c1f8,
        ),
    ];
    // 600,001 bytes: rounded up to 600,200, three parts of 262,200.
    let o = opts(600_001);
    assert_eq!(o.head_bytes().unwrap(), 600_200);
    assert_eq!(o.parts().unwrap(), 3);
    let out = render_script(&tpl, &targets, &o).unwrap();

    let defines: Vec<&str> = out.lines().filter(|l| l.starts_with("#define ")).collect();
    assert_eq!(
        defines
            .iter()
            .filter(|l| l.starts_with("#define HEAD_BYTES "))
            .collect::<Vec<_>>(),
        vec![&"#define HEAD_BYTES 600200"]
    );
    assert_eq!(
        defines
            .iter()
            .filter(|l| l.starts_with("#define RENDERED "))
            .collect::<Vec<_>>(),
        vec![&"#define RENDERED 1"]
    );
    assert!(!out.contains("bt2immu:entry-") && !out.contains("bt2immu:part-"));

    let progs = programs(&out);
    // Entry programs: one per target, in order, with that target's values.
    let entries: Vec<&(Vec<String>, Vec<String>)> = progs
        .iter()
        .filter(|(a, _)| {
            a.iter()
                .any(|l| l.starts_with("uprobe:") && l.contains(":readline_internal_teardown"))
        })
        .collect();
    assert_eq!(entries.len(), 2);
    for ((attach, body), t) in entries.iter().zip(&targets) {
        assert_eq!(
            attach,
            &vec![format!(
                "uprobe:{}:readline_internal_teardown",
                t.binary.display()
            )]
        );
        let body = body.join("\n");
        assert!(
            body.contains(&format!("$base = reg(\"ip\") - {:#x};", t.teardown)),
            "{body}"
        );
        assert!(
            body.contains(&format!("$base + {:#x})", t.rl_end)),
            "{body}"
        );
        assert!(
            body.contains(&format!("$base + {:#x});", t.rl_line_buffer)),
            "{body}"
        );
    }

    // Return programs: every one lists all targets and nothing else.
    let all_returns: Vec<String> = targets
        .iter()
        .map(|t| {
            format!(
                "uretprobe:{}:readline_internal_teardown",
                t.binary.display()
            )
        })
        .collect();
    let want_attach = vec![format!("{},", all_returns[0]), all_returns[1].clone()];
    let returns: Vec<&(Vec<String>, Vec<String>)> = progs
        .iter()
        .filter(|(a, _)| {
            a.iter()
                .any(|l| l.contains("uretprobe:") && l.contains(":readline_internal_teardown"))
        })
        .collect();
    assert_eq!(
        returns.len(),
        3 + 2,
        "3 head parts, the tail and the last chunk"
    );
    for (attach, _) in &returns {
        assert_eq!(attach, &want_attach);
    }
    // The head parts are the first three, PART_INDEX 0, 1, 2 in turn.
    for (k, (_, body)) in returns[..3].iter().enumerate() {
        let body = body.join("\n");
        assert!(
            body.contains(&format!("if ({k} == 0) {{")),
            "part {k}: {body}"
        );
        assert!(
            body.contains(&format!("$off = (uint64){k} * PART_BYTES;")),
            "part {k}: {body}"
        );
    }
    assert!(!out.contains("uprobe:/bin/bash") && !out.contains("uretprobe:/bin/bash"));

    // No placeholder is left in any program.
    for (attach, body) in &progs {
        for l in body {
            for w in idents(l) {
                assert!(
                    !w.ends_with("_SYM") && w != "PART_INDEX",
                    "{w} left in the program of {attach:?}: {l}"
                );
            }
        }
    }
    // bash's own functions are probed once, in the shell that defines them, never in
    // libreadline.
    let shell_progs: Vec<&Vec<String>> = progs
        .iter()
        .map(|(a, _)| a)
        .filter(|a| {
            a.iter().any(|l| {
                l.contains(":parse_and_execute")
                    || l.contains(":fc_execute_file")
                    || l.contains(":getc_with_restart")
                    || l.contains(":with_input_from_stream")
            })
        })
        .collect();
    assert_eq!(
        shell_progs,
        vec![
            &vec!["uprobe:/usr/bin/bash:fc_execute_file".to_string()],
            &vec!["uprobe:/usr/bin/bash:with_input_from_stream".to_string()],
            &vec!["uretprobe:/usr/bin/bash:fc_execute_file".to_string()],
            &vec!["uprobe:/usr/bin/bash:getc_with_restart".to_string()],
            &vec!["uretprobe:/usr/bin/bash:getc_with_restart".to_string()],
            &vec![
                "uprobe:/usr/bin/bash:parse_and_execute".to_string(),
                "/@fc[tid] == 1 || strncmp(str(arg1), \"bash_execute_unix_command\", 26) == 0/"
                    .to_string(),
            ],
        ]
    );
    // With the shell's own values for its flags.
    assert!(out.contains("$base = reg(\"ip\") - 0x33be0;"), "{out}");
    assert!(out.contains("@noedit[tid] = ($base + 0x134920, $base + 0x134978);"));
    // Without a shell that defines them, the block is left out.
    let no_shell: Vec<ProbeTarget> = targets
        .iter()
        .cloned()
        .map(|mut t| {
            t.shell = None;
            t
        })
        .collect();
    let bare = render_script(&tpl, &no_shell, &o).unwrap();
    assert!(!bare.contains(":parse_and_execute") && !bare.contains(":fc_execute_file"));

    // Nothing else changed: the rendered script minus the copies is the template's length.
    let tpl_programs = programs(&tpl);
    assert_eq!(
        progs.len(),
        tpl_programs.len() + 1 + 2,
        "one more entry, two more parts"
    );
}

#[test]
fn render_part_count_follows_the_limit() {
    let tpl = template();
    let t = vec![target("/usr/bin/bash", 1, 2, 3)];
    for (max, head, parts) in [
        (1, 200, 1),
        (200, 200, 1),
        (201, 400, 1),
        (PART_BYTES, PART_BYTES, 1),
        (PART_BYTES + 1, PART_BYTES + 200, 2),
        (1024 * 1024, 1_048_600, 4),
        (MAX_LINE_BYTES, MAX_LINE_BYTES, MAX_PARTS),
    ] {
        let o = opts(max);
        assert_eq!(o.head_bytes().unwrap(), head, "{max}");
        assert_eq!(o.parts().unwrap(), parts, "{max}");
        let out = render_script(&tpl, &t, &o).unwrap();
        assert!(
            out.contains(&format!("\n#define HEAD_BYTES {head}\n")),
            "{max}"
        );
        let heads = programs(&out)
            .iter()
            .filter(|(_, b)| {
                b.iter()
                    .any(|l| l.contains("$off = (uint64)") && l.contains("* PART_BYTES"))
            })
            .count();
        assert_eq!(heads, parts, "{max}");
    }
}

#[test]
fn render_refuses_bad_input() {
    let tpl = template();
    let ok = vec![target("/usr/bin/bash", 1, 2, 3)];
    let d = ReadlineOptions::default();
    for bad in [
        "/tmp/my bash",
        "/x:y",
        "/a,b",
        "relative/bash",
        "/a\nb",
        "/a{b}",
        "/a\"b",
        "",
    ] {
        let t = vec![target(bad, 1, 2, 3)];
        assert!(
            matches!(render_script(&tpl, &t, &d), Err(ReadlineError::UnsafeTarget(p)) if p == bad),
            "{bad:?}"
        );
        // One bad target among good ones spoils the lot.
        let mixed = vec![ok[0].clone(), t[0].clone()];
        assert!(render_script(&tpl, &mixed, &d).is_err(), "{bad:?}");
    }
    assert!(matches!(
        render_script(&tpl, &[], &d),
        Err(ReadlineError::NoTargets(_))
    ));
    for max in [0, MAX_LINE_BYTES + 1, usize::MAX] {
        assert!(
            matches!(
                render_script(&tpl, &ok, &opts(max)),
                Err(ReadlineError::LimitOutOfRange(m)) if m == max
            ),
            "{max}"
        );
        assert!(opts(max).perf_rb_pages().is_err());
        assert!(readline::bpftrace_env(&opts(max)).is_err());
    }
    assert!(matches!(
        render_script("uretprobe:/bin/bash:readline { }", &ok, &d),
        Err(ReadlineError::NotReadlineScript)
    ));
    // Every marker and parameter the renderer needs.
    let cases: Vec<(String, &str)> = vec![
        (tpl.replace("// bt2immu:targets", "// x"), "bt2immu:targets"),
        (tpl.replace("// bt2immu:entry-begin", "// x"), "entry-begin"),
        (tpl.replace("// bt2immu:entry-end", "// x"), "entry-begin"),
        (tpl.replace("// bt2immu:part-begin", "// x"), "part-begin"),
        (tpl.replace("// bt2immu:part-end", "// x"), "part-begin"),
        (
            tpl.replace("#define HEAD_BYTES ", "#define HEADBYTES "),
            "HEAD_BYTES",
        ),
        (
            tpl.replace("#define RENDERED ", "#define RENDER "),
            "RENDERED",
        ),
    ];
    for (broken, what) in cases {
        assert_ne!(broken, tpl, "{what}: the test did not change the template");
        let err = render_script(&broken, &ok, &d).unwrap_err();
        assert!(
            matches!(err, ReadlineError::NoBlock(_) | ReadlineError::NoParam(_)),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
}

#[test]
fn perf_buffer_holds_every_chunk_of_the_longest_line() {
    let mut last = 0;
    for max in [1, 200, 4000, PART_BYTES, 1024 * 1024, MAX_LINE_BYTES] {
        let o = opts(max);
        let pages = o.perf_rb_pages().unwrap();
        assert!(pages.is_power_of_two(), "{max}: {pages}");
        assert!(pages >= 64, "{max}: {pages}");
        let chunks = (o.head_bytes().unwrap() + TAIL_BYTES) / CHUNK;
        assert!(
            pages * 4096 >= chunks * 256,
            "{max}: {pages} pages for {chunks} chunks"
        );
        assert!(pages >= last, "never fewer pages for a longer limit");
        last = pages;
        let env = readline::bpftrace_env(&o).unwrap();
        assert!(env.contains(&("BPFTRACE_PERF_RB_PAGES".into(), pages.to_string())));
        assert!(env.contains(&("BPFTRACE_STRLEN".into(), CHUNK.to_string())));
        assert!(env.contains(&("BPFTRACE_MAX_STRLEN".into(), CHUNK.to_string())));
        assert!(env.contains(&("BPFTRACE_STR_TRUNC_TRAILER".into(), String::new())));
    }
    // The default: 5,571 chunks of 256 bytes need 349 pages, rounded up to 512.
    assert_eq!(ReadlineOptions::default().perf_rb_pages().unwrap(), 512);
    assert_eq!(opts(MAX_LINE_BYTES).perf_rb_pages().unwrap(), 1024);
    assert_eq!(readline::bpftrace_args(), vec!["-f", "json"]);
}

/// The rendered script, for bash and for libreadline at once, loaded by the real bpftrace
/// (root): it passes the verifier, attaches every probe, announces its layout, and captures
/// lines typed into an interactive bash on a pseudo-terminal byte-exact — short (S only),
/// exactly two chunks (C only), long (five C and an S), empty, and non-ASCII.
#[test]
fn the_rendered_script_runs_in_bpftrace_and_captures_typed_lines() {
    use bt2immu::decode::{Decoder, Event, Format};
    use bt2immu::readline::{AssembledEvent, Assembler};

    let dir = tempfile::tempdir().unwrap();
    let mut targets = locate_targets(&[PathBuf::from("/bin/bash")]).unwrap();
    let lib = readline::find_library("libreadline.so.8").expect("libreadline8 installed");
    targets.push(elf_info(&lib).unwrap().target(&lib).unwrap());
    let o = ReadlineOptions::default();
    let script = dir.path().join("bashreadline.bt");
    std::fs::write(&script, render_script(&template(), &targets, &o).unwrap()).unwrap();

    // What is typed: a marker line to find this bash among any others on the host.
    let marker = format!("echo bt2immu-test-{}", std::process::id());
    let long: String = (0..1000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let long = format!(": {long}");
    let two_chunks = format!(": {}", "x".repeat(398));
    let typed: Vec<String> = vec![
        marker.clone(),
        long.clone(),
        two_chunks.clone(),
        String::new(),
        "echo 'héllo \"wörld\"' \\ $HOME".into(),
        "exit".into(),
    ];
    let input = dir.path().join("typed.txt");
    std::fs::write(&input, typed.join("\n") + "\n").unwrap();
    // bpftrace -c splits its command on spaces, so the pty comes from a small script.
    let run = dir.path().join("run.sh");
    std::fs::write(
        &run,
        "exec /usr/bin/script -q -e -c '/bin/bash --norc --noprofile -i' /dev/null >/dev/null\n",
    )
    .unwrap();

    let started = std::time::Instant::now();
    let out = Command::new("timeout")
        .arg("180")
        .arg("bpftrace")
        .args(readline::bpftrace_args())
        .arg("-c")
        .arg(format!("/bin/sh {}", run.display()))
        .arg(&script)
        .envs(readline::bpftrace_env(&o).unwrap())
        .stdin(std::fs::File::open(&input).unwrap())
        .output()
        .expect("running bpftrace");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bpftrace: {:?}\n{stderr}", out.status);
    eprintln!("bpftrace loaded, ran and exited in {elapsed:?}");

    let mut dec = Decoder::new(Format::Json);
    let mut events = dec.push(&out.stdout);
    events.extend(dec.finish());
    let parts = o.parts().unwrap() as u64;
    // bash's own functions (6 probes): in bash only; and the two read tracepoints.
    let probes = 3 + targets.len() as u64 * (1 + parts + 2) + 6 + 2;
    assert_eq!(
        events.first(),
        Some(&Event::Attached { probes }),
        "BEGIN, END, exit tracepoint; per target the entry, {parts} head parts, tail, last \
         chunk; bash's fc_execute_file and getc_with_restart (in, out), \
         with_input_from_stream and parse_and_execute; the two read tracepoints"
    );
    let outputs: Vec<Vec<u8>> = events
        .into_iter()
        .filter_map(|e| match e {
            Event::Output(l) => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(outputs[0], b"BT2I2 B 200 1048600 65600", "{stderr}");

    let mut asm = Assembler::new(o.clone());
    let mut assembled: Vec<AssembledEvent> = outputs.iter().flat_map(|l| asm.push(l)).collect();
    assembled.extend(asm.finish());
    let ours = assembled
        .iter()
        .find_map(|e| match e {
            AssembledEvent::Line(l) if l.line == marker.as_bytes() => Some(l.pid),
            _ => None,
        })
        .unwrap_or_else(|| panic!("marker line not captured: {assembled:#?}"));
    let pid_field = format!(" {ours} ");
    for e in &assembled {
        if let AssembledEvent::Malformed { raw, reason } = e {
            assert!(
                !String::from_utf8_lossy(raw).contains(&pid_field),
                "{reason}: {}",
                String::from_utf8_lossy(raw)
            );
        }
        if let AssembledEvent::Incomplete(i) = e {
            assert!(
                i.about.as_ref().is_some_and(|l| l.pid != ours),
                "a line of ours (or of unknown origin) came incomplete: {}",
                i.reason
            );
        }
    }
    let lines: Vec<&readline::ReadlineLine> = assembled
        .iter()
        .filter_map(|e| match e {
            AssembledEvent::Line(l) if l.pid == ours => Some(l),
            _ => None,
        })
        .collect();
    let got: Vec<String> = lines
        .iter()
        .map(|l| String::from_utf8(l.line.clone()).unwrap())
        .collect();
    assert_eq!(got, typed);
    for l in &lines {
        assert_eq!(l.len, l.line.len() as u64);
        assert!(!l.truncated && !l.eof);
        assert_eq!(l.tid, l.pid);
        assert_eq!(l.comm, b"bash");
        assert!(l.tty.starts_with(b"pts"), "{:?}", l.tty);
        assert_eq!(l.probe, "uprobe:/usr/bin/bash:readline_internal_teardown");
    }
    assert!(lines.windows(2).all(|w| w[0].nsecs < w[1].nsecs));
}

/// Every limit must give a script the verifier accepts: a head shorter than one part once made
/// LLVM drop the loop bound and the program no longer loaded.
#[test]
fn rendered_scripts_load_at_small_and_large_limits() {
    let dir = tempfile::tempdir().unwrap();
    let targets = locate_targets(&[PathBuf::from("/bin/bash")]).unwrap();
    for limit in [1, 16_384, 600_000, readline::MAX_LINE_BYTES] {
        let o = opts(limit);
        let script = dir.path().join(format!("r{limit}.bt"));
        std::fs::write(&script, render_script(&template(), &targets, &o).unwrap()).unwrap();
        let out = Command::new("timeout")
            .arg("180")
            .arg("bpftrace")
            .args(readline::bpftrace_args())
            .args(["-c", "/bin/true"])
            .arg(&script)
            .envs(readline::bpftrace_env(&o).unwrap())
            .output()
            .expect("running bpftrace");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let want = format!("BT2I2 B 200 {} 65600", o.head_bytes().unwrap());
        assert!(
            out.status.success() && stdout.contains(&want),
            "limit {limit}: {:?}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `check` on the bashreadline script describes the records the job gives and the binaries
/// it probes here, not the internal BT2I2 protocol lines; `--render` keeps the shebang first.
#[test]
fn check_describes_the_bashreadline_records_and_render_keeps_the_shebang_first() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bashreadline.bt");
    let bin = env!("CARGO_BIN_EXE_bt2immu");
    let out = std::process::Command::new(bin)
        .arg("check")
        .arg(&script)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("verdict: safe to run"), "{text}");
    assert!(text.contains("one record per typed line"), "{text}");
    assert!(text.contains("line, line_b64, len, truncated"), "{text}");
    let bash = std::fs::canonicalize("/bin/bash").unwrap();
    assert!(
        text.contains(&format!(
            "  uprobe:{}:readline_internal_teardown",
            bash.display()
        )),
        "{text}"
    );
    assert!(
        !text.contains("BT2I2 P {pid}"),
        "protocol lines shown: {text}"
    );

    let out = std::process::Command::new(bin)
        .args(["check", "--json"])
        .arg(&script)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["safe"], true);
    let fields = v["bashreadline"]["record_fields"].as_array().unwrap();
    for f in ["line", "line_b64", "len", "truncated", "tty", "uid", "eof"] {
        assert!(fields.iter().any(|x| x == f), "{f} missing: {fields:?}");
    }

    let out = std::process::Command::new(bin)
        .args(["check", "--render"])
        .arg(&script)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("#!/usr/bin/env bpftrace"));
    assert!(lines
        .next()
        .unwrap()
        .starts_with("// Rendered by bt2immu for this host"));
    assert_eq!(text.matches("#!/usr/bin/env bpftrace").count(), 1);
}
