//! Golden tests: real bpftrace 0.17 output of the rendered `scripts/bashreadline.bt`
//! (protocol BT2I2), captured with `tests/fixtures/readline/capture.sh` while a real bash
//! under tmux was typed into, goes through the JSON decoder and the readline Assembler; the
//! lines must be exactly the bytes that were typed (listed as hex in `*.expected`), with the
//! exact length, and a cut line must carry exactly the tail the protocol promises.
//!
//! session1 was rendered with `--max-line-bytes 16384` (head 16,400 bytes), session2 with the
//! default 1 MiB (head 1,048,600 bytes); both keep 65,600 bytes of tail.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bt2immu::decode::{Decoder, Event, Format};
use bt2immu::readline::{
    AssembledEvent, Assembler, ReadlineLine, ReadlineOptions, CHUNK, DEFAULT_MAX_LINE_BYTES,
    TAIL_BYTES,
};

/// A captured session: its files and the limit its script was rendered with.
struct Session {
    name: &'static str,
    max_line_bytes: usize,
    /// What the B record must announce as the head.
    head_bytes: u64,
}

const SESSION1: Session = Session {
    name: "session1",
    max_line_bytes: 16_384,
    head_bytes: 16_400,
};
const SESSION2: Session = Session {
    name: "session2",
    max_line_bytes: DEFAULT_MAX_LINE_BYTES,
    head_bytes: 1_048_600,
};

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/readline")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Expected lines: hex of the typed bytes, one per line; `EOF` (None) for Ctrl-D.
fn expected(s: &Session) -> Vec<Option<Vec<u8>>> {
    String::from_utf8(fixture(&format!("{}.expected", s.name)))
        .unwrap()
        .lines()
        .map(|l| (l != "EOF").then(|| hex::decode(l).unwrap()))
        .collect()
}

fn opts(max_line_bytes: usize) -> ReadlineOptions {
    ReadlineOptions {
        max_line_bytes,
        ..Default::default()
    }
}

/// Runs captured stdout through Decoder + Assembler, feeding the decoder `piece` bytes at a
/// time.
fn assemble(stdout: &[u8], piece: usize, o: ReadlineOptions) -> (Vec<AssembledEvent>, Assembler) {
    let mut dec = Decoder::new(Format::Json);
    let mut asm = Assembler::new(o);
    let mut out = Vec::new();
    let mut feed = |events: Vec<Event>, asm: &mut Assembler| {
        for ev in events {
            match ev {
                Event::Output(line) => out.extend(asm.push(&line)),
                Event::Attached { .. } | Event::ExitMarker => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
    };
    for p in stdout.chunks(piece) {
        feed(dec.push(p), &mut asm);
    }
    feed(dec.finish(), &mut asm);
    out.extend(asm.finish());
    (out, asm)
}

fn typed_lines(events: &[AssembledEvent]) -> Vec<&ReadlineLine> {
    events
        .iter()
        .map(|e| match e {
            AssembledEvent::Line(l) => l,
            AssembledEvent::Malformed { raw, reason } => {
                let raw = String::from_utf8_lossy(raw);
                panic!("malformed: {reason}: {}", &raw[..raw.len().min(400)])
            }
            AssembledEvent::Incomplete(i) => panic!("incomplete: {}", i.reason),
        })
        .collect()
}

/// Where the tail of a cut line of `len` bytes starts, from the protocol's definition: the
/// chunks from max(head, end of the last full chunk - tail) to the end.
fn tail_start(len: usize, head: usize) -> usize {
    let full_end = len - len % 200;
    if full_end > head + 65_600 {
        full_end - 65_600
    } else {
        head
    }
}

/// One line against what was typed.
fn check_line(l: &ReadlineLine, want: &Option<Vec<u8>>, head: usize, what: &str) {
    let Some(want) = want else {
        assert!(l.eof, "{what}: expected EOF, got {l:?}");
        assert!(l.line.is_empty() && l.len == 0 && !l.truncated, "{what}");
        assert!(l.tail.is_none() && l.tail_offset.is_none(), "{what}");
        return;
    };
    let shown = String::from_utf8_lossy(&want[..want.len().min(60)]).into_owned();
    assert!(!l.eof, "{what} {shown:?}");
    assert_eq!(l.len, want.len() as u64, "{what}: length of {shown:?}");
    // Whole when it fits the head, or when the tail starts where the head ends.
    if want.len() <= head || tail_start(want.len(), head) == head {
        assert!(!l.truncated, "{what}: {shown:?} fits the head and the tail");
        assert!(l.line == *want, "{what}: bytes of {shown:?} differ");
        assert_eq!((&l.tail, l.tail_offset), (&None, None), "{what}");
    } else {
        assert!(
            l.truncated,
            "{what}: {} bytes are over the head",
            want.len()
        );
        assert_eq!(
            l.line.len(),
            head,
            "{what}: a cut line keeps the whole head"
        );
        assert!(l.line == want[..head], "{what}: head of {shown:?} differs");
        let t0 = tail_start(want.len(), head);
        assert_eq!(l.tail_offset, Some(t0 as u64), "{what}: tail offset");
        let tail = l.tail.as_deref().expect("a cut line has a tail");
        assert_eq!(tail.len(), want.len() - t0, "{what}: tail length");
        assert!(tail == &want[t0..], "{what}: tail bytes differ");
    }
}

/// Every typed line, in order per task, byte-exact, for several ways of cutting the stream
/// into pieces and with the Assembler configured with `o`.
fn check_session(s: &Session, o: impl Fn() -> ReadlineOptions) {
    let stdout = fixture(&format!("{}.jsonl", s.name));
    let want = expected(s);
    for piece in [stdout.len(), 65_537, 4093, 333, 7] {
        let (events, asm) = assemble(&stdout, piece, o());
        let a = asm.announced().expect("the capture has its B record");
        assert_eq!(
            (a.chunk, a.head_bytes, a.tail_bytes),
            (200, s.head_bytes, 65_600),
            "{}: announced layout",
            s.name
        );
        let mut per_task: BTreeMap<u64, Vec<&ReadlineLine>> = BTreeMap::new();
        for l in typed_lines(&events) {
            per_task.entry(l.tid).or_default().push(l);
        }
        assert_eq!(per_task.len(), 1, "{}: one shell typed everything", s.name);
        let got = per_task.into_values().next().unwrap();
        assert_eq!(got.len(), want.len(), "{}: number of lines", s.name);
        for (i, (l, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("{} line {} (pieces of {piece})", s.name, i + 1);
            check_line(l, w, s.head_bytes as usize, &what);
        }
    }
}

#[test]
fn the_crate_constants_match_the_captures() {
    assert_eq!(CHUNK, 200);
    assert_eq!(TAIL_BYTES, 65_600);
    assert_eq!(opts(16_384).head_bytes().unwrap(), 16_400);
    assert_eq!(
        opts(DEFAULT_MAX_LINE_BYTES).head_bytes().unwrap(),
        1_048_600
    );
}

#[test]
fn session1_every_typed_line_byte_exact() {
    check_session(&SESSION1, || opts(SESSION1.max_line_bytes));
}

#[test]
fn session2_every_typed_line_byte_exact() {
    check_session(&SESSION2, || opts(SESSION2.max_line_bytes));
}

/// `bt2immu ingest` assembles with default options: the B record in the capture, not the
/// configured limit, decides which chunks make a line.
#[test]
fn the_announced_layout_wins_over_the_configured_limit() {
    check_session(&SESSION1, ReadlineOptions::default);
    check_session(&SESSION2, || opts(16_384));
}

#[test]
fn session1_provenance() {
    let (events, _) = assemble(&fixture("session1.jsonl"), 1 << 20, opts(16_384));
    let got = typed_lines(&events);
    let first = got[0];
    assert_eq!(first.comm, b"bash");
    assert!(first.tty.starts_with(b"pts"), "{:?}", first.tty);
    assert_eq!((first.uid, first.gid), (0, 0));
    assert!(
        first.probe.starts_with("uprobe:/")
            && first.probe.ends_with("bash:readline_internal_teardown"),
        "{}",
        first.probe
    );
    assert!(first.pid > 1 && first.ppid > 1 && first.cgroup > 0);
    assert_eq!(first.pid, first.tid, "bash is single-threaded");
    // One shell typed everything: same task, time moves forward.
    for w in got.windows(2) {
        assert_eq!(
            (w[0].pid, w[0].tid, w[0].ppid, &w[0].tty),
            (w[1].pid, w[1].tid, w[1].ppid, &w[1].tty)
        );
        assert!(w[0].nsecs < w[1].nsecs);
    }
    // Ctrl-D: the shell is leaving; the terminal may already be gone, the line is empty.
    assert!(got.last().unwrap().eof);
}

#[test]
fn session1_an_edited_history_line_has_its_edited_length() {
    let (events, _) = assemble(&fixture("session1.jsonl"), 1 << 20, opts(16_384));
    let got = typed_lines(&events);
    let i = got
        .iter()
        .position(|l| l.line == b"echo history-edit-XYZ")
        .expect("the history entry");
    let edited = got[i + 1];
    assert_eq!(edited.line, b"echo history-edit-");
    assert_eq!(edited.len, 18);
}

#[test]
fn session1_padding_cannot_hide_the_command() {
    let (events, _) = assemble(&fixture("session1.jsonl"), 1 << 20, opts(16_384));
    let got = typed_lines(&events);
    let cut: Vec<_> = got.iter().filter(|l| l.truncated).collect();
    assert_eq!(cut.len(), 1, "the 100,318-byte line is cut");

    // Longer than the head, shorter than head + tail: head and tail meet, the line is whole.
    let a = got.iter().find(|l| l.len == 20_015).unwrap();
    assert!(!a.truncated && a.tail.is_none() && a.tail_offset.is_none());
    assert_eq!(a.line.len(), 20_015);
    assert!(a.line[..16_400].iter().all(|&b| b == b' '));
    assert!(a.line.ends_with(b"    : rm -rf /tmp/x"));

    // Longer than head + tail: the tail is the last 65,600 bytes of whole chunks plus the
    // partial one, and the command, 318 bytes before the end, is in it.
    let b = cut[0];
    assert_eq!(b.len, 100_318);
    assert_eq!(b.tail_offset, Some(100_200 - 65_600));
    let tail = b.tail.as_deref().unwrap();
    assert_eq!(tail.len(), 100_318 - 34_600);
    let cmd = b": rm -rf /tmp/y; #";
    let at = tail.windows(cmd.len()).position(|w| w == cmd).unwrap();
    assert_eq!(34_600 + at, 100_000);
    assert!(tail[at + cmd.len()..].iter().all(|&c| c == b'z'));
}

#[test]
fn session2_a_300_kb_line_is_captured_whole() {
    let (events, _) = assemble(
        &fixture("session2.jsonl"),
        1 << 20,
        opts(DEFAULT_MAX_LINE_BYTES),
    );
    let got = typed_lines(&events);
    let big: Vec<_> = got.iter().filter(|l| l.len > 1000).collect();
    assert_eq!(big.len(), 1);
    let l = big[0];
    assert_eq!(
        (l.len, l.line.len(), l.truncated),
        (300_000, 300_000, false)
    );
    assert!(l.tail.is_none());
    let cmd = b": rm -rf /tmp/z; #";
    let at = l.line.windows(cmd.len()).position(|w| w == cmd).unwrap();
    assert_eq!(at, 250_000 - cmd.len());
    assert!(l.line[..at].iter().all(|&c| c == b' '));
    assert!(l.line[250_000..].iter().all(|&c| c == b'w'));
}
