//! bpftrace printf format strings: literal text and conversions.
//!
//! bpftrace accepts (all versions 0.17–0.26) `%[flags][width][.precision][length]spec` with flags
//! `-+ #0`, lengths `hh h l ll j z t L`, and specifiers `d i u o x X p c s` plus its own `r rx rh`
//! for `buf()`; 0.24+ adds floating point `e f g a` (and upper case). `%%` is a literal percent.
//! Anything else after `%` is kept as literal text, as it would be printed.

/// One parsed `%…` conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conversion {
    /// As written, e.g. `%-16s`.
    pub text: String,
    pub left: bool,
    pub zero: bool,
    pub plus: bool,
    pub space: bool,
    pub alt: bool,
    pub width: Option<usize>,
    /// `*` width: takes an extra argument before the value.
    pub star_width: bool,
    pub precision: Option<usize>,
    pub star_precision: bool,
    pub spec: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FmtPiece {
    Lit(Vec<u8>),
    Conv(Conversion),
}

const SPECS: &[&str] = &[
    "rx", "rh", "r", "d", "i", "u", "o", "x", "X", "p", "c", "s", "e", "E", "f", "F", "g", "G",
    "a", "A",
];

fn digits(b: &[u8], mut i: usize) -> (Option<usize>, usize) {
    let s = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i == s {
        (None, i)
    } else {
        let n = std::str::from_utf8(&b[s..i])
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(usize::MAX);
        (Some(n), i)
    }
}

/// Parses a conversion at `fmt[i] == b'%'`; returns it and the offset after it.
fn conversion(fmt: &[u8], start: usize) -> Option<(Conversion, usize)> {
    let mut c = Conversion {
        text: String::new(),
        left: false,
        zero: false,
        plus: false,
        space: false,
        alt: false,
        width: None,
        star_width: false,
        precision: None,
        star_precision: false,
        spec: String::new(),
    };
    let mut i = start + 1;
    while let Some(&b) = fmt.get(i) {
        match b {
            b'-' => c.left = true,
            b'0' => c.zero = true,
            b'+' => c.plus = true,
            b' ' => c.space = true,
            b'#' => c.alt = true,
            _ => break,
        }
        i += 1;
    }
    if fmt.get(i) == Some(&b'*') {
        c.star_width = true;
        i += 1;
    } else {
        (c.width, i) = digits(fmt, i);
    }
    if fmt.get(i) == Some(&b'.') {
        i += 1;
        if fmt.get(i) == Some(&b'*') {
            c.star_precision = true;
            i += 1;
        } else {
            let (p, j) = digits(fmt, i);
            c.precision = Some(p.unwrap_or(0));
            i = j;
        }
    }
    while matches!(fmt.get(i), Some(b'h' | b'l' | b'j' | b'z' | b't' | b'L')) {
        i += 1;
    }
    let rest = fmt.get(i..)?;
    let spec = SPECS.iter().find(|s| rest.starts_with(s.as_bytes()))?;
    c.spec = spec.to_string();
    i += spec.len();
    c.text = String::from_utf8_lossy(&fmt[start..i]).into_owned();
    Some((c, i))
}

/// Splits a (decoded) format string into literal runs and conversions.
pub(crate) fn parse_format(fmt: &[u8]) -> Vec<FmtPiece> {
    let mut out: Vec<FmtPiece> = Vec::new();
    let mut lit = Vec::new();
    let mut i = 0;
    while i < fmt.len() {
        if fmt[i] == b'%' {
            if fmt.get(i + 1) == Some(&b'%') {
                lit.push(b'%');
                i += 2;
                continue;
            }
            if let Some((c, j)) = conversion(fmt, i) {
                if !lit.is_empty() {
                    out.push(FmtPiece::Lit(std::mem::take(&mut lit)));
                }
                out.push(FmtPiece::Conv(c));
                i = j;
                continue;
            }
        }
        lit.push(fmt[i]);
        i += 1;
    }
    if !lit.is_empty() {
        out.push(FmtPiece::Lit(lit));
    }
    out
}

/// Pads `body` to the conversion's width the way C's printf does.
fn pad(c: &Conversion, body: Vec<u8>, zero_ok: bool) -> Vec<u8> {
    let w = c.width.unwrap_or(0);
    if body.len() >= w {
        return body;
    }
    let n = w - body.len();
    if c.left {
        let mut b = body;
        b.extend(std::iter::repeat_n(b' ', n));
        b
    } else if c.zero && zero_ok {
        let (sign, digits) = match body.first() {
            Some(b'-' | b'+') => body.split_at(1),
            _ => body.split_at(0),
        };
        let mut b = sign.to_vec();
        b.extend(std::iter::repeat_n(b'0', n));
        b.extend_from_slice(digits);
        b
    } else {
        let mut b = vec![b' '; n];
        b.extend(body);
        b
    }
}

/// Renders a conversion applied to a string literal argument (a header column).
pub(crate) fn render_str(c: &Conversion, s: &[u8]) -> Option<Vec<u8>> {
    if c.spec != "s" || c.star_width || c.star_precision {
        return None;
    }
    let s = match c.precision {
        Some(p) if p < s.len() => &s[..p],
        _ => s,
    };
    Some(pad(c, s.to_vec(), false))
}

/// Renders a conversion applied to an integer literal argument.
pub(crate) fn render_int(c: &Conversion, v: i128) -> Option<Vec<u8>> {
    if c.star_width || c.star_precision {
        return None;
    }
    let body = match c.spec.as_str() {
        "d" | "i" => {
            let mut s = v.to_string();
            if v >= 0 && c.plus {
                s.insert(0, '+');
            }
            s
        }
        "u" => (v as u64).to_string(),
        "x" => format!("{:x}", v as u64),
        "X" => format!("{:X}", v as u64),
        _ => return None,
    };
    Some(pad(c, body.into_bytes(), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convs(f: &str) -> Vec<String> {
        parse_format(f.as_bytes())
            .into_iter()
            .map(|p| match p {
                FmtPiece::Lit(l) => format!("L{}", String::from_utf8_lossy(&l)),
                FmtPiece::Conv(c) => format!("C{}", c.text),
            })
            .collect()
    }

    #[test]
    fn specifiers() {
        assert_eq!(
            convs("%-16s %6d %08x %llu %rx|%rh %r %%d %lX %c %p %y\n"),
            [
                "C%-16s", "L ", "C%6d", "L ", "C%08x", "L ", "C%llu", "L ", "C%rx", "L|", "C%rh",
                "L ", "C%r", "L %d ", "C%lX", "L ", "C%c", "L ", "C%p", "L %y\n"
            ]
        );
        let p = parse_format(b"%-8.3s");
        let FmtPiece::Conv(c) = &p[0] else { panic!() };
        assert!(c.left);
        assert_eq!(
            (c.width, c.precision, c.spec.as_str()),
            (Some(8), Some(3), "s")
        );
    }

    #[test]
    fn rendering_matches_c() {
        let FmtPiece::Conv(c) = parse_format(b"%-9s").remove(0) else {
            panic!()
        };
        assert_eq!(render_str(&c, b"TIME").unwrap(), b"TIME     ");
        let FmtPiece::Conv(c) = parse_format(b"%05d").remove(0) else {
            panic!()
        };
        assert_eq!(render_int(&c, -42).unwrap(), b"-0042");
        let FmtPiece::Conv(c) = parse_format(b"%6s").remove(0) else {
            panic!()
        };
        assert_eq!(render_str(&c, b"PID").unwrap(), b"   PID");
    }

    #[test]
    fn trailing_percent() {
        assert_eq!(convs("abc%"), ["Labc%"]);
        assert_eq!(convs("%-"), ["L%-"]);
    }
}
