//! The structure of a bpftrace program, as far as the analysis needs it: top-level items
//! (probes, `#include`/`#define`, `config = {…}`, C type definitions, `import`, `macro`/`fn`
//! bodies, `let` map declarations), each probe's attach points, predicate and body tokens, and
//! every call `name(args…)` inside them.
//!
//! This is deliberately not a full grammar: bpftrace's syntax changed a lot between 0.17 and
//! 0.26, and bt2immu must keep working on scripts written for a newer version. The parser is
//! driven by brace balance and by the few shapes it needs; what it cannot place is recorded as a
//! note and skipped, and every byte outside comments and strings is still lexed, so an unsafe
//! call can never hide in an unparsed region.

use super::lex::{next_token, read_string, skip_trivia, tokens, Tok, Token};

/// What kind of top-level item a body belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ItemKind {
    Probe,
    /// `macro name(...) {…}` (0.24+) or `fn name(...) {…}` (0.22+): not a probe, but its calls
    /// still count for the safety check.
    Definition(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub kind: ItemKind,
    pub start: usize,
    /// Attach points as written, each with its offset.
    pub attach_points: Vec<(String, usize)>,
    /// Tokens between the predicate slashes.
    pub predicate: Vec<Token>,
    /// Tokens of the body, braces included.
    pub body: Vec<Token>,
}

#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    pub items: Vec<Item>,
    /// `#include` targets as written (`<linux/sched.h>` or `"local.h"`) with their offset.
    pub includes: Vec<(String, usize)>,
    /// Tokens of `#define` lines and of any other region that is not a probe or a C type
    /// definition (`config`, `let`, `import`, unparsed text): scanned for unsafe names only.
    pub other_tokens: Vec<Token>,
    /// Things the parser could not place, with their offset.
    pub notes: Vec<(usize, String)>,
}

/// A call `name(arg, …)` found in a token list.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub name: String,
    pub start: usize,
    pub args: Vec<Vec<Token>>,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

/// Lexes a balanced `{…}` starting at `src[i] == b'{'`; returns its tokens and the end offset.
fn balanced_block(src: &[u8], mut i: usize) -> (Vec<Token>, usize, bool) {
    let mut out = Vec::new();
    let mut depth = 0usize;
    loop {
        i = skip_trivia(src, i);
        let Some(t) = next_token(src, i) else {
            return (out, i, false);
        };
        i = t.end;
        if t.is_punct("{") {
            depth += 1;
        } else if t.is_punct("}") {
            depth = depth.saturating_sub(1);
            if depth == 0 {
                out.push(t);
                return (out, i, true);
            }
        }
        out.push(t);
    }
}

/// Lexes from `i` up to and including the first `;` outside braces; returns the end offset.
fn until_semicolon(src: &[u8], mut i: usize, sink: &mut Vec<Token>) -> usize {
    let mut depth = 0usize;
    loop {
        i = skip_trivia(src, i);
        let Some(t) = next_token(src, i) else {
            return i;
        };
        i = t.end;
        let stop = depth == 0 && t.is_punct(";");
        if t.is_punct("{") {
            depth += 1;
        } else if t.is_punct("}") {
            depth = depth.saturating_sub(1);
        }
        sink.push(t);
        if stop {
            return i;
        }
    }
}

/// Reads one attach point at `i`; returns its end.
fn attach_point_end(src: &[u8], mut i: usize) -> usize {
    let mut seen_colon = false;
    while i < src.len() {
        let b = src[i];
        if b.is_ascii_whitespace() || b == b',' || b == b'{' {
            break;
        }
        // `BEGIN/pred/`: a slash ends a colon-less name; after a colon it is part of a path.
        if b == b'/' && !seen_colon {
            break;
        }
        if src[i..].starts_with(b"//") || src[i..].starts_with(b"/*") {
            break;
        }
        match b {
            b'"' => {
                i = read_string(src, i).1;
                continue;
            }
            b'\\' => i += 1,
            b':' => seen_colon = true,
            _ => {}
        }
        i += 1;
    }
    i.min(src.len())
}

pub(crate) fn parse(src: &[u8]) -> Parsed {
    let mut p = Parsed {
        items: Vec::new(),
        includes: Vec::new(),
        other_tokens: Vec::new(),
        notes: Vec::new(),
    };
    let mut i = 0;
    loop {
        i = skip_trivia(src, i);
        if i >= src.len() {
            break;
        }
        let start = i;
        let c = src[i];
        if c == b'#' {
            // Preprocessor line, with backslash continuations.
            let mut j = i;
            while j < src.len() && src[j] != b'\n' {
                if src[j] == b'\\' && j + 1 < src.len() {
                    j += 1;
                }
                j += 1;
            }
            let line = String::from_utf8_lossy(&src[i..j]).into_owned();
            let rest = line[1..].trim_start();
            if let Some(target) = rest.strip_prefix("include") {
                p.includes.push((target.trim().to_string(), i));
            }
            p.other_tokens.extend(tokens(src, i + 1, j));
            i = j;
            continue;
        }
        if c == b'!' && src[i..].starts_with(b"#!") {
            while i < src.len() && src[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if is_ident_start(c) {
            let mut j = i;
            while j < src.len() && (src[j].is_ascii_alphanumeric() || src[j] == b'_') {
                j += 1;
            }
            let word = &src[i..j];
            let after = skip_trivia(src, j);
            match word {
                b"struct" | b"union" | b"enum" | b"typedef" => {
                    // C type definitions cannot call anything: a member named `signal` is
                    // not a use of the builtin, so these tokens are not kept for the scan.
                    i = until_semicolon(src, i, &mut Vec::new());
                    continue;
                }
                b"config" if src.get(after) == Some(&b'=') => {
                    let k = skip_trivia(src, after + 1);
                    if src.get(k) == Some(&b'{') {
                        let (toks, end, _) = balanced_block(src, k);
                        p.other_tokens.extend(toks);
                        i = skip_trivia(src, end);
                        if src.get(i) == Some(&b';') {
                            i += 1;
                        }
                    } else {
                        i = until_semicolon(src, i, &mut p.other_tokens);
                    }
                    continue;
                }
                b"import" | b"let" => {
                    i = until_semicolon(src, i, &mut p.other_tokens);
                    continue;
                }
                b"macro" | b"fn" => {
                    let name = next_token(src, after)
                        .and_then(|t| t.ident().map(str::to_string))
                        .unwrap_or_default();
                    // Skip the signature up to the body's opening brace.
                    let mut k = after;
                    let mut ok = false;
                    loop {
                        k = skip_trivia(src, k);
                        let Some(t) = next_token(src, k) else { break };
                        if t.is_punct("{") {
                            ok = true;
                            break;
                        }
                        k = t.end;
                        p.other_tokens.push(t);
                    }
                    if !ok {
                        p.notes
                            .push((start, format!("`{}` without a body", lossy(word))));
                        i = src.len();
                        continue;
                    }
                    let (body, end, closed) = balanced_block(src, k);
                    if !closed {
                        p.notes.push((k, "unclosed `{`".into()));
                    }
                    p.items.push(Item {
                        kind: ItemKind::Definition(name),
                        start,
                        attach_points: Vec::new(),
                        predicate: Vec::new(),
                        body,
                    });
                    i = end;
                    continue;
                }
                _ => {}
            }
        }
        i = parse_probe(src, i, &mut p);
        if i == start {
            // No progress: keep the byte's tokens for the safety scan and move on.
            let t = next_token(src, i).expect("not at end");
            p.notes.push((
                start,
                format!("unexpected `{}` at top level", lossy(&src[t.start..t.end])),
            ));
            i = t.end;
            p.other_tokens.push(t);
        }
    }
    p
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Parses `ap[, ap…] [/pred/] {body}` at `i`; returns the end offset (== `i` when nothing fit).
fn parse_probe(src: &[u8], start: usize, p: &mut Parsed) -> usize {
    let mut aps = Vec::new();
    let mut i = start;
    loop {
        let j = skip_trivia(src, i);
        let end = attach_point_end(src, j);
        if end == j {
            break;
        }
        aps.push((lossy(&src[j..end]), j));
        let k = skip_trivia(src, end);
        i = k;
        if src.get(k) == Some(&b',') {
            i = k + 1;
            continue;
        }
        break;
    }
    let mut predicate = Vec::new();
    if src.get(i) == Some(&b'/') {
        // Predicate: tokens up to a `/` outside parentheses that is followed by `{`.
        let mut k = i + 1;
        let mut depth = 0i32;
        let mut closed = false;
        loop {
            k = skip_trivia(src, k);
            let Some(t) = next_token(src, k) else { break };
            k = t.end;
            if t.is_punct("(") || t.is_punct("[") {
                depth += 1;
            } else if t.is_punct(")") || t.is_punct("]") {
                depth -= 1;
            } else if t.is_punct("/") && depth <= 0 {
                let n = skip_trivia(src, k);
                if src.get(n) == Some(&b'{') {
                    closed = true;
                    break;
                }
            } else if t.is_punct("{") || t.is_punct("}") {
                // A brace before the closing slash: this was not a predicate after all.
                predicate.push(t);
                break;
            }
            predicate.push(t);
        }
        if !closed {
            p.notes
                .push((i, "predicate without a closing `/` before `{`".into()));
            p.other_tokens.append(&mut predicate);
            return k.max(start + 1);
        }
        i = skip_trivia(src, k);
    }
    if src.get(i) == Some(&b'{') {
        let (body, end, closed) = balanced_block(src, i);
        if !closed {
            p.notes.push((i, "unclosed `{`".into()));
        }
        p.items.push(Item {
            kind: ItemKind::Probe,
            start,
            attach_points: aps,
            predicate,
            body,
        });
        return end;
    }
    if aps.is_empty() {
        return start;
    }
    // Attach points with no body: keep going after them.
    let names: Vec<_> = aps.iter().map(|(a, _)| a.as_str()).collect();
    p.notes.push((
        start,
        format!("`{}` is not followed by a `{{` block", names.join(",")),
    ));
    for (text, off) in &aps {
        p.other_tokens.extend(tokens(src, *off, off + text.len()));
    }
    i.max(start + 1)
}

/// Finds every call `name(...)` in `toks`, nested calls included, in source order.
pub(crate) fn find_calls(toks: &[Token]) -> Vec<Call> {
    let mut calls = Vec::new();
    for i in 0..toks.len() {
        let Some(name) = toks[i].ident() else {
            continue;
        };
        if name.starts_with('@') || name.starts_with('$') {
            continue;
        }
        if !toks.get(i + 1).is_some_and(|t| t.is_punct("(")) {
            continue;
        }
        if i > 0 && (toks[i - 1].is_punct("->") || toks[i - 1].is_punct(".")) {
            continue; // a member that happens to be followed by `(`
        }
        let mut args = Vec::new();
        let mut cur = Vec::new();
        let mut depth = 0usize;
        for t in &toks[i + 1..] {
            if t.is_punct("(") || t.is_punct("[") || t.is_punct("{") {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            } else if t.is_punct(")") || t.is_punct("]") || t.is_punct("}") {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    break;
                }
            } else if depth == 1 && t.is_punct(",") {
                args.push(std::mem::take(&mut cur));
                continue;
            }
            cur.push(t.clone());
        }
        if !cur.is_empty() || !args.is_empty() {
            args.push(cur);
        }
        calls.push(Call {
            name: name.to_string(),
            start: toks[i].start,
            args,
        });
    }
    calls
}

/// The source text of a token run, as written (comments inside it are kept).
pub(crate) fn text_of(src: &[u8], toks: &[Token]) -> String {
    match (toks.first(), toks.last()) {
        (Some(a), Some(b)) => lossy(&src[a.start..b.end]),
        _ => String::new(),
    }
}

/// The decoded bytes if `toks` is exactly one string literal.
pub(crate) fn string_literal(toks: &[Token]) -> Option<&[u8]> {
    match toks {
        [Token {
            tok: Tok::Str(s), ..
        }] => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_and_attach_points() {
        let src = br#"#!/usr/bin/env bpftrace
#include <linux/sched.h>
#define X 1
struct foo { int a; };
config = { max_strlen = 100 }
BEGIN { printf("hi\n"); }
uretprobe:/bin/bash:readline,
  uprobe:"/opt/a b/x":f /retval != 0 && (pid / 2) > 1/ { printf("%s\n", str(retval)); }
tracepoint:syscalls:sys_enter_execve{ join(args->argv); }
END/1/{}
"#;
        let p = parse(src);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
        let aps: Vec<Vec<String>> = p
            .items
            .iter()
            .map(|it| it.attach_points.iter().map(|a| a.0.clone()).collect())
            .collect();
        assert_eq!(
            aps,
            vec![
                vec!["BEGIN".to_string()],
                vec![
                    "uretprobe:/bin/bash:readline".into(),
                    "uprobe:\"/opt/a b/x\":f".into()
                ],
                vec!["tracepoint:syscalls:sys_enter_execve".into()],
                vec!["END".into()],
            ]
        );
        assert_eq!(
            text_of(src, &p.items[1].predicate),
            "retval != 0 && (pid / 2) > 1"
        );
        assert_eq!(p.includes[0].0, "<linux/sched.h>");
        let calls = find_calls(&p.items[1].body);
        let names: Vec<_> = calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["printf", "str"]);
        assert_eq!(calls[0].args.len(), 2);
        assert_eq!(text_of(src, &calls[0].args[1]), "str(retval)");
    }

    #[test]
    fn garbage_does_not_panic() {
        for src in [
            &b"}}}"[..],
            b"kprobe:f /x",
            b"a, b, c",
            b"macro",
            b"fn f(",
            b"BEGIN { printf(",
            b"/ / / {",
            b"\xff\xfe{",
            b"config =",
        ] {
            let _ = parse(src);
        }
    }
}
