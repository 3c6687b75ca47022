//! Reading a user's bpftrace script: is it safe to run as root, what does it print, and how
//! does each printed line split into named fields.
//!
//! This is what makes bt2immu a drop-in for *any* bpftrace script: the script's own `printf`
//! calls say what its output lines look like, so each line can become a record with named,
//! typed fields, and a line that fits no `printf` is kept raw rather than guessed at.
//!
//! # API
//!
//! ```no_run
//! use bt2immu::script::{check_script, check_program, Split};
//!
//! // Refuses unsafe builtins (`system()`, `signal()`, …, bare-address kprobes) and, when running
//! // as root, a script that a non-root user could modify. Errors say file:line:col and the fix.
//! let info = check_script("scripts/examples/execsnoop.bt".as_ref())?;
//! // The same analysis for `bpftrace -e '…'` programs:
//! let _ = check_program("BEGIN { printf(\"hi\\n\"); }")?;
//!
//! println!("{}", info.describe());          // for `bt2immu check`; describe_json() too
//! match info.split_line(b"1234   ls -l") {
//!     Split::Fields { probe, fields, .. } => { /* [("pid", UInt(1234)), ("argv", Str(..))] */ }
//!     Split::Header { .. } | Split::Literal { .. } => { /* a constant line of the script */ }
//!     Split::Raw { reason } => { /* keep the line as it is, flagged with the reason */ }
//! }
//! # Ok::<(), bt2immu::script::ScriptError>(())
//! ```
//!
//! * [`analyze`] is the pure core (bytes in, [`ScriptInfo`] out, never fails, never panics);
//!   [`inspect_script`] adds reading the file and the permission check without refusing;
//!   [`check_script`] / [`check_program`] refuse what is unsafe ([`ScriptError`]).
//! * [`ScriptInfo::sites`] lists every output line the script can print ([`PrintSite`]): its
//!   probe, its position, its [`LineSchema`] (literal text and fields, each with a name, a
//!   [`FieldType`] and the expression that fills it).
//! * [`ScriptInfo::split_line`] takes one output line (as `decode::Event::Output` gives it,
//!   without the `\n`) and returns a [`Split`].
//! * [`perms::permission_issues`] is the pure permission rule.
//!
//! # How lines are assembled
//!
//! In each probe, the output calls are taken in source order: `printf` contributes its format
//! (conversions whose argument is a literal are rendered into the text, so a header
//! `printf("%-6s %s\n", "PID", "COMM")` is a constant line), `time(fmt)` a time field,
//! `join(a)` a string field and a newline. Every `\n` ends a line. `print`, `cat` and other
//! outputs interrupt a partial line, which is then not split (noted). Branches are not followed:
//! a line assembled differently at run time falls back to [`Split::Raw`].
//!
//! # Field names
//!
//! From a header line the script prints in `BEGIN` (a constant line with more upper- than
//! lower-case letters) whose whitespace-separated column count equals the line's field count;
//! otherwise from the argument expressions (see [`names`]). Names are sanitised to
//! `[a-z0-9_]` and made unique (`pid`, `pid_2`).

pub mod format;
mod lex;
pub mod names;
mod parse;
pub mod perms;
mod split;

use std::path::{Path, PathBuf};

pub use lex::Pos;
use lex::{LineIndex, Tok, Token};
use parse::{find_calls, string_literal, text_of, ItemKind};
pub use perms::{FileMeta, PermIssue, PermProblem};
pub use split::{FieldValue, Split};

use format::{parse_format, render_int, render_str, FmtPiece};

/// Builtins that bpftrace only runs with `--unsafe` (0.17–0.26: `system`, `signal`, `override`;
/// 0.25+ moved these into the standard library and added `signal_thread` and `write_user`).
pub const UNSAFE_BUILTINS: &[(&str, &str)] = &[
    ("system", "runs a shell command as root"),
    ("signal", "sends signals to traced processes"),
    ("signal_thread", "sends signals to traced threads"),
    ("override", "changes the return value of kernel functions"),
    ("write_user", "writes into the memory of traced processes"),
];

/// The JSON-facing type of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// Signed integer (`%d`, `%i`, `%ld`…): a JSON number.
    Int,
    /// Unsigned integer (`%u`, `%lu`, `%llu`…): a JSON number, full u64 range.
    UInt,
    /// Bytes (`%s`, `%c`, `%x`, `%p`, `%r*`, floats, `join`, `time`): a string when valid UTF-8.
    #[serde(rename = "string")]
    Str,
}

/// How a field's text looks in the line; drives the matcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Signed,
    Unsigned,
    Hex,
    Octal,
    Char,
    /// Any bytes (may contain spaces).
    Str,
    /// A run of non-space bytes (`%p`, `%rx`, floats, `time()` without spaces).
    Word,
    /// `%rh`: hex byte pairs separated by single spaces.
    HexBytes,
}

/// One field of a line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// The expression that fills it, as written (`str(args->filename)`, `join(args->argv)`).
    pub expr: String,
    /// How it is printed: the printf conversion (`%-16s`) or `join()` / `time()`.
    pub conversion: String,
    #[serde(skip)]
    pub(crate) kind: Kind,
    #[serde(skip)]
    pub(crate) width: usize,
    #[serde(skip)]
    pub(crate) left: bool,
    #[serde(skip)]
    pub(crate) precision: Option<usize>,
    /// Known upper bound of the value's length (`comm` is at most 15 bytes).
    #[serde(skip)]
    pub(crate) max_len: Option<usize>,
}

/// A piece of a line: literal bytes or the field with this index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(Vec<u8>),
    Field(usize),
}

/// What one output line of the script looks like.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LineSchema {
    pub segments: Vec<Segment>,
    pub fields: Vec<FieldSpec>,
}

impl LineSchema {
    /// The line as a pattern, fields shown as `{name}`; for people.
    pub fn pattern(&self) -> String {
        let mut s = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Literal(l) => {
                    s.push_str(&String::from_utf8_lossy(l).escape_debug().to_string())
                }
                Segment::Field(i) => {
                    s.push('{');
                    s.push_str(&self.fields[*i].name);
                    s.push('}');
                }
            }
        }
        s
    }

    /// The line bpftrace would print for these field values (padding as printf pads; `%x` and
    /// other text-typed fields take their text from a `Str` value). The inverse of
    /// [`ScriptInfo::split_line`], used to test it and to show examples.
    pub fn render(&self, values: &[FieldValue]) -> Vec<u8> {
        let mut out = Vec::new();
        for seg in &self.segments {
            match seg {
                Segment::Literal(l) => out.extend_from_slice(l),
                Segment::Field(i) => {
                    let f = &self.fields[*i];
                    let body = match values.get(*i) {
                        Some(FieldValue::Int(v)) => v.to_string().into_bytes(),
                        Some(FieldValue::UInt(v)) => v.to_string().into_bytes(),
                        Some(FieldValue::Str(s)) => match f.precision {
                            Some(p) if p < s.len() && f.kind == Kind::Str => s[..p].to_vec(),
                            _ => s.clone(),
                        },
                        None => Vec::new(),
                    };
                    let pad = f.width.saturating_sub(body.len());
                    if !f.left {
                        out.extend(std::iter::repeat_n(b' ', pad));
                    }
                    out.extend_from_slice(&body);
                    if f.left {
                        out.extend(std::iter::repeat_n(b' ', pad));
                    }
                }
            }
        }
        out
    }

    /// The constant text, when the line has no fields.
    pub fn constant(&self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for seg in &self.segments {
            match seg {
                Segment::Literal(l) => out.extend_from_slice(l),
                Segment::Field(_) => return None,
            }
        }
        Some(out)
    }
}

/// What role a printed line plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteKind {
    /// A column header printed in `BEGIN`.
    Header,
    /// Other constant text (a banner such as "Tracing… Hit Ctrl-C to end.").
    Literal,
    /// A line with fields.
    Data,
}

/// Where a data line's field names came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "from", rename_all = "lowercase")]
pub enum NamesFrom {
    /// The columns of the header line printed at `pos`.
    Header { pos: Pos },
    /// The argument expressions.
    Arguments,
    /// A constant line has no fields.
    None,
}

/// One line the script can print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrintSite {
    /// The probe's attach points as written, joined with `,`; `macro NAME` / `fn NAME` for
    /// output inside a definition.
    pub probe: String,
    /// Where the first call contributing to the line is.
    pub pos: Pos,
    pub kind: SiteKind,
    pub schema: LineSchema,
    pub names_from: NamesFrom,
    /// The calls that print the line, as written.
    pub calls: Vec<String>,
}

/// A probe of the script.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProbeInfo {
    pub attach_points: Vec<String>,
    pub pos: Pos,
    pub predicate: Option<String>,
}

/// A call to an output builtin (`printf`, `print`, `time`, `join`, `cat`, `system`, …).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutputCall {
    pub name: String,
    pub probe: String,
    pub pos: Pos,
}

/// Something that needs `bpftrace --unsafe`, which bt2immu never passes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnsafeUse {
    /// `system()`, `kprobe:0xffffffff81000000`, …
    pub what: String,
    pub pos: Pos,
    pub reason: String,
}

/// Something the analysis could not fully understand; never fatal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Note {
    pub pos: Pos,
    pub msg: String,
}

/// Everything bt2immu knows about a script.
#[derive(Debug, Clone)]
pub struct ScriptInfo {
    /// The script's path, or `-e program` for an inline program.
    pub origin: String,
    pub path: Option<PathBuf>,
    /// The exact bytes analysed. Run bpftrace on these bytes (not on a re-read of the file),
    /// so what was checked is what runs.
    pub source: Vec<u8>,
    pub probes: Vec<ProbeInfo>,
    pub sites: Vec<PrintSite>,
    pub output_calls: Vec<OutputCall>,
    /// `#include` targets as written.
    pub includes: Vec<String>,
    pub unsafe_uses: Vec<UnsafeUse>,
    /// Filled by [`inspect_script`] when permissions were checked.
    pub permission_problems: Vec<PermProblem>,
    pub permissions_checked: bool,
    pub notes: Vec<Note>,
}

/// Why a script is refused.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot read script {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_unsafe(origin, uses))]
    Unsafe {
        origin: String,
        uses: Vec<UnsafeUse>,
    },
    #[error("{}", render_insecure(origin, problems))]
    Insecure {
        origin: String,
        problems: Vec<PermProblem>,
    },
}

fn render_unsafe(origin: &str, uses: &[UnsafeUse]) -> String {
    let mut s =
        format!("refusing {origin}: it needs `bpftrace --unsafe`, which bt2immu never uses");
    for u in uses {
        s.push_str(&format!("\n  {origin}:{}: {} {}", u.pos, u.what, u.reason));
    }
    s
}

fn render_insecure(origin: &str, problems: &[PermProblem]) -> String {
    let mut s =
        format!("refusing {origin}: running as root, but a non-root user could change what runs");
    for p in problems {
        s.push_str(&format!("\n  {p}"));
    }
    s
}

/// Options for [`inspect_script`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Check that only root can modify the script (and local `#include`s) and the directories
    /// above. [`CheckOptions::default`] turns it on exactly when running as root (euid 0).
    pub check_permissions: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        CheckOptions {
            check_permissions: euid == 0,
        }
    }
}

/// Reads and analyses a script file, refusing it if it is unsafe (see [`ScriptInfo::ensure_safe`]).
/// Permissions are checked when running as root.
pub fn check_script(path: &Path) -> Result<ScriptInfo, ScriptError> {
    let info = inspect_script(path, CheckOptions::default())?;
    info.ensure_safe()?;
    Ok(info)
}

/// Analyses a `bpftrace -e` program, refusing unsafe builtins.
pub fn check_program(program: &str) -> Result<ScriptInfo, ScriptError> {
    let info = analyze(program.as_bytes(), "-e program");
    info.ensure_safe()?;
    Ok(info)
}

/// Reads and analyses a script file without refusing anything (for `bt2immu check`); only a
/// read error is an error.
pub fn inspect_script(path: &Path, opts: CheckOptions) -> Result<ScriptInfo, ScriptError> {
    let read_err = |source| ScriptError::Read {
        path: path.to_path_buf(),
        source,
    };
    let source = std::fs::read(path).map_err(read_err)?;
    let mut info = analyze(&source, &path.display().to_string());
    info.path = Some(path.to_path_buf());
    if opts.check_permissions {
        info.permissions_checked = true;
        info.permission_problems = perms::path_problems(path).map_err(read_err)?;
        // Local headers are compiled into the program too.
        let dir = path.parent().unwrap_or(Path::new("."));
        // Quoted includes resolve from the script's directory, and so do `<…>` ones, because
        // bt2immu passes `-I <script dir>`; absolute paths are taken as they are. A system
        // header that resolves elsewhere is checked where it is found.
        for inc in &info.includes {
            let name = inc
                .strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .or_else(|| inc.strip_prefix('<').and_then(|s| s.strip_suffix('>')));
            if let Some(name) = name {
                let p = dir.join(name); // an absolute `name` replaces `dir`
                if p.exists() {
                    info.permission_problems
                        .extend(perms::path_problems(&p).map_err(read_err)?);
                }
            }
        }
        info.permission_problems.dedup();
    }
    Ok(info)
}

impl ScriptInfo {
    /// True when nothing needs `--unsafe` and no permission problem was found.
    pub fn is_safe(&self) -> bool {
        self.unsafe_uses.is_empty() && self.permission_problems.is_empty()
    }

    /// The refusal, if any: unsafe uses first (they are about the script's content), then
    /// permission problems.
    pub fn ensure_safe(&self) -> Result<(), ScriptError> {
        if !self.unsafe_uses.is_empty() {
            return Err(ScriptError::Unsafe {
                origin: self.origin.clone(),
                uses: self.unsafe_uses.clone(),
            });
        }
        if !self.permission_problems.is_empty() {
            return Err(ScriptError::Insecure {
                origin: self.origin.clone(),
                problems: self.permission_problems.clone(),
            });
        }
        Ok(())
    }

    /// Splits one output line (without its `\n`) into fields; see [`Split`].
    pub fn split_line(&self, line: &[u8]) -> Split {
        split::split_line(&self.sites, line)
    }

    /// A human-readable summary for `bt2immu check`.
    pub fn describe(&self) -> String {
        describe_text(self)
    }

    /// The same summary as JSON.
    pub fn describe_json(&self) -> serde_json::Value {
        describe_json(self)
    }
}

/// Reading a provider and whether its function part is a bare address.
fn bare_kprobe_address(ap: &str) -> bool {
    let mut parts = ap.split(':');
    let provider = parts.next().unwrap_or("");
    if !matches!(provider, "kprobe" | "k" | "kretprobe" | "kr") {
        return false;
    }
    let Some(func) = ap.split(':').next_back() else {
        return false;
    };
    let func = func.trim();
    if let Some(hex) = func.strip_prefix("0x").or_else(|| func.strip_prefix("0X")) {
        !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit())
    } else {
        !func.is_empty() && func.chars().all(|c| c.is_ascii_digit())
    }
}

/// Scans tokens for unsafe builtins used as calls or bare names (a `#define` alias).
fn scan_unsafe(toks: &[Token], idx: &LineIndex, out: &mut Vec<UnsafeUse>) {
    for (i, t) in toks.iter().enumerate() {
        let Some(name) = t.ident() else { continue };
        let Some((_, reason)) = UNSAFE_BUILTINS.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        if i > 0 && (toks[i - 1].is_punct("->") || toks[i - 1].is_punct(".")) {
            continue; // a struct member such as `curtask->signal`
        }
        let call = toks.get(i + 1).is_some_and(|n| n.is_punct("("));
        out.push(UnsafeUse {
            what: if call {
                format!("{name}()")
            } else {
                format!("`{name}`")
            },
            pos: idx.pos(t.start),
            reason: reason.to_string(),
        });
    }
}

/// A field before names are given.
struct Draft {
    expr_toks: Vec<Token>,
    expr: String,
    conversion: String,
    kind: Kind,
    width: usize,
    left: bool,
    precision: Option<usize>,
    /// Fallback name (`join`, `time`).
    default_name: Option<&'static str>,
}

enum Piece {
    Lit(Vec<u8>),
    Field(Draft),
}

struct RawSite {
    probe: String,
    in_begin: bool,
    start: usize,
    pieces: Vec<Piece>,
    calls: Vec<(usize, String)>,
}

fn kind_for(spec: &str) -> Kind {
    match spec {
        "d" | "i" => Kind::Signed,
        "u" => Kind::Unsigned,
        "x" | "X" => Kind::Hex,
        "o" => Kind::Octal,
        "c" => Kind::Char,
        "s" | "r" => Kind::Str,
        "rh" => Kind::HexBytes,
        _ => Kind::Word, // p, rx, floats
    }
}

fn int_literal(toks: &[Token]) -> Option<i128> {
    let (neg, t) = match toks {
        [m, t] if m.is_punct("-") => (true, t),
        [t] => (false, t),
        _ => return None,
    };
    let Tok::Num(s) = &t.tok else { return None };
    let s = s.replace('_', "");
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        i128::from_str_radix(h, 16).ok()?
    } else {
        s.parse::<i128>().ok()?
    };
    Some(if neg { -v } else { v })
}

/// Collects the lines one item prints.
fn assemble(
    src: &[u8],
    idx: &LineIndex,
    probe: &str,
    in_begin: bool,
    body: &[Token],
    calls_out: &mut Vec<OutputCall>,
    notes: &mut Vec<Note>,
) -> Vec<RawSite> {
    let mut sites = Vec::new();
    let mut cur: Option<RawSite> = None;
    // The line being assembled, created on first use and told which call contributes.
    fn ensure<'c>(
        cur: &'c mut Option<RawSite>,
        probe: &str,
        in_begin: bool,
        call: (usize, &str),
    ) -> &'c mut RawSite {
        let site = cur.get_or_insert_with(|| RawSite {
            probe: probe.to_string(),
            in_begin,
            start: call.0,
            pieces: Vec::new(),
            calls: Vec::new(),
        });
        if site.calls.last().is_none_or(|c| c.0 != call.0) {
            site.calls.push((call.0, call.1.to_string()));
        }
        site
    }
    // Appends literal bytes, closing a line at every newline.
    let push_lit =
        |cur: &mut Option<RawSite>, sites: &mut Vec<RawSite>, call: (usize, &str), lit: &[u8]| {
            let mut parts = lit.split(|&b| b == b'\n').peekable();
            while let Some(part) = parts.next() {
                let newline = parts.peek().is_some();
                if part.is_empty() && !newline {
                    continue;
                }
                let site = ensure(cur, probe, in_begin, call);
                if !part.is_empty() {
                    site.pieces.push(Piece::Lit(part.to_vec()));
                }
                if newline {
                    sites.push(cur.take().expect("just ensured"));
                }
            }
        };
    for call in find_calls(body) {
        let name = call.name.as_str();
        if !matches!(
            name,
            "printf" | "time" | "join" | "print" | "cat" | "system"
        ) {
            continue;
        }
        let pos = idx.pos(call.start);
        calls_out.push(OutputCall {
            name: name.to_string(),
            probe: probe.to_string(),
            pos,
        });
        let call_text = {
            let end = call
                .args
                .last()
                .and_then(|a| a.last())
                .map_or(call.start + name.len(), |t| t.end);
            let close = src[end..]
                .iter()
                .position(|&b| b == b')')
                .map_or(end, |p| end + p + 1);
            String::from_utf8_lossy(&src[call.start..close]).into_owned()
        };
        match name {
            "printf" => {
                let Some(fmt) = call.args.first().and_then(|a| string_literal(a)) else {
                    notes.push(Note {
                        pos,
                        msg: "printf without a literal format string: its lines are not split"
                            .into(),
                    });
                    cur = None;
                    continue;
                };
                let mut ai = 1;
                for piece in parse_format(fmt) {
                    match piece {
                        FmtPiece::Lit(l) => {
                            push_lit(&mut cur, &mut sites, (call.start, &call_text), &l)
                        }
                        FmtPiece::Conv(c) => {
                            ai += usize::from(c.star_width) + usize::from(c.star_precision);
                            let arg: &[Token] = call.args.get(ai).map_or(&[], |a| a.as_slice());
                            ai += 1;
                            let rendered = if c.star_width || c.star_precision {
                                None
                            } else if let Some(s) = string_literal(arg) {
                                render_str(&c, s)
                            } else {
                                int_literal(arg).and_then(|v| render_int(&c, v))
                            };
                            if let Some(r) = rendered {
                                push_lit(&mut cur, &mut sites, (call.start, &call_text), &r);
                                continue;
                            }
                            let site = ensure(&mut cur, probe, in_begin, (call.start, &call_text));
                            site.pieces.push(Piece::Field(Draft {
                                expr_toks: arg.to_vec(),
                                expr: text_of(src, arg),
                                kind: if c.star_width {
                                    Kind::Str
                                } else {
                                    kind_for(&c.spec)
                                },
                                width: c.width.unwrap_or(0),
                                left: c.left,
                                precision: c.precision,
                                conversion: c.text,
                                default_name: None,
                            }));
                        }
                    }
                }
            }
            "time" => {
                let fmt = call
                    .args
                    .first()
                    .and_then(|a| string_literal(a))
                    .map_or_else(|| b"%H:%M:%S\n".to_vec(), <[u8]>::to_vec);
                let core_len = fmt
                    .iter()
                    .rposition(|b| !b.is_ascii_whitespace())
                    .map_or(0, |p| p + 1);
                let (core, tail) = fmt.split_at(core_len);
                let site = ensure(&mut cur, probe, in_begin, (call.start, &call_text));
                if !core.is_empty() {
                    site.pieces.push(Piece::Field(Draft {
                        expr_toks: Vec::new(),
                        expr: format!("time(\"{}\")", String::from_utf8_lossy(core).escape_debug()),
                        conversion: "time()".into(),
                        kind: if core.iter().any(u8::is_ascii_whitespace) {
                            Kind::Str
                        } else {
                            Kind::Word
                        },
                        width: 0,
                        left: false,
                        precision: None,
                        default_name: Some("time"),
                    }));
                }
                push_lit(&mut cur, &mut sites, (call.start, &call_text), tail);
            }
            "join" => {
                let arg: &[Token] = call.args.first().map_or(&[], |a| a.as_slice());
                let site = ensure(&mut cur, probe, in_begin, (call.start, &call_text));
                site.pieces.push(Piece::Field(Draft {
                    expr_toks: arg.to_vec(),
                    expr: format!("join({})", text_of(src, arg)),
                    conversion: "join()".into(),
                    kind: Kind::Str,
                    width: 0,
                    left: false,
                    precision: None,
                    default_name: Some("join"),
                }));
                push_lit(&mut cur, &mut sites, (call.start, &call_text), b"\n");
            }
            other => {
                if let Some(partial) = cur.take() {
                    if !partial.pieces.is_empty() {
                        notes.push(Note {
                            pos: idx.pos(partial.start),
                            msg: format!(
                                "a line started here is continued by {other}(): it is not split"
                            ),
                        });
                    }
                }
            }
        }
    }
    if let Some(partial) = cur {
        if !partial.pieces.is_empty() {
            notes.push(Note {
                pos: idx.pos(partial.start),
                msg: "output that does not end with a newline in its probe: not split".into(),
            });
        }
    }
    sites
}

/// Columns of a header candidate: more upper- than lower-case letters, printed in BEGIN.
fn header_columns(in_begin: bool, text: &[u8]) -> Option<Vec<String>> {
    if !in_begin {
        return None;
    }
    let upper = text.iter().filter(|b| b.is_ascii_uppercase()).count();
    let lower = text.iter().filter(|b| b.is_ascii_lowercase()).count();
    if upper == 0 || upper <= lower {
        return None;
    }
    let cols: Vec<String> = String::from_utf8_lossy(text)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (!cols.is_empty()).then_some(cols)
}

/// The pure analysis of a script's bytes. `origin` names it in messages.
pub fn analyze(source: &[u8], origin: &str) -> ScriptInfo {
    let idx = LineIndex::new(source);
    let parsed = parse::parse(source);
    let mut info = ScriptInfo {
        origin: origin.to_string(),
        path: None,
        source: source.to_vec(),
        probes: Vec::new(),
        sites: Vec::new(),
        output_calls: Vec::new(),
        includes: parsed.includes.iter().map(|(s, _)| s.clone()).collect(),
        unsafe_uses: Vec::new(),
        permission_problems: Vec::new(),
        permissions_checked: false,
        notes: parsed
            .notes
            .iter()
            .map(|(o, m)| Note {
                pos: idx.pos(*o),
                msg: m.clone(),
            })
            .collect(),
    };
    // Safety: a bare unsafe name in a `#define` counts (the macro could expand to a call);
    // members (`curtask->signal`) and C type definitions do not.
    scan_unsafe(&parsed.other_tokens, &idx, &mut info.unsafe_uses);
    let mut raw_sites = Vec::new();
    for item in &parsed.items {
        scan_unsafe(&item.predicate, &idx, &mut info.unsafe_uses);
        scan_unsafe(&item.body, &idx, &mut info.unsafe_uses);
        let probe = match &item.kind {
            ItemKind::Probe => {
                let aps: Vec<String> = item.attach_points.iter().map(|a| a.0.clone()).collect();
                for (ap, off) in &item.attach_points {
                    if bare_kprobe_address(ap) {
                        info.unsafe_uses.push(UnsafeUse {
                            what: ap.clone(),
                            pos: idx.pos(*off),
                            reason: "probes a bare kernel address".into(),
                        });
                    }
                }
                info.probes.push(ProbeInfo {
                    attach_points: aps.clone(),
                    pos: idx.pos(item.start),
                    predicate: (!item.predicate.is_empty())
                        .then(|| text_of(source, &item.predicate)),
                });
                aps.join(",")
            }
            ItemKind::Definition(name) => {
                let kw = String::from_utf8_lossy(
                    source[item.start..]
                        .split(|b| b.is_ascii_whitespace())
                        .next()
                        .unwrap_or(b""),
                )
                .into_owned();
                format!("{kw} {name}")
            }
        };
        let in_begin = item.attach_points.iter().any(|(a, _)| a == "BEGIN");
        raw_sites.extend(assemble(
            source,
            &idx,
            &probe,
            in_begin,
            &item.body,
            &mut info.output_calls,
            &mut info.notes,
        ));
    }
    info.unsafe_uses.sort_by_key(|u| u.pos);
    info.unsafe_uses.dedup();
    info.sites = name_sites(raw_sites, &idx);
    info
}

fn merge_literals(pieces: Vec<Piece>) -> (Vec<Segment>, Vec<Draft>) {
    let mut segs: Vec<Segment> = Vec::new();
    let mut drafts = Vec::new();
    for p in pieces {
        match p {
            Piece::Lit(l) => {
                if let Some(Segment::Literal(prev)) = segs.last_mut() {
                    prev.extend_from_slice(&l);
                } else {
                    segs.push(Segment::Literal(l));
                }
            }
            Piece::Field(d) => {
                segs.push(Segment::Field(drafts.len()));
                drafts.push(d);
            }
        }
    }
    (segs, drafts)
}

fn name_sites(raw: Vec<RawSite>, idx: &LineIndex) -> Vec<PrintSite> {
    struct Built {
        raw_probe: String,
        start: usize,
        calls: Vec<String>,
        segs: Vec<Segment>,
        drafts: Vec<Draft>,
        header: Option<Vec<String>>,
    }
    let mut built: Vec<Built> = raw
        .into_iter()
        .map(|r| {
            let in_begin = r.in_begin;
            let probe = r.probe;
            let start = r.start;
            let calls = r.calls.into_iter().map(|c| c.1).collect();
            let (segs, drafts) = merge_literals(r.pieces);
            let mut b = Built {
                raw_probe: probe,
                start,
                calls,
                segs,
                drafts,
                header: None,
            };
            if b.drafts.is_empty() {
                let text: Vec<u8> = b
                    .segs
                    .iter()
                    .flat_map(|s| match s {
                        Segment::Literal(l) => l.clone(),
                        Segment::Field(_) => Vec::new(),
                    })
                    .collect();
                b.header = header_columns(in_begin, &text);
            }
            b
        })
        .collect();
    built.sort_by_key(|b| b.start);
    let headers: Vec<(usize, Vec<String>)> = built
        .iter()
        .filter_map(|b| b.header.clone().map(|h| (b.start, h)))
        .collect();
    built
        .into_iter()
        .map(|b| {
            let pos = idx.pos(b.start);
            if b.drafts.is_empty() {
                return PrintSite {
                    probe: b.raw_probe,
                    pos,
                    kind: if b.header.is_some() {
                        SiteKind::Header
                    } else {
                        SiteKind::Literal
                    },
                    schema: LineSchema {
                        segments: b.segs,
                        fields: Vec::new(),
                    },
                    names_from: NamesFrom::None,
                    calls: b.calls,
                };
            }
            let n = b.drafts.len();
            // The last matching header printed before this line in the source, else any.
            let header = headers
                .iter()
                .rev()
                .find(|(s, h)| h.len() == n && *s < b.start)
                .or_else(|| headers.iter().rev().find(|(_, h)| h.len() == n));
            let (names, names_from) = match header {
                Some((hstart, cols)) => (
                    cols.iter()
                        .enumerate()
                        .map(|(i, c)| names::sanitize(c).unwrap_or(format!("field_{}", i + 1)))
                        .collect(),
                    NamesFrom::Header {
                        pos: idx.pos(*hstart),
                    },
                ),
                None => (
                    b.drafts
                        .iter()
                        .enumerate()
                        .map(|(i, d)| {
                            names::name_for_expr(&d.expr_toks)
                                .or(d.default_name.map(str::to_string))
                                .unwrap_or(format!("field_{}", i + 1))
                        })
                        .collect(),
                    NamesFrom::Arguments,
                ),
            };
            let names = names::uniquify(names);
            let fields = b
                .drafts
                .into_iter()
                .zip(names)
                .map(|(d, name)| FieldSpec {
                    name,
                    ty: match d.kind {
                        Kind::Signed => FieldType::Int,
                        Kind::Unsigned => FieldType::UInt,
                        _ => FieldType::Str,
                    },
                    max_len: (d.expr.trim() == "comm").then_some(15),
                    expr: d.expr,
                    conversion: d.conversion,
                    kind: d.kind,
                    width: d.width,
                    left: d.left,
                    precision: d.precision,
                })
                .collect();
            PrintSite {
                probe: b.raw_probe,
                pos,
                kind: SiteKind::Data,
                schema: LineSchema {
                    segments: b.segs,
                    fields,
                },
                names_from,
                calls: b.calls,
            }
        })
        .collect()
}

fn describe_text(info: &ScriptInfo) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "script: {}", info.origin);
    if info.unsafe_uses.is_empty() {
        let _ = writeln!(s, "unsafe builtins: none");
    } else {
        let _ = writeln!(s, "unsafe builtins: REFUSED (needs --unsafe)");
        for u in &info.unsafe_uses {
            let _ = writeln!(s, "  {}:{}: {} {}", info.origin, u.pos, u.what, u.reason);
        }
    }
    if !info.permissions_checked {
        let _ = writeln!(
            s,
            "permissions: not checked (only checked when running as root)"
        );
    } else if info.permission_problems.is_empty() {
        let _ = writeln!(
            s,
            "permissions: only root can modify the script and its directories"
        );
    } else {
        let _ = writeln!(s, "permissions: REFUSED (a non-root user could change it)");
        for p in &info.permission_problems {
            let _ = writeln!(s, "  {p}");
        }
    }
    let _ = writeln!(
        s,
        "verdict: {}",
        if info.is_safe() {
            "safe to run"
        } else {
            "refused"
        }
    );
    let _ = writeln!(s, "probes:");
    for p in &info.probes {
        let _ = write!(s, "  {}: {}", p.pos, p.attach_points.join(", "));
        if let Some(pred) = &p.predicate {
            let _ = write!(s, " /{pred}/");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "lines:");
    for site in &info.sites {
        let kind = match site.kind {
            SiteKind::Header => "header",
            SiteKind::Literal => "literal",
            SiteKind::Data => "data",
        };
        let _ = writeln!(
            s,
            "  {}: {kind} from {}: \"{}\"",
            site.pos,
            site.probe,
            site.schema.pattern()
        );
        if site.kind == SiteKind::Data {
            let from = match &site.names_from {
                NamesFrom::Header { pos } => format!("header at {pos}"),
                _ => "argument expressions".to_string(),
            };
            let _ = writeln!(s, "    names from {from}");
            for f in &site.schema.fields {
                let ty = match f.ty {
                    FieldType::Int => "int",
                    FieldType::UInt => "uint",
                    FieldType::Str => "string",
                };
                let _ = writeln!(
                    s,
                    "    {:<16} {:<6} {} ({})",
                    f.name, ty, f.expr, f.conversion
                );
            }
        }
    }
    for c in info
        .output_calls
        .iter()
        .filter(|c| !matches!(c.name.as_str(), "printf" | "time" | "join"))
    {
        let _ = writeln!(
            s,
            "  {}: {}() in {}: its output is kept raw",
            c.pos, c.name, c.probe
        );
    }
    if !info.notes.is_empty() {
        let _ = writeln!(s, "notes:");
        for n in &info.notes {
            let _ = writeln!(s, "  {}:{}: {}", info.origin, n.pos, n.msg);
        }
    }
    s
}

fn describe_json(info: &ScriptInfo) -> serde_json::Value {
    use serde_json::json;
    let sites: Vec<_> = info
        .sites
        .iter()
        .map(|site| {
            json!({
                "probe": site.probe,
                "pos": site.pos,
                "kind": site.kind,
                "pattern": site.schema.pattern(),
                "names_from": site.names_from,
                "fields": site.schema.fields,
                "calls": site.calls,
            })
        })
        .collect();
    json!({
        "script": info.origin,
        "safe": info.is_safe(),
        "unsafe_uses": info.unsafe_uses,
        "permissions_checked": info.permissions_checked,
        "permission_problems": info.permission_problems.iter().map(|p| json!({
            "path": p.path, "issue": p.issue, "fix": p.fix(), "message": p.to_string(),
        })).collect::<Vec<_>>(),
        "probes": info.probes,
        "lines": sites,
        "output_calls": info.output_calls,
        "notes": info.notes,
    })
}
