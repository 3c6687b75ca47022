//! Fuzzes the bashreadline `Assembler`: any sequence of records (one per input line, mostly
//! BT2I2-shaped thanks to the seeds) must never panic, and whatever comes out must keep the
//! record's promises: a line never holds more bytes than its length says, a cut line's tail
//! ends exactly at that length, and nothing stays pending after `finish`.
#![no_main]

#[path = "../../src"]
#[allow(dead_code, unused_imports)]
mod src {
    pub mod readline;
}

use libfuzzer_sys::fuzz_target;
use src::readline::{AssembledEvent, Assembler, ReadlineOptions};

fuzz_target!(|input: &[u8]| {
    let mut a = Assembler::new(ReadlineOptions::default());
    let mut out = Vec::new();
    for rec in input.split(|&b| b == b'\n') {
        out.extend(a.push(rec));
    }
    out.extend(a.finish());
    assert!(a.finish().is_empty(), "finish left lines pending");
    for ev in out {
        if let AssembledEvent::Line(l) = ev {
            assert!(l.line.len() as u64 <= l.len, "line longer than its len");
            match (&l.tail, l.tail_offset) {
                (Some(t), Some(off)) => {
                    assert!(l.truncated);
                    assert_eq!(off + t.len() as u64, l.len, "tail does not end at len");
                    assert!(off >= l.line.len() as u64, "tail overlaps head");
                }
                (None, None) => {
                    assert!(!l.truncated);
                    assert_eq!(l.line.len() as u64, l.len, "whole line of the wrong length");
                }
                _ => panic!("tail without offset or offset without tail"),
            }
        }
    }
});
