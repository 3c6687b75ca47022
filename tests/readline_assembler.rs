//! The Assembler against reordered, lost and foreign records, built from the real capture.

use std::time::{Duration, Instant};

use bt2immu::decode::{Decoder, Event, Format};
use bt2immu::readline::{AssembledEvent, Assembler, ReadlineOptions};

/// The decoded output lines of the real capture (without the B record).
fn records() -> Vec<Vec<u8>> {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/readline/session1.jsonl"
    );
    let mut dec = Decoder::new(Format::Json);
    let mut evs = dec.push(&std::fs::read(p).unwrap());
    evs.extend(dec.finish());
    evs.into_iter()
        .filter_map(|e| match e {
            Event::Output(l) if !l.starts_with(b"BT2I1 B ") => Some(l),
            _ => None,
        })
        .collect()
}

fn run(recs: &[Vec<u8>]) -> Vec<AssembledEvent> {
    let mut a = Assembler::new(ReadlineOptions::default());
    let mut out: Vec<_> = recs.iter().flat_map(|r| a.push(r)).collect();
    out.extend(a.finish());
    out
}

fn lines(evs: &[AssembledEvent]) -> Vec<Vec<u8>> {
    evs.iter()
        .filter_map(|e| match e {
            AssembledEvent::Line(l) => Some(l.line.clone()),
            _ => None,
        })
        .collect()
}

fn kind(r: &[u8]) -> u8 {
    r[6]
}

#[test]
fn program_order_does_not_matter() {
    let recs = records();
    let want = run(&recs);
    assert_eq!(lines(&want).len(), 13);
    // Each program's records stay in order, but the three programs interleave differently:
    // all P first, then T/F, then C/E (a stable partition keeps each program's order).
    let mut reordered: Vec<Vec<u8>> = recs.iter().filter(|r| kind(r) == b'P').cloned().collect();
    reordered.extend(
        recs.iter()
            .filter(|r| matches!(kind(r), b'T' | b'F'))
            .cloned(),
    );
    reordered.extend(
        recs.iter()
            .filter(|r| matches!(kind(r), b'C' | b'E'))
            .cloned(),
    );
    assert_eq!(run(&reordered), want);
    // And the other way round: heads first.
    let mut heads_first: Vec<Vec<u8>> = recs
        .iter()
        .filter(|r| matches!(kind(r), b'C' | b'E'))
        .cloned()
        .collect();
    heads_first.extend(
        recs.iter()
            .filter(|r| !matches!(kind(r), b'C' | b'E'))
            .cloned(),
    );
    assert_eq!(run(&heads_first), want);
}

#[test]
fn a_lost_chunk_makes_that_line_malformed_and_keeps_the_others() {
    let recs = records();
    // Drop the third C record of the 5,000-byte line (offset 268).
    let i = recs
        .iter()
        .position(|r| {
            r.starts_with(b"BT2I1 C ")
                && r.windows(5).any(|w| w == b" 268 ")
                && r.ends_with(b"xxxx")
        })
        .unwrap();
    let mut lost = recs.clone();
    let dropped = lost.remove(i);
    let out = run(&lost);
    let bad: Vec<_> = out
        .iter()
        .filter_map(|e| match e {
            AssembledEvent::Malformed { raw, reason } => Some((raw, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].1.contains("38 chunks, 37 arrived"), "{}", bad[0].1);
    // Nothing dropped: every other record of the group is in the raw bytes.
    let raw = bad[0].0;
    assert!(!raw.windows(dropped.len()).any(|w| w == &dropped[..]));
    assert!(raw
        .windows(13)
        .any(|w| w == b"BT2I1 C 26826" || w.starts_with(b"BT2I1 C ")));
    assert_eq!(lines(&out).len(), 12);
    assert!(lines(&out)
        .iter()
        .all(|l| l.len() != 5000 && l.len() != 268 * 5));
}

#[test]
fn a_lost_provenance_record_does_not_shift_the_others() {
    let recs = records();
    // Drop the P record of the second line: its head must not take the third line's P.
    let p_idx: Vec<usize> = recs
        .iter()
        .enumerate()
        .filter(|(_, r)| kind(r) == b'P')
        .map(|(i, _)| i)
        .collect();
    let mut lost = recs.clone();
    lost.remove(p_idx[1]);
    let mut a = Assembler::new(ReadlineOptions::default());
    let mut out: Vec<_> = lost.iter().flat_map(|r| a.push(r)).collect();
    // The second line waits for its P; time passes; it is given up, flagged.
    out.extend(a.flush_stale(Instant::now() + Duration::from_secs(60)));
    let good = lines(&out);
    assert_eq!(good.len(), 12);
    let all = run(&recs);
    let want = lines(&all);
    assert_eq!(good[0], want[0]);
    assert!(!good.contains(&want[1]));
    let bad: Vec<_> = out
        .iter()
        .filter_map(|e| match e {
            AssembledEvent::Malformed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(bad.len(), 1);
    assert!(
        bad[0].contains("provenance (P) record never arrived"),
        "{}",
        bad[0]
    );
    // Each remaining line kept its own provenance (nsecs strictly increasing, as captured).
    let ns: Vec<u64> = out
        .iter()
        .filter_map(|e| match e {
            AssembledEvent::Line(l) => Some(l.nsecs),
            _ => None,
        })
        .collect();
    assert!(ns.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn records_from_before_attach_complete_and_foreign_lines_are_kept() {
    let mut recs = records();
    // A P whose head program was not attached yet (seen in a real run before the B record
    // was added), and a line that is not part of the protocol at all.
    let orphan = b"BT2I1 P 26826 26826 55cf79437b80 1000 26824 0 0 4294967295 4294967295 1 \
uretprobe:/bin/bash:readline_internal_teardown pts0 bash"
        .to_vec();
    recs.insert(0, orphan.clone());
    recs.insert(3, b"hello from someone else".to_vec());
    let out = run(&recs);
    assert_eq!(lines(&out).len(), 13);
    let bad: Vec<_> = out
        .iter()
        .filter_map(|e| match e {
            AssembledEvent::Malformed { raw, reason } => Some((raw.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad
        .iter()
        .any(|(raw, r)| raw == &orphan && r.contains("without the line's head")));
    assert!(bad.iter().any(|(raw, _)| raw == b"hello from someone else"));
}

#[test]
fn truncated_stream_is_flushed_flagged_at_finish() {
    let recs = records();
    // Stop in the middle of the 5,000-byte line's head.
    let i = recs.iter().position(|r| r.ends_with(b"xxxx")).unwrap() + 5;
    let out = run(&recs[..i]);
    let last = out.last().unwrap();
    let AssembledEvent::Malformed { raw, reason } = last else {
        panic!("{last:?}")
    };
    assert!(
        reason.contains("head chunks without their end record"),
        "{reason}"
    );
    assert_eq!(
        raw.iter().filter(|&&b| b == b'\n').count(),
        4,
        "all five chunks kept"
    );
}
