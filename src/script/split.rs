//! Splitting one output line into the fields of the printf site that printed it.
//!
//! Every site is tried. A site matches when its literal text and its fields account for the
//! whole line: numbers must parse and carry exactly the padding their width implies, a padded
//! `%-16s` string has its padding trimmed (its own inner spaces are kept), and a string field
//! followed only by literal text takes the rest of the line. When a site can be matched in
//! several ways, the ways that let a padded string overflow its width are dropped first; if
//! distinct results remain, the line is ambiguous and kept raw. The search is bounded, so a
//! hostile line cannot make it slow.

use super::{FieldSpec, Kind, PrintSite, Segment, SiteKind};

/// A field's value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum FieldValue {
    Int(i64),
    UInt(u64),
    /// Raw bytes: may not be valid UTF-8 (the caller decides how to encode them).
    Str(Vec<u8>),
}

impl FieldValue {
    /// The value as JSON: numbers stay numbers (full u64 range); a string that is not valid
    /// UTF-8 gives `None`, so the caller can pick a lossless encoding for it.
    pub fn to_json(&self) -> Option<serde_json::Value> {
        Some(match self {
            FieldValue::Int(v) => (*v).into(),
            FieldValue::UInt(v) => (*v).into(),
            FieldValue::Str(b) => std::str::from_utf8(b).ok()?.into(),
        })
    }
}

/// What a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// Exactly one way to read the line: the probe(s) that print it and its fields in order.
    /// When several sites print the same fields identically, `probe` lists them joined by
    /// `" | "` and `site` is the first.
    Fields {
        probe: String,
        site: usize,
        fields: Vec<(String, FieldValue)>,
    },
    /// The column header the script prints.
    Header { probe: String, site: usize },
    /// Other constant text of the script (a banner).
    Literal { probe: String, site: usize },
    /// Not split: keep the line as it is, flagged with this reason.
    Raw { reason: String },
}

/// Upper bound on matcher steps per site and line.
const BUDGET: usize = 20_000;

type Ranges = Vec<(usize, usize)>;

struct Matcher<'a> {
    line: &'a [u8],
    segs: &'a [Segment],
    fields: &'a [FieldSpec],
    steps: usize,
    exhausted: bool,
    ranges: Ranges,
    best_cost: u32,
    best: Vec<Ranges>,
}

fn digits_len(b: &[u8], radix: u32) -> usize {
    b.iter()
        .take_while(|c| (**c as char).is_digit(radix))
        .count()
}

/// Greedy length of the numeric token at the start of `b`.
fn token_len(kind: Kind, b: &[u8]) -> usize {
    match kind {
        Kind::Signed => {
            let sign = usize::from(matches!(b.first(), Some(b'-' | b'+')));
            let d = digits_len(&b[sign..], 10);
            if d == 0 {
                0
            } else {
                sign + d
            }
        }
        Kind::Unsigned => digits_len(b, 10),
        Kind::Hex => {
            let pre = if b.starts_with(b"0x") || b.starts_with(b"0X") {
                2
            } else {
                0
            };
            let d = digits_len(&b[pre..], 16);
            if d == 0 {
                digits_len(b, 16)
            } else {
                pre + d
            }
        }
        Kind::Octal => digits_len(b, 8),
        _ => 0,
    }
}

fn parses(kind: Kind, v: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(v) else {
        return false;
    };
    let s = s.strip_prefix('+').unwrap_or(s);
    match kind {
        Kind::Signed => s.parse::<i64>().is_ok() || s.parse::<u64>().is_ok(),
        Kind::Unsigned => s.parse::<u64>().is_ok(),
        _ => true,
    }
}

fn hex_bytes(v: &[u8]) -> bool {
    v.is_empty()
        || v.split(|&b| b == b' ')
            .all(|p| p.len() == 2 && p.iter().all(u8::is_ascii_hexdigit))
}

impl Matcher<'_> {
    /// Candidate readings of field `f` at `pos`: (end of its text, value range, extra cost).
    fn candidates(
        &self,
        f: &FieldSpec,
        pos: usize,
        next_lit: Option<&[u8]>,
        fixed_end: Option<usize>,
    ) -> Vec<(usize, (usize, usize), u32)> {
        let line = self.line;
        let w = f.width;
        let mut out = Vec::new();
        match f.kind {
            Kind::Signed | Kind::Unsigned | Kind::Hex | Kind::Octal => {
                let lead = if !f.left && w > 0 {
                    line[pos..].iter().take_while(|&&b| b == b' ').count()
                } else {
                    0
                };
                let ts = pos + lead;
                let tl = token_len(f.kind, &line[ts..]);
                if tl == 0 || !parses(f.kind, &line[ts..ts + tl]) {
                    return out;
                }
                let pad = w.saturating_sub(tl);
                let end = if f.left {
                    let e = ts + tl + pad;
                    if e > line.len() || line[ts + tl..e].iter().any(|&b| b != b' ') {
                        return out;
                    }
                    e
                } else {
                    if lead != pad {
                        return out;
                    }
                    ts + tl
                };
                out.push((end, (ts, ts + tl), 0));
            }
            Kind::Char => {
                let total = w.max(1);
                if pos + total > line.len() {
                    return out;
                }
                let (v, pad) = if f.left {
                    (pos, pos + 1..pos + total)
                } else {
                    (pos + total - 1, pos..pos + total - 1)
                };
                if line[pad].iter().all(|&b| b == b' ') {
                    out.push((pos + total, (v, v + 1), 0));
                }
            }
            Kind::Str | Kind::Word | Kind::HexBytes => {
                let ends = match fixed_end {
                    Some(e) if e >= pos => e..=e,
                    Some(_) => return out,
                    None => pos..=line.len(),
                };
                for e in ends {
                    let span = &line[pos..e];
                    if f.kind == Kind::Word && w == 0 && span.last() == Some(&b' ') {
                        break;
                    }
                    if let Some(l) = next_lit {
                        if !line[e..].starts_with(l) {
                            continue;
                        }
                    }
                    let len = span.len();
                    let (vs, ve, cost) = if w > 0 && len < w {
                        continue;
                    } else if w > 0 && len == w {
                        if f.left {
                            let t = span.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
                            (pos, pos + t, 0)
                        } else {
                            let t = span.iter().position(|&b| b != b' ').unwrap_or(len);
                            (pos + t, e, 0)
                        }
                    } else {
                        (pos, e, u32::from(w > 0))
                    };
                    let v = &line[vs..ve];
                    if f.precision.is_some_and(|p| v.len() > p)
                        || f.max_len.is_some_and(|m| v.len() > m)
                    {
                        continue;
                    }
                    let ok = match f.kind {
                        Kind::Word => !v.is_empty() && !v.contains(&b' '),
                        Kind::HexBytes => hex_bytes(v),
                        _ => true,
                    };
                    if ok {
                        out.push((e, (vs, ve), cost));
                    }
                }
            }
        }
        out
    }

    fn record(&mut self, cost: u32) {
        if cost < self.best_cost {
            self.best_cost = cost;
            self.best.clear();
        }
        if cost == self.best_cost && self.best.len() < 2 {
            let line = self.line;
            let same = |a: &Ranges, b: &Ranges| {
                a.iter()
                    .zip(b)
                    .all(|(x, y)| line[x.0..x.1] == line[y.0..y.1])
            };
            if !self.best.iter().any(|b| same(b, &self.ranges)) {
                self.best.push(self.ranges.clone());
            }
        }
    }

    fn go(&mut self, si: usize, pos: usize, cost: u32) {
        self.steps += 1;
        if self.steps > BUDGET {
            self.exhausted = true;
            return;
        }
        let Some(seg) = self.segs.get(si) else {
            if pos == self.line.len() {
                self.record(cost);
            }
            return;
        };
        match seg {
            Segment::Literal(l) => {
                if self.line[pos..].starts_with(l) {
                    self.go(si + 1, pos + l.len(), cost);
                }
            }
            Segment::Field(fi) => {
                let next_lit = match self.segs.get(si + 1) {
                    Some(Segment::Literal(l)) => Some(l.as_slice()),
                    _ => None,
                };
                // Followed only by literal text: the field ends where that text begins.
                let rest = &self.segs[si + 1..];
                let fixed_end = if rest.iter().all(|s| matches!(s, Segment::Literal(_))) {
                    let suffix: Vec<u8> = rest
                        .iter()
                        .flat_map(|s| match s {
                            Segment::Literal(l) => l.clone(),
                            Segment::Field(_) => Vec::new(),
                        })
                        .collect();
                    if !self.line.ends_with(&suffix) {
                        return;
                    }
                    Some(self.line.len() - suffix.len())
                } else {
                    None
                };
                let f = &self.fields[*fi];
                for (end, range, extra) in self.candidates(f, pos, next_lit, fixed_end) {
                    self.ranges[*fi] = range;
                    self.go(si + 1, end, cost + extra);
                    if self.exhausted {
                        return;
                    }
                }
            }
        }
    }
}

enum SiteMatch {
    None,
    One(Vec<(String, FieldValue)>),
    Ambiguous,
    TooComplex,
}

fn value(kind: Kind, v: &[u8]) -> FieldValue {
    let s = std::str::from_utf8(v).unwrap_or("");
    let s = s.strip_prefix('+').unwrap_or(s);
    match kind {
        Kind::Signed => match s.parse::<i64>() {
            Ok(n) => FieldValue::Int(n),
            Err(_) => s
                .parse::<u64>()
                .map_or_else(|_| FieldValue::Str(v.to_vec()), FieldValue::UInt),
        },
        Kind::Unsigned => s
            .parse::<u64>()
            .map_or_else(|_| FieldValue::Str(v.to_vec()), FieldValue::UInt),
        _ => FieldValue::Str(v.to_vec()),
    }
}

fn match_site(site: &PrintSite, line: &[u8]) -> SiteMatch {
    let fields = &site.schema.fields;
    let mut m = Matcher {
        line,
        segs: &site.schema.segments,
        fields,
        steps: 0,
        exhausted: false,
        ranges: vec![(0, 0); fields.len()],
        best_cost: u32::MAX,
        best: Vec::new(),
    };
    m.go(0, 0, 0);
    if m.exhausted {
        return SiteMatch::TooComplex;
    }
    match m.best.as_slice() {
        [] => SiteMatch::None,
        [one] => SiteMatch::One(
            fields
                .iter()
                .zip(one)
                .map(|(f, r)| (f.name.clone(), value(f.kind, &line[r.0..r.1])))
                .collect(),
        ),
        _ => SiteMatch::Ambiguous,
    }
}

pub(crate) fn split_line(sites: &[PrintSite], line: &[u8]) -> Split {
    // A constant line of the script wins: it is the more specific reading.
    for (i, site) in sites.iter().enumerate() {
        if site.schema.fields.is_empty() && site.schema.constant().as_deref() == Some(line) {
            let probe = site.probe.clone();
            return match site.kind {
                SiteKind::Header => Split::Header { probe, site: i },
                _ => Split::Literal { probe, site: i },
            };
        }
    }
    let mut hits: Vec<(usize, Vec<(String, FieldValue)>)> = Vec::new();
    let mut unclear: Vec<String> = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        if site.schema.fields.is_empty() {
            continue;
        }
        match match_site(site, line) {
            SiteMatch::None => {}
            SiteMatch::One(f) => hits.push((i, f)),
            SiteMatch::Ambiguous => unclear.push(format!(
                "splits in more than one way for the printf at {} ({})",
                site.pos, site.probe
            )),
            SiteMatch::TooComplex => unclear.push(format!(
                "too many ways to split for the printf at {} ({})",
                site.pos, site.probe
            )),
        }
    }
    if !unclear.is_empty() {
        return Split::Raw {
            reason: format!("ambiguous: {}", unclear.join("; ")),
        };
    }
    match hits.len() {
        0 => Split::Raw {
            reason: "matches no printf of the script".into(),
        },
        _ if hits.iter().all(|h| h.1 == hits[0].1) => {
            let mut probes: Vec<&str> = Vec::new();
            for (i, _) in &hits {
                if !probes.contains(&sites[*i].probe.as_str()) {
                    probes.push(&sites[*i].probe);
                }
            }
            let site = hits[0].0;
            Split::Fields {
                probe: probes.join(" | "),
                site,
                fields: hits.swap_remove(0).1,
            }
        }
        _ => Split::Raw {
            reason: format!(
                "ambiguous: matches {} printf sites differently ({})",
                hits.len(),
                hits.iter()
                    .map(|(i, _)| format!("{} at {}", sites[*i].probe, sites[*i].pos))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}
