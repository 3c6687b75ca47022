//! The Assembler against the BT2I2 records of `scripts/bashreadline.bt`: records of a line in
//! every order, lines of several tasks interleaved, short, empty, exact-multiple, end-of-file
//! and cut lines, and every way a line can be incomplete or inconsistent.
//!
//! The records are built here from the protocol as the script's header describes it (which
//! chunks a line of `len` bytes is printed as), independently of `Announced::layout`, so a
//! mistake in either shows up as a mismatch.

use std::time::{Duration, Instant};

use bt2immu::readline::{
    Announced, AssembledEvent, Assembler, IncompleteLine, ReadlineLine, ReadlineOptions,
    EXEC_MAX_BYTES,
};
use proptest::prelude::*;

const PID: u64 = 4242;
const PROBE: &str = "uprobe:/usr/bin/bash:readline_internal_teardown";

/// A small layout, announced as the script's BEGIN does: chunk 200, head 400, tail 200.
fn begin(chunk: u64, head: u64, tail: u64) -> Vec<u8> {
    format!("BT2I2 B {chunk} {head} {tail}").into_bytes()
}

fn small() -> Vec<u8> {
    begin(200, 400, 200)
}

/// A P record as the entry program prints it; `comm` has a space (it is the rest of the record).
fn p(tid: u64, id: u64, stored: bool, eof: bool, len: u64) -> Vec<u8> {
    format!(
        "BT2I2 P {PID} {tid} {id} {} {} {len} 1000 1001 1002 4294967295 7 12345 {PROBE} pts3 my bash",
        stored as u8, eof as u8
    )
    .into_bytes()
}

/// A C record: bytes as bpftrace's `%rx` prints them.
fn c(tid: u64, id: u64, off: u64, data: &[u8]) -> Vec<u8> {
    let mut r = format!("BT2I2 C {tid} {id} {off} ").into_bytes();
    for b in data {
        r.extend_from_slice(format!("\\x{b:02x}").as_bytes());
    }
    r
}

/// An S record: the last partial chunk as a string, the rest of the record.
fn s(tid: u64, id: u64, off: u64, data: &[u8]) -> Vec<u8> {
    let mut r = format!("BT2I2 S {tid} {id} {off} ").into_bytes();
    r.extend_from_slice(data);
    r
}

/// Where the tail of a cut line starts, from the script's tail program: the full chunks of
/// the last `tail` bytes beyond the head.
fn tail_start(len: u64, chunk: u64, head: u64, tail: u64) -> u64 {
    let full_end = len - len % chunk;
    if full_end > head + tail {
        full_end - tail
    } else {
        head
    }
}

/// The chunk records the script's return programs print for `data` (in program order: head
/// parts, tail, last partial chunk).
fn chunk_records(tid: u64, id: u64, data: &[u8], chunk: u64, head: u64, tail: u64) -> Vec<Vec<u8>> {
    let len = data.len() as u64;
    let full_end = len - len % chunk;
    let mut offs: Vec<u64> = Vec::new();
    let mut off = 0;
    while off + chunk <= len.min(head) {
        offs.push(off);
        off += chunk;
    }
    if len > head {
        let mut off = tail_start(len, chunk, head, tail);
        while off < full_end {
            offs.push(off);
            off += chunk;
        }
    }
    let mut out: Vec<Vec<u8>> = offs
        .iter()
        .map(|&o| c(tid, id, o, &data[o as usize..(o + chunk) as usize]))
        .collect();
    if full_end < len {
        out.push(s(tid, id, full_end, &data[full_end as usize..]));
    }
    out
}

/// P first, then the chunks, in the small layout.
fn line_records(tid: u64, id: u64, data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![p(tid, id, true, false, data.len() as u64)];
    out.extend(chunk_records(tid, id, data, 200, 400, 200));
    out
}

/// Line bytes that show where each one came from: every byte differs from its neighbours,
/// and spaces and newlines occur (they are data, not separators).
fn text(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| match i % 53 {
            7 => b' ',
            31 => b'\n',
            _ => (i as u8).wrapping_mul(31).wrapping_add(seed) | 1,
        })
        .collect()
}

fn assembler() -> Assembler {
    Assembler::new(ReadlineOptions::default())
}

fn push_all(a: &mut Assembler, recs: &[Vec<u8>]) -> Vec<AssembledEvent> {
    recs.iter().flat_map(|r| a.push(r)).collect()
}

fn run(recs: &[Vec<u8>]) -> Vec<AssembledEvent> {
    let mut a = assembler();
    let mut out = push_all(&mut a, recs);
    out.extend(a.finish());
    out
}

fn only_line(evs: &[AssembledEvent]) -> &ReadlineLine {
    match evs {
        [AssembledEvent::Line(l)] => l,
        _ => panic!("want exactly one line, got {evs:#?}"),
    }
}

fn only_malformed(evs: &[AssembledEvent]) -> (Vec<u8>, String) {
    match evs {
        [AssembledEvent::Malformed { raw, reason }] => (raw.clone(), reason.clone()),
        _ => panic!("want exactly one malformed event, got {evs:#?}"),
    }
}

fn joined(recs: &[&Vec<u8>]) -> Vec<u8> {
    recs.iter()
        .map(|r| r.as_slice())
        .collect::<Vec<_>>()
        .join(&b'\n')
}

/// All permutations of 0..n (Heap's algorithm).
fn permutations(n: usize) -> Vec<Vec<usize>> {
    fn heap(k: usize, a: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if k <= 1 {
            out.push(a.clone());
            return;
        }
        for i in 0..k - 1 {
            heap(k - 1, a, out);
            if k % 2 == 0 {
                a.swap(i, k - 1);
            } else {
                a.swap(0, k - 1);
            }
        }
        heap(k - 1, a, out);
    }
    let mut a: Vec<usize> = (0..n).collect();
    let mut out = Vec::new();
    heap(n, &mut a, &mut out);
    out
}

#[test]
fn short_line_is_one_s_record_with_all_provenance() {
    let mut a = assembler();
    assert!(a.push(&small()).is_empty());
    assert_eq!(
        a.announced(),
        Some(Announced {
            chunk: 200,
            head_bytes: 400,
            tail_bytes: 200
        })
    );
    assert!(a.push(&p(77, 9_000_000_001, true, false, 7)).is_empty());
    let out = a.push(&s(77, 9_000_000_001, 0, b"ls  -l\n"));
    let l = only_line(&out);
    assert_eq!(
        *l,
        ReadlineLine {
            pid: PID,
            tid: 77,
            ppid: 1000,
            uid: 1001,
            gid: 1002,
            loginuid: 4294967295,
            sessionid: 7,
            tty: b"pts3".to_vec(),
            comm: b"my bash".to_vec(),
            cgroup: 12345,
            nsecs: 9_000_000_001,
            probe: PROBE.into(),
            line: b"ls  -l\n".to_vec(),
            len: 7,
            truncated: false,
            tail: None,
            tail_offset: None,
            eof: false,
            executed: false,
            executed_cut: false,
            line_editing_off: false,
        }
    );
    assert!(a.finish().is_empty());
}

/// A Q record: bash is about to run a command readline did not return (C-x C-e, bind -x).
fn q(tid: u64, id: u64, cut: bool, len: u64) -> Vec<u8> {
    format!(
        "BT2I2 Q {PID} {tid} {id} {} {len} 1000 1001 1002 4294967295 7 12345 \
         uprobe:/usr/bin/bash:parse_and_execute pts3 bash",
        cut as u8
    )
    .into_bytes()
}

#[test]
fn an_executed_command_is_a_whole_line_whatever_the_head_limit() {
    // 450 bytes with a 200-byte head: a typed line would be cut; an executed command (at most
    // 32 KiB, sent whole by one program) is not.
    let data = text(450, 11);
    let mut recs = vec![begin(200, 200, 200), q(9, 42, false, 450)];
    recs.push(c(9, 42, 0, &data[..200]));
    recs.push(c(9, 42, 200, &data[200..400]));
    recs.push(s(9, 42, 400, &data[400..]));
    let out = run(&recs);
    let l = only_line(&out);
    assert_eq!(l.line, data);
    assert_eq!(l.len, 450);
    assert!(l.executed && !l.executed_cut && !l.truncated && l.tail.is_none());
    assert_eq!(l.probe, "uprobe:/usr/bin/bash:parse_and_execute");

    // Cut at the script's limit (a multiple of the chunk size, so only full chunks):
    // flagged, with what was read.
    let cap = EXEC_MAX_BYTES as usize;
    assert_eq!(cap % 200, 0);
    let big = text(cap, 12);
    let mut recs = vec![q(9, 43, true, cap as u64)];
    for off in (0..cap).step_by(200) {
        recs.push(c(9, 43, off as u64, &big[off..off + 200]));
    }
    assert_eq!(recs.len(), 1 + cap / 200);
    let out = run(&recs);
    let l = only_line(&out);
    assert!(l.executed && l.executed_cut);
    assert_eq!(l.len, EXEC_MAX_BYTES);
    assert_eq!(l.line, big);

    // A Q record claiming more than the script can send is not believed.
    let out = run(&[q(9, 44, false, EXEC_MAX_BYTES + 1)]);
    let want = format!("over {EXEC_MAX_BYTES}");
    assert!(
        matches!(&out[..], [AssembledEvent::Malformed { reason, .. }] if reason.contains(&want)),
        "{out:?}"
    );
}

#[test]
fn every_order_of_a_lines_records_gives_the_same_line_on_its_last_record() {
    // 450 bytes with a 1000-byte head: C 0, C 200, S 400, and the P record.
    let data = text(450, 3);
    let mut recs = vec![begin(200, 1000, 200), p(5, 100, true, false, 450)];
    recs.extend(chunk_records(5, 100, &data, 200, 1000, 200));
    assert_eq!(recs.len(), 5, "B, P, C, C, S");
    let perms = permutations(4);
    assert_eq!(perms.len(), 24);
    for perm in perms {
        let mut a = assembler();
        assert!(a.push(&recs[0]).is_empty());
        for (n, &i) in perm.iter().enumerate() {
            let out = a.push(&recs[1 + i]);
            if n < 3 {
                assert!(out.is_empty(), "order {perm:?}: early {out:?}");
            } else {
                let l = only_line(&out);
                assert_eq!(l.line, data, "order {perm:?}");
                assert_eq!((l.len, l.truncated, l.tid, l.nsecs), (450, false, 5, 100));
            }
        }
        assert!(a.finish().is_empty(), "order {perm:?}");
    }
}

#[test]
fn lines_of_several_tasks_and_of_one_task_interleave() {
    // Two lines of tid 5 (ids 100 and 200) and one of tid 6 with the same id as one of them.
    let lines = [
        (5u64, 100u64, text(399, 1)),
        (5, 200, text(400, 2)),
        (6, 100, text(250, 3)),
    ];
    let per_line: Vec<Vec<Vec<u8>>> = lines
        .iter()
        .map(|(t, i, d)| {
            let mut r = line_records(*t, *i, d);
            // P last for one of them, S before C for another.
            if *t == 6 {
                r.rotate_left(1);
            } else {
                r.reverse();
            }
            r
        })
        .collect();
    // Round robin over the three lines, then the same with the lines' records reversed.
    let mut interleaved = vec![small()];
    let longest = per_line.iter().map(Vec::len).max().unwrap();
    for k in 0..longest {
        for recs in &per_line {
            if let Some(r) = recs.get(k) {
                interleaved.push(r.clone());
            }
        }
    }
    let mut backwards = vec![small()];
    backwards.extend(interleaved[1..].iter().rev().cloned());
    for recs in [interleaved, backwards] {
        let out = run(&recs);
        assert_eq!(out.len(), 3, "{out:#?}");
        for (t, i, d) in &lines {
            let got: Vec<&ReadlineLine> = out
                .iter()
                .filter_map(|e| match e {
                    AssembledEvent::Line(l) if l.tid == *t && l.nsecs == *i => Some(l),
                    _ => None,
                })
                .collect();
            assert_eq!(got.len(), 1, "tid {t} id {i}: {out:#?}");
            assert_eq!(got[0].line, *d, "tid {t} id {i}");
            assert_eq!(got[0].len, d.len() as u64);
            assert!(!got[0].truncated);
        }
    }
}

#[test]
fn empty_line_completes_on_its_p_record() {
    let mut a = assembler();
    a.push(&small());
    let out = a.push(&p(5, 1, true, false, 0));
    let l = only_line(&out);
    assert!(l.line.is_empty());
    assert_eq!((l.len, l.eof, l.truncated), (0, false, false));
    assert!(a.finish().is_empty());
}

#[test]
fn end_of_file_is_a_line_flagged_eof() {
    let mut a = assembler();
    a.push(&small());
    let out = a.push(&p(5, 1, true, true, 0));
    let l = only_line(&out);
    assert!(l.eof);
    assert!(l.line.is_empty());
    assert_eq!(l.len, 0);
    // End-of-file with a length is not something the script prints.
    let (_, reason) = only_malformed(&run(&[small(), p(5, 2, true, true, 3)]));
    assert!(reason.contains("end-of-file"), "{reason}");
}

#[test]
fn exact_multiple_of_the_chunk_has_no_s_record() {
    let data = text(400, 9);
    let recs = line_records(5, 1, &data);
    assert_eq!(recs.len(), 3, "P and two C records");
    assert!(recs.iter().all(|r| !r.starts_with(b"BT2I2 S")));
    let mut a = assembler();
    a.push(&small());
    assert!(a.push(&recs[0]).is_empty());
    assert!(a.push(&recs[2]).is_empty());
    let out = a.push(&recs[1]);
    assert_eq!(only_line(&out).line, data);
    assert!(!only_line(&out).truncated);
}

#[test]
fn cut_lines_keep_the_head_the_exact_length_and_the_tail() {
    // (len, where the tail starts) in the layout chunk 200, head 400, tail 200. The tail
    // starting at the head's end means every byte came: such a line is whole.
    for (len, t0) in [
        (401u64, 400u64), // only a partial chunk beyond the head
        (450, 400),
        (600, 400), // one full chunk beyond the head: all of it is tail
        (650, 400), // full_end 600 is not beyond head + tail
    ] {
        assert_eq!(tail_start(len, 200, 400, 200), t0, "test's own arithmetic");
        let data = text(len as usize, len as u8);
        let mut recs = vec![p(8, len, true, false, len)];
        recs.extend(chunk_records(8, len, &data, 200, 400, 200));
        recs.rotate_left(1);
        let out = run(&std::iter::once(small()).chain(recs).collect::<Vec<_>>());
        let l = only_line(&out);
        assert_eq!(
            l.line, data,
            "len {len}: head and tail meet, the line is whole"
        );
        assert_eq!((l.len, l.truncated, l.tail_offset), (len, false, None));
        assert_eq!(l.tail, None);
    }
    for (len, t0) in [
        (800u64, 600u64), // full_end 800 > 600: the last 200 full bytes
        (1000, 800),      // exact multiple, no S
        (1234, 1000),
    ] {
        assert_eq!(tail_start(len, 200, 400, 200), t0, "test's own arithmetic");
        let data = text(len as usize, len as u8);
        let mut recs = vec![p(8, len, true, false, len)];
        recs.extend(chunk_records(8, len, &data, 200, 400, 200));
        // Chunks first, P last.
        recs.rotate_left(1);
        let mut a = assembler();
        a.push(&small());
        let mut out = push_all(&mut a, &recs);
        out.extend(a.finish());
        let l = only_line(&out);
        assert_eq!(l.line, data[..400], "len {len}");
        assert_eq!(l.len, len);
        assert!(l.truncated, "len {len}");
        assert_eq!(l.tail_offset, Some(t0), "len {len}");
        assert_eq!(
            l.tail.as_deref(),
            Some(&data[t0 as usize..]),
            "len {len}: tail"
        );
    }
}

#[test]
fn a_line_of_exactly_the_head_is_not_cut() {
    let data = text(400, 4);
    let out = run(&[small(), p(5, 1, true, false, 400)]
        .into_iter()
        .chain(chunk_records(5, 1, &data, 200, 400, 200))
        .collect::<Vec<_>>());
    let l = only_line(&out);
    assert_eq!(
        (l.truncated, l.tail.is_none(), l.tail_offset),
        (false, true, None)
    );
    assert_eq!(l.line, data);
}

#[test]
fn without_a_b_record_the_options_decide_the_layout() {
    // max_line_bytes 300 rounds up to a 400-byte head: a 66,450-byte line is cut, and its
    // tail is the script's last 65,600 full bytes and the partial chunk.
    let data = text(66_450, 5);
    let recs: Vec<Vec<u8>> = std::iter::once(p(5, 1, true, false, 66_450))
        .chain(chunk_records(5, 1, &data, 200, 400, 65_600))
        .collect();
    let mut a = Assembler::new(ReadlineOptions {
        max_line_bytes: 300,
        ..Default::default()
    });
    assert_eq!(a.announced(), None);
    let out = push_all(&mut a, &recs);
    let l = only_line(&out);
    assert!(l.truncated);
    assert_eq!(l.line, data[..400]);
    assert_eq!(l.tail_offset, Some(800));
    assert_eq!(l.tail.as_deref(), Some(&data[800..]));
    let data = text(450, 5);

    // The default options (1 MiB) take the same 450 bytes whole ...
    let recs: Vec<Vec<u8>> = std::iter::once(p(5, 1, true, false, 450))
        .chain(chunk_records(5, 1, &data, 200, 1_048_600, 65_600))
        .collect();
    let out = run(&recs);
    assert_eq!(only_line(&out).line, data);
    assert!(!only_line(&out).truncated);

    // ... unless the script announced a smaller head: the B record wins over the options
    // (chunk 200, head 400, tail 200: 1,000 bytes are cut).
    let data = text(1000, 5);
    let mut cut = vec![small(), p(5, 1, true, false, 1000)];
    cut.extend(chunk_records(5, 1, &data, 200, 400, 200));
    let out = run(&cut);
    assert!(only_line(&out).truncated);
    // And a chunk size other than 200 is followed too.
    let mut odd = vec![begin(7, 21, 14), p(5, 1, true, false, 50)];
    odd.extend(chunk_records(5, 1, &data[..50], 7, 21, 14));
    let out = run(&odd);
    let l = only_line(&out);
    assert_eq!(l.line, data[..21]);
    assert_eq!(l.tail_offset, Some(35));
    assert_eq!(l.tail.as_deref(), Some(&data[35..50]));
}

fn only_incomplete(evs: &[AssembledEvent]) -> &IncompleteLine {
    match evs {
        [AssembledEvent::Incomplete(i)] => i,
        _ => panic!("want exactly one incomplete line, got {evs:#?}"),
    }
}

#[test]
fn a_missing_chunk_waits_then_comes_out_incomplete_with_every_byte_that_arrived() {
    let data = text(450, 6);
    let recs = line_records(5, 1, &data);
    // Drop C 200.
    let kept = [&recs[0], &recs[1], &recs[3]];
    assert!(recs[2].starts_with(b"BT2I2 C 5 1 200 "));
    let mut a = Assembler::new(ReadlineOptions {
        stale_after: Duration::from_secs(5),
        ..Default::default()
    });
    a.push(&small());
    let t0 = Instant::now();
    for r in kept {
        assert!(a.push_at(r, t0).is_empty());
    }
    assert!(a.flush_stale(t0 + Duration::from_secs(4)).is_empty());
    let out = a.flush_stale(t0 + Duration::from_secs(5));
    let inc = only_incomplete(&out);
    assert_eq!((inc.tid, inc.id), (5, 1));
    // Bytes 0..200 and 400..450 arrived; 200..400 did not.
    assert_eq!(
        inc.pieces,
        vec![(0, data[..200].to_vec()), (400, data[400..].to_vec())]
    );
    assert_eq!(inc.missing, vec![(200, 200)]);
    let about = inc.about.as_ref().expect("the P record arrived");
    assert_eq!((about.pid, about.len, about.uid), (PID, 450, 1001));
    assert!(about.line.is_empty() && about.tail.is_none());
    assert!(inc.reason.contains("2 of the 3 chunks"), "{}", inc.reason);
    assert!(inc.reason.contains("450-byte line"), "{}", inc.reason);
    assert!(
        inc.reason.contains(&format!("pid {PID} tid 5 line 1")),
        "{}",
        inc.reason
    );
    assert!(a.finish().is_empty());

    // The missing chunk arriving after that is flagged too, not taken for a new line.
    let (raw, reason) = only_malformed(&a.push(&recs[2]));
    assert_eq!(raw, recs[2]);
    assert!(reason.contains("already complete"), "{reason}");
}

#[test]
fn chunks_without_their_p_record_come_out_at_finish_with_their_bytes() {
    let data = text(450, 7);
    let recs = line_records(5, 1, &data);
    let mut a = assembler();
    a.push(&small());
    let chunks: Vec<&Vec<u8>> = recs[1..].iter().collect();
    for r in &chunks {
        assert!(a.push(r).is_empty());
    }
    let out = a.finish();
    let inc = only_incomplete(&out);
    assert!(inc.about.is_none());
    assert_eq!(inc.pieces, vec![(0, data.clone())]);
    assert!(inc.missing.is_empty(), "the length is unknown");
    assert!(
        inc.reason
            .contains("450 bytes arrived without the line's P record"),
        "{}",
        inc.reason
    );
}

#[test]
fn a_missing_chunk_does_not_hold_up_other_lines() {
    let a_data = text(450, 8);
    let b_data = text(300, 9);
    let mut recs = vec![small()];
    let a_recs = line_records(5, 1, &a_data);
    recs.extend(
        a_recs
            .iter()
            .filter(|r| !r.starts_with(b"BT2I2 C 5 1 0 "))
            .cloned(),
    );
    recs.extend(line_records(6, 2, &b_data));
    let out = run(&recs);
    assert_eq!(out.len(), 2, "{out:#?}");
    assert!(matches!(&out[0], AssembledEvent::Line(l) if l.line == b_data && l.tid == 6));
    assert!(
        matches!(&out[1], AssembledEvent::Incomplete(i) if i.reason.contains("tid 5 line 1") && i.missing == vec![(0, 200)])
    );
}

/// Runs records and expects one Malformed event holding all of them, with `why` in its reason.
fn expect_malformed(recs: &[Vec<u8>], why: &str) {
    let mut all = vec![small()];
    all.extend_from_slice(recs);
    let out = run(&all);
    let (raw, reason) = only_malformed(&out);
    assert_eq!(raw, joined(&recs.iter().collect::<Vec<_>>()), "{reason}");
    assert!(reason.contains(why), "want {why:?} in {reason:?}");
}

#[test]
fn inconsistent_chunks_make_the_line_malformed() {
    let data = text(450, 10);
    let [pr, c0, c200, s400] = <[Vec<u8>; 4]>::try_from(line_records(5, 1, &data)).unwrap();

    // The same chunk twice (before the line could complete).
    expect_malformed(
        &[pr.clone(), c0.clone(), c0.clone()],
        "chunk at offset 0 twice",
    );
    // A duplicate before the P record.
    expect_malformed(&[c200.clone(), c200.clone()], "chunk at offset 200 twice");

    // A short C record where a full chunk belongs, after and before the P record.
    let short = c(5, 1, 0, &data[..100]);
    expect_malformed(
        &[pr.clone(), short.clone()],
        "a 100-byte chunk at offset 0 is not part of a 450-byte line",
    );
    expect_malformed(
        &[short.clone(), pr.clone()],
        "a 100-byte chunk at offset 0 is not part of a 450-byte line",
    );
    // A last chunk of the wrong size.
    expect_malformed(
        &[pr.clone(), s(5, 1, 400, &data[400..420])],
        "a 20-byte chunk at offset 400",
    );
    // Chunks at offsets the layout does not have.
    expect_malformed(&[pr.clone(), c(5, 1, 100, &data[100..300])], "offset 100");
    expect_malformed(&[c(5, 1, 600, &data[..200]), pr.clone()], "offset 600");
    // A chunk for a line that ended earlier than it.
    expect_malformed(
        &[p(5, 1, true, false, 200), c200.clone()],
        "a 200-byte chunk at offset 200 is not part of a 200-byte line",
    );
    // A chunk for an empty line.
    expect_malformed(&[s400.clone(), p(5, 1, true, false, 0)], "0-byte line");
}

#[test]
fn records_after_a_line_is_complete_are_flagged_and_the_line_stands() {
    let data = text(250, 11);
    let recs = line_records(5, 1, &data);
    let mut a = assembler();
    a.push(&small());
    let out = push_all(&mut a, &recs);
    assert_eq!(only_line(&out).line, data);
    // A late copy of a chunk.
    let (raw, reason) = only_malformed(&a.push(&recs[1]));
    assert_eq!(raw, recs[1]);
    assert!(reason.contains("already complete"), "{reason}");
    // A second P record for the same line.
    let (raw, reason) = only_malformed(&a.push(&recs[0]));
    assert_eq!(raw, recs[0]);
    assert!(
        reason.contains("a P record for line 1, which was already complete"),
        "{reason}"
    );
    assert!(a.finish().is_empty());
}

#[test]
fn records_of_a_line_given_up_early_are_flagged_one_by_one() {
    let data = text(450, 13);
    let recs = line_records(5, 1, &data);
    let mut a = assembler();
    a.push(&small());
    // A duplicate chunk before the P record: the line is given up at once.
    let (raw, reason) = only_malformed(&push_all(&mut a, &[recs[1].clone(), recs[1].clone()]));
    assert_eq!(raw, joined(&[&recs[1], &recs[1]]));
    assert!(reason.contains("chunk at offset 0 twice"), "{reason}");
    // Its P record and its other chunks still come, and are not taken for a new line.
    for r in [&recs[0], &recs[2], &recs[3]] {
        let (raw, reason) = only_malformed(&a.push(r));
        assert_eq!(&raw, r);
        assert!(
            reason.contains("already complete or given up on"),
            "{reason}"
        );
    }
    assert!(a.finish().is_empty());
}

#[test]
fn two_p_records_for_one_line_are_malformed() {
    let data = text(450, 12);
    let recs = line_records(5, 1, &data);
    expect_malformed(
        &[recs[0].clone(), recs[1].clone(), recs[0].clone()],
        "second P record",
    );
}

#[test]
fn a_line_the_entry_could_not_store_is_malformed_at_once() {
    let mut a = assembler();
    a.push(&small());
    let pr = p(5, 1, false, false, 30);
    let (raw, reason) = only_malformed(&a.push(&pr));
    assert_eq!(raw, pr);
    assert!(reason.contains("30-byte line was not handed"), "{reason}");
    assert!(a.finish().is_empty());
    // An empty line needs no bytes: not storing it loses nothing.
    let out = run(&[small(), p(5, 2, false, false, 0)]);
    assert!(only_line(&out).line.is_empty());
}

#[test]
fn m_and_x_records_are_malformed_with_their_reason() {
    let m = b"BT2I2 M 4242 4243 99999".to_vec();
    let out = run(std::slice::from_ref(&m));
    let (raw, reason) = only_malformed(&out);
    assert_eq!(raw, m);
    assert!(reason.contains("pid 4242 tid 4243"), "{reason}");
    assert!(reason.contains("without its entry record"), "{reason}");

    // A shell with editing off had read input before the probes attached.
    let r = b"BT2I2 R 4242 4243 99999".to_vec();
    let out = run(std::slice::from_ref(&r));
    let (raw, reason) = only_malformed(&out);
    assert_eq!(raw, r);
    assert!(reason.contains("pid 4242 tid 4243"), "{reason}");
    assert!(reason.contains("before the probes attached"), "{reason}");

    let x = b"BT2I2 X this script must be run through bt2immu (it fills in the readline symbol addresses)"
        .to_vec();
    let out = run(std::slice::from_ref(&x));
    let (raw, reason) = only_malformed(&out);
    assert_eq!(raw, x);
    assert!(reason.contains("without bt2immu filling in"), "{reason}");
}

#[test]
fn undecodable_records_are_malformed_and_kept_whole() {
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"BT2I2 C 5 1 0 \\xZZ\\x41".to_vec(), "bad escape"),
        (b"BT2I2 C 5 1 0 \\x4".to_vec(), "not \\xNN escapes"),
        (b"BT2I2 C 5 1 0 41424344".to_vec(), "bad escape"),
        (b"BT2I2 C 5 1 0 ".to_vec(), "empty chunk"),
        (b"BT2I2 S 5 1 0 ".to_vec(), "empty chunk"),
        (b"BT2I2 C 5 x 0 \\x41".to_vec(), "bad id"),
        (b"BT2I2 P 1 2 3 1 0 5".to_vec(), "expected 15 fields"),
        (
            b"BT2I2 P 1 2 3 2 0 5 1 1 1 1 1 1 probe tty comm".to_vec(),
            "bad stored",
        ),
        (b"BT2I2 Q 1 2 3".to_vec(), "expected 14 fields"),
        (b"BT2I2 Z 1 2 3".to_vec(), "unknown BT2I2 record kind"),
        (b"BT2I2 ".to_vec(), "without a kind"),
        (b"BT2I1 C 5 1 0 \\x41".to_vec(), "not a BT2I2 record"),
        (b"hello from someone else".to_vec(), "not a BT2I2 record"),
        (b"BT2I2 M 1 2".to_vec(), "expected 3 fields"),
        (b"BT2I2 R 1".to_vec(), "expected 3 fields"),
        (b"BT2I2 R x 2 3".to_vec(), "bad pid"),
        // Found by an adversarial pass: offset + length overflowed (a panic in debug builds).
        (
            b"BT2I2 S 1 1 18446744073709551615 x".to_vec(),
            "out of range",
        ),
        (
            b"BT2I2 C 1 1 18446744073709551615 \\x41".to_vec(),
            "out of range",
        ),
        (
            b"BT2I2 C 1 1 4611686018427387905 \\x41".to_vec(),
            "out of range",
        ),
    ];
    for (rec, why) in bad {
        let out = run(&[small(), rec.clone()]);
        let (raw, reason) = only_malformed(&out);
        assert_eq!(raw, rec);
        assert!(
            reason.contains(why),
            "{:?}: want {why:?} in {reason:?}",
            String::from_utf8_lossy(&rec)
        );
    }
}

#[test]
fn a_bad_b_record_is_malformed_and_announces_nothing() {
    for rec in [
        "BT2I2 B 200 450 200",      // head not whole chunks
        "BT2I2 B 200 400 250",      // tail not whole chunks
        "BT2I2 B 200 99999800 200", // head beyond what the script can be rendered with
        "BT2I2 B 200 0 200",
        "BT2I2 B 0 400 200",
        "BT2I2 B 200 400",
        "BT2I2 B 200 400 x",
    ] {
        let mut a = assembler();
        let out = a.push(rec.as_bytes());
        let (raw, reason) = only_malformed(&out);
        assert_eq!(raw, rec.as_bytes());
        assert!(reason.starts_with("BT2I2 B record"), "{rec}: {reason}");
        assert_eq!(a.announced(), None, "{rec}");
    }
    // The largest head the script can be rendered with is accepted.
    let mut a = assembler();
    let max = bt2immu::readline::MAX_LINE_BYTES;
    assert!(a
        .push(format!("BT2I2 B 200 {max} 65600").as_bytes())
        .is_empty());
    assert_eq!(a.announced().map(|b| b.head_bytes), Some(max as u64));
}

#[test]
fn a_line_longer_than_any_head_is_cut_with_a_bounded_number_of_chunks() {
    // 10 GB announced: the layout has the head and the tail, not 50 million chunks.
    let len: u64 = 10_000_000_123;
    let mut a = assembler();
    a.push(&small());
    assert!(a.push(&p(5, 1, true, false, len)).is_empty());
    let t0 = tail_start(len, 200, 400, 200);
    let head = text(400, 1);
    let tail = text((len - t0) as usize, 2);
    let mut recs = vec![c(5, 1, 0, &head[..200]), c(5, 1, 200, &head[200..])];
    recs.push(c(5, 1, t0, &tail[..200]));
    recs.push(s(5, 1, t0 + 200, &tail[200..]));
    let out = push_all(&mut a, &recs);
    let l = only_line(&out);
    assert_eq!((l.len, l.tail_offset), (len, Some(len - 323)));
    assert_eq!(l.line, head);
    assert_eq!(l.tail.as_deref(), Some(&tail[..]));
}

/// Layouts small enough to make many chunks out of short lines: chunk 1..=40 bytes, head and
/// tail whole chunks.
fn layout() -> impl Strategy<Value = (u64, u64, u64)> {
    (1u64..=40, 1u64..=12, 0u64..=8).prop_map(|(c, h, t)| (c, c * h, c * t))
}

fn line_and_order() -> impl Strategy<Value = ((u64, u64, u64), Vec<u8>, Vec<usize>)> {
    (layout(), proptest::collection::vec(any::<u8>(), 0..2000)).prop_flat_map(|(lay, data)| {
        let n = 1 + chunk_records(1, 1, &data, lay.0, lay.1, lay.2).len();
        (
            Just(lay),
            Just(data),
            Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any bytes, any length, any layout, the records in any order: the line comes back
    /// byte-exact, exactly once, on its last record.
    #[test]
    fn random_lines_reassemble_byte_exact(((chunk, head, tail), data, order) in line_and_order()) {
        let tid = 31;
        let id = 123_456_789;
        let len = data.len() as u64;
        let mut recs = vec![p(tid, id, true, false, len)];
        recs.extend(chunk_records(tid, id, &data, chunk, head, tail));
        prop_assert_eq!(recs.len(), order.len());
        let mut a = assembler();
        prop_assert!(a.push(&begin(chunk, head, tail)).is_empty());
        let mut out = Vec::new();
        for (n, &i) in order.iter().enumerate() {
            let evs = a.push(&recs[i]);
            if n + 1 < order.len() {
                prop_assert!(evs.is_empty(), "early: {:?}", evs);
            }
            out.extend(evs);
        }
        prop_assert!(a.finish().is_empty());
        let l = only_line(&out);
        prop_assert_eq!(l.len, len);
        let t0 = tail_start(len, chunk, head, tail);
        // Whole when the tail begins where the head ends: every byte came.
        if len <= head || t0 == head {
            prop_assert_eq!(&l.line, &data);
            prop_assert!(!l.truncated);
            prop_assert_eq!(&l.tail, &None);
        } else {
            prop_assert_eq!(&l.line[..], &data[..head as usize]);
            prop_assert!(l.truncated);
            prop_assert_eq!(l.tail_offset, Some(t0));
            prop_assert_eq!(l.tail.as_deref(), Some(&data[t0 as usize..]));
            // The tail holds at most `tail` full bytes plus the partial chunk.
            prop_assert!(len - t0 < tail + chunk);
        }
    }
}

/// When the entry program could not store a line (map full), its return programs find nothing
/// and print an M record; the P record already reports the line, so the M adds no second event.
#[test]
fn an_unstored_line_is_reported_once() {
    let mut a = Assembler::new(ReadlineOptions::default());
    let mut out = a.push(&p(5, 1, false, false, 12));
    out.extend(a.push(b"BT2I2 M 4242 5 99"));
    out.extend(a.finish());
    assert_eq!(out.len(), 1, "{out:?}");
    let AssembledEvent::Malformed { reason, .. } = &out[0] else {
        panic!("{out:?}")
    };
    assert!(reason.contains("not handed to the programs"), "{reason}");

    // An empty line needs no bytes: it is a whole line, and its M is not an error either.
    let mut out = a.push(&p(5, 2, false, false, 0));
    out.extend(a.push(b"BT2I2 M 4242 5 100"));
    out.extend(a.finish());
    assert_eq!(out.len(), 1, "{out:?}");
    let AssembledEvent::Line(l) = &out[0] else {
        panic!("{out:?}")
    };
    assert!(l.line.is_empty() && l.len == 0);

    // An M with no unstored P before it still says the line was lost.
    let out = a.push(b"BT2I2 M 4242 5 101");
    assert!(
        matches!(&out[..], [AssembledEvent::Malformed { reason, .. }] if reason.contains("without its entry record")),
        "{out:?}"
    );
}
