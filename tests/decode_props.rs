//! Property tests for the decoder, with a fixed-seed generator so failures reproduce:
//! - arbitrary and mutated inputs never panic, and chunking never changes the events;
//! - every byte of generated script output comes back exactly, in order, in both formats.

use bt2immu::decode::{decode_json_string, Decoder, Event, Format};
use std::path::Path;

/// xorshift64*: small, deterministic, good enough to pick bytes and chunk sizes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Feeds `input` in random chunk sizes (1..=max_chunk), then finishes.
fn decode_random_chunks(
    format: Format,
    input: &[u8],
    rng: &mut Rng,
    max_chunk: usize,
) -> Vec<Event> {
    let mut d = Decoder::new(format);
    let mut ev = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = (rng.below(max_chunk) + 1).min(rest.len());
        ev.extend(d.push(&rest[..n]));
        rest = &rest[n..];
    }
    ev.extend(d.finish());
    ev
}

fn decode_whole(format: Format, input: &[u8]) -> Vec<Event> {
    let mut d = Decoder::new(format);
    let mut ev = d.push(input);
    ev.extend(d.finish());
    ev
}

fn fixture_inputs() -> Vec<(Format, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bpftrace");
    let mut out = Vec::new();
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".out") {
                continue;
            }
            let format = if name.contains("json") {
                Format::Json
            } else {
                Format::Text
            };
            let mut bytes = std::fs::read(&f).unwrap();
            bytes.truncate(20_000); // the lost-events capture is large; its head is enough
            out.push((format, bytes));
        }
    }
    assert!(out.len() >= 15, "fixtures missing: found {}", out.len());
    out
}

/// Byte-level mutations in the style of a fuzzer: flip, insert, delete, splice, duplicate.
fn mutate(rng: &mut Rng, input: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.below(8) + 1 {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let n = rng.below(16);
                let b = rng.bytes(n);
                v.splice(at..at, b);
            }
            2 => {
                let end = (at + rng.below(32)).min(v.len());
                v.drain(at..end);
            }
            3 => {
                let other = &pool[rng.below(pool.len())];
                let s = rng.below(other.len() + 1);
                let e = (s + rng.below(200)).min(other.len());
                v.splice(at..at, other[s..e].iter().copied());
            }
            4 => {
                let tokens: [&[u8]; 10] = [
                    b"\n",
                    b"\n\n",
                    b"\\u",
                    b"\\uffffff",
                    b"\"",
                    b"{\"type\": \"printf\", \"data\": \"",
                    b"Lost 3 events",
                    b": WARNING: Failed to x: y (-1)\n",
                    b"@m[",
                    b"[1, 2)   3 |@@|\n",
                ];
                let t = tokens[rng.below(tokens.len())];
                v.splice(at..at, t.iter().copied());
            }
            _ => {
                let end = (at + rng.below(64)).min(v.len());
                let dup = v[at..end].to_vec();
                v.splice(at..at, dup);
            }
        }
    }
    v
}

#[test]
fn mutated_fixtures_never_panic_and_chunking_is_invisible() {
    let inputs = fixture_inputs();
    let pool: Vec<Vec<u8>> = inputs.iter().map(|(_, b)| b.clone()).collect();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut cases = 0;
    for round in 0..300 {
        for (format, input) in &inputs {
            if round % 4 != 0 && input.len() > 4000 {
                continue;
            }
            let m = mutate(&mut rng, input, &pool);
            for format in [*format, other(*format)] {
                let whole = decode_whole(format, &m);
                let chunked = decode_random_chunks(format, &m, &mut rng, 97);
                assert_eq!(
                    whole, chunked,
                    "chunking changed the events of a mutated input"
                );
                cases += 1;
            }
            let _ = decode_json_string(&m);
        }
    }
    assert!(cases > 5000, "only {cases} cases ran");
}

fn other(f: Format) -> Format {
    match f {
        Format::Text => Format::Json,
        Format::Json => Format::Text,
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0xdead_beef_0000_0042);
    for i in 0..3000 {
        let n = rng.below(600);
        let mut b = rng.bytes(n);
        // Bias towards the structural bytes the parsers care about.
        for x in b.iter_mut() {
            if rng.below(4) == 0 {
                const STRUCTURAL: &[u8] = b"\n{}[]\":,\\u@ 0f";
                *x = STRUCTURAL[rng.below(STRUCTURAL.len())];
            }
        }
        let format = if i % 2 == 0 {
            Format::Text
        } else {
            Format::Json
        };
        let whole = decode_whole(format, &b);
        assert_eq!(whole, decode_random_chunks(format, &b, &mut rng, 13));
    }
}

/// Escapes like bpftrace does on x86_64: signed char, `\uffffffXX` for bytes >= 0x80.
fn bpftrace_escape(data: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in data {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            0x80..=0xff => out.extend_from_slice(format!("\\uffffff{b:02x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'"');
    out
}

/// Random printf/time/join records with arbitrary bytes: the Output lines, rejoined, are
/// exactly the data that went in (join ends a line just like a newline does).
#[test]
fn json_output_accounts_for_every_byte() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for _ in 0..500 {
        let mut stream = b"{\"type\": \"attached_probes\", \"data\": {\"probes\": 1}}\n".to_vec();
        let mut expected_lines: Vec<Vec<u8>> = Vec::new();
        let mut cur: Vec<u8> = Vec::new();
        let mut open = false;
        let mut lost_total = 0u64;
        for _ in 0..rng.below(40) + 1 {
            let n = rng.below(50);
            let mut data = rng.bytes(n);
            match rng.below(10) {
                0 => {
                    let k = rng.below(1000) as u64;
                    lost_total += k;
                    stream.extend_from_slice(
                        format!("{{\"type\": \"lost_events\", \"data\": {{\"events\": {k}}}}}\n")
                            .as_bytes(),
                    );
                }
                1 => {
                    data.retain(|&b| b != b'\n');
                    stream.extend_from_slice(b"{\"type\": \"join\", \"data\": ");
                    stream.extend_from_slice(&bpftrace_escape(&data));
                    stream.extend_from_slice(b"}\n");
                    cur.extend_from_slice(&data);
                    expected_lines.push(std::mem::take(&mut cur));
                    open = false;
                }
                k => {
                    if k < 5 {
                        data.push(b'\n');
                    }
                    let kind = ["printf", "time", "cat"][rng.below(3)];
                    stream.extend_from_slice(
                        format!("{{\"type\": \"{kind}\", \"data\": ").as_bytes(),
                    );
                    stream.extend_from_slice(&bpftrace_escape(&data));
                    stream.extend_from_slice(b"}\n");
                    cur.extend_from_slice(&data);
                    open = true;
                    if cur.last() == Some(&b'\n') {
                        cur.pop();
                        expected_lines.push(std::mem::take(&mut cur));
                        open = false;
                    }
                }
            }
        }
        if open {
            expected_lines.push(std::mem::take(&mut cur));
        }
        let events = decode_random_chunks(Format::Json, &stream, &mut rng, 40);
        let outputs: Vec<Vec<u8>> = events
            .iter()
            .filter_map(|e| match e {
                Event::Output(b) => Some(b.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(outputs, expected_lines);
        let lost: u64 = events
            .iter()
            .map(|e| match e {
                Event::Lost { events } => *events,
                _ => 0,
            })
            .sum();
        assert_eq!(lost, lost_total);
        assert!(!events.iter().any(|e| matches!(e, Event::Raw { .. })));
    }
}

/// Text mode: lines of arbitrary bytes (not shaped like bpftrace's own messages) come back as
/// Output, byte for byte and in order, interleaved with Lost/Attached lines.
#[test]
fn text_output_accounts_for_every_line() {
    let mut rng = Rng(0xfeed_f00d_1357_2468);
    for _ in 0..500 {
        let mut stream = Vec::new();
        let mut expected: Vec<Event> = Vec::new();
        for _ in 0..rng.below(60) + 1 {
            match rng.below(12) {
                0 => {
                    let k = rng.below(100_000) as u64;
                    stream.extend_from_slice(format!("Lost {k} events\n").as_bytes());
                    expected.push(Event::Lost { events: k });
                }
                1 => {
                    let k = rng.below(50) as u64;
                    stream.extend_from_slice(format!("Attaching {k} probes...\n").as_bytes());
                    expected.push(Event::Attached { probes: k });
                }
                _ => {
                    // A script line: starts with a letter so it cannot look like a map line,
                    // a bar or a WARNING block; the rest is arbitrary bytes without '\n'.
                    let n = rng.below(80);
                    let mut line = vec![b'a' + rng.below(26) as u8];
                    line.extend(rng.bytes(n).into_iter().filter(|&b| b != b'\n'));
                    if text_shaped(&line) {
                        continue;
                    }
                    stream.extend_from_slice(&line);
                    stream.push(b'\n');
                    expected.push(Event::Output(line));
                }
            }
        }
        let events = decode_random_chunks(Format::Text, &stream, &mut rng, 50);
        assert_eq!(events, expected);
    }
}

/// Whether a random line happens to match a bpftrace message shape (then the test skips it).
fn text_shaped(line: &[u8]) -> bool {
    let has = |n: &[u8]| line.windows(n.len()).any(|w| w == n);
    has(b"WARNING: ")
        || (line.ends_with(b" events") && has(b"Lost "))
        || line.starts_with(b"Attach")
}
