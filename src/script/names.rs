//! Field names: from a header column (`TIME(ms)` → `time_ms`) or from the argument expression
//! that fills the column (`str(args->filename)` → `filename`, `@start[tid]` → `start`,
//! `nsecs / 1000000` → `nsecs`).
//!
//! A name only has to be stable and recognisable: it becomes a JSON key in every record, so
//! what matters is that the same script always yields the same names and that they are unique.

use super::lex::{Tok, Token};

/// Builtins whose value is best named after their (first) argument.
const WRAPPERS: &[&str] = &[
    "str",
    "buf",
    "ntop",
    "path",
    "ksym",
    "usym",
    "kaddr",
    "uaddr",
    "macaddr",
    "strerror",
    "cgroup_path",
    "kptr",
    "uptr",
    "pton",
    "bswap",
    "join",
    "reg",
    "sizeof",
    "offsetof",
    "signed",
    "unsigned",
];

/// Lower-cases and reduces `raw` to `[a-z0-9_]`, collapsing runs of other characters to one
/// `_`. `None` when nothing is left.
pub(crate) fn sanitize(raw: &str) -> Option<String> {
    let mut out = String::new();
    for ch in raw.chars() {
        if ch.is_ascii_alphanumeric() {
            out.push(ch.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_matches('_').to_string();
    if out.is_empty() {
        None
    } else if out.as_bytes()[0].is_ascii_digit() {
        Some(format!("f_{out}"))
    } else {
        Some(out)
    }
}

/// Makes names unique in order: the second `pid` becomes `pid_2`, the third `pid_3`, skipping
/// any suffix another field already uses.
pub(crate) fn uniquify(names: Vec<String>) -> Vec<String> {
    let mut used: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let mut candidate = n.clone();
        let mut k = 2;
        while used.contains(&candidate) {
            candidate = format!("{n}_{k}");
            k += 1;
        }
        used.insert(candidate.clone());
        out.push(candidate);
    }
    out
}

/// Index of the token closing the bracket opened at `open`.
fn matching(toks: &[Token], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (k, t) in toks.iter().enumerate().skip(open) {
        if t.is_punct("(") || t.is_punct("[") {
            depth += 1;
        } else if t.is_punct(")") || t.is_punct("]") {
            depth = depth.checked_sub(1)?;
            if depth == 0 {
                return Some(k);
            }
        }
    }
    None
}

fn looks_like_type(toks: &[Token]) -> bool {
    !toks.is_empty()
        && toks.iter().all(|t| {
            t.is_punct("*")
                || t.is_punct("::")
                || matches!(&t.tok, Tok::Ident(s) if !s.starts_with('@') && !s.starts_with('$'))
        })
}

/// A name for the value of an expression, from its first operand; `None` for a literal.
pub(crate) fn name_for_expr(toks: &[Token]) -> Option<String> {
    let mut toks = toks;
    for _ in 0..64 {
        let first = toks.first()?;
        if first.is_punct("(") {
            let close = matching(toks, 0)?;
            if close == toks.len() - 1 {
                toks = &toks[1..close]; // (expr)
                continue;
            }
            if looks_like_type(&toks[1..close]) {
                toks = &toks[close + 1..]; // (type) expr
                continue;
            }
            toks = &toks[1..close]; // (a + b) * c: name after a
            continue;
        }
        if ["-", "!", "~", "*", "&", "+", "++", "--"]
            .iter()
            .any(|p| first.is_punct(p))
        {
            toks = &toks[1..];
            continue;
        }
        break;
    }
    let first = toks.first()?;
    let Tok::Ident(base) = &first.tok else {
        return None;
    };
    if toks.get(1).is_some_and(|t| t.is_punct("(")) {
        let close = matching(toks, 1).unwrap_or(toks.len());
        let inner = &toks[2..close.min(toks.len())];
        if base == "strftime" {
            return Some("time".into());
        }
        if WRAPPERS.contains(&base.as_str()) {
            // The first argument that is not a literal names the value (`ntop(2, saddr)`).
            let mut depth = 0usize;
            let mut from = 0;
            for k in 0..=inner.len() {
                let t = inner.get(k);
                if let Some(t) = t {
                    if t.is_punct("(") || t.is_punct("[") {
                        depth += 1;
                    } else if t.is_punct(")") || t.is_punct("]") {
                        depth = depth.saturating_sub(1);
                    }
                }
                if t.is_none() || (depth == 0 && t.is_some_and(|t| t.is_punct(","))) {
                    if let Some(n) = name_for_expr(&inner[from..k]) {
                        return Some(n);
                    }
                    from = k + 1;
                }
            }
        }
        return sanitize(base);
    }
    // A postfix chain: base, then `->m`, `.m`, `[…]`; the last member names the value.
    let mut last_member: Option<&str> = None;
    let mut k = 1;
    while k < toks.len() {
        let t = &toks[k];
        if (t.is_punct("->") || t.is_punct(".")) && k + 1 < toks.len() {
            match &toks[k + 1].tok {
                Tok::Ident(m) => last_member = Some(m),
                Tok::Num(m) => last_member = Some(m), // tuple index `$t.0`
                _ => break,
            }
            k += 2;
        } else if t.is_punct("[") {
            k = matching(toks, k).map_or(toks.len(), |c| c + 1);
        } else {
            break;
        }
    }
    match last_member {
        Some(m) if !m.as_bytes()[0].is_ascii_digit() => sanitize(m),
        Some(m) => sanitize(&format!("{base}_{m}")),
        None if base == "@" => Some("map".into()),
        None => sanitize(base),
    }
}

#[cfg(test)]
mod tests {
    use super::super::lex::tokens;
    use super::*;

    fn n(src: &str) -> Option<String> {
        name_for_expr(&tokens(src.as_bytes(), 0, src.len()))
    }

    #[test]
    fn names_from_expressions() {
        assert_eq!(n("pid").as_deref(), Some("pid"));
        assert_eq!(n("comm").as_deref(), Some("comm"));
        assert_eq!(n("str(args->filename)").as_deref(), Some("filename"));
        assert_eq!(n("str(args.filename, 64)").as_deref(), Some("filename"));
        assert_eq!(n("str(retval)").as_deref(), Some("retval"));
        assert_eq!(n("args->ret").as_deref(), Some("ret"));
        assert_eq!(n("@start[tid]").as_deref(), Some("start"));
        assert_eq!(n("@[tid]").as_deref(), Some("map"));
        assert_eq!(n("nsecs / 1000000").as_deref(), Some("nsecs"));
        assert_eq!(n("(nsecs - @start[tid]) / 1000").as_deref(), Some("nsecs"));
        assert_eq!(n("(uint64)arg0").as_deref(), Some("arg0"));
        assert_eq!(n("curtask->real_parent->tgid").as_deref(), Some("tgid"));
        assert_eq!(n("strftime(\"%H:%M:%S\", nsecs)").as_deref(), Some("time"));
        assert_eq!(n("$ret").as_deref(), Some("ret"));
        assert_eq!(n("kstack").as_deref(), Some("kstack"));
        assert_eq!(n("ntop(2, args->saddr)").as_deref(), Some("saddr"));
        assert_eq!(n("kstack()").as_deref(), Some("kstack"));
        assert_eq!(n("\"x\""), None);
        assert_eq!(n("42"), None);
        assert_eq!(n("$t.0").as_deref(), Some("t_0"));
    }

    #[test]
    fn sanitizing_and_uniqueness() {
        assert_eq!(sanitize("TIME(ms)").as_deref(), Some("time_ms"));
        assert_eq!(sanitize("LAT(us)").as_deref(), Some("lat_us"));
        assert_eq!(sanitize("()"), None);
        assert_eq!(sanitize("9X").as_deref(), Some("f_9x"));
        assert_eq!(
            uniquify(vec![
                "pid".into(),
                "pid".into(),
                "pid_2".into(),
                "pid".into()
            ]),
            ["pid", "pid_2", "pid_2_2", "pid_3"]
        );
    }
}
