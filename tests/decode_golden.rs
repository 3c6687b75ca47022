//! Golden tests: real bpftrace 0.17 captures (tests/fixtures/bpftrace/*/{text,json}.out, made by
//! `capture.sh` there) and hand-written newer-version streams, decoded and compared with the
//! hand-reviewed `*.expected.jsonl` next to them. Each capture is also decoded in several
//! chunkings (byte by byte included), which must not change the result.
//!
//! Expected-event lines: `{"ev": "output"|"map"|"raw", "text": "..."}` (or `"hex"` when the
//! bytes are not UTF-8; raw also has `"reason"`, matched as a substring), `{"ev": "attached",
//! "probes": N}`, `{"ev": "lost", "events": N}`, `{"ev": "helper_error", "helper", "retcode",
//! "line", "col", "msg"}`, `{"ev": "runtime_error", "msg"}`, `{"ev": "exit"}`.

use bt2immu::decode::{Decoder, Event, Format};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bpftrace")
}

fn decode_chunked(format: Format, input: &[u8], chunk: usize) -> Vec<Event> {
    let mut d = Decoder::new(format);
    let mut ev = Vec::new();
    for c in input.chunks(chunk.max(1)) {
        ev.extend(d.push(c));
    }
    ev.extend(d.finish());
    ev
}

fn bytes_json(v: &[u8]) -> (&'static str, Value) {
    match std::str::from_utf8(v) {
        Ok(s) => ("text", json!(s)),
        Err(_) => ("hex", json!(hex::encode(v))),
    }
}

/// The comparable JSON form of an event (raw reasons are compared as substrings separately).
fn event_json(e: &Event) -> Value {
    match e {
        Event::Attached { probes } => json!({"ev": "attached", "probes": probes}),
        Event::Output(b) => {
            let (k, v) = bytes_json(b);
            json!({"ev": "output", k: v})
        }
        Event::Lost { events } => json!({"ev": "lost", "events": events}),
        Event::HelperError {
            helper,
            retcode,
            line,
            col,
            msg,
        } => json!({"ev": "helper_error", "helper": helper, "retcode": retcode,
                    "line": line, "col": col, "msg": msg}),
        Event::RuntimeError { msg } => json!({"ev": "runtime_error", "msg": msg}),
        Event::Map { raw } => {
            let (k, v) = bytes_json(raw);
            json!({"ev": "map", k: v})
        }
        Event::ExitMarker => json!({"ev": "exit"}),
        Event::Raw { bytes, reason } => {
            let (k, v) = bytes_json(bytes);
            json!({"ev": "raw", k: v, "reason": reason})
        }
    }
}

fn matches_expected(actual: &Value, expected: &Value) -> bool {
    if expected["ev"] == "raw" {
        let reason_ok = actual["reason"]
            .as_str()
            .zip(expected["reason"].as_str())
            .is_some_and(|(a, e)| a.contains(e));
        let mut a = actual.clone();
        let mut e = expected.clone();
        a.as_object_mut().unwrap().remove("reason");
        e.as_object_mut().unwrap().remove("reason");
        return reason_ok && a == e;
    }
    actual == expected
}

fn check(rel: &str, format: Format, expected: &str) {
    let dir = fixtures();
    let input = std::fs::read(dir.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let expected_text =
        std::fs::read_to_string(dir.join(expected)).unwrap_or_else(|e| panic!("{expected}: {e}"));
    let expected: Vec<Value> = expected_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{expected}: {e}: {l}")))
        .collect();
    let whole = decode_chunked(format, &input, input.len());
    let actual: Vec<Value> = whole.iter().map(event_json).collect();
    let shown: Vec<String> = actual.iter().map(|v| v.to_string()).collect();
    assert_eq!(
        actual.len(),
        expected.len(),
        "{rel}: event count differs; decoded:\n{}",
        shown.join("\n")
    );
    for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
        assert!(
            matches_expected(a, e),
            "{rel}: event {i} differs\n  decoded:  {a}\n  expected: {e}"
        );
    }
    for chunk in [1, 2, 3, 7, 64, 4096] {
        assert_eq!(
            decode_chunked(format, &input, chunk),
            whole,
            "{rel}: chunking by {chunk} changes the events"
        );
    }
}

macro_rules! golden {
    ($name:ident, $dir:literal) => {
        mod $name {
            use super::*;
            #[test]
            fn text() {
                check(
                    concat!($dir, "/text.out"),
                    Format::Text,
                    concat!($dir, "/text.expected.jsonl"),
                );
            }
            #[test]
            fn json() {
                check(
                    concat!($dir, "/json.out"),
                    Format::Json,
                    concat!($dir, "/json.expected.jsonl"),
                );
            }
        }
    };
}

golden!(printf_bytes, "printf_bytes");
golden!(maps_exit, "maps_exit");
golden!(helper_error, "helper_error");
golden!(cat_file, "cat_file");
golden!(time_join, "time_join");
golden!(readline, "readline");

#[test]
fn handwritten_v024() {
    check(
        "handwritten/v024.json.out",
        Format::Json,
        "handwritten/v024.json.expected.jsonl",
    );
    check(
        "handwritten/v024.text.out",
        Format::Text,
        "handwritten/v024.text.expected.jsonl",
    );
}

#[test]
fn handwritten_v020() {
    check(
        "handwritten/v020.json.out",
        Format::Json,
        "handwritten/v020.json.expected.jsonl",
    );
}

#[test]
fn handwritten_text_edge_cases() {
    check(
        "handwritten/text_edges.text.out",
        Format::Text,
        "handwritten/text_edges.text.expected.jsonl",
    );
}

#[test]
fn handwritten_json_edge_cases() {
    check(
        "handwritten/json_edges.json.out",
        Format::Json,
        "handwritten/json_edges.json.expected.jsonl",
    );
}

/// Byte values asserted directly, independent of the expected files.
#[test]
fn printf_bytes_exact_values() {
    let input = std::fs::read(fixtures().join("printf_bytes/json.out")).unwrap();
    let lines: Vec<Vec<u8>> = decode_chunked(Format::Json, &input, 5)
        .into_iter()
        .filter_map(|e| match e {
            Event::Output(b) => Some(b),
            _ => None,
        })
        .collect();
    assert!(lines.contains(&b"invalid \xff \x80 \xc3 \xfe end".to_vec()));
    assert!(lines.contains(&"utf8 é ü 😀 ✓".as_bytes().to_vec()));
    assert!(lines.contains(&b"ctl \x01 \x1f esc \x1b bell \x07".to_vec()));
    assert!(lines.contains(&b"quote \" backslash \\ tab \t cr \r del \x7f end".to_vec()));
    assert!(lines.contains(&b"line one\nline two".to_vec()));
    assert!(lines.contains(&b"split over three records".to_vec()));
    // The literal text `\uffffffc3` in a printf must survive as text, not become a byte.
    assert!(lines.contains(&b"\\u00e9 is not an escape here, nor \\uffffffc3".to_vec()));
    // JSON and text modes agree on every line both can represent.
    let text = std::fs::read(fixtures().join("printf_bytes/text.out")).unwrap();
    assert!(text
        .windows(b"invalid \xff \x80 \xc3 \xfe end\n".len())
        .any(|w| w == b"invalid \xff \x80 \xc3 \xfe end\n"));
}

/// The readline capture: a line typed with Ctrl-V Ctrl-J holds a real newline, which JSON
/// mode keeps inside one Output and text mode cannot.
#[test]
fn readline_embedded_newline() {
    let input = std::fs::read(fixtures().join("readline/json.out")).unwrap();
    let outs: Vec<Vec<u8>> = decode_chunked(Format::Json, &input, 3)
        .into_iter()
        .filter_map(|e| match e {
            Event::Output(b) => Some(b),
            _ => None,
        })
        .collect();
    assert!(outs.contains(&b"4242 echo 'first\nsecond'".to_vec()));
    assert!(outs.contains(
        &"4242 echo \"quote \\\" back\\\\slashtab é 😀\""
            .as_bytes()
            .to_vec()
    ));
    assert!(outs.contains(&b"4242 ".to_vec()));
}

/// The lost-events capture (1000s of records): every printf line and every loss is accounted
/// for, counted independently of the decoder by scanning the raw capture.
#[test]
fn lost_events_are_all_accounted() {
    let flood = b"padding-padding-padding-padding-padding-padding";
    for (file, format) in [("text.out", Format::Text), ("json.out", Format::Json)] {
        let input = std::fs::read(fixtures().join("lost_events").join(file)).unwrap();
        let text_lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
        let (want_lines, want_lost_records, want_lost_sum) = match format {
            Format::Text => {
                let lost: Vec<u64> = text_lines
                    .iter()
                    .filter_map(|l| {
                        let s = std::str::from_utf8(l).ok()?;
                        s.strip_prefix("Lost ")?
                            .strip_suffix(" events")?
                            .parse()
                            .ok()
                    })
                    .collect();
                let flood_lines = text_lines
                    .iter()
                    .filter(|l| l.starts_with(b"flood "))
                    .count();
                (flood_lines, lost.len(), lost.iter().sum::<u64>())
            }
            Format::Json => {
                let mut lost = Vec::new();
                for l in &text_lines {
                    if let Ok(v) = serde_json::from_slice::<Value>(l) {
                        if v["type"] == "lost_events" {
                            lost.push(v["data"]["events"].as_u64().unwrap());
                        }
                    }
                }
                let flood_lines = text_lines
                    .iter()
                    .filter(|l| l.starts_with(br#"{"type": "printf", "data": "flood "#))
                    .count();
                (flood_lines, lost.len(), lost.iter().sum::<u64>())
            }
        };
        assert!(want_lost_records > 0, "{file}: capture has no losses");
        let events = decode_chunked(format, &input, 1000);
        let outputs: Vec<&Vec<u8>> = events
            .iter()
            .filter_map(|e| match e {
                Event::Output(b) => Some(b),
                _ => None,
            })
            .collect();
        let lost: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                Event::Lost { events } => Some(*events),
                _ => None,
            })
            .collect();
        assert_eq!(outputs.len(), want_lines, "{file}");
        assert!(outputs
            .iter()
            .all(|o| o.starts_with(b"flood ") && o.ends_with(flood)));
        assert_eq!(lost.len(), want_lost_records, "{file}");
        assert_eq!(lost.iter().sum::<u64>(), want_lost_sum, "{file}");
        assert!(
            !events.iter().any(|e| matches!(e, Event::Raw { .. })),
            "{file}"
        );
        assert_eq!(
            events.iter().filter(|e| **e == Event::ExitMarker).count(),
            1
        );
        assert_eq!(events[0], Event::Attached { probes: 2 });
    }
}
