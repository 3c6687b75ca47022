//! Decoding one JSON string literal as bpftrace writes it, to the exact bytes it stood for.
//!
//! bpftrace (0.17 through at least 0.26) escapes string data one C++ `char` at a time. `char`
//! is signed on x86_64, so every byte >= 0x80 is sign-extended and printed with `std::hex` as
//! `\u` plus **eight** hex digits: `é` (c3 a9) becomes `\uffffffc3\uffffffa9`. A standard JSON
//! parser reads `\uffff` as U+FFFF followed by the literal text `ffc3`, silently corrupting the
//! data. bpftrace never emits a genuine `\uffff`, so the eight-digit form is unambiguous and the
//! encoding is lossless if it is decoded here, byte by byte, instead of by a JSON library.
//!
//! On unsigned-`char` targets (aarch64, ppc64le, s390x) the same bytes come out raw, which makes
//! the JSON line invalid UTF-8; raw bytes are therefore accepted and copied as they are.
//!
//! Standard escapes from other producers (`\/`, `\b`, `\f`, `\u00e9`, surrogate pairs) are also
//! accepted; a four-digit escape above 0x7f is written as its UTF-8 encoding.

use nom::branch::alt;
use nom::bytes::complete::{tag, take_till1, take_while_m_n};
use nom::character::complete::char;
use nom::combinator::{map, map_res, value};
use nom::sequence::preceded;
use nom::{IResult, Parser};

/// Why a string literal could not be decoded. `offset` counts bytes from the opening quote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad JSON string at byte {offset}: {what}")]
pub struct EscapeError {
    pub offset: usize,
    pub what: &'static str,
}

/// A decoded string: its bytes and whether any `\u` escape was seen. The latter matters for
/// bpftrace 0.24+, where a `\u` escape leaves `std::hex` set on the output stream and later
/// bare integers (lost_events counts, hist counts) come out in hexadecimal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decoded {
    pub bytes: Vec<u8>,
    pub saw_u_escape: bool,
}

/// Decodes one complete, quoted JSON string literal (`"..."`, quotes included) to bytes.
///
/// This is the function other modules should use for any string bpftrace wrote in `-f json`
/// mode: it turns `\uffffffXX` back into the single byte `0xXX`.
///
/// ```
/// let bytes = bt2immu::decode::decode_json_string(br#""x \uffffffc3\uffffffa9 \"y\"""#).unwrap();
/// assert_eq!(bytes, "x é \"y\"".as_bytes());
/// ```
pub fn decode_json_string(quoted: &[u8]) -> Result<Vec<u8>, EscapeError> {
    match json_string(quoted) {
        Ok((&[], d)) => Ok(d.bytes),
        Ok((rest, _)) => Err(EscapeError {
            offset: quoted.len() - rest.len(),
            what: "bytes after the closing quote",
        }),
        Err(e) => Err(to_escape_error(quoted, e)),
    }
}

/// Turns a nom error from [`json_string`] into an [`EscapeError`] relative to `start`.
pub(crate) fn to_escape_error(start: &[u8], e: nom::Err<nom::error::Error<&[u8]>>) -> EscapeError {
    match e {
        nom::Err::Incomplete(_) => EscapeError {
            offset: start.len(),
            what: "unterminated string",
        },
        nom::Err::Error(e) | nom::Err::Failure(e) => EscapeError {
            offset: start.len() - e.input.len(),
            what: if e.input.is_empty() {
                "unterminated string"
            } else {
                "invalid escape or missing quote"
            },
        },
    }
}

/// One piece of a string body.
#[derive(Clone)]
enum Piece<'a> {
    /// A run of bytes copied as they are.
    Run(&'a [u8]),
    /// One byte from an escape.
    Byte(u8),
    /// A code point from a standard `\uXXXX` escape (or surrogate pair) above 0x7f.
    Char(char),
}

fn hex_value(digits: &[u8]) -> Result<u32, ()> {
    let mut v: u32 = 0;
    for &d in digits {
        let n = (d as char).to_digit(16).ok_or(())?;
        v = (v << 4) | n;
    }
    Ok(v)
}

fn is_hex(b: u8) -> bool {
    b.is_ascii_hexdigit()
}

/// `\uffffffXX`: bpftrace's sign-extended byte. Tried before the four-digit form.
fn sign_extended_byte(i: &[u8]) -> IResult<&[u8], Piece<'_>> {
    map_res(
        preceded(
            alt((tag("ffffff"), tag("FFFFFF"))),
            take_while_m_n(2, 2, is_hex),
        ),
        |d: &[u8]| hex_value(d).map(|v| Piece::Byte(v as u8)),
    )
    .parse(i)
}

fn four_hex(i: &[u8]) -> IResult<&[u8], u32> {
    map_res(take_while_m_n(4, 4, is_hex), hex_value).parse(i)
}

/// `\uXXXX` (after the `u`), including a UTF-16 surrogate pair as a standard producer writes it.
fn standard_u(i: &[u8]) -> IResult<&[u8], Piece<'_>> {
    let (rest, hi) = four_hex(i)?;
    if hi < 0x80 {
        return Ok((rest, Piece::Byte(hi as u8)));
    }
    if (0xd800..0xdc00).contains(&hi) {
        let (rest2, lo) = preceded(tag("\\u"), four_hex).parse(rest)?;
        if (0xdc00..0xe000).contains(&lo) {
            let cp = 0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00);
            if let Some(c) = char::from_u32(cp) {
                return Ok((rest2, Piece::Char(c)));
            }
        }
        return Err(nom::Err::Error(nom::error::Error::new(
            i,
            nom::error::ErrorKind::Verify,
        )));
    }
    match char::from_u32(hi) {
        Some(c) => Ok((rest, Piece::Char(c))),
        None => Err(nom::Err::Error(nom::error::Error::new(
            i,
            nom::error::ErrorKind::Verify,
        ))),
    }
}

fn escape(i: &[u8]) -> IResult<&[u8], (Piece<'_>, bool)> {
    preceded(
        char('\\'),
        alt((
            map(
                preceded(char('u'), alt((sign_extended_byte, standard_u))),
                |p| (p, true),
            ),
            map(
                alt((
                    value(b'"', char('"')),
                    value(b'\\', char('\\')),
                    value(b'/', char('/')),
                    value(b'\n', char('n')),
                    value(b'\r', char('r')),
                    value(b'\t', char('t')),
                    value(0x08, char('b')),
                    value(0x0c, char('f')),
                )),
                |b| (Piece::Byte(b), false),
            ),
        )),
    )
    .parse(i)
}

fn piece(i: &[u8]) -> IResult<&[u8], (Piece<'_>, bool)> {
    alt((
        map(take_till1(|b| b == b'"' || b == b'\\'), |r| {
            (Piece::Run(r), false)
        }),
        escape,
    ))
    .parse(i)
}

/// nom parser for one quoted string literal; leaves the input after the closing quote.
pub(crate) fn json_string(i: &[u8]) -> IResult<&[u8], Decoded> {
    let (mut i, _) = char('"').parse(i)?;
    let mut out = Decoded::default();
    loop {
        if let Some(rest) = i.strip_prefix(b"\"") {
            return Ok((rest, out));
        }
        let (rest, (p, saw_u)) = piece(i)?;
        out.saw_u_escape |= saw_u;
        match p {
            Piece::Run(r) => out.bytes.extend_from_slice(r),
            Piece::Byte(b) => out.bytes.push(b),
            Piece::Char(c) => {
                let mut buf = [0u8; 4];
                out.bytes
                    .extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
        i = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes bytes exactly as bpftrace 0.17–0.26 does on x86_64 (signed char).
    fn bpftrace_escape(data: &[u8]) -> Vec<u8> {
        let mut out = vec![b'"'];
        for &b in data {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0..=0x1f => out.extend_from_slice(format!("\\u{:04x}", b).as_bytes()),
                0x80..=0xff => out.extend_from_slice(format!("\\uffffff{:02x}", b).as_bytes()),
                _ => out.push(b),
            }
        }
        out.push(b'"');
        out
    }

    #[test]
    fn every_byte_value_round_trips() {
        let all: Vec<u8> = (0..=255u8).collect();
        let enc = bpftrace_escape(&all);
        assert_eq!(decode_json_string(&enc).unwrap(), all);
    }

    #[test]
    fn sign_extended_bytes_are_single_bytes() {
        let d = decode_json_string(br#""\uffffffc3\uffffffa9\uffffffff\uffffff80""#).unwrap();
        assert_eq!(d, vec![0xc3, 0xa9, 0xff, 0x80]);
    }

    #[test]
    fn escaped_backslash_before_u_is_not_an_escape() {
        // `\\uffffffc3` is a backslash followed by the text "uffffffc3".
        let d = decode_json_string(br#""\\uffffffc3""#).unwrap();
        assert_eq!(d, b"\\uffffffc3".to_vec());
    }

    #[test]
    fn standard_escapes_from_other_producers() {
        let d = decode_json_string(br#""\u00e9 \ud83d\ude00 \/ \b\f \u0001""#).unwrap();
        assert_eq!(d, "é 😀 / \u{8}\u{c} \u{1}".as_bytes());
    }

    #[test]
    fn raw_high_bytes_from_unsigned_char_targets_are_kept() {
        let d = decode_json_string(b"\"a\xc3\xa9\xffb\"").unwrap();
        assert_eq!(d, b"a\xc3\xa9\xffb".to_vec());
    }

    #[test]
    fn reports_saw_u_escape() {
        let (_, d) = json_string(br#""plain \n""#).unwrap();
        assert!(!d.saw_u_escape);
        let (_, d) = json_string(br#""x\u0001""#).unwrap();
        assert!(d.saw_u_escape);
    }

    #[test]
    fn rejects_broken_literals() {
        assert_eq!(
            decode_json_string(br#""abc"#).unwrap_err().what,
            "unterminated string"
        );
        assert!(decode_json_string(br#""\q""#).is_err());
        assert!(decode_json_string(br#""\u12""#).is_err());
        assert!(decode_json_string(br#""\ud800x""#).is_err());
        assert_eq!(decode_json_string(br#""a"b"#).unwrap_err().offset, 3);
        assert!(decode_json_string(b"abc").is_err());
    }
}
