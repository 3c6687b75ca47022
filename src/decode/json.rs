//! One line of `bpftrace -f json` output → a [`Record`].
//!
//! Only the envelope is parsed strictly: `{"type": "<t>", ...}`. Every string goes through the
//! byte decoder in [`super::escape`], never through a JSON library (see there for why). Values
//! are parsed leniently because bpftrace's JSON is not always JSON:
//! - 0.17 writes `strftime`/`cgroup_path`/`strerror` values unquoted inside tuples
//!   (`[1,"two",16:33,3]`), so map/hist/stats/value records are kept raw and only their type is
//!   read;
//! - 0.24+ may write bare integers in hexadecimal after a `\u` escape (`"count": a`), so scalars
//!   are taken as tokens and interpreted by the caller, who knows the stream's history.

use super::escape::{json_string, Decoded};
use nom::branch::alt;
use nom::bytes::complete::{tag, take_while, take_while1};
use nom::character::complete::char;
use nom::combinator::{map, opt};
use nom::multi::separated_list0;
use nom::sequence::{delimited, preceded, separated_pair};
use nom::{IResult, Parser};

/// A leniently parsed JSON value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value<'a> {
    Str(Decoded),
    /// A number, `true`/`false`/`null`, a hex integer, or an unquoted 0.17 value: the raw token.
    Scalar(&'a [u8]),
    Object(Vec<(Decoded, Value<'a>)>),
    Array(Vec<Value<'a>>),
}

impl<'a> Value<'a> {
    fn saw_u_escape(&self) -> bool {
        match self {
            Value::Str(d) => d.saw_u_escape,
            Value::Scalar(_) => false,
            Value::Object(m) => m.iter().any(|(k, v)| k.saw_u_escape || v.saw_u_escape()),
            Value::Array(v) => v.iter().any(Value::saw_u_escape),
        }
    }
}

/// What one JSON line says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record<'a> {
    /// printf/time/cat/syscall data: part of the current output line.
    Data(Decoded),
    /// join data: ends the current output line (text mode prints a newline after it).
    Join(Decoded),
    /// map/hist/stats/value/tseries and friends: kept as the raw line.
    Map,
    /// Any other envelope: its type and members, for the caller to interpret.
    Other {
        kind: Vec<u8>,
        members: Vec<(Decoded, Value<'a>)>,
    },
}

/// Record types whose payload is kept raw as [`Record::Map`]. The 0.17 tuple bug makes their
/// `data` unparseable in general, and downstream keeps them as text anyway.
const MAP_TYPES: &[&[u8]] = &[
    b"map",
    b"hist",
    b"stats",
    b"value",
    b"tseries",
    b"test_result",
    b"benchmark_result",
    b"benchmark_results",
];

fn ws(i: &[u8]) -> IResult<&[u8], &[u8]> {
    take_while(|b| b == b' ' || b == b'\t' || b == b'\r').parse(i)
}

fn scalar(i: &[u8]) -> IResult<&[u8], Value<'_>> {
    map(
        take_while1(|b: u8| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'"')),
        Value::Scalar,
    )
    .parse(i)
}

fn member(i: &[u8]) -> IResult<&[u8], (Decoded, Value<'_>)> {
    separated_pair(preceded(ws, json_string), (ws, char(':'), ws), value).parse(i)
}

fn object(i: &[u8]) -> IResult<&[u8], Vec<(Decoded, Value<'_>)>> {
    delimited(
        char('{'),
        separated_list0(preceded(ws, char(',')), member),
        (ws, char('}')),
    )
    .parse(i)
}

fn array(i: &[u8]) -> IResult<&[u8], Vec<Value<'_>>> {
    delimited(
        char('['),
        separated_list0(preceded(ws, char(',')), preceded(ws, value)),
        (ws, char(']')),
    )
    .parse(i)
}

/// Nesting depth is bounded by the input line; recursion here is at most one frame per
/// bracket, and lines come from bpftrace whose nesting is shallow. A hostile line of 100k
/// brackets is still refused by the depth guard in [`parse_line`].
fn value(i: &[u8]) -> IResult<&[u8], Value<'_>> {
    alt((
        map(json_string, Value::Str),
        map(object, Value::Object),
        map(array, Value::Array),
        scalar,
    ))
    .parse(i)
}

/// `{"type": "<kind>"` — the envelope head, with or without spaces.
fn head(i: &[u8]) -> IResult<&[u8], Decoded> {
    preceded(
        (ws, char('{'), ws, tag(&b"\"type\""[..]), ws, char(':'), ws),
        json_string,
    )
    .parse(i)
}

/// The deepest bracket nesting `parse_line` will recurse into.
const MAX_DEPTH: usize = 64;

fn nesting_depth(line: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in line {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Parses one line (without its '\n'). `Err` carries the reason the line is kept raw.
pub(crate) fn parse_line(line: &[u8]) -> Result<(Record<'_>, bool), String> {
    let (rest, kind) = head(line).map_err(|_| "not a bpftrace JSON record".to_string())?;
    if MAP_TYPES.contains(&kind.bytes.as_slice()) {
        if line.trim_ascii_end().ends_with(b"}") {
            return Ok((Record::Map, kind.saw_u_escape));
        }
        return Err(format!(
            "{} record is not closed",
            String::from_utf8_lossy(&kind.bytes)
        ));
    }
    if nesting_depth(rest) > MAX_DEPTH {
        return Err("record nested too deeply".into());
    }
    let mut members_then_close = (
        opt(preceded(
            (ws, char(',')),
            separated_list0(preceded(ws, char(',')), member),
        )),
        ws,
        char('}'),
        ws,
    );
    let (rest, (members, _, _, _)) = members_then_close
        .parse(rest)
        .map_err(|_| format!("malformed {} record", String::from_utf8_lossy(&kind.bytes)))?;
    if !rest.is_empty() {
        return Err("bytes after the end of the record".into());
    }
    let members = members.unwrap_or_default();
    let saw_u = kind.saw_u_escape
        || members
            .iter()
            .any(|(k, v)| k.saw_u_escape || v.saw_u_escape());
    let data = || {
        members
            .iter()
            .find(|(k, _)| k.bytes == b"data")
            .map(|(_, v)| v)
    };
    let record = match kind.bytes.as_slice() {
        b"printf" | b"time" | b"cat" | b"syscall" | b"join" => match data() {
            Some(Value::Str(d)) => {
                if kind.bytes == b"join" {
                    Record::Join(d.clone())
                } else {
                    Record::Data(d.clone())
                }
            }
            _ => {
                return Err(format!(
                    "{} record without string data",
                    String::from_utf8_lossy(&kind.bytes)
                ))
            }
        },
        _ => Record::Other {
            kind: kind.bytes,
            members,
        },
    };
    Ok((record, saw_u))
}

/// Reads an integer token: decimal, or hexadecimal when `hex` says the stream is in hex mode
/// (or when the token has hex letters, which decimal output never has). Quoted integers (0.24+
/// writes integers a double cannot hold as strings) are accepted too.
pub(crate) fn int_of(v: &Value<'_>, hex: bool) -> Option<i128> {
    let tok: &[u8] = match v {
        Value::Scalar(t) => t,
        Value::Str(d) => &d.bytes,
        _ => return None,
    };
    let (neg, digits) = match tok.strip_prefix(b"-") {
        Some(d) => (true, d),
        None => (false, tok),
    };
    if digits.is_empty() || digits.len() > 32 {
        return None;
    }
    let has_letters = digits.iter().any(|b| b.is_ascii_alphabetic());
    let radix = if hex || has_letters { 16 } else { 10 };
    let s = std::str::from_utf8(digits).ok()?;
    let n = i128::from_str_radix(s, radix).ok()?;
    Some(if neg { -n } else { n })
}

/// Finds a member by key.
pub(crate) fn get<'v, 'a>(members: &'v [(Decoded, Value<'a>)], key: &str) -> Option<&'v Value<'a>> {
    members
        .iter()
        .find(|(k, _)| k.bytes == key.as_bytes())
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printf_record_with_escapes() {
        let (r, saw) =
            parse_line(br#"{"type": "printf", "data": "a\uffffffc3\uffffffa9\n"}"#).unwrap();
        assert!(saw);
        match r {
            Record::Data(d) => assert_eq!(d.bytes, b"a\xc3\xa9\n"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn compact_envelope_is_accepted() {
        let (r, _) = parse_line(br#"{"type":"join","data":"a b"}"#).unwrap();
        assert!(matches!(r, Record::Join(d) if d.bytes == b"a b"));
    }

    #[test]
    fn unquoted_017_tuple_is_a_map_record() {
        let (r, _) = parse_line(br#"{"type": "value", "data": [1,"two",16:33,3]}"#).unwrap();
        assert_eq!(r, Record::Map);
    }

    #[test]
    fn hex_scalars_are_tokens() {
        let (r, _) =
            parse_line(br#"{"type": "lost_events", "count": a, "data": {"events": a}}"#).unwrap();
        let Record::Other { kind, members } = r else {
            panic!("not Other")
        };
        assert_eq!(kind, b"lost_events");
        assert_eq!(int_of(get(&members, "count").unwrap(), false), Some(10));
        assert_eq!(int_of(get(&members, "count").unwrap(), true), Some(10));
        let Value::Object(d) = get(&members, "data").unwrap() else {
            panic!("data is not an object")
        };
        assert_eq!(int_of(get(d, "events").unwrap(), false), Some(10));
    }

    #[test]
    fn rejects_non_records_and_truncation() {
        assert!(parse_line(b"Attaching 1 probe...").is_err());
        assert!(parse_line(br#"{"type": "printf", "data": "abc"#).is_err());
        assert!(parse_line(br#"{"type": "printf", "data": 5}"#).is_err());
        assert!(parse_line(br#"{"type": "printf", "data": "a"} x"#).is_err());
        assert!(parse_line(br#"{"type": "map", "data": {"@x": 1"#).is_err());
        let deep = format!(
            r#"{{"type": "x", "data": {}{}}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        assert!(parse_line(deep.as_bytes()).is_err());
    }
}
