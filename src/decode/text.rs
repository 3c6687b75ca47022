//! bpftrace's text-mode stdout, one line at a time.
//!
//! Text mode has no framing: script output, bpftrace's own messages and the map dump share one
//! byte stream, so the shapes below are recognised by their exact wording (taken from the
//! bpftrace source, 0.17–0.26). A script that prints a line shaped like one of them
//! (`Lost 5 events`, `@x: 1`) is misread; that is inherent to text mode — use `-f json` when
//! it matters. Whatever is recognised, every byte of script output still ends up in an event.
//!
//! Shapes:
//! - `Attaching N probe(s)...` (0.17–0.23, stdout) and `Attached N probe(s)` (0.24+, stderr,
//!   recognised in case stderr is merged);
//! - `Lost N events` (stdout in 0.17–0.23), possibly glued after a printf that had no newline;
//! - a WARNING block: `FILE:L:C1-C2: WARNING: Failed to HELPER: STRERROR (RC)`, the source line,
//!   and a `~~~` marker line;
//! - map lines `@name: value` / `@name[key]: value`, hist/lhist bars `[a, b)   N |@@@ |`, and
//!   the single blank line bpftrace prints after some map kinds;
//! - the blank-line pair at exit, after which everything is the map dump.

use super::Event;
use nom::branch::alt;
use nom::bytes::complete::{tag, take_while, take_while1};
use nom::character::complete::{char, digit1, u64 as dec_u64};
use nom::combinator::{all_consuming, map_res, opt, recognize};
use nom::sequence::{preceded, terminated};
use nom::{IResult, Parser};

fn parse_i64(s: &[u8]) -> Result<i64, std::num::ParseIntError> {
    String::from_utf8_lossy(s).parse()
}

/// `Attaching 3 probes...`, `Attaching 1 probe...`, `Attached 3 probes`, `Attached 1 probe`.
pub(crate) fn attached(line: &[u8]) -> Option<u64> {
    fn shape(i: &[u8]) -> IResult<&[u8], u64> {
        let attaching = preceded(
            tag(&b"Attaching "[..]),
            terminated(
                dec_u64,
                alt((tag(&b" probes..."[..]), tag(&b" probe..."[..]))),
            ),
        );
        let attached = preceded(
            tag(&b"Attached "[..]),
            terminated(dec_u64, alt((tag(&b" probes"[..]), tag(&b" probe"[..])))),
        );
        all_consuming(alt((attaching, attached))).parse(i)
    }
    shape(line).ok().map(|(_, n)| n)
}

/// `Lost N events` at the end of the line: returns the length of whatever printf output was
/// glued in front of it, and N.
pub(crate) fn lost(line: &[u8]) -> Option<(usize, u64)> {
    let body = line.strip_suffix(b" events")?;
    let digits = body.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let prefix = body.len() - digits;
    let head = body[..prefix].strip_suffix(b"Lost ")?;
    let n = std::str::from_utf8(&body[prefix..]).ok()?.parse().ok()?;
    Some((head.len(), n))
}

/// A parsed WARNING location line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Warning {
    pub line: Option<u64>,
    pub col: Option<u64>,
    /// Whether bpftrace prints the source line and a `~~~` marker after it (single-line
    /// locations only).
    pub has_context: bool,
    pub msg: Vec<u8>,
}

const WARNING_MARK: &[u8] = b": WARNING: ";

fn num(s: &[u8]) -> Result<u64, std::num::ParseIntError> {
    String::from_utf8_lossy(s).parse()
}

/// `L:C1-C2` at the end of a single-line location.
fn loc_single(i: &[u8]) -> IResult<&[u8], (u64, Option<u64>)> {
    map_res(
        (digit1, char(':'), digit1, char('-'), digit1),
        |(l, _, c, _, _): (&[u8], char, &[u8], char, &[u8])| -> Result<_, std::num::ParseIntError> {
            Ok((num(l)?, Some(num(c)?)))
        },
    )
    .parse(i)
}

/// `L1-L2` at the end of a multi-line location (bpftrace prints no context lines for it).
fn loc_range(i: &[u8]) -> IResult<&[u8], (u64, Option<u64>)> {
    map_res(
        (digit1, char('-'), digit1),
        |(l, _, _): (&[u8], char, &[u8])| -> Result<_, std::num::ParseIntError> {
            Ok((num(l)?, None))
        },
    )
    .parse(i)
}

/// `[FILE:]L:C1-C2: WARNING: msg`, `FILE:L1-L2: WARNING: msg` or `WARNING: msg`.
pub(crate) fn warning(line: &[u8]) -> Option<Warning> {
    if let Some(msg) = line.strip_prefix(&WARNING_MARK[2..]) {
        return Some(Warning {
            line: None,
            col: None,
            has_context: false,
            msg: msg.to_vec(),
        });
    }
    let at = find(line, WARNING_MARK)?;
    let (loc, msg) = (&line[..at], &line[at + WARNING_MARK.len()..]);
    // The filename may contain ':' itself, so try the tail at every ':' boundary, rightmost
    // first (start 0: no filename), the single-line form before the range form.
    let mut starts: Vec<usize> = vec![0];
    starts.extend(
        loc.iter()
            .enumerate()
            .filter(|(_, &b)| b == b':')
            .map(|(i, _)| i + 1),
    );
    for tail in [loc_single, loc_range] {
        for &s in starts.iter().rev() {
            if let Ok((_, (l, c))) = all_consuming(tail).parse(&loc[s..]) {
                return Some(Warning {
                    line: Some(l),
                    col: c,
                    has_context: c.is_some(),
                    msg: msg.to_vec(),
                });
            }
        }
    }
    None
}

/// The message of a helper-error warning: `Failed to HELPER: STRERROR (RC)` or
/// `Failed to HELPER: RC` (non-negative return codes). Returns (helper, retcode, strerror).
pub(crate) fn helper_failure(msg: &[u8]) -> Option<(String, i64, Option<String>)> {
    fn head(i: &[u8]) -> IResult<&[u8], &[u8]> {
        preceded(
            tag(&b"Failed to "[..]),
            terminated(take_while1(|b: u8| b != b':' && b != b' '), tag(&b": "[..])),
        )
        .parse(i)
    }
    fn int(i: &[u8]) -> IResult<&[u8], i64> {
        map_res(recognize((opt(char('-')), digit1)), parse_i64).parse(i)
    }
    fn paren_int(i: &[u8]) -> IResult<&[u8], i64> {
        all_consuming(preceded(char('('), terminated(int, char(')')))).parse(i)
    }
    let (rest, helper) = head(msg).ok()?;
    let helper = String::from_utf8_lossy(helper).into_owned();
    if let Ok((_, rc)) = all_consuming(int).parse(rest) {
        return Some((helper, rc, None));
    }
    // "STRERROR (RC)": the return code is the last parenthesised number.
    let open = rest.iter().rposition(|&b| b == b'(')?;
    let (text, tail) = (&rest[..open], &rest[open..]);
    let (_, rc) = paren_int(tail).ok()?;
    let text = text.strip_suffix(b" ").unwrap_or(text);
    Some((helper, rc, Some(String::from_utf8_lossy(text).into_owned())))
}

/// The `~~~~` marker under a WARNING's source line.
pub(crate) fn is_tilde_line(line: &[u8]) -> bool {
    let t = line.trim_ascii();
    !t.is_empty() && t.iter().all(|&b| b == b'~')
}

/// `@name: ...` or `@name[key]: ...` (the name may be empty: `@: 121`).
pub(crate) fn is_map_line(line: &[u8]) -> bool {
    let r: IResult<&[u8], &[u8]> = preceded(
        char('@'),
        take_while(|b: u8| b.is_ascii_alphanumeric() || b == b'_'),
    )
    .parse(line);
    match r {
        Ok((rest, _)) => {
            rest.starts_with(b":") || (rest.starts_with(b"[") && find(rest, b"]:").is_some())
        }
        Err(_) => false,
    }
}

/// A hist/lhist bar: `[4, 8)   1 |@@@   |`, `[0]  2 |@|`, `(..., 0)  1 |@|`.
pub(crate) fn is_bar_line(line: &[u8]) -> bool {
    (line.starts_with(b"[") || line.starts_with(b"(")) && line.ends_with(b"|") && line.len() > 2
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A WARNING block still waiting for its source line and marker line.
#[derive(Debug)]
struct PendingWarning {
    event: Event,
    source: Option<Vec<u8>>,
}

/// Text-mode state: what the last lines left open.
#[derive(Debug, Default)]
pub(crate) struct TextState {
    /// After the exit blank-line pair every line belongs to the map dump.
    after_exit: bool,
    /// One blank line seen and not yet known to be output or half of the exit pair.
    pending_blank: bool,
    /// A map entry (and its hist bars) not yet closed.
    map_block: Option<Vec<u8>>,
    warning: Option<PendingWarning>,
    /// printf output that was followed by a glued `Lost N events`; it continues on the next line.
    glued: Option<Vec<u8>>,
}

impl TextState {
    pub(crate) fn line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if let Some(mut w) = self.warning.take() {
            match w.source.take() {
                None => {
                    w.source = Some(line.to_vec());
                    self.warning = Some(w);
                    return;
                }
                Some(source) => {
                    out.push(w.event);
                    if is_tilde_line(line) {
                        return;
                    }
                    // Not the block shape after all: the two lines are ordinary lines.
                    self.line(&source, out);
                    self.line(line, out);
                    return;
                }
            }
        }
        if let Some(mut block) = self.map_block.take() {
            if is_bar_line(line) {
                block.push(b'\n');
                block.extend_from_slice(line);
                self.map_block = Some(block);
                return;
            }
            if line.is_empty() {
                block.push(b'\n');
                out.push(Event::Map { raw: block });
                return;
            }
            out.push(Event::Map { raw: block });
        }
        if line.is_empty() && self.glued.is_none() {
            if self.after_exit {
                // An empty map in the dump prints an empty line.
                out.push(Event::Map { raw: Vec::new() });
            } else if self.pending_blank {
                self.pending_blank = false;
                self.after_exit = true;
                out.push(Event::ExitMarker);
            } else {
                self.pending_blank = true;
            }
            return;
        }
        if self.pending_blank {
            self.pending_blank = false;
            out.push(Event::Output(Vec::new()));
        }
        let joined;
        let line = match self.glued.take() {
            Some(mut g) => {
                g.extend_from_slice(line);
                joined = g;
                &joined[..]
            }
            None => line,
        };
        self.classify(line, out);
    }

    fn classify(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if let Some(probes) = attached(line) {
            out.push(Event::Attached { probes });
            return;
        }
        if let Some((glued, events)) = lost(line) {
            out.push(Event::Lost { events });
            if glued > 0 {
                self.glued = Some(line[..glued].to_vec());
            }
            return;
        }
        if let Some(w) = warning(line) {
            let msg = String::from_utf8_lossy(&w.msg).into_owned();
            let event = match helper_failure(&w.msg) {
                Some((helper, retcode, strerror)) => Event::HelperError {
                    helper,
                    retcode,
                    line: w.line,
                    col: w.col,
                    msg: strerror,
                },
                None => Event::RuntimeError { msg },
            };
            if w.has_context {
                self.warning = Some(PendingWarning {
                    event,
                    source: None,
                });
            } else {
                out.push(event);
            }
            return;
        }
        if is_map_line(line) {
            self.map_block = Some(line.to_vec());
            return;
        }
        if line == b"No probes to attach" {
            out.push(Event::Raw {
                bytes: line.to_vec(),
                reason: "bpftrace: no probes to attach".into(),
            });
            return;
        }
        if self.after_exit && is_bar_line(line) {
            out.push(Event::Map { raw: line.to_vec() });
            return;
        }
        out.push(Event::Output(line.to_vec()));
    }

    pub(crate) fn finish(&mut self, out: &mut Vec<Event>) {
        if let Some(w) = self.warning.take() {
            out.push(w.event);
            if let Some(source) = w.source {
                out.push(Event::Output(source));
            }
        }
        if let Some(block) = self.map_block.take() {
            out.push(Event::Map { raw: block });
        }
        if self.pending_blank {
            self.pending_blank = false;
            out.push(Event::Output(Vec::new()));
        }
        if let Some(g) = self.glued.take() {
            out.push(Event::Output(g));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_lines() {
        assert_eq!(attached(b"Attaching 1 probe..."), Some(1));
        assert_eq!(attached(b"Attaching 12 probes..."), Some(12));
        assert_eq!(attached(b"Attached 3 probes"), Some(3));
        assert_eq!(attached(b"Attached 1 probe"), Some(1));
        assert_eq!(attached(b"Attaching 1 probe... x"), None);
        assert_eq!(attached(b"Attaching x probes..."), None);
    }

    #[test]
    fn lost_lines() {
        assert_eq!(lost(b"Lost 12571 events"), Some((0, 12571)));
        assert_eq!(lost(b"partial printfLost 3 events"), Some((14, 3)));
        assert_eq!(lost(b"Lost  events"), None);
        assert_eq!(lost(b"Lost 99999999999999999999999 events"), None);
    }

    #[test]
    fn warning_locations() {
        let w =
            warning(b"x.bt:3:35-41: WARNING: Failed to probe_read_str: Bad address (-14)").unwrap();
        assert_eq!((w.line, w.col, w.has_context), (Some(3), Some(35), true));
        assert_eq!(w.msg, b"Failed to probe_read_str: Bad address (-14)");
        let w = warning(b"stdin:1:58-64: WARNING: m").unwrap();
        assert_eq!((w.line, w.col), (Some(1), Some(58)));
        let w = warning(b"/tmp/a:b.bt:2-4: WARNING: multi").unwrap();
        assert_eq!((w.line, w.col, w.has_context), (Some(2), None, false));
        let w = warning(b"WARNING: bare").unwrap();
        assert_eq!((w.line, w.has_context), (None, false));
        assert_eq!(warning(b"no warning here"), None);
        assert_eq!(warning(b"file:x: WARNING: m"), None);
    }

    #[test]
    fn helper_messages() {
        assert_eq!(
            helper_failure(b"Failed to probe_read_str: Operation not permitted (-1)"),
            Some((
                "probe_read_str".into(),
                -1,
                Some("Operation not permitted".into())
            ))
        );
        assert_eq!(
            helper_failure(b"Failed to map_lookup_elem: 0"),
            Some(("map_lookup_elem".into(), 0, None))
        );
        assert_eq!(helper_failure(b"something else"), None);
    }

    #[test]
    fn map_and_bar_shapes() {
        assert!(is_map_line(b"@x: 5"));
        assert!(is_map_line(b"@: 121"));
        assert!(is_map_line(b"@m[a b, 3]: 1"));
        assert!(is_map_line(b"@h: "));
        assert!(!is_map_line(b"@m[unclosed"));
        assert!(!is_map_line(b"user@host: x"));
        assert!(is_bar_line(b"[4, 8)                 0 |        |"));
        assert!(is_bar_line(b"(..., 0)               1 |@|"));
        assert!(!is_bar_line(b"[not a bar"));
    }
}
