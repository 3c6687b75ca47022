//! What `bt2immu check` shows, and that newer (0.22–0.26) syntax is understood or skipped
//! without losing the probes and lines around it.

use bt2immu::script::{analyze, NamesFrom, Pos, SiteKind, Split};

#[test]
fn sites_have_their_own_positions_and_calls() {
    let src =
        "BEGIN\n{\n\tprintf(\"Tracing...\\n\");\n\tprintf(\"%-6s %s\\n\", \"PID\", \"COMM\");\n}\n\
               t:s:e { printf(\"%-6d \", pid); printf(\"%s\\n\", comm); }\n";
    let i = analyze(src.as_bytes(), "x.bt");
    let got: Vec<_> = i
        .sites
        .iter()
        .map(|s| (s.kind, s.pos, s.calls.len()))
        .collect();
    assert_eq!(
        got,
        [
            (SiteKind::Literal, Pos { line: 3, col: 2 }, 1),
            (SiteKind::Header, Pos { line: 4, col: 2 }, 1),
            (SiteKind::Data, Pos { line: 6, col: 9 }, 2),
        ]
    );
    assert_eq!(
        i.sites[2].names_from,
        NamesFrom::Header {
            pos: Pos { line: 4, col: 2 }
        }
    );
    assert_eq!(i.sites[2].schema.pattern(), "{pid} {comm}");
}

#[test]
fn describe_text_and_json() {
    let i = analyze(
        b"BEGIN { printf(\"%-6s %s\\n\", \"PID\", \"PATH\"); }\n\
          t:syscalls:sys_enter_openat { printf(\"%-6d %s\\n\", pid, str(args->filename)); system(\"x\"); }\n",
        "o.bt",
    );
    let text = i.describe();
    for want in [
        "o.bt:2:78: system() runs a shell command as root",
        "verdict: refused",
        "2:1: t:syscalls:sys_enter_openat",
        "names from header at 1:9",
        "pid              int    pid (%-6d)",
        "path             string str(args->filename) (%s)",
        "permissions: not checked",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let j = i.describe_json();
    assert_eq!(j["safe"], false);
    assert_eq!(j["unsafe_uses"][0]["what"], "system()");
    assert_eq!(j["unsafe_uses"][0]["pos"]["line"], 2);
    assert_eq!(j["lines"][1]["fields"][1]["name"], "path");
    assert_eq!(j["lines"][1]["fields"][1]["type"], "string");
    assert_eq!(j["lines"][1]["names_from"]["from"], "header");
}

#[test]
fn newer_syntax_is_skipped_without_losing_probes() {
    let src = r#"
config = { max_strlen = 1024; missing_probes = "ignore" }
import "stdlib/foo";
let @starts = lruhash(1000);
struct S { int signal_count; };
fn add($a: int64, $b: int64): int64 { return $a + $b; }
macro show($x) { printf("macro %d\n", $x); }
BEGIN { printf("%-8s %s\n", "PID", "CMD"); }
uretprobe:/bin/bash:readline_internal_teardown
/comm == "bash"/
{
    for ($kv : @starts) { $n = 1; }
    if comptime (1) { $y = 2; }
    printf("%-8d %s\n", pid, str(retval));
}
"#;
    let i = analyze(src.as_bytes(), "n.bt");
    assert!(i.unsafe_uses.is_empty(), "{:?}", i.unsafe_uses);
    assert!(i.notes.is_empty(), "{:?}", i.notes);
    let probes: Vec<_> = i.probes.iter().map(|p| p.attach_points.join(",")).collect();
    assert_eq!(
        probes,
        ["BEGIN", "uretprobe:/bin/bash:readline_internal_teardown"]
    );
    assert_eq!(i.probes[1].predicate.as_deref(), Some("comm == \"bash\""));
    match i.split_line(b"4242     echo  hi") {
        Split::Fields { probe, fields, .. } => {
            assert_eq!(probe, "uretprobe:/bin/bash:readline_internal_teardown");
            assert_eq!(fields[0].0, "pid");
            assert_eq!(fields[1].0, "cmd");
        }
        other => panic!("{other:?}"),
    }
    // The macro's printf is a site of its own.
    assert!(i.sites.iter().any(|s| s.probe == "macro show"));
}

#[test]
fn unknown_constructs_become_notes() {
    let i = analyze(
        b"BEGIN { printf(\"a\\n\") }\n@@@ ???\nkprobe:f\nEND { printf(\"%d\\n\", 1 }",
        "u.bt",
    );
    assert!(!i.notes.is_empty());
    assert_eq!(i.probes[0].attach_points, ["BEGIN"]);
    assert!(i.describe().contains("notes:"));
}
