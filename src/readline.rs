//! The bashreadline job: which binaries to probe, how `scripts/bashreadline.bt` is
//! instantiated for them, and how its chunk protocol (`BT2I1 …` records) is put back
//! together into whole typed lines.
//!
//! Why chunks: bpftrace 0.17 reads at most 199 bytes per `str()`, and the BPF stack holds only
//! three such strings next to a printf record, so the script reads a line in
//! [`STRIDE`]-byte pieces and prints each one as its own record (the protocol is described in
//! the script's header). Three BPF programs run on each return of the probed function — head
//! (C…E), scan (T…F, only for lines longer than the head) and provenance (P) — in no
//! guaranteed order, so [`Assembler`] matches them by task, line pointer and time, checks that
//! every chunk is there, and turns anything inconsistent into [`AssembledEvent::Malformed`]
//! with all of its raw records: nothing is dropped and nothing is glued over a gap.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use object::read::elf::{Dyn, ElfFile, FileHeader};
use object::{Object, ObjectSymbol, SymbolKind};
use thiserror::Error;

/// The comment line that marks a script as speaking this protocol.
pub const PROTOCOL_MARKER: &str = "// bt2immu:protocol bashreadline BT2I1";
/// Every record of the protocol starts with this.
pub const RECORD_PREFIX: &[u8] = b"BT2I1 ";
/// The marker comment before each attach point line that [`render_script`] rewrites.
pub const TARGETS_MARKER: &str = "// bt2immu:targets";
/// bpftrace's string size for the script (`BPFTRACE_STRLEN`): the largest that keeps the scan
/// program's three strings and its printf record within the 512-byte BPF stack (measured on
/// 0.17; 138 and above fail to load).
pub const STRLEN: usize = 136;
/// Bytes per chunk: `str(p, STRIDE + 1)` must still fit in a STRLEN buffer with its NUL.
pub const STRIDE: usize = STRLEN - 2;
/// The most head chunks measured to load: 123 chunks (16,482 bytes) was verified with
/// 393,028–734,399 instructions processed (the count varies with the verifier's pruning), so
/// the 1M limit leaves no room to double it safely.
pub const MAX_HEAD_CHUNKS: usize = 123;
/// How many chunks from the start the scan program looks for the end of a cut line:
/// 240 chunks = 32,160 bytes; 361,305 verifier instructions.
pub const SCAN_CHUNKS: usize = 240;
/// The probed functions, best first: `readline_internal_teardown` also sees the line that was
/// being typed when the probe was attached; `readline` is the portable fallback.
pub const SYMBOLS: [&str; 2] = ["readline_internal_teardown", "readline"];

/// The records of one line's three programs are at most this far apart (they run back to back
/// on the same return, within microseconds).
const MATCH_WINDOW_NS: u64 = 100_000_000;

#[derive(Debug, Error)]
pub enum ReadlineError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file bt2immu can read: {source}")]
    Elf {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
    #[error("{0} is an object file but not ELF")]
    NotElf(PathBuf),
    #[error("nothing to probe: {0}")]
    NoTargets(String),
    #[error("the script is not the bashreadline protocol (no `{PROTOCOL_MARKER}` line)")]
    NotReadlineScript,
    #[error("the script has no `{TARGETS_MARKER}` line followed by an attach point")]
    NoTargetMarker,
    #[error("the script has no `#define {0} …` line to set")]
    NoParam(&'static str),
    #[error("cannot put {0:?} into an attach point (only letters, digits and . _ + - / are safe)")]
    UnsafeTarget(String),
    #[error(
        "max line bytes {0} is out of range: 1 ..= {max} (the BPF verifier's instruction limit)",
        max = MAX_HEAD_CHUNKS * STRIDE
    )]
    LimitOutOfRange(usize),
}

/// A function to put a uretprobe on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbeTarget {
    /// Canonical path of the ELF file that defines the function (bash, or libreadline.so).
    pub binary: PathBuf,
    pub symbol: String,
}

impl fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uretprobe:{}:{}", self.binary.display(), self.symbol)
    }
}

#[derive(Debug, Clone)]
pub struct ReadlineOptions {
    /// Lines up to this many bytes are captured whole (rounded up to whole chunks of
    /// [`STRIDE`] bytes); longer ones are cut, flagged, with their length and their tail.
    pub max_line_bytes: usize,
    /// Records of a line still incomplete after this long are given up as malformed.
    pub stale_after: Duration,
}

impl Default for ReadlineOptions {
    fn default() -> Self {
        ReadlineOptions {
            max_line_bytes: 16384,
            stale_after: Duration::from_secs(5),
        }
    }
}

impl ReadlineOptions {
    /// Head chunks the script must read for `max_line_bytes`.
    pub fn head_chunks(&self) -> Result<usize, ReadlineError> {
        let n = self.max_line_bytes.div_ceil(STRIDE);
        if n == 0 || n > MAX_HEAD_CHUNKS {
            return Err(ReadlineError::LimitOutOfRange(self.max_line_bytes));
        }
        Ok(n)
    }
}

/// Does this script speak the bashreadline chunk protocol?
pub fn is_readline_script(text: &str) -> bool {
    text.lines().any(|l| l.trim_end() == PROTOCOL_MARKER)
}

/// Environment for the bpftrace child. `BPFTRACE_STR_TRUNC_TRAILER` is empty so that 0.18+
/// does not append `..` to every full chunk.
pub fn bpftrace_env(_opts: &ReadlineOptions) -> Vec<(String, String)> {
    vec![
        ("BPFTRACE_STRLEN".into(), STRLEN.to_string()),
        ("BPFTRACE_STR_TRUNC_TRAILER".into(), String::new()),
    ]
}

/// Arguments for the bpftrace child, before the script path: JSON mode keeps newlines that
/// were typed into a line inside one record.
pub fn bpftrace_args() -> Vec<String> {
    vec!["-f".into(), "json".into()]
}

/// The shells probed by default: `/bin/bash` and every bash listed in `/etc/shells`, one per
/// canonical path (uprobes attach to the file, so `/bin/bash` and `/usr/bin/bash` are one).
pub fn default_shells() -> Vec<PathBuf> {
    let listed = std::fs::read_to_string("/etc/shells").unwrap_or_default();
    let mut candidates = vec![PathBuf::from("/bin/bash")];
    for line in listed.lines() {
        let line = line.trim();
        if line.starts_with('/') {
            candidates.push(PathBuf::from(line));
        }
    }
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for c in candidates {
        let Ok(real) = std::fs::canonicalize(&c) else {
            continue;
        };
        let is_bash = real
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with("bash"));
        if is_bash && !seen.contains(&real) {
            seen.push(real);
            out.push(c);
        }
    }
    out
}

/// Finds, for each shell, the binary that defines the readline functions: the shell itself
/// (Debian, Ubuntu, Fedora build readline in) or the libreadline it loads (Arch, Alpine,
/// openSUSE). Per binary the best symbol of [`SYMBOLS`] is chosen. Shells that do not exist
/// are skipped; when nothing at all can be probed, the error says what was found where.
pub fn locate_targets(shells: &[PathBuf]) -> Result<Vec<ProbeTarget>, ReadlineError> {
    let mut out: Vec<ProbeTarget> = Vec::new();
    let mut notes = Vec::new();
    for shell in shells {
        let Ok(real) = std::fs::canonicalize(shell) else {
            notes.push(format!("{}: does not exist", shell.display()));
            continue;
        };
        let info = elf_info(&real)?;
        let target = match best_symbol(&info.functions) {
            Some(sym) => Some(ProbeTarget {
                binary: real.clone(),
                symbol: sym.into(),
            }),
            None => {
                let mut found = None;
                for lib in info.needed.iter().filter(|n| n.contains("readline")) {
                    let Some(path) = find_library(lib) else {
                        notes.push(format!("{}: needs {lib}, not found", real.display()));
                        continue;
                    };
                    let lib_info = elf_info(&path)?;
                    if let Some(sym) = best_symbol(&lib_info.functions) {
                        found = Some(ProbeTarget {
                            binary: path,
                            symbol: sym.into(),
                        });
                        break;
                    }
                    notes.push(format!("{}: defines no readline function", path.display()));
                }
                if found.is_none() {
                    notes.push(format!(
                        "{}: defines no readline function and loads no libreadline that does",
                        real.display()
                    ));
                }
                found
            }
        };
        if let Some(t) = target {
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    if out.is_empty() {
        if shells.is_empty() {
            notes.push("no shells given".into());
        }
        return Err(ReadlineError::NoTargets(notes.join("; ")));
    }
    Ok(out)
}

fn best_symbol(functions: &[String]) -> Option<&'static str> {
    SYMBOLS
        .into_iter()
        .find(|s| functions.iter().any(|f| f == s))
}

/// What an ELF file offers to a uprobe: its defined dynamic functions, and the libraries it
/// loads (`DT_NEEDED`).
#[derive(Debug, Clone, Default)]
pub struct ElfInfo {
    pub functions: Vec<String>,
    pub needed: Vec<String>,
}

/// Reads the defined FUNC dynamic symbols and `DT_NEEDED` entries of an ELF file.
pub fn elf_info(path: &Path) -> Result<ElfInfo, ReadlineError> {
    let data = std::fs::read(path).map_err(|source| ReadlineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let elf_err = |source| ReadlineError::Elf {
        path: path.to_path_buf(),
        source,
    };
    let file = object::File::parse(&*data).map_err(elf_err)?;
    let functions = file
        .dynamic_symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.address() != 0)
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .collect();
    let needed = match &file {
        object::File::Elf64(f) => needed_libs(f),
        object::File::Elf32(f) => needed_libs(f),
        _ => return Err(ReadlineError::NotElf(path.to_path_buf())),
    }
    .map_err(elf_err)?;
    Ok(ElfInfo { functions, needed })
}

fn needed_libs<Elf: FileHeader>(f: &ElfFile<'_, Elf>) -> object::Result<Vec<String>> {
    let endian = f.endian();
    let sections = f.elf_section_table();
    let Some((dyns, link)) = sections.dynamic(endian, f.data())? else {
        return Ok(Vec::new());
    };
    let strings = sections.strings(endian, f.data(), link)?;
    let mut out = Vec::new();
    for d in dyns {
        if d.tag32(endian) == Some(object::elf::DT_NEEDED) {
            out.push(String::from_utf8_lossy(d.string(endian, strings)?).into_owned());
        }
    }
    Ok(out)
}

/// Where the dynamic loader would find a library by soname: the directories of
/// `/etc/ld.so.conf` (and its includes), then the usual system directories.
pub fn find_library(soname: &str) -> Option<PathBuf> {
    let mut dirs = ld_so_conf_dirs(Path::new("/etc/ld.so.conf"), 0);
    for d in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .map(|d| d.join(soname))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

fn ld_so_conf_dirs(conf: &Path, depth: u32) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(conf) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include ") {
            if depth > 4 {
                continue;
            }
            // Only the `dir/*.conf` form is used in practice.
            let pattern = Path::new(pattern.trim());
            let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
                continue;
            };
            let suffix = name.to_string_lossy().trim_start_matches('*').to_string();
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(&suffix))
                .collect();
            files.sort();
            for f in files {
                dirs.extend(ld_so_conf_dirs(&f, depth + 1));
            }
        } else if line.starts_with('/') {
            dirs.push(PathBuf::from(line));
        }
    }
    dirs
}

/// Instantiates the bashreadline script for `targets` and `opts`: the attach point line after
/// each `// bt2immu:targets` marker becomes one attach point per target, and
/// `#define HEAD_CHUNKS` is set from `opts.max_line_bytes`. The template itself is a working
/// script for `/bin/bash`, so it can also be run by hand.
pub fn render_script(
    template: &str,
    targets: &[ProbeTarget],
    opts: &ReadlineOptions,
) -> Result<String, ReadlineError> {
    if !is_readline_script(template) {
        return Err(ReadlineError::NotReadlineScript);
    }
    if targets.is_empty() {
        return Err(ReadlineError::NoTargets("no targets given".into()));
    }
    let head_chunks = opts.head_chunks()?;
    let mut points = Vec::new();
    for t in targets {
        let path = t.binary.to_string_lossy().into_owned();
        let path_ok = path.starts_with('/')
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-/".contains(&b));
        if !path_ok {
            return Err(ReadlineError::UnsafeTarget(path));
        }
        if t.symbol.is_empty()
            || !t
                .symbol
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(ReadlineError::UnsafeTarget(t.symbol.clone()));
        }
        points.push(format!("uretprobe:{path}:{}", t.symbol));
    }
    let attach = points.join(",\n");

    let mut out = String::with_capacity(template.len() + 256);
    let mut markers = 0;
    let mut replace_next = false;
    let mut defines = 0;
    for line in template.lines() {
        if replace_next && !line.trim().is_empty() {
            out.push_str(&attach);
            out.push('\n');
            replace_next = false;
            continue;
        }
        if line.trim_end() == TARGETS_MARKER {
            markers += 1;
            replace_next = true;
        } else if line.starts_with("#define HEAD_CHUNKS ") {
            defines += 1;
            out.push_str(&format!("#define HEAD_CHUNKS {head_chunks}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if markers == 0 || replace_next {
        return Err(ReadlineError::NoTargetMarker);
    }
    if defines != 1 {
        return Err(ReadlineError::NoParam("HEAD_CHUNKS"));
    }
    Ok(out)
}

/// One line typed into a shell, put back together from the protocol's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadlineLine {
    pub pid: u64,
    pub tid: u64,
    pub ppid: u64,
    pub uid: u32,
    pub gid: u32,
    /// 4294967295 (-1) when the task has no login uid.
    pub loginuid: u32,
    pub sessionid: u32,
    /// Terminal name (`pts0`); empty when there is none.
    pub tty: Vec<u8>,
    /// Task name, at most 15 bytes, may contain spaces or any other byte.
    pub comm: Vec<u8>,
    /// cgroup v2 id.
    pub cgroup: u64,
    /// Monotonic nanoseconds (CLOCK_MONOTONIC) when the line was read.
    pub nsecs: u64,
    /// The attach point that fired, e.g. `uretprobe:/usr/bin/bash:readline_internal_teardown`.
    pub probe: String,
    /// The line's bytes; when `truncated`, its head only.
    pub line: Vec<u8>,
    /// The real length of the line in bytes (a lower bound when `len_is_lower_bound`).
    pub len: u64,
    pub len_is_lower_bound: bool,
    pub truncated: bool,
    /// For a cut line: its last bytes (from `tail_offset`), so padding in front of a command
    /// cannot push the command out of the record.
    pub tail: Option<Vec<u8>>,
    pub tail_offset: Option<u64>,
    /// The shell read end-of-file (Ctrl-D on an empty line); `line` is empty.
    pub eof: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssembledEvent {
    Line(ReadlineLine),
    /// Records that do not make a whole, consistent line: all of them, newline-separated.
    Malformed {
        raw: Vec<u8>,
        reason: String,
    },
}

/// The parameters the script announced in its `B` record once attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    pub stride: u64,
    pub head_chunks: u64,
    pub scan_chunks: u64,
}

#[derive(Debug, Clone)]
struct Chunk {
    off: u64,
    data: Vec<u8>,
}

/// C records since the last E, or T records since the last F, of one task.
#[derive(Debug, Default)]
struct Open {
    chunks: Vec<Chunk>,
    raws: Vec<Vec<u8>>,
    at: Option<Instant>,
}

#[derive(Debug)]
struct Head {
    ptr: u64,
    nsecs: u64,
    nchunks: u64,
    cut: bool,
    chunks: Vec<Chunk>,
    raws: Vec<Vec<u8>>,
    at: Instant,
}

#[derive(Debug)]
struct Tail {
    ptr: u64,
    nsecs: u64,
    nscanned: u64,
    found: bool,
    chunks: Vec<Chunk>,
    raws: Vec<Vec<u8>>,
    at: Instant,
}

#[derive(Debug)]
struct Prov {
    ptr: u64,
    nsecs: u64,
    ppid: u64,
    uid: u32,
    gid: u32,
    loginuid: u32,
    sessionid: u32,
    cgroup: u64,
    probe: String,
    tty: Vec<u8>,
    comm: Vec<u8>,
    raw: Vec<u8>,
    at: Instant,
}

#[derive(Debug, Default)]
struct Task {
    open_head: Open,
    open_tail: Open,
    heads: VecDeque<Head>,
    tails: VecDeque<Tail>,
    provs: VecDeque<Prov>,
}

impl Task {
    fn is_empty(&self) -> bool {
        self.open_head.raws.is_empty()
            && self.open_tail.raws.is_empty()
            && self.heads.is_empty()
            && self.tails.is_empty()
            && self.provs.is_empty()
    }
}

/// Reassembles the protocol's records (one decoded output line at a time) into
/// [`ReadlineLine`]s, per task, whatever order the three programs' records arrive in.
#[derive(Debug)]
pub struct Assembler {
    opts: ReadlineOptions,
    tasks: BTreeMap<(u64, u64), Task>,
    announced: Option<Announced>,
}

impl Assembler {
    pub fn new(opts: ReadlineOptions) -> Self {
        Assembler {
            opts,
            tasks: BTreeMap::new(),
            announced: None,
        }
    }

    pub fn options(&self) -> &ReadlineOptions {
        &self.opts
    }

    /// What the script announced when it was attached (`None` before its `B` record).
    pub fn announced(&self) -> Option<Announced> {
        self.announced
    }

    /// Takes one output line (the record without its final newline).
    pub fn push(&mut self, line: &[u8]) -> Vec<AssembledEvent> {
        self.push_at(line, Instant::now())
    }

    /// [`push`](Self::push) with an explicit arrival time (for [`flush_stale`](Self::flush_stale)).
    pub fn push_at(&mut self, line: &[u8], now: Instant) -> Vec<AssembledEvent> {
        let mut out = Vec::new();
        let rec = match parse_record(line) {
            Ok(r) => r,
            Err(reason) => {
                out.push(malformed(vec![line.to_vec()], reason));
                return out;
            }
        };
        let raw = line.to_vec();
        match rec {
            Record::Begin(a) => self.announced = Some(a),
            Record::Chunk {
                pid,
                tid,
                off,
                data,
                tail,
            } => {
                let task = self.tasks.entry((pid, tid)).or_default();
                let open = if tail {
                    &mut task.open_tail
                } else {
                    &mut task.open_head
                };
                open.chunks.push(Chunk { off, data });
                open.raws.push(raw);
                open.at = Some(now);
            }
            Record::End {
                pid,
                tid,
                ptr,
                nsecs,
                nchunks,
                cut,
            } => {
                let task = self.tasks.entry((pid, tid)).or_default();
                let open = std::mem::take(&mut task.open_head);
                let mut raws = open.raws;
                raws.push(raw);
                task.heads.push_back(Head {
                    ptr,
                    nsecs,
                    nchunks,
                    cut,
                    chunks: open.chunks,
                    raws,
                    at: now,
                });
            }
            Record::TailEnd {
                pid,
                tid,
                ptr,
                nsecs,
                nscanned,
                found,
            } => {
                let task = self.tasks.entry((pid, tid)).or_default();
                let open = std::mem::take(&mut task.open_tail);
                let mut raws = open.raws;
                raws.push(raw);
                task.tails.push_back(Tail {
                    ptr,
                    nsecs,
                    nscanned,
                    found,
                    chunks: open.chunks,
                    raws,
                    at: now,
                });
            }
            Record::Prov(mut p, pid, tid) => {
                p.raw = raw;
                p.at = now;
                self.tasks
                    .entry((pid, tid))
                    .or_default()
                    .provs
                    .push_back(*p);
            }
        }
        self.complete_all(&mut out);
        out
    }

    /// Gives up on records that have waited longer than `stale_after` for the rest of their
    /// line: they come out as [`AssembledEvent::Malformed`], flagged, with all their bytes.
    pub fn flush_stale(&mut self, now: Instant) -> Vec<AssembledEvent> {
        let stale_after = self.opts.stale_after;
        let is_stale = |at: Instant| now.saturating_duration_since(at) >= stale_after;
        self.flush(is_stale)
    }

    /// End of stream: everything still pending comes out, flagged.
    pub fn finish(&mut self) -> Vec<AssembledEvent> {
        self.flush(|_| true)
    }

    fn flush(&mut self, stale: impl Fn(Instant) -> bool) -> Vec<AssembledEvent> {
        let mut out = Vec::new();
        for ((pid, tid), task) in self.tasks.iter_mut() {
            loop {
                complete_task(*pid, *tid, task, &mut out);
                let Some(h) = task.heads.front() else { break };
                if !stale(h.at) {
                    break;
                }
                let h = task.heads.pop_front().expect("front exists");
                let why = if h.cut {
                    "line's provenance (P) or tail (F) records never arrived"
                } else {
                    "line's provenance (P) record never arrived"
                };
                out.push(malformed(h.raws, format!("pid {pid} tid {tid}: {why}")));
            }
            // Without a head, provenance and tails can never complete.
            while task.provs.front().is_some_and(|p| stale(p.at)) {
                let p = task.provs.pop_front().expect("front exists");
                out.push(malformed(
                    vec![p.raw],
                    format!("pid {pid} tid {tid}: provenance without the line's head records"),
                ));
            }
            while task.tails.front().is_some_and(|t| stale(t.at)) {
                let t = task.tails.pop_front().expect("front exists");
                out.push(malformed(
                    t.raws,
                    format!("pid {pid} tid {tid}: tail without the line's head records"),
                ));
            }
            for (open, what) in [(&mut task.open_head, "head"), (&mut task.open_tail, "tail")] {
                if open.at.is_some_and(&stale) {
                    let o = std::mem::take(open);
                    out.push(malformed(
                        o.raws,
                        format!("pid {pid} tid {tid}: {what} chunks without their end record"),
                    ));
                }
            }
        }
        self.tasks.retain(|_, t| !t.is_empty());
        out
    }

    fn complete_all(&mut self, out: &mut Vec<AssembledEvent>) {
        for ((pid, tid), task) in self.tasks.iter_mut() {
            complete_task(*pid, *tid, task, out);
        }
        self.tasks.retain(|_, t| !t.is_empty());
    }
}

/// Emits every line of `task` whose head, provenance and (if cut) tail are all there, oldest
/// first; records older than the line being completed that match no head are orphans.
fn complete_task(pid: u64, tid: u64, task: &mut Task, out: &mut Vec<AssembledEvent>) {
    while let Some(head) = task.heads.front() {
        let near =
            |ptr: u64, nsecs: u64| ptr == head.ptr && nsecs.abs_diff(head.nsecs) <= MATCH_WINDOW_NS;
        // Each program's records of a task come in order, so a record of a *later* line
        // from the same program means this line's record of that program was lost.
        let later = |nsecs: u64| nsecs > head.nsecs.saturating_add(MATCH_WINDOW_NS);
        let pi = task.provs.iter().position(|p| near(p.ptr, p.nsecs));
        let ti = if head.cut {
            task.tails.iter().position(|t| near(t.ptr, t.nsecs))
        } else {
            None
        };
        let prov_lost = pi.is_none() && task.provs.iter().any(|p| later(p.nsecs));
        let tail_lost = head.cut && ti.is_none() && task.tails.iter().any(|t| later(t.nsecs));
        if prov_lost || tail_lost {
            let head = task.heads.pop_front().expect("front exists");
            let what = if prov_lost {
                "provenance (P)"
            } else {
                "tail (F)"
            };
            out.push(malformed(
                head.raws,
                format!("pid {pid} tid {tid}: line's {what} record never arrived"),
            ));
            continue;
        }
        let Some(pi) = pi else { break };
        if head.cut && ti.is_none() {
            break;
        }
        let head = task.heads.pop_front().expect("front exists");
        // Provenance and tails before the matched ones belong to lines whose heads were lost.
        for p in task.provs.drain(..pi) {
            out.push(malformed(
                vec![p.raw],
                format!("pid {pid} tid {tid}: provenance without the line's head records"),
            ));
        }
        let prov = task.provs.pop_front().expect("matched provenance");
        let tail = match ti {
            Some(i) => {
                for t in task.tails.drain(..i) {
                    out.push(malformed(
                        t.raws,
                        format!("pid {pid} tid {tid}: tail without the line's head records"),
                    ));
                }
                task.tails.pop_front()
            }
            None => None,
        };
        out.push(assemble(pid, tid, head, prov, tail));
    }
}

fn assemble(pid: u64, tid: u64, head: Head, prov: Prov, tail: Option<Tail>) -> AssembledEvent {
    let mut raws = head.raws.clone();
    raws.push(prov.raw.clone());
    if let Some(t) = &tail {
        raws.extend(t.raws.iter().cloned());
    }
    let bad = |reason: String| malformed(raws.clone(), format!("pid {pid} tid {tid}: {reason}"));

    if head.ptr == 0 {
        if head.nchunks != 0 || !head.chunks.is_empty() {
            return bad("EOF record with chunks".into());
        }
    } else if head.nchunks as usize != head.chunks.len() {
        return bad(format!(
            "head announced {} chunks, {} arrived",
            head.nchunks,
            head.chunks.len()
        ));
    }
    let line = match join_chunks(&head.chunks, !head.cut) {
        Ok(l) => l,
        Err(e) => return bad(format!("head: {e}")),
    };
    let mut ev = ReadlineLine {
        pid,
        tid,
        ppid: prov.ppid,
        uid: prov.uid,
        gid: prov.gid,
        loginuid: prov.loginuid,
        sessionid: prov.sessionid,
        tty: prov.tty,
        comm: prov.comm,
        cgroup: prov.cgroup,
        nsecs: prov.nsecs,
        probe: prov.probe,
        len: line.len() as u64,
        line,
        len_is_lower_bound: false,
        truncated: head.cut,
        tail: None,
        tail_offset: None,
        eof: head.ptr == 0,
    };
    if let Some(t) = tail {
        let Some(first) = t.chunks.first() else {
            return bad("tail end record without tail chunks".into());
        };
        let tail_off = first.off;
        let bytes = match join_chunks_from(&t.chunks, tail_off, t.found) {
            Ok(b) => b,
            Err(e) => return bad(format!("tail: {e}")),
        };
        let stride = t.chunks[0].data.len() as u64;
        if t.found {
            ev.len = tail_off + bytes.len() as u64;
        } else {
            ev.len = t.nscanned * stride + 1;
            ev.len_is_lower_bound = true;
        }
        if ev.len < ev.line.len() as u64 {
            return bad("tail ends before the head".into());
        }
        ev.tail = Some(bytes);
        ev.tail_offset = Some(tail_off);
    }
    AssembledEvent::Line(ev)
}

/// Joins chunks that must start at 0 and follow each other without a gap.
fn join_chunks(chunks: &[Chunk], last_may_be_short: bool) -> Result<Vec<u8>, String> {
    join_chunks_from(chunks, 0, last_may_be_short)
}

/// Every chunk must start where the previous one ended, and every chunk but the last must be
/// as long as the first (a full stride); a missing chunk shows up as a jump in the offsets.
fn join_chunks_from(
    chunks: &[Chunk],
    start: u64,
    last_may_be_short: bool,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut next = start;
    let full = chunks.first().map_or(0, |c| c.data.len());
    for (i, c) in chunks.iter().enumerate() {
        if c.off != next {
            return Err(format!(
                "chunk at offset {} where {} was expected",
                c.off, next
            ));
        }
        let is_last = i + 1 == chunks.len();
        if c.data.len() != full && !(is_last && last_may_be_short && c.data.len() < full) {
            return Err(format!(
                "chunk at offset {} has {} bytes, not {full}",
                c.off,
                c.data.len()
            ));
        }
        out.extend_from_slice(&c.data);
        next += c.data.len() as u64;
    }
    Ok(out)
}

fn malformed(raws: Vec<Vec<u8>>, reason: impl Into<String>) -> AssembledEvent {
    AssembledEvent::Malformed {
        raw: raws.join(&b'\n'),
        reason: reason.into(),
    }
}

enum Record {
    Begin(Announced),
    Chunk {
        pid: u64,
        tid: u64,
        off: u64,
        data: Vec<u8>,
        tail: bool,
    },
    End {
        pid: u64,
        tid: u64,
        ptr: u64,
        nsecs: u64,
        nchunks: u64,
        cut: bool,
    },
    TailEnd {
        pid: u64,
        tid: u64,
        ptr: u64,
        nsecs: u64,
        nscanned: u64,
        found: bool,
    },
    Prov(Box<Prov>, u64, u64),
}

/// Splits a record into exactly `n` fields on single spaces; the last field is the rest.
fn fields(body: &[u8], n: usize) -> Result<Vec<&[u8]>, String> {
    let f: Vec<&[u8]> = body.splitn(n, |&b| b == b' ').collect();
    if f.len() != n {
        return Err(format!("expected {n} fields, found {}", f.len()));
    }
    Ok(f)
}

fn num<T: std::str::FromStr>(f: &[u8], what: &str) -> Result<T, String> {
    std::str::from_utf8(f)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad {what}: {:?}", String::from_utf8_lossy(f)))
}

fn hex(f: &[u8], what: &str) -> Result<u64, String> {
    std::str::from_utf8(f)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| format!("bad {what}: {:?}", String::from_utf8_lossy(f)))
}

fn flag(f: &[u8], what: &str) -> Result<bool, String> {
    match f {
        b"0" => Ok(false),
        b"1" => Ok(true),
        _ => Err(format!("bad {what}: {:?}", String::from_utf8_lossy(f))),
    }
}

fn parse_record(line: &[u8]) -> Result<Record, String> {
    let body = line
        .strip_prefix(RECORD_PREFIX)
        .ok_or("not a BT2I1 record")?;
    let (kind, rest) = match body {
        [k, b' ', rest @ ..] => (*k, rest),
        _ => return Err("BT2I1 record without a kind".into()),
    };
    let bad = |e: String| format!("BT2I1 {} record: {e}", kind as char);
    match kind {
        b'B' => {
            let f = fields(rest, 3).map_err(bad)?;
            Ok(Record::Begin(Announced {
                stride: num(f[0], "stride").map_err(bad)?,
                head_chunks: num(f[1], "head chunks").map_err(bad)?,
                scan_chunks: num(f[2], "scan chunks").map_err(bad)?,
            }))
        }
        b'C' | b'T' => {
            let f = fields(rest, 4).map_err(bad)?;
            Ok(Record::Chunk {
                pid: num(f[0], "pid").map_err(bad)?,
                tid: num(f[1], "tid").map_err(bad)?,
                off: num(f[2], "offset").map_err(bad)?,
                data: f[3].to_vec(),
                tail: kind == b'T',
            })
        }
        b'E' | b'F' => {
            let f = fields(rest, 6).map_err(bad)?;
            let (pid, tid) = (
                num(f[0], "pid").map_err(bad)?,
                num(f[1], "tid").map_err(bad)?,
            );
            let ptr = hex(f[2], "ptr").map_err(bad)?;
            let nsecs = num(f[3], "nsecs").map_err(bad)?;
            let count = num(f[4], "count").map_err(bad)?;
            let yes = flag(f[5], "flag").map_err(bad)?;
            Ok(if kind == b'E' {
                Record::End {
                    pid,
                    tid,
                    ptr,
                    nsecs,
                    nchunks: count,
                    cut: yes,
                }
            } else {
                Record::TailEnd {
                    pid,
                    tid,
                    ptr,
                    nsecs,
                    nscanned: count,
                    found: yes,
                }
            })
        }
        b'P' => {
            let f = fields(rest, 13).map_err(bad)?;
            let p = Prov {
                ptr: hex(f[2], "ptr").map_err(bad)?,
                nsecs: num(f[3], "nsecs").map_err(bad)?,
                ppid: num(f[4], "ppid").map_err(bad)?,
                uid: num(f[5], "uid").map_err(bad)?,
                gid: num(f[6], "gid").map_err(bad)?,
                loginuid: num(f[7], "loginuid").map_err(bad)?,
                sessionid: num(f[8], "sessionid").map_err(bad)?,
                cgroup: num(f[9], "cgroup").map_err(bad)?,
                probe: String::from_utf8_lossy(f[10]).into_owned(),
                tty: f[11].to_vec(),
                comm: f[12].to_vec(),
                raw: Vec::new(),
                at: Instant::now(),
            };
            Ok(Record::Prov(
                Box::new(p),
                num(f[0], "pid").map_err(bad)?,
                num(f[1], "tid").map_err(bad)?,
            ))
        }
        _ => Err(format!("unknown BT2I1 record kind {:?}", kind as char)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(a: &mut Assembler, recs: &[&[u8]]) -> Vec<AssembledEvent> {
        recs.iter().flat_map(|r| a.push(r)).collect()
    }

    const P: &[u8] = b"BT2I1 P 10 11 abc 1000 9 0 0 4294967295 3 77 uretprobe:/usr/bin/bash:readline_internal_teardown pts0 my bash";

    #[test]
    fn provenance_first_then_head() {
        let mut a = Assembler::new(ReadlineOptions::default());
        let ev = lines(
            &mut a,
            &[P, b"BT2I1 C 10 11 0 echo hi", b"BT2I1 E 10 11 abc 1001 1 0"],
        );
        let [AssembledEvent::Line(l)] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!(l.line, b"echo hi");
        assert_eq!(l.comm, b"my bash");
        assert_eq!(l.tty, b"pts0");
        assert_eq!(
            (l.ppid, l.loginuid, l.sessionid, l.cgroup, l.nsecs),
            (9, u32::MAX, 3, 77, 1000)
        );
        assert!(!l.truncated && !l.eof);
    }

    #[test]
    fn missing_chunk_is_flagged_not_glued() {
        let mut a = Assembler::new(ReadlineOptions::default());
        let c0 = format!("BT2I1 C 10 11 0 {}", "a".repeat(STRIDE));
        let c2 = format!("BT2I1 C 10 11 {} bbb", 2 * STRIDE);
        let ev = lines(
            &mut a,
            &[
                c0.as_bytes(),
                c2.as_bytes(),
                b"BT2I1 E 10 11 abc 1001 3 0",
                P,
            ],
        );
        let [AssembledEvent::Malformed { raw, reason }] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert!(reason.contains("3 chunks, 2 arrived"), "{reason}");
        assert!(raw.windows(3).any(|w| w == b"bbb"));
    }
}
