//! Robustness: damage to fsynced spool frames in the *newest* segment.
//!
//! The spool's contract (src/spool.rs): "A frame whose length or checksum does not match at the
//! end of the newest segment is a torn write from a crash ... The same damage anywhere else is
//! corruption and stops the agent with an error." But a damaged length field in the middle of
//! the newest segment that points past the end of the file is taken for a torn tail: every
//! later, fsynced frame is cut off, and the agent records one `spool_torn_tail` loss of
//! "count 1" while 8 records are gone.
//!
//! Reproduction by hand: `bt2immu ingest` 10 lines with immudb unreachable (they stay in the
//! spool), raise the u32 length of the 3rd frame of `spool/<source>/seg-…1.log` so it ends at
//! or past the end of the file, start `ingest` again with immudb up: records 1–2 arrive plus a
//! loss record `{"cause":"spool_torn_tail","count":1}`; records 3–10 are gone.

use bt2immu::spool::{Entry, Spool, SpoolError};

fn entry(seq: u64) -> Entry {
    Entry {
        seq,
        key: format!("k{seq}").into_bytes(),
        value: format!("value number {seq}, fsynced long ago").into_bytes(),
    }
}

/// (offset, payload length) of every frame in a segment.
fn frames(bytes: &[u8]) -> Vec<(usize, u32)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[off..off + 4].try_into().unwrap());
        out.push((off, len));
        off += 8 + len as usize;
    }
    out
}

#[test]
fn damaged_length_mid_segment_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        // Ten separate appends: each one fsynced, as the pipeline does.
        for seq in 1..=10 {
            spool.append(&[entry(seq)]).unwrap();
        }
    }
    let seg = dir.path().join(format!("seg-{:020}.log", 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    let fr = frames(&bytes);
    assert_eq!(fr.len(), 10);
    // Frame 3 claims to run a few bytes past the end of the file.
    let (off, _) = fr[2];
    let bogus = (bytes.len() - off - 8 + 5) as u32;
    bytes[off..off + 4].copy_from_slice(&bogus.to_be_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let len_before = bytes.len() as u64;

    match Spool::open(dir.path()) {
        Err(SpoolError::Corrupted { .. }) => {}
        Ok((spool, rec)) => {
            let kept = spool.reader().read_batch(100, usize::MAX).unwrap().len();
            panic!(
                "damage in front of 8 fsynced frames was treated as a torn tail: cut {} bytes \
                 (file was {len_before}), {kept} of 10 records kept, recovery {rec:?}",
                rec.torn_bytes
            );
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}
