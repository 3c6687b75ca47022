//! Golden tests: the example scripts' real bpftrace 0.17 output (captured by
//! tests/fixtures/scripts/capture.sh) split into the expected fields.

use bt2immu::script::{inspect_script, CheckOptions, FieldValue, ScriptInfo, SiteKind, Split};
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn script(name: &str) -> ScriptInfo {
    let path = root().join("scripts/examples").join(format!("{name}.bt"));
    let info = inspect_script(
        &path,
        CheckOptions {
            check_permissions: false,
        },
    )
    .unwrap();
    assert!(info.unsafe_uses.is_empty(), "{:?}", info.unsafe_uses);
    assert!(info.notes.is_empty(), "{:?}", info.notes);
    info
}

/// The script-output lines of a capture: without bpftrace's attach line and blank lines.
fn output_lines(name: &str) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(root().join(format!("tests/fixtures/scripts/{name}.out"))).unwrap();
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty() && !l.starts_with(b"Attaching "))
        .map(<[u8]>::to_vec)
        .collect()
}

fn pid_of(which: &str) -> u64 {
    let pids = std::fs::read_to_string(root().join("tests/fixtures/scripts/pids.txt")).unwrap();
    pids.lines()
        .find_map(|l| l.strip_prefix(which)?.trim().parse().ok())
        .unwrap()
}

/// The fields of every data line of a capture.
fn data_fields(info: &ScriptInfo, lines: &[Vec<u8>]) -> Vec<Vec<(String, FieldValue)>> {
    lines
        .iter()
        .filter_map(|l| match info.split_line(l) {
            Split::Fields { fields, .. } => Some(fields),
            _ => None,
        })
        .collect()
}

fn get<'a>(f: &'a [(String, FieldValue)], name: &str) -> &'a FieldValue {
    &f.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in {f:?}"))
        .1
}

fn str_of(v: &FieldValue) -> &[u8] {
    match v {
        FieldValue::Str(s) => s,
        other => panic!("not a string: {other:?}"),
    }
}

/// Every line of a capture is accounted for: split, or a constant line of the script.
fn assert_all_split(info: &ScriptInfo, lines: &[Vec<u8>]) {
    let raw: Vec<_> = lines
        .iter()
        .filter(|l| matches!(info.split_line(l), Split::Raw { .. }))
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    assert!(raw.is_empty(), "unsplit lines: {raw:#?}");
}

#[test]
fn execsnoop_lines_split_with_header_names() {
    let info = script("execsnoop");
    let data: Vec<_> = info
        .sites
        .iter()
        .filter(|s| s.kind == SiteKind::Data)
        .collect();
    assert_eq!(data.len(), 1);
    let names: Vec<_> = data[0]
        .schema
        .fields
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(names, ["time_ms", "pid", "ppid", "args"]);

    let lines = output_lines("execsnoop");
    assert!(matches!(info.split_line(&lines[0]), Split::Header { .. }));
    assert_all_split(&info, &lines);

    let pid = pid_of("exec");
    let mine: Vec<_> = data_fields(&info, &lines)
        .into_iter()
        .filter(|f| *get(f, "pid") == FieldValue::Int(pid as i64))
        .collect();
    // sh -c '…; exec /bin/echo …': two execs in the same process.
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert!(str_of(get(&mine[0], "args")).starts_with(b"sh -c echo $$ >\"$1/exec.pid\"; exec"));
    assert_eq!(
        str_of(get(&mine[1], "args")),
        b"/bin/echo bt2immu-golden two  words tab\there q\"uote"
    );
    assert_eq!(get(&mine[0], "ppid"), get(&mine[1], "ppid"));
    assert!(matches!(get(&mine[1], "time_ms"), FieldValue::UInt(_)));
}

#[test]
fn opensnoop_keeps_spaces_inside_comm_and_errors() {
    let info = script("opensnoop");
    let lines = output_lines("opensnoop");
    assert!(matches!(info.split_line(&lines[0]), Split::Literal { .. }));
    assert!(matches!(info.split_line(&lines[1]), Split::Header { .. }));
    assert_all_split(&info, &lines);

    let pid = pid_of("open");
    let mine: Vec<_> = data_fields(&info, &lines)
        .into_iter()
        .filter(|f| *get(f, "pid") == FieldValue::Int(pid as i64))
        .collect();
    let names: Vec<_> = mine[0].iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["pid", "comm", "fd", "err", "path"]);
    let hostname = mine
        .iter()
        .find(|f| str_of(get(f, "path")) == b"/etc/hostname")
        .expect("the open of /etc/hostname");
    assert_eq!(str_of(get(hostname, "comm")), b"my cat");
    assert!(matches!(get(hostname, "fd"), FieldValue::Int(fd) if *fd >= 0));
    assert_eq!(get(hostname, "err"), &FieldValue::Int(0));
    let missing = mine
        .iter()
        .find(|f| str_of(get(f, "path")) == b"/nonexistent-bt2immu-golden")
        .expect("the failed open");
    assert_eq!(get(missing, "fd"), &FieldValue::Int(-1));
    assert_eq!(get(missing, "err"), &FieldValue::Int(2)); // ENOENT
}

#[test]
fn killsnoop_joins_time_and_printf() {
    let info = script("killsnoop");
    let lines = output_lines("killsnoop");
    assert_all_split(&info, &lines);
    let pid = pid_of("kill");
    let mine: Vec<_> = data_fields(&info, &lines)
        .into_iter()
        .filter(|f| *get(f, "pid") == FieldValue::Int(pid as i64))
        .collect();
    let names: Vec<_> = mine[0].iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["time", "pid", "comm", "tsig", "tpid", "ret"]);
    // kill -0 $$, then kill -TERM 999999 (no such process: -ESRCH).
    assert_eq!(mine.len(), 2);
    assert_eq!(get(&mine[0], "tpid"), &FieldValue::Int(pid as i64));
    assert_eq!(get(&mine[0], "ret"), &FieldValue::Int(0));
    assert_eq!(get(&mine[1], "tsig"), &FieldValue::Int(15));
    assert_eq!(get(&mine[1], "tpid"), &FieldValue::Int(999_999));
    assert_eq!(get(&mine[1], "ret"), &FieldValue::Int(-3));
    assert_eq!(str_of(get(&mine[1], "comm")), b"sh");
    let t = str_of(get(&mine[1], "time"));
    assert_eq!(t.len(), 8, "{}", String::from_utf8_lossy(t));
}
