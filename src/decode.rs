//! Decoding bpftrace's stdout (text or `-f json`, versions 0.17 – 0.26) into [`Event`]s.
//!
//! The decoder is incremental: [`Decoder::push`] takes stdout bytes in whatever chunks the pipe
//! delivers and returns the events completed so far; [`Decoder::finish`] flushes what is left at
//! end of stream. Input is treated as bytes throughout — bpftrace output is not UTF-8 in general
//! (script strings, invalid bytes, raw high bytes in JSON on unsigned-`char` targets).
//!
//! Nothing is dropped: a line that cannot be decoded becomes [`Event::Raw`] with a reason, and
//! the decoder never panics on any input (there is a fuzz target in `fuzz/` and a property test
//! in `tests/decode_props.rs`).
//!
//! How lines are formed:
//! - **Text:** a line is what lies between two '\n'. Map entries (with hist bars) and the blank
//!   line bpftrace prints after some map kinds become one [`Event::Map`]; the blank-line pair at
//!   exit becomes [`Event::ExitMarker`] (see `text` for the shapes and their ambiguities).
//! - **JSON:** printf/time/cat/syscall records are pieces of a line: their data is appended to the
//!   current line, which is emitted when the accumulated data ends with '\n' (only that final
//!   newline is removed; newlines inside one record's data stay in the line, which keeps
//!   multi-line strings byte-exact). `join` data ends the line (text mode prints a newline after
//!   it). Strings are decoded by [`decode_json_string`], which undoes bpftrace's `\uffffffXX`
//!   escaping of bytes >= 0x80.
//!
//! Version notes handled here: 0.24+ `lost_events`/`attached_probes` carry a `count` member and,
//! after any `\u` escape earlier in the stream, print their integers in hexadecimal (a sticky
//! `std::hex` on the output stream); `helper_error` gains `msg`/`filename`; `runtime_error`,
//! `errorf` and `warnf` records become [`Event::RuntimeError`].

mod escape;
mod json;
mod text;

pub use escape::{decode_json_string, EscapeError};

use json::{get, int_of, Record, Value};

/// Which output format bpftrace was run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// The default text output.
    Text,
    /// `-f json`: one JSON record per line.
    Json,
}

/// One decoded piece of bpftrace's stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `Attaching N probes...` / `attached_probes`.
    Attached { probes: u64 },
    /// One line of script output: printf/time/join/cat pieces concatenated, exact bytes,
    /// the terminating '\n' removed. In JSON mode a line ends when the accumulated data ends
    /// with '\n'; newlines *inside* one printf record's data stay inside the line.
    Output(Vec<u8>),
    /// The kernel dropped events (perf ring buffer full).
    Lost { events: u64 },
    /// A BPF helper failed (`-k`/`-kk`).
    HelperError {
        helper: String,
        retcode: i64,
        line: Option<u64>,
        col: Option<u64>,
        msg: Option<String>,
    },
    /// Any other runtime error, and (0.24+) `errorf`/`warnf` messages, prefixed with their kind.
    RuntimeError { msg: String },
    /// map / hist / stats / value records and the text map dump at exit, kept as text/JSON.
    Map { raw: Vec<u8> },
    /// The blank-line pair bpftrace prints at exit.
    ExitMarker,
    /// Anything that could not be decoded: kept, flagged, never dropped.
    Raw { bytes: Vec<u8>, reason: String },
}

/// Guesses the format from the first bytes of a stream: JSON if the first non-blank line
/// starts with `{`, text otherwise (including an empty stream).
pub fn sniff_format(first_bytes: &[u8]) -> Format {
    match first_bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
    {
        Some(b'{') => Format::Json,
        _ => Format::Text,
    }
}

/// A line longer than this is cut and the pieces kept as [`Event::Raw`], so a stream without
/// newlines cannot grow memory without bound. bpftrace's own lines are far shorter (strings
/// and `cat` are capped at kilobytes).
pub const MAX_LINE: usize = 16 << 20;

/// Incremental decoder for one bpftrace stdout stream.
#[derive(Debug)]
pub struct Decoder {
    format: Format,
    /// Bytes of the current, not yet terminated line.
    partial: Vec<u8>,
    text: text::TextState,
    json: JsonState,
}

impl Decoder {
    pub fn new(format: Format) -> Self {
        Decoder {
            format,
            partial: Vec::new(),
            text: text::TextState::default(),
            json: JsonState::default(),
        }
    }

    /// The format this decoder was made for.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Feeds raw stdout bytes (any chunking); returns the events completed so far.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            if self.partial.is_empty() {
                self.line(&rest[..nl], &mut out);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&rest[..nl]);
                self.line(&line, &mut out);
                line.clear();
                self.partial = line; // keep the allocation
            }
            rest = &rest[nl + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE {
            let bytes = std::mem::take(&mut self.partial);
            out.push(Event::Raw {
                bytes,
                reason: format!("line longer than {MAX_LINE} bytes, cut here"),
            });
        }
        out
    }

    /// End of stream: flushes what is pending (a partial line becomes Output or Raw).
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            match self.format {
                Format::Text => self.text.line(&line, &mut out),
                Format::Json => self.json.last_line(&line, &mut out),
            }
        }
        match self.format {
            Format::Text => self.text.finish(&mut out),
            Format::Json => self.json.finish(&mut out),
        }
        out
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        match self.format {
            Format::Text => self.text.line(line, out),
            Format::Json => self.json.line(line, out),
        }
    }
}

/// JSON-mode state: the output line being assembled from records, and stream history.
#[derive(Debug, Default)]
struct JsonState {
    /// Data of the current output line.
    cur: Vec<u8>,
    /// Whether any record contributed to `cur` (an empty printf still opens a line).
    cur_open: bool,
    /// One empty line seen: the first half of the exit pair, or stray.
    pending_blank: bool,
    /// A `\u` escape has been written to the stream (0.24+: later bare integers may be hex).
    seen_u_escape: bool,
}

impl JsonState {
    fn line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            if self.pending_blank {
                self.pending_blank = false;
                self.flush_line(out);
                out.push(Event::ExitMarker);
            } else {
                self.pending_blank = true;
            }
            return;
        }
        self.stray_blank(out);
        match json::parse_line(line) {
            Ok((record, saw_u)) => {
                let hex_before = self.seen_u_escape;
                self.seen_u_escape |= saw_u;
                self.record(line, record, hex_before, out);
            }
            Err(reason) => out.push(Event::Raw {
                bytes: line.to_vec(),
                reason,
            }),
        }
    }

    /// An unterminated last line: decoded if it is a complete record, else kept raw.
    fn last_line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if json::parse_line(line).is_ok() {
            self.line(line, out);
        } else {
            self.stray_blank(out);
            out.push(Event::Raw {
                bytes: line.to_vec(),
                reason: "truncated record at end of stream".into(),
            });
        }
    }

    fn stray_blank(&mut self, out: &mut Vec<Event>) {
        if self.pending_blank {
            self.pending_blank = false;
            out.push(Event::Raw {
                bytes: Vec::new(),
                reason: "lone blank line in JSON output".into(),
            });
        }
    }

    fn flush_line(&mut self, out: &mut Vec<Event>) {
        if self.cur_open {
            self.cur_open = false;
            out.push(Event::Output(std::mem::take(&mut self.cur)));
        }
    }

    fn record(&mut self, line: &[u8], record: Record<'_>, hex: bool, out: &mut Vec<Event>) {
        match record {
            Record::Data(d) => {
                self.cur.extend_from_slice(&d.bytes);
                self.cur_open = true;
                if self.cur.last() == Some(&b'\n') {
                    self.cur.pop();
                    self.flush_line(out);
                }
            }
            Record::Join(d) => {
                self.cur.extend_from_slice(&d.bytes);
                self.cur_open = true;
                self.flush_line(out);
            }
            Record::Map => out.push(Event::Map { raw: line.to_vec() }),
            Record::Other { kind, members } => match other_record(&kind, &members, hex) {
                Ok(ev) => out.push(ev),
                Err(reason) => out.push(Event::Raw {
                    bytes: line.to_vec(),
                    reason,
                }),
            },
        }
    }

    fn finish(&mut self, out: &mut Vec<Event>) {
        self.stray_blank(out);
        self.flush_line(out);
    }
}

fn string_of(v: Option<&Value<'_>>) -> Option<String> {
    match v {
        Some(Value::Str(d)) => Some(String::from_utf8_lossy(&d.bytes).into_owned()),
        _ => None,
    }
}

fn u64_of(v: Option<&Value<'_>>, hex: bool) -> Option<u64> {
    v.and_then(|v| int_of(v, hex))
        .and_then(|n| u64::try_from(n).ok())
}

/// A count that 0.24+ writes both as `count` and inside `data` (`events`/`probes`). Those bare
/// integers follow the stream's sticky hex mode; the `count` member tells the 0.24+ shape.
fn counted(members: &[(escape::Decoded, Value<'_>)], inner: &str, hex: bool) -> Option<u64> {
    let count = get(members, "count");
    let hex = hex && count.is_some();
    let data_inner = match get(members, "data") {
        Some(Value::Object(d)) => get(d, inner),
        _ => None,
    };
    u64_of(data_inner, hex).or_else(|| u64_of(count, hex))
}

/// Where a 0.24+ message came from, as ` (at FILE:LINE:COL)`, or nothing.
fn location(members: &[(escape::Decoded, Value<'_>)]) -> String {
    let file = string_of(get(members, "filename"));
    let line = u64_of(get(members, "line"), false);
    let col = u64_of(get(members, "col"), false);
    match (file, line, col) {
        (None, None, None) => String::new(),
        (f, l, c) => format!(
            " (at {}:{}:{})",
            f.unwrap_or_default(),
            l.map(|n| n.to_string()).unwrap_or_default(),
            c.map(|n| n.to_string()).unwrap_or_default()
        ),
    }
}

fn other_record(
    kind: &[u8],
    members: &[(escape::Decoded, Value<'_>)],
    hex: bool,
) -> Result<Event, String> {
    match kind {
        b"attached_probes" => counted(members, "probes", hex)
            .map(|probes| Event::Attached { probes })
            .ok_or_else(|| "attached_probes without a probe count".into()),
        b"lost_events" => counted(members, "events", hex)
            .map(|events| Event::Lost { events })
            .ok_or_else(|| "lost_events without an event count".into()),
        b"helper_error" => {
            let helper = string_of(get(members, "helper"))
                .ok_or_else(|| "helper_error without a helper".to_string())?;
            let retcode = get(members, "retcode")
                .and_then(|v| int_of(v, false))
                .and_then(|n| i64::try_from(n).ok())
                .ok_or_else(|| "helper_error without a retcode".to_string())?;
            Ok(Event::HelperError {
                helper,
                retcode,
                line: u64_of(get(members, "line"), false),
                col: u64_of(get(members, "col"), false),
                msg: string_of(get(members, "msg")),
            })
        }
        b"runtime_error" | b"errorf" | b"warnf" => {
            let msg = string_of(get(members, "msg"))
                .ok_or_else(|| "message record without msg".to_string())?;
            let prefix = match kind {
                b"runtime_error" => "",
                b"errorf" => "errorf: ",
                _ => "warnf: ",
            };
            Ok(Event::RuntimeError {
                msg: format!("{prefix}{msg}{}", location(members)),
            })
        }
        other => Err(format!(
            "unknown JSON record type {:?}",
            String::from_utf8_lossy(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(format: Format, input: &[u8]) -> Vec<Event> {
        let mut d = Decoder::new(format);
        let mut ev = d.push(input);
        ev.extend(d.finish());
        ev
    }

    #[test]
    fn sniffing() {
        assert_eq!(
            sniff_format(b"\n {\"type\": \"attached_probes\""),
            Format::Json
        );
        assert_eq!(sniff_format(b"Attaching 1 probe...\n"), Format::Text);
        assert_eq!(sniff_format(b""), Format::Text);
    }

    #[test]
    fn json_line_assembly_and_exit() {
        let ev = all(
            Format::Json,
            b"{\"type\": \"time\", \"data\": \"12:00:00 \"}\n\
              {\"type\": \"printf\", \"data\": \"a\\nb\"}\n\
              {\"type\": \"join\", \"data\": \"x y\"}\n\
              {\"type\": \"printf\", \"data\": \"tail\"}\n\n\n",
        );
        assert_eq!(
            ev,
            vec![
                Event::Output(b"12:00:00 a\nbx y".to_vec()),
                Event::Output(b"tail".to_vec()),
                Event::ExitMarker,
            ]
        );
    }

    #[test]
    fn json_hex_counts_after_an_escape_in_024_shape() {
        let ev = all(
            Format::Json,
            b"{\"type\": \"lost_events\", \"count\": 10, \"data\": {\"events\": 10}}\n\
              {\"type\": \"printf\", \"data\": \"\\u0001\\n\"}\n\
              {\"type\": \"lost_events\", \"count\": 10, \"data\": {\"events\": 10}}\n\
              {\"type\": \"lost_events\", \"data\": {\"events\": 10}}\n",
        );
        assert_eq!(
            ev,
            vec![
                Event::Lost { events: 10 },
                Event::Output(vec![1]),
                Event::Lost { events: 16 },
                Event::Lost { events: 10 },
            ]
        );
    }

    #[test]
    fn truncated_json_tail_is_raw() {
        let ev = all(Format::Json, b"{\"type\": \"printf\", \"da");
        assert!(
            matches!(&ev[..], [Event::Raw { bytes, reason }] if bytes == b"{\"type\": \"printf\", \"da" && reason.contains("truncated"))
        );
    }

    #[test]
    fn overlong_line_is_cut_not_buffered_forever() {
        let mut d = Decoder::new(Format::Text);
        let ev = d.push(&vec![b'x'; MAX_LINE + 1]);
        assert!(matches!(&ev[..], [Event::Raw { bytes, .. }] if bytes.len() == MAX_LINE + 1));
        assert_eq!(d.finish(), vec![]);
    }
}
