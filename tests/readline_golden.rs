//! Golden tests: real bpftrace 0.17 output of `scripts/bashreadline.bt` (captured with
//! `tests/fixtures/readline/capture.sh` while a real bash under tmux was typed into) goes
//! through the JSON decoder and the readline Assembler; the lines must be exactly the bytes
//! that were typed (listed as hex in `*.expected`).

use std::path::PathBuf;

use bt2immu::decode::{Decoder, Event, Format};
use bt2immu::readline::{AssembledEvent, Assembler, ReadlineLine, ReadlineOptions, STRIDE};

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/readline")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Expected lines: hex of the typed bytes, one per line; `EOF` for Ctrl-D.
fn expected(name: &str) -> Vec<Option<Vec<u8>>> {
    String::from_utf8(fixture(name))
        .unwrap()
        .lines()
        .map(|l| {
            if l == "EOF" {
                None
            } else {
                Some(hex::decode(l).unwrap())
            }
        })
        .collect()
}

/// Runs captured stdout through Decoder + Assembler, feeding it in odd-sized pieces.
fn assemble(stdout: &[u8], piece: usize) -> (Vec<AssembledEvent>, Assembler) {
    let mut dec = Decoder::new(Format::Json);
    let mut asm = Assembler::new(ReadlineOptions::default());
    let mut out = Vec::new();
    let mut events = Vec::new();
    for p in stdout.chunks(piece) {
        events.extend(dec.push(p));
    }
    events.extend(dec.finish());
    for ev in events {
        match ev {
            Event::Output(line) => out.extend(asm.push(&line)),
            Event::Attached { .. } | Event::ExitMarker => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
    out.extend(asm.finish());
    (out, asm)
}

fn typed_lines(events: &[AssembledEvent]) -> Vec<&ReadlineLine> {
    events
        .iter()
        .map(|e| match e {
            AssembledEvent::Line(l) => l,
            AssembledEvent::Malformed { raw, reason } => {
                panic!("malformed: {reason}: {}", String::from_utf8_lossy(raw))
            }
        })
        .collect()
}

/// The whole line, with the tail of a cut line placed at its offset (the middle of a cut
/// line is unknown and compared as such).
fn check_line(l: &ReadlineLine, want: &[u8]) {
    assert_eq!(
        l.len,
        want.len() as u64,
        "length of {:?}",
        String::from_utf8_lossy(&l.line)
    );
    assert!(!l.len_is_lower_bound);
    if l.truncated {
        assert!(want.len() > l.line.len());
        assert_eq!(l.line, want[..l.line.len()]);
        let off = l.tail_offset.unwrap() as usize;
        assert_eq!(l.tail.as_deref().unwrap(), &want[off..]);
    } else {
        assert_eq!(l.line, want, "line {:?}", String::from_utf8_lossy(want));
        assert!(l.tail.is_none());
    }
}

#[test]
fn session1_every_typed_line_byte_exact() {
    let stdout = fixture("session1.jsonl");
    let want = expected("session1.expected");
    for piece in [stdout.len(), 4096, 1] {
        let (events, asm) = assemble(&stdout, piece);
        let got = typed_lines(&events);
        assert_eq!(got.len(), want.len(), "number of lines");
        for (l, w) in got.iter().zip(&want) {
            match w {
                None => {
                    assert!(l.eof, "expected EOF, got {l:?}");
                    assert!(l.line.is_empty());
                }
                Some(w) => {
                    assert!(!l.eof);
                    check_line(l, w);
                }
            }
        }
        let a = asm.announced().expect("B record");
        assert_eq!(a.stride, STRIDE as u64);
        assert_eq!(a.head_chunks, 123);
    }
}

#[test]
fn session1_provenance() {
    let (events, _) = assemble(&fixture("session1.jsonl"), 1 << 20);
    let got = typed_lines(&events);
    let first = got[0];
    assert_eq!(first.comm, b"bash");
    assert!(first.tty.starts_with(b"pts"), "{:?}", first.tty);
    assert_eq!(first.uid, 0);
    assert_eq!(
        first.probe,
        "uretprobe:/bin/bash:readline_internal_teardown"
    );
    assert!(first.pid > 1 && first.ppid > 1 && first.cgroup > 0);
    // One shell typed everything: same task, time moves forward.
    for w in got.windows(2) {
        assert_eq!(
            (w[0].pid, w[0].tid, w[0].ppid),
            (w[1].pid, w[1].tid, w[1].ppid)
        );
        assert!(w[0].nsecs < w[1].nsecs);
    }
}

#[test]
fn session1_padding_cannot_hide_the_command() {
    let (events, _) = assemble(&fixture("session1.jsonl"), 1 << 20);
    let got = typed_lines(&events);
    let cut: Vec<_> = got.iter().filter(|l| l.truncated).collect();
    assert_eq!(
        cut.len(),
        1,
        "only the 20,000-byte line is longer than the head"
    );
    let l = cut[0];
    assert_eq!(l.len, 20_000);
    assert_eq!(l.line.len(), 123 * STRIDE);
    assert!(l.line.iter().all(|&b| b == b' '));
    assert!(l.tail.as_deref().unwrap().ends_with(b": rm -rf /"));
}
