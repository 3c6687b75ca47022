//! Decoder throughput: MB/s and lines/s for text and JSON, on a large synthetic stream built
//! from the real 0.17 captures in tests/fixtures/bpftrace (script output, escapes, maps, lost
//! events), repeated to about 64 MiB and fed in 64 KiB chunks as a pipe would deliver it.
//!
//! Run: `cargo bench --bench decode` (plain harness, no extra dependencies).

use bt2immu::decode::{Decoder, Event, Format};
use std::path::Path;
use std::time::Instant;

const TARGET_BYTES: usize = 64 << 20;
const CHUNK: usize = 64 << 10;

/// The script-output body of every capture of one format (attach line and exit dump dropped,
/// so repeating it keeps a realistic stream shape), repeated up to TARGET_BYTES.
fn synthetic(format: Format) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bpftrace");
    let file = match format {
        Format::Text => "text.out",
        Format::Json => "json.out",
    };
    let mut body = Vec::new();
    for name in [
        "printf_bytes",
        "time_join",
        "readline",
        "cat_file",
        "helper_error",
        "lost_events",
    ] {
        let bytes = std::fs::read(root.join(name).join(file)).expect("fixture");
        let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        lines.remove(0); // attach line
                         // Cut at the exit pair: what follows is the one-off map dump.
        if let Some(p) = lines
            .windows(2)
            .position(|w| w[0].is_empty() && w[1].is_empty())
        {
            lines.truncate(p);
        }
        for l in lines {
            body.extend_from_slice(l);
            body.push(b'\n');
        }
    }
    let mut out = Vec::with_capacity(TARGET_BYTES + body.len());
    while out.len() < TARGET_BYTES {
        out.extend_from_slice(&body);
    }
    out
}

fn run(format: Format, input: &[u8]) -> (f64, usize) {
    let start = Instant::now();
    let mut d = Decoder::new(format);
    let mut events = 0usize;
    let mut raw = 0usize;
    for c in input.chunks(CHUNK) {
        for e in d.push(c) {
            events += 1;
            raw += usize::from(matches!(e, Event::Raw { .. }));
        }
    }
    events += d.finish().len();
    assert_eq!(raw, 0, "the synthetic stream should decode cleanly");
    (start.elapsed().as_secs_f64(), events)
}

fn main() {
    // `cargo test --benches` runs this binary too; keep that quick.
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    for format in [Format::Text, Format::Json] {
        let mut input = synthetic(format);
        if quick {
            input.truncate(1 << 20);
        }
        let lines = input.iter().filter(|&&b| b == b'\n').count();
        let mut best = f64::MAX;
        let mut events = 0;
        for _ in 0..if quick { 1 } else { 5 } {
            let (secs, n) = run(format, &input);
            best = best.min(secs);
            events = n;
        }
        let mb = input.len() as f64 / (1024.0 * 1024.0);
        println!(
            "decode {:?}: {:.1} MiB, {} input lines, {} events; best of runs {:.3} s = {:.1} MiB/s, {:.2} M lines/s",
            format,
            mb,
            lines,
            events,
            best,
            mb / best,
            lines as f64 / best / 1e6
        );
    }
}
