//! The bashreadline job: which binaries to probe, how `scripts/bashreadline.bt` is
//! instantiated for them, and how its records (`BT2I2 …`) are put back together into whole
//! typed lines.
//!
//! How the script captures a line (its header has the protocol): at the entry of readline's
//! `readline_internal_teardown` it reads the line's exact length from readline's `rl_end`
//! and prints the provenance (P); programs on the return then print the line's bytes from
//! `rl_line_buffer` as hex chunks (C) of [`CHUNK`] bytes, one program per head part of
//! [`PART_BYTES`], one for the tail of a cut line, and one for the last partial chunk (S, a
//! string: its length is not a constant the verifier accepts for `buf()`). Knowing
//! the length, nothing past the line is read, and the verifier's budget buys ~262 KB per
//! program instead of the ~16 KB a NUL-scanning loop gets on bpftrace 0.17.
//!
//! The programs run on the same call but may print on different CPUs, so their records arrive
//! in no guaranteed order. [`Assembler`] groups them by task and line id, knows from the
//! length exactly which chunks make the line, and turns anything missing or inconsistent into
//! [`AssembledEvent::Malformed`] with all of its raw records: nothing is dropped and nothing is
//! glued over a gap.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use object::read::elf::{Dyn, ElfFile, FileHeader};
use object::{Object, ObjectSymbol, SymbolKind};
use thiserror::Error;

/// The comment line that marks a script as speaking this protocol.
pub const PROTOCOL_MARKER: &str = "// bt2immu:protocol bashreadline BT2I2";
/// Every record of the protocol starts with this.
pub const RECORD_PREFIX: &[u8] = b"BT2I2 ";
/// The marker comment before each return attach point line that [`render_script`] rewrites.
pub const TARGETS_MARKER: &str = "// bt2immu:targets";
const ENTRY_BEGIN: &str = "// bt2immu:entry-begin";
const ENTRY_END: &str = "// bt2immu:entry-end";
const PART_BEGIN: &str = "// bt2immu:part-begin";
const PART_END: &str = "// bt2immu:part-end";
/// bpftrace's string/buffer size for the script: the most `buf()` reads on 0.17.
pub const STRLEN: usize = 200;
/// Bytes per chunk record.
pub const CHUNK: usize = 200;
/// Bytes one head program reads (1311 chunks, ~412k verifier instructions on 0.17, measured).
pub const PART_BYTES: usize = 262_200;
/// The most head programs the script is rendered with: 8 parts, 2,097,600 bytes. A record of
/// a line this long stays below immudb's 32 MiB message limit even when every byte has to be
/// escaped; each part also adds about a second to bpftrace's start.
pub const MAX_PARTS: usize = 8;
/// The longest `max_line_bytes` accepted.
pub const MAX_LINE_BYTES: usize = MAX_PARTS * PART_BYTES;
/// How much of the end of a cut line the script keeps (`TAIL_BYTES` in the script).
pub const TAIL_BYTES: usize = 65_600;
/// The default line limit: 1 MiB (rounded up to whole chunks: 1,048,600 bytes).
pub const DEFAULT_MAX_LINE_BYTES: usize = 1024 * 1024;
/// The probed function: readline calls it once a line is accepted, so even the line that was
/// being typed when the probe attached is seen.
pub const SYMBOL: &str = "readline_internal_teardown";
/// readline's globals the entry program reads: the line's length and its buffer.
pub const DATA_SYMBOLS: [&str; 2] = ["rl_end", "rl_line_buffer"];
/// The most bytes of a command run without readline that the script sends (`EXEC_BYTES`).
pub const EXEC_MAX_BYTES: u64 = 32_800;
/// The most bytes of one read without readline that the script sends (`READ_BYTES`).
pub const READ_MAX_BYTES: u64 = 4096;
/// bash's own functions: through the first two it runs commands that readline did not
/// return; the parser reads its input through the third when editing is off; the fourth
/// switches its input away from readline.
pub const SHELL_SYMBOLS: [&str; 4] = [
    "parse_and_execute",
    "fc_execute_file",
    "getc_with_restart",
    "with_input_from_stream",
];
/// bash's flags the read programs check: line editing off, and interactive.
pub const SHELL_DATA_SYMBOLS: [&str; 2] = ["no_line_editing", "interactive_shell"];
const SHELL_BEGIN: &str = "// bt2immu:shell-begin";
const SHELL_END: &str = "// bt2immu:shell-end";

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
    #[error("the script has no `{0}` block with an attach point")]
    NoBlock(&'static str),
    #[error("the script has no `#define {0} …` line to set")]
    NoParam(&'static str),
    #[error("cannot put {0:?} into an attach point (only letters, digits and . _ + - / are safe)")]
    UnsafeTarget(String),
    #[error(
        "max line bytes {0} is out of range: 1 ..= {MAX_LINE_BYTES} ({MAX_PARTS} BPF programs \
         of {PART_BYTES} bytes)"
    )]
    LimitOutOfRange(usize),
}

/// A binary to probe, with the values (link-time addresses) of the symbols the script reads.
/// At run time the entry program gets the binary's load offset as the probe's address minus
/// `teardown`, and finds readline's globals from there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbeTarget {
    /// Canonical path of the ELF file that defines readline (bash, or libreadline.so).
    pub binary: PathBuf,
    /// `readline_internal_teardown`.
    pub teardown: u64,
    /// `rl_end` (int: bytes in the line).
    pub rl_end: u64,
    /// `rl_line_buffer` (char *: the line).
    pub rl_line_buffer: u64,
    /// The shell binary whose own functions are probed for input that bypasses readline:
    /// commands run without readline accepting a line (C-x C-e, `fc`, `bind -x`) and lines
    /// read with line editing off; `None` when the shell does not export what is needed.
    pub shell: Option<ShellTarget>,
}

/// A bash binary with the symbols [`SHELL_SYMBOLS`] and [`SHELL_DATA_SYMBOLS`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShellTarget {
    pub path: PathBuf,
    /// `with_input_from_stream`: called when bash stops using readline.
    pub with_input_from_stream: u64,
    /// `getc_with_restart`: the parser's input with editing off; a shell whose editing was
    /// off before the probes attached is found here.
    pub getc_with_restart: u64,
    /// `no_line_editing` (int).
    pub no_line_editing: u64,
    /// `interactive_shell` (int).
    pub interactive_shell: u64,
}

impl fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uprobe:{}:{SYMBOL}", self.binary.display())
    }
}

#[derive(Debug, Clone)]
pub struct ReadlineOptions {
    /// Lines up to this many bytes (rounded up to whole chunks of [`CHUNK`] bytes) are
    /// captured whole; longer ones are cut, flagged, with their exact length and their last
    /// [`TAIL_BYTES`].
    pub max_line_bytes: usize,
    /// Records of a line still incomplete after this long are given up as malformed.
    pub stale_after: Duration,
}

impl Default for ReadlineOptions {
    fn default() -> Self {
        ReadlineOptions {
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            stale_after: Duration::from_secs(5),
        }
    }
}

impl ReadlineOptions {
    /// The script's `HEAD_BYTES`: `max_line_bytes` rounded up to whole chunks.
    pub fn head_bytes(&self) -> Result<usize, ReadlineError> {
        if self.max_line_bytes == 0 || self.max_line_bytes > MAX_LINE_BYTES {
            return Err(ReadlineError::LimitOutOfRange(self.max_line_bytes));
        }
        Ok(self.max_line_bytes.div_ceil(CHUNK) * CHUNK)
    }

    /// How many head programs the script needs.
    pub fn parts(&self) -> Result<usize, ReadlineError> {
        Ok(self.head_bytes()?.div_ceil(PART_BYTES))
    }

    /// Pages per CPU for bpftrace's perf buffer: every chunk of the longest line (head and
    /// tail) may be printed on one CPU before bpftrace reads any of it. Rounded up to a power
    /// of two (the kernel's requirement), and never below bpftrace's default of 64.
    pub fn perf_rb_pages(&self) -> Result<usize, ReadlineError> {
        // A chunk record: printf id, tid, line id, offset and a 200-byte buffer, plus the
        // perf sample header; 256 bytes is a safe round figure (measured struct: 241).
        let records = (self.head_bytes()? + TAIL_BYTES).div_ceil(CHUNK) + 1;
        let bytes = records * 256;
        Ok(bytes.div_ceil(4096).next_power_of_two().max(64))
    }
}

/// Does this script speak the bashreadline protocol?
pub fn is_readline_script(text: &str) -> bool {
    text.lines().any(|l| l.trim_end() == PROTOCOL_MARKER)
}

/// Environment for the bpftrace child. Both names of the string-size variable are set (0.20
/// renamed it); `BPFTRACE_STR_TRUNC_TRAILER` is empty so that 0.18+ adds no `..` to strings.
pub fn bpftrace_env(opts: &ReadlineOptions) -> Result<Vec<(String, String)>, ReadlineError> {
    Ok(vec![
        ("BPFTRACE_STRLEN".into(), STRLEN.to_string()),
        ("BPFTRACE_MAX_STRLEN".into(), STRLEN.to_string()),
        ("BPFTRACE_STR_TRUNC_TRAILER".into(), String::new()),
        (
            "BPFTRACE_PERF_RB_PAGES".into(),
            opts.perf_rb_pages()?.to_string(),
        ),
    ])
}

/// Arguments for the bpftrace child, before the script path: JSON mode keeps whatever bytes
/// a task's name holds inside one record.
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

/// Finds, for each shell, the binary that defines readline: the shell itself (Debian, Ubuntu,
/// Fedora build readline in) or the libreadline it loads (Arch, Alpine, openSUSE), with the
/// values of [`SYMBOL`] and [`DATA_SYMBOLS`]. Shells that do not exist are skipped; when
/// nothing at all can be probed, the error says what was found where.
pub fn locate_targets(shells: &[PathBuf]) -> Result<Vec<ProbeTarget>, ReadlineError> {
    let mut out: Vec<ProbeTarget> = Vec::new();
    let mut notes = Vec::new();
    for shell in shells {
        let Ok(real) = std::fs::canonicalize(shell) else {
            notes.push(format!("{}: does not exist", shell.display()));
            continue;
        };
        let info = elf_info(&real)?;
        let shell = info.shell_target(&real);
        let mut target = info.target(&real);
        if target.is_none() {
            if info.defines(SYMBOL) {
                notes.push(info.missing_note(&real));
            }
            for lib in info.needed.iter().filter(|n| n.contains("readline")) {
                let Some(path) = find_library(lib) else {
                    notes.push(format!("{}: needs {lib}, not found", real.display()));
                    continue;
                };
                let lib_info = elf_info(&path)?;
                target = lib_info.target(&path);
                if target.is_some() {
                    break;
                }
                notes.push(lib_info.missing_note(&path));
            }
            if target.is_none() && !info.defines(SYMBOL) {
                notes.push(format!(
                    "{}: does not define {SYMBOL} and loads no libreadline that does",
                    real.display()
                ));
            }
        }
        if let Some(mut t) = target {
            t.shell = shell;
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

/// What an ELF file offers to the script: its defined dynamic symbols with their values, and
/// the libraries it loads (`DT_NEEDED`).
#[derive(Debug, Clone, Default)]
pub struct ElfInfo {
    /// Defined FUNC symbols.
    pub functions: Vec<(String, u64)>,
    /// Defined data (OBJECT) symbols.
    pub objects: Vec<(String, u64)>,
    pub needed: Vec<String>,
}

impl ElfInfo {
    fn function(&self, name: &str) -> Option<u64> {
        self.functions
            .iter()
            .find_map(|(n, v)| (n == name).then_some(*v))
    }

    fn object(&self, name: &str) -> Option<u64> {
        self.objects
            .iter()
            .find_map(|(n, v)| (n == name).then_some(*v))
    }

    /// Defines the function `name`.
    pub fn defines(&self, name: &str) -> bool {
        self.function(name).is_some()
    }

    /// The probe target, when the file defines everything the script reads.
    pub fn target(&self, path: &Path) -> Option<ProbeTarget> {
        Some(ProbeTarget {
            binary: path.to_path_buf(),
            teardown: self.function(SYMBOL)?,
            rl_end: self.object(DATA_SYMBOLS[0])?,
            rl_line_buffer: self.object(DATA_SYMBOLS[1])?,
            shell: None,
        })
    }

    /// The shell target, when the file is a bash that exports everything the shell block
    /// of the script reads.
    pub fn shell_target(&self, path: &Path) -> Option<ShellTarget> {
        if !SHELL_SYMBOLS[..3].iter().all(|f| self.defines(f)) {
            return None;
        }
        Some(ShellTarget {
            path: path.to_path_buf(),
            with_input_from_stream: self.function(SHELL_SYMBOLS[3])?,
            getc_with_restart: self.function(SHELL_SYMBOLS[2])?,
            no_line_editing: self.object(SHELL_DATA_SYMBOLS[0])?,
            interactive_shell: self.object(SHELL_DATA_SYMBOLS[1])?,
        })
    }

    fn missing_note(&self, path: &Path) -> String {
        let mut missing = Vec::new();
        if !self.defines(SYMBOL) {
            missing.push(SYMBOL);
        }
        for d in DATA_SYMBOLS {
            if self.object(d).is_none() {
                missing.push(d);
            }
        }
        format!(
            "{}: does not export {} in its dynamic symbols",
            path.display(),
            missing.join(", ")
        )
    }
}

/// Reads the defined FUNC and OBJECT dynamic symbols and `DT_NEEDED` entries of an ELF file.
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
    let mut info = ElfInfo::default();
    for s in file.dynamic_symbols() {
        if !s.is_definition() || s.address() == 0 {
            continue;
        }
        let Ok(name) = s.name() else { continue };
        match s.kind() {
            SymbolKind::Text => info.functions.push((name.to_owned(), s.address())),
            SymbolKind::Data => info.objects.push((name.to_owned(), s.address())),
            _ => {}
        }
    }
    info.needed = match &file {
        object::File::Elf64(f) => needed_libs(f),
        object::File::Elf32(f) => needed_libs(f),
        _ => return Err(ReadlineError::NotElf(path.to_path_buf())),
    }
    .map_err(elf_err)?;
    Ok(info)
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

/// Instantiates the bashreadline script for `targets` and `opts`:
/// - the entry block (`// bt2immu:entry-begin` … `-end`) is written once per target, its
///   attach point set to the target and `TEARDOWN_SYM`, `RL_END_SYM`, `RL_LINE_BUFFER_SYM`
///   replaced by the target's symbol values;
/// - the head part block (`// bt2immu:part-begin` … `-end`) is written once per part, with
///   `PART_INDEX` replaced by 0, 1, …;
/// - the attach point after each `// bt2immu:targets` becomes one return probe per target;
/// - `#define HEAD_BYTES` is set from `opts`, and `#define RENDERED` to 1.
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
    let head_bytes = opts.head_bytes()?;
    let parts = opts.parts()?;
    let safe_path = |p: &Path| {
        let path = p.to_string_lossy().into_owned();
        let ok = path.starts_with('/')
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-/".contains(&b));
        if ok {
            Ok(path)
        } else {
            Err(ReadlineError::UnsafeTarget(path))
        }
    };
    // One probe per file: two shells loading the same libreadline share its probes.
    let mut unique: Vec<&ProbeTarget> = Vec::new();
    let mut paths = Vec::new();
    let mut shells: Vec<(String, &ShellTarget)> = Vec::new();
    for t in targets {
        let path = safe_path(&t.binary)?;
        if !paths.contains(&path) {
            paths.push(path);
            unique.push(t);
        }
        if let Some(sh) = &t.shell {
            let path = safe_path(&sh.path)?;
            if !shells.iter().any(|(p, _)| *p == path) {
                shells.push((path, sh));
            }
        }
    }
    let targets = unique;
    let returns = paths
        .iter()
        .map(|p| format!("uretprobe:{p}:{SYMBOL}"))
        .collect::<Vec<_>>()
        .join(",\n");

    // First the blocks that are repeated.
    let lines: Vec<&str> = template.lines().collect();
    let mut expanded: Vec<String> = Vec::with_capacity(lines.len() * 2);
    let (mut entry_blocks, mut part_blocks) = (0, 0);
    let mut i = 0;
    while i < lines.len() {
        let marker = lines[i].trim_end();
        let (end_marker, kind) = match marker {
            ENTRY_BEGIN => (ENTRY_END, ENTRY_BEGIN),
            PART_BEGIN => (PART_END, PART_BEGIN),
            SHELL_BEGIN => (SHELL_END, SHELL_BEGIN),
            _ => {
                expanded.push(lines[i].to_string());
                i += 1;
                continue;
            }
        };
        let len = lines[i + 1..]
            .iter()
            .position(|l| l.trim_end() == end_marker)
            .ok_or(ReadlineError::NoBlock(kind))?;
        let block = &lines[i + 1..i + 1 + len];
        if kind == ENTRY_BEGIN {
            entry_blocks += 1;
            let attach = block
                .iter()
                .position(|l| !l.trim().is_empty() && !l.trim_start().starts_with("//"))
                .ok_or(ReadlineError::NoBlock(ENTRY_BEGIN))?;
            for (t, path) in targets.iter().copied().zip(&paths) {
                for (j, l) in block.iter().enumerate() {
                    if j == attach {
                        expanded.push(format!("uprobe:{path}:{SYMBOL}"));
                        continue;
                    }
                    let mut l = replace_word(l, "TEARDOWN_SYM", &format!("{:#x}", t.teardown));
                    l = replace_word(&l, "RL_END_SYM", &format!("{:#x}", t.rl_end));
                    l = replace_word(
                        &l,
                        "RL_LINE_BUFFER_SYM",
                        &format!("{:#x}", t.rl_line_buffer),
                    );
                    expanded.push(l);
                }
                expanded.push(String::new());
            }
        } else if kind == SHELL_BEGIN {
            // Attach points name the template's `/bin/bash`; each copy names one shell.
            for (path, sh) in &shells {
                for l in block {
                    let is_attach = l.starts_with("uprobe:/") || l.starts_with("uretprobe:/");
                    if is_attach {
                        expanded.push(l.replacen("/bin/bash:", &format!("{path}:"), 1));
                        continue;
                    }
                    let mut l = replace_word(
                        l,
                        "WITH_INPUT_FROM_STREAM_SYM",
                        &format!("{:#x}", sh.with_input_from_stream),
                    );
                    l = replace_word(
                        &l,
                        "GETC_WITH_RESTART_SYM",
                        &format!("{:#x}", sh.getc_with_restart),
                    );
                    l = replace_word(
                        &l,
                        "NO_LINE_EDITING_SYM",
                        &format!("{:#x}", sh.no_line_editing),
                    );
                    l = replace_word(
                        &l,
                        "INTERACTIVE_SHELL_SYM",
                        &format!("{:#x}", sh.interactive_shell),
                    );
                    expanded.push(l);
                }
                expanded.push(String::new());
            }
        } else {
            part_blocks += 1;
            for k in 0..parts {
                // Each copy loops exactly as often as its part has chunks: with a bound the
                // loop can never reach (a head shorter than a part), LLVM replaces the bound
                // by a trip count computed with a division the verifier cannot bound, and the
                // program no longer loads (measured on 0.17 for heads below 262,200 bytes).
                let part_chunks = (head_bytes.min((k + 1) * PART_BYTES) - k * PART_BYTES) / CHUNK;
                for l in block {
                    let l = replace_word(l, "PART_INDEX", &k.to_string());
                    expanded.push(replace_word(&l, "PART_CHUNKS", &part_chunks.to_string()));
                }
                expanded.push(String::new());
            }
        }
        i += len + 2;
    }
    if entry_blocks != 1 {
        return Err(ReadlineError::NoBlock(ENTRY_BEGIN));
    }
    if part_blocks != 1 {
        return Err(ReadlineError::NoBlock(PART_BEGIN));
    }

    // Then the return attach points and the parameters.
    let mut out = String::with_capacity(template.len() * 2);
    let (mut markers, mut head_defines, mut rendered_defines) = (0, 0, 0);
    let mut replace_next = false;
    for line in &expanded {
        if replace_next && !line.trim().is_empty() {
            out.push_str(&returns);
            out.push('\n');
            replace_next = false;
            continue;
        }
        if line.trim_end() == TARGETS_MARKER {
            markers += 1;
            replace_next = true;
        } else if line.starts_with("#define HEAD_BYTES ") {
            head_defines += 1;
            out.push_str(&format!("#define HEAD_BYTES {head_bytes}\n"));
            continue;
        } else if line.starts_with("#define RENDERED ") {
            rendered_defines += 1;
            out.push_str("#define RENDERED 1\n");
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if markers == 0 || replace_next {
        return Err(ReadlineError::NoBlock(TARGETS_MARKER));
    }
    if head_defines != 1 {
        return Err(ReadlineError::NoParam("HEAD_BYTES"));
    }
    if rendered_defines != 1 {
        return Err(ReadlineError::NoParam("RENDERED"));
    }
    Ok(out)
}

/// Replaces `word` where it stands as a whole identifier.
fn replace_word(line: &str, word: &str, with: &str) -> String {
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while let Some(pos) = line[i..].find(word) {
        let start = i + pos;
        let end = start + word.len();
        let before_ok = start == 0 || !is_ident(bytes[start - 1]);
        let after_ok = end == bytes.len() || !is_ident(bytes[end]);
        out.push_str(&line[i..start]);
        out.push_str(if before_ok && after_ok { with } else { word });
        i = end;
    }
    out.push_str(&line[i..]);
    out
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
    /// Monotonic nanoseconds (CLOCK_MONOTONIC) when the line was accepted.
    pub nsecs: u64,
    /// The attach point that fired, e.g. `uprobe:/usr/bin/bash:readline_internal_teardown`.
    pub probe: String,
    /// The line's bytes; when `truncated`, its head only.
    pub line: Vec<u8>,
    /// The exact length of the line in bytes.
    pub len: u64,
    pub truncated: bool,
    /// For a cut line: its last bytes (from `tail_offset` to the end), so padding in front
    /// of a command cannot push the command out of the record.
    pub tail: Option<Vec<u8>>,
    pub tail_offset: Option<u64>,
    /// The shell read end-of-file (Ctrl-D on an empty line); `line` is empty.
    pub eof: bool,
    /// Not a line readline returned: a command bash ran from the editor (C-x C-e, `fc`) or
    /// a `bind -x` key. `probe` says which function saw it.
    pub executed: bool,
    /// For `executed`: longer than the script's EXEC_BYTES; `line` is its start and `len`
    /// how much of it was read.
    pub executed_cut: bool,
    /// Read by an interactive bash with line editing off (not through readline): `line` is
    /// what one read of its terminal returned, newline included.
    pub line_editing_off: bool,
}

/// A line that did not arrive whole (bpftrace lost events, or stopped before the rest came):
/// the bytes that did arrive, each at its place, so a command in them is still in the trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncompleteLine {
    pub tid: u64,
    /// The line's id (the entry probe's nsecs).
    pub id: u64,
    /// Provenance, exact length and cut, when the line's P record arrived; its `line` and
    /// `tail` are empty (the bytes are in `pieces`).
    pub about: Option<ReadlineLine>,
    /// Runs of contiguous bytes that arrived, by offset in the line.
    pub pieces: Vec<(u64, Vec<u8>)>,
    /// Byte ranges (offset, length) of the line that should have come and did not; empty when
    /// the length is unknown (no P record).
    pub missing: Vec<(u64, u64)>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssembledEvent {
    Line(ReadlineLine),
    Incomplete(IncompleteLine),
    /// Records that do not make a whole, consistent line: all of them, newline-separated.
    Malformed {
        raw: Vec<u8>,
        reason: String,
    },
}

/// The chunk layout the script announced in its `B` record once attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    pub chunk: u64,
    pub head_bytes: u64,
    pub tail_bytes: u64,
}

impl Announced {
    /// Where the stored tail of a line of `len` bytes starts; `None` when the line is not cut.
    fn tail_start(&self, len: u64) -> Option<u64> {
        if len <= self.head_bytes {
            return None;
        }
        let full_end = len - len % self.chunk;
        Some(if full_end > self.head_bytes + self.tail_bytes {
            full_end - self.tail_bytes
        } else {
            self.head_bytes
        })
    }

    /// The size of the chunk the script sends at `off` for a line of `len` bytes, if it sends
    /// one there. Computed, not listed: a record claiming a huge length costs nothing.
    fn chunk_size_at(&self, len: u64, off: u64) -> Option<u64> {
        let c = self.chunk;
        let full_end = len - len % c;
        if off % c != 0 || off >= len {
            return None;
        }
        if off == full_end {
            return Some(len - full_end);
        }
        match self.tail_start(len) {
            Some(t0) if off >= self.head_bytes && off < t0 => None,
            _ => Some(c),
        }
    }

    /// How many chunks the script sends for a line of `len` bytes.
    fn chunk_count(&self, len: u64) -> u64 {
        let c = self.chunk;
        let full_end = len - len % c;
        let full = match self.tail_start(len) {
            None => full_end / c,
            Some(t0) => self.head_bytes / c + (full_end - t0) / c,
        };
        full + u64::from(full_end < len)
    }

    /// Which chunks (offset, size) make a line of `len` bytes, in order; and where its tail
    /// starts when it is cut. Mirrors the script's three kinds of return programs; the
    /// assembler uses the computed forms above, which the tests check against this list.
    #[cfg(test)]
    fn layout(&self, len: u64) -> (Vec<(u64, u64)>, Option<u64>) {
        let c = self.chunk;
        let full_end = len - len % c;
        let mut out = Vec::new();
        let mut tail_start = None;
        if len <= self.head_bytes {
            out.extend((0..full_end).step_by(c as usize).map(|o| (o, c)));
        } else {
            out.extend((0..self.head_bytes).step_by(c as usize).map(|o| (o, c)));
            let t0 = if full_end > self.head_bytes + self.tail_bytes {
                full_end - self.tail_bytes
            } else {
                self.head_bytes
            };
            out.extend((t0..full_end).step_by(c as usize).map(|o| (o, c)));
            tail_start = Some(t0);
        }
        if full_end < len {
            out.push((full_end, len - full_end));
        }
        (out, tail_start)
    }
}

#[derive(Debug)]
struct Prov {
    pid: u64,
    /// From a Q record (see [`ReadlineLine::executed`]); `Some(cut)`.
    executed: Option<bool>,
    /// From an N record (see [`ReadlineLine::line_editing_off`]); `Some(cut)`.
    noedit: Option<bool>,
    stored: bool,
    eof: bool,
    len: u64,
    ppid: u64,
    uid: u32,
    gid: u32,
    loginuid: u32,
    sessionid: u32,
    cgroup: u64,
    probe: String,
    tty: Vec<u8>,
    comm: Vec<u8>,
}

/// The records of one line (one task, one id) so far.
#[derive(Debug)]
struct Pending {
    prov: Option<Prov>,
    /// Chunk bytes by offset.
    chunks: BTreeMap<u64, Vec<u8>>,
    /// Once the P record is there: the layout and length the chunks must match, and how many
    /// chunks make the line.
    expected: Option<(Announced, u64, u64)>,
    tail_start: Option<u64>,
    raws: Vec<Vec<u8>>,
    since: Instant,
    problem: Option<String>,
}

impl Pending {
    fn new(now: Instant) -> Self {
        Pending {
            prov: None,
            chunks: BTreeMap::new(),
            expected: None,
            tail_start: None,
            raws: Vec::new(),
            since: now,
            problem: None,
        }
    }

    fn check_chunk(&mut self, off: u64, size: u64) {
        if let Some((layout, len, _)) = &self.expected {
            if self.problem.is_none() && layout.chunk_size_at(*len, off) != Some(size) {
                self.problem = Some(format!(
                    "a {size}-byte chunk at offset {off} is not part of a {len}-byte line"
                ));
            }
        }
    }
}

/// Reassembles the protocol's records (one decoded output line at a time) into
/// [`ReadlineLine`]s, whatever order the programs' records arrive in.
#[derive(Debug)]
pub struct Assembler {
    opts: ReadlineOptions,
    announced: Option<Announced>,
    /// Lines in flight by (tid, id).
    pending: BTreeMap<(u64, u64), Pending>,
    /// Lines already put together or given up on, so that a late duplicate is not taken for
    /// the start of a new line. Bounded: ids are forgotten oldest first.
    done: HashSet<(u64, u64)>,
    done_order: std::collections::VecDeque<(u64, u64)>,
    /// Tasks whose last P record said its line was not stored: the return programs then find
    /// nothing and print an M record, which that P record already accounts for.
    unstored: HashSet<u64>,
    /// Reads of a line typed with editing off that did not end it yet (bash reads at most
    /// 1024 bytes at a time), by task: joined with the next ones up to the newline.
    noedit_partial: BTreeMap<u64, (ReadlineLine, Instant)>,
}

/// A line typed with editing off is given out whole at its newline, or at this many bytes.
const NOEDIT_MAX_LINE: usize = 64 * 1024;

/// How many finished line ids are remembered.
const DONE_MEMORY: usize = 4096;
/// How many lines may wait for the rest of their records at once: far more than shells can
/// accept lines within `stale_after`, few enough to bound the memory damaged input can take.
pub const MAX_PENDING: usize = 4096;

impl Assembler {
    pub fn new(opts: ReadlineOptions) -> Self {
        Assembler {
            opts,
            announced: None,
            pending: BTreeMap::new(),
            done: HashSet::new(),
            done_order: std::collections::VecDeque::new(),
            unstored: HashSet::new(),
            noedit_partial: BTreeMap::new(),
        }
    }

    pub fn options(&self) -> &ReadlineOptions {
        &self.opts
    }

    /// What the script announced when it was attached (`None` before its `B` record).
    pub fn announced(&self) -> Option<Announced> {
        self.announced
    }

    /// The layout in force: as announced, or (before the `B` record, e.g. a line accepted
    /// while the probes were still attaching) as configured.
    fn layout(&self) -> Announced {
        self.announced.unwrap_or(Announced {
            chunk: CHUNK as u64,
            head_bytes: self
                .opts
                .head_bytes()
                .unwrap_or(DEFAULT_MAX_LINE_BYTES.div_ceil(CHUNK) * CHUNK)
                as u64,
            tail_bytes: TAIL_BYTES as u64,
        })
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
        let key = match rec {
            Record::Begin(a) => {
                self.announced = Some(a);
                return out;
            }
            Record::Missing { pid, tid } => {
                if self.unstored.remove(&tid) {
                    return out;
                }
                out.push(malformed(
                    vec![line.to_vec()],
                    format!(
                        "pid {pid} tid {tid}: a line returned without its entry record (the \
                         probes attached between the two); its bytes were not captured"
                    ),
                ));
                return out;
            }
            Record::ReadBeforeAttach { pid, tid } => {
                out.push(malformed(
                    vec![line.to_vec()],
                    format!(
                        "pid {pid} tid {tid}: bash with line editing off had read input before \
                         the probes attached (the line being typed then); those bytes were not \
                         captured"
                    ),
                ));
                return out;
            }
            Record::Unrendered => {
                out.push(malformed(
                    vec![line.to_vec()],
                    "the script ran without bt2immu filling in the readline symbol addresses; \
                     nothing was captured",
                ));
                return out;
            }
            Record::Prov(tid, id, p) => {
                let key = (tid, id);
                if self.done.contains(&key) {
                    out.push(malformed(
                        vec![line.to_vec()],
                        format!(
                            "tid {tid}: a P record for line {id}, which was already complete \
                             or given up on"
                        ),
                    ));
                    return out;
                }
                let layout = self.layout();
                let pend = self.pending.entry(key).or_insert_with(|| Pending::new(now));
                pend.raws.push(line.to_vec());
                if pend.prov.is_some() {
                    pend.problem.get_or_insert_with(|| {
                        format!("tid {tid}: a second P record for line {id}")
                    });
                } else {
                    if p.eof && p.len != 0 {
                        pend.problem = Some(format!("tid {tid}: end-of-file with a length"));
                    }
                    if !p.stored {
                        self.unstored.insert(tid);
                    }
                    // An executed command is sent whole (it is at most EXEC_MAX_BYTES) by one
                    // program: its layout has no head limit and no tail.
                    let layout = if p.executed.is_some() || p.noedit.is_some() {
                        Announced {
                            chunk: layout.chunk,
                            head_bytes: p.len.div_ceil(layout.chunk).max(1) * layout.chunk,
                            tail_bytes: 0,
                        }
                    } else {
                        layout
                    };
                    let count = if p.eof { 0 } else { layout.chunk_count(p.len) };
                    pend.expected = Some((layout, p.len, count));
                    pend.tail_start = layout.tail_start(p.len);
                    pend.prov = Some(*p);
                    let arrived: Vec<(u64, u64)> = pend
                        .chunks
                        .iter()
                        .map(|(o, d)| (*o, d.len() as u64))
                        .collect();
                    for (o, s) in arrived {
                        pend.check_chunk(o, s);
                    }
                }
                key
            }
            Record::Chunk { tid, id, off, data } => {
                let key = (tid, id);
                if self.done.contains(&key) {
                    out.push(malformed(
                        vec![line.to_vec()],
                        format!(
                            "tid {tid}: a chunk at offset {off} of line {id}, which was already \
                             complete or given up on"
                        ),
                    ));
                    return out;
                }
                let pend = self.pending.entry(key).or_insert_with(|| Pending::new(now));
                pend.raws.push(line.to_vec());
                let size = data.len() as u64;
                if pend.chunks.insert(off, data).is_some() {
                    pend.problem
                        .get_or_insert_with(|| format!("tid {tid}: chunk at offset {off} twice"));
                }
                pend.check_chunk(off, size);
                key
            }
        };
        self.try_complete(key, &mut out);
        self.bound_pending(&mut out);
        out
    }

    fn try_complete(&mut self, key: (u64, u64), out: &mut Vec<AssembledEvent>) {
        let Some(pend) = self.pending.get(&key) else {
            return;
        };
        let (tid, id) = key;
        if let Some(problem) = &pend.problem {
            let reason = format!("tid {tid} line {id}: {problem}");
            let pend = self.finish_key(key);
            out.push(malformed(pend.raws, reason));
            return;
        }
        let (Some(prov), Some(expected)) = (&pend.prov, &pend.expected) else {
            return;
        };
        if !prov.stored && prov.len > 0 {
            let reason = format!(
                "pid {} tid {tid}: a {}-byte line was not handed to the programs that read it \
                 (the map of lines in flight is full); its bytes were not captured",
                prov.pid, prov.len
            );
            let pend = self.finish_key(key);
            out.push(malformed(pend.raws, reason));
            return;
        }
        if (pend.chunks.len() as u64) < expected.2 {
            return;
        }
        let pend = self.finish_key(key);
        match assemble(tid, id, pend) {
            AssembledEvent::Line(l) if l.line_editing_off => {
                if let Some(l) = self.join_noedit(l) {
                    out.push(AssembledEvent::Line(l));
                }
            }
            ev => out.push(ev),
        }
    }

    /// Joins the reads of one line typed with editing off; the line comes out at its newline.
    fn join_noedit(&mut self, mut l: ReadlineLine) -> Option<ReadlineLine> {
        if let Some((mut first, _)) = self.noedit_partial.remove(&l.tid) {
            first.line.extend_from_slice(&l.line);
            first.len += l.len;
            first.executed_cut |= l.executed_cut;
            l = first;
        }
        if l.line.ends_with(b"\n") || l.line.len() >= NOEDIT_MAX_LINE {
            return Some(l);
        }
        self.noedit_partial.insert(l.tid, (l, Instant::now()));
        None
    }

    fn finish_key(&mut self, key: (u64, u64)) -> Pending {
        if self.done.insert(key) {
            self.done_order.push_back(key);
            if self.done_order.len() > DONE_MEMORY {
                if let Some(old) = self.done_order.pop_front() {
                    self.done.remove(&old);
                }
            }
        }
        self.pending.remove(&key).expect("pending line exists")
    }

    /// Gives up on lines that have waited longer than `stale_after` for the rest of their
    /// records: they come out as [`AssembledEvent::Malformed`], flagged, with all their bytes.
    pub fn flush_stale(&mut self, now: Instant) -> Vec<AssembledEvent> {
        let stale_after = self.opts.stale_after;
        self.flush(|since| now.saturating_duration_since(since) >= stale_after)
    }

    /// End of stream: everything still pending comes out, flagged.
    pub fn finish(&mut self) -> Vec<AssembledEvent> {
        self.flush(|_| true)
    }

    fn flush(&mut self, stale: impl Fn(Instant) -> bool) -> Vec<AssembledEvent> {
        let keys: Vec<(u64, u64)> = self
            .pending
            .iter()
            .filter(|(_, p)| stale(p.since))
            .map(|(k, _)| *k)
            .collect();
        let mut out: Vec<AssembledEvent> = keys
            .into_iter()
            .map(|key| self.give_up(key, None))
            .collect();
        // A line typed with editing off whose newline never came (Ctrl-D, or bash exited).
        let tids: Vec<u64> = self
            .noedit_partial
            .iter()
            .filter(|(_, (_, since))| stale(*since))
            .map(|(t, _)| *t)
            .collect();
        for t in tids {
            let (l, _) = self.noedit_partial.remove(&t).expect("listed");
            out.push(AssembledEvent::Line(l));
        }
        out
    }

    /// A line that will not complete: what arrived of it, flagged.
    fn give_up(&mut self, key: (u64, u64), why: Option<&str>) -> AssembledEvent {
        let pend = self.finish_key(key);
        let mut inc = incomplete(key.0, key.1, pend);
        if let Some(why) = why {
            inc.reason = format!("{why}: {}", inc.reason);
        }
        AssembledEvent::Incomplete(inc)
    }

    /// Keeps the lines in flight under [`MAX_PENDING`]: the oldest is given up (with what
    /// arrived of it) so that no input, however damaged, costs unbounded memory.
    fn bound_pending(&mut self, out: &mut Vec<AssembledEvent>) {
        while self.pending.len() > MAX_PENDING {
            let oldest = self
                .pending
                .iter()
                .min_by_key(|(_, p)| p.since)
                .map(|(k, _)| *k)
                .expect("pending is not empty");
            out.push(self.give_up(
                oldest,
                Some(&format!("more than {MAX_PENDING} lines in flight")),
            ));
        }
    }
}

/// What is left of a line given up on: its arrived chunks joined into runs, the ranges that
/// are missing (from the layout, when the P record told the length), and why.
fn incomplete(tid: u64, id: u64, mut pend: Pending) -> IncompleteLine {
    let mut pieces: Vec<(u64, Vec<u8>)> = Vec::new();
    for (off, data) in std::mem::take(&mut pend.chunks) {
        match pieces.last_mut() {
            Some((start, bytes)) if *start + bytes.len() as u64 == off => {
                bytes.extend_from_slice(&data)
            }
            _ => pieces.push((off, data)),
        }
    }
    let arrived: u64 = pieces.iter().map(|(_, b)| b.len() as u64).sum();
    let (about, missing, reason) = match (pend.prov.take(), &pend.expected) {
        (Some(prov), Some((layout, len, count))) => {
            let mut missing: Vec<(u64, u64)> = Vec::new();
            let have = |off: u64| {
                pieces
                    .iter()
                    .any(|(s, b)| off >= *s && off < *s + b.len() as u64)
            };
            let mut push = |off: u64, size: u64| match missing.last_mut() {
                Some((s, l)) if *s + *l == off => *l += size,
                _ => missing.push((off, size)),
            };
            // Walk the layout's chunk offsets (bounded by what the script sends).
            let c = layout.chunk;
            let full_end = len - len % c;
            let mut off = 0;
            while off < *len {
                if let Some(t0) = layout.tail_start(*len) {
                    if off >= layout.head_bytes && off < t0 {
                        off = t0;
                        continue;
                    }
                }
                let size = if off == full_end { len - full_end } else { c };
                if !have(off) {
                    push(off, size);
                }
                off += size;
            }
            let reason = format!(
                "pid {} tid {tid} line {id}: {} of the {count} chunks of a {len}-byte line \
                 arrived ({arrived} bytes, kept); bpftrace lost events, or stopped",
                prov.pid,
                count - missing_chunks(&missing, c),
            );
            let about = typed_line(tid, id, prov, Vec::new(), None, pend.tail_start);
            (Some(about), missing, reason)
        }
        _ => (
            None,
            Vec::new(),
            format!(
                "tid {tid} line {id}: {} bytes arrived without the line's P record (its \
                 length and provenance were lost; bytes kept); bpftrace lost events, or stopped",
                arrived
            ),
        ),
    };
    IncompleteLine {
        tid,
        id,
        about,
        pieces,
        missing,
        reason,
    }
}

/// How many chunks of `chunk` bytes (the last one possibly shorter) the missing ranges cover.
fn missing_chunks(missing: &[(u64, u64)], chunk: u64) -> u64 {
    missing.iter().map(|(_, l)| l.div_ceil(chunk)).sum()
}

fn assemble(tid: u64, id: u64, pend: Pending) -> AssembledEvent {
    let prov = pend.prov.expect("complete line has provenance");
    let mut line = Vec::new();
    // A cut line always has a tail, even an empty one (a layout without tail bytes, on a
    // line that ends on a chunk boundary): `truncated`, `tail` and `tail_offset` go together.
    let mut tail: Option<Vec<u8>> = pend.tail_start.map(|_| Vec::new());
    for (off, data) in pend.chunks {
        match (pend.tail_start, tail.as_mut()) {
            (Some(t0), Some(tail)) if off >= t0 => tail.extend_from_slice(&data),
            _ => line.extend_from_slice(&data),
        }
    }
    // A line longer than the head but not than head and tail together: the tail starts
    // where the head ends, every byte is here, and the line is whole.
    let mut tail_start = pend.tail_start;
    if let (Some(t0), Some(t)) = (tail_start, tail.as_ref()) {
        if line.len() as u64 == t0 && t0 + t.len() as u64 == prov.len {
            line.extend_from_slice(t);
            tail = None;
            tail_start = None;
        }
    }
    AssembledEvent::Line(typed_line(tid, id, prov, line, tail, tail_start))
}

/// A line with the provenance of its P record.
fn typed_line(
    tid: u64,
    id: u64,
    prov: Prov,
    line: Vec<u8>,
    tail: Option<Vec<u8>>,
    tail_offset: Option<u64>,
) -> ReadlineLine {
    ReadlineLine {
        pid: prov.pid,
        tid,
        ppid: prov.ppid,
        uid: prov.uid,
        gid: prov.gid,
        loginuid: prov.loginuid,
        sessionid: prov.sessionid,
        tty: prov.tty,
        comm: prov.comm,
        cgroup: prov.cgroup,
        nsecs: id,
        probe: prov.probe,
        line,
        len: prov.len,
        truncated: tail_offset.is_some(),
        tail_offset,
        tail,
        eof: prov.eof,
        executed: prov.executed.is_some(),
        executed_cut: prov.executed == Some(true) || prov.noedit == Some(true),
        line_editing_off: prov.noedit.is_some(),
    }
}

fn malformed(raws: Vec<Vec<u8>>, reason: impl Into<String>) -> AssembledEvent {
    AssembledEvent::Malformed {
        raw: raws.join(&b'\n'),
        reason: reason.into(),
    }
}

enum Record {
    Begin(Announced),
    Prov(u64, u64, Box<Prov>),
    Chunk {
        tid: u64,
        id: u64,
        off: u64,
        data: Vec<u8>,
    },
    Missing {
        pid: u64,
        tid: u64,
    },
    /// A shell with editing off had read input before the probes attached.
    ReadBeforeAttach {
        pid: u64,
        tid: u64,
    },
    Unrendered,
}

/// The highest chunk offset believed: far beyond any line (the script reads rl_end as 32
/// bits), and low enough that offset + length cannot overflow.
const MAX_CHUNK_OFFSET: u64 = 1 << 62;

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

fn flag(f: &[u8], what: &str) -> Result<bool, String> {
    match f {
        b"0" => Ok(false),
        b"1" => Ok(true),
        _ => Err(format!("bad {what}: {:?}", String::from_utf8_lossy(f))),
    }
}

/// Decodes bpftrace's `%rx`: `\xNN` for every byte.
fn unhex(f: &[u8]) -> Result<Vec<u8>, String> {
    if f.len() % 4 != 0 {
        return Err(format!(
            "chunk of {} characters is not \\xNN escapes",
            f.len()
        ));
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    f.chunks_exact(4)
        .map(|q| match q {
            [b'\\', b'x', h, l] => match (digit(*h), digit(*l)) {
                (Some(h), Some(l)) => Ok(h << 4 | l),
                _ => Err(format!("bad escape {:?}", String::from_utf8_lossy(q))),
            },
            _ => Err(format!("bad escape {:?}", String::from_utf8_lossy(q))),
        })
        .collect()
}

fn parse_record(line: &[u8]) -> Result<Record, String> {
    let body = line
        .strip_prefix(RECORD_PREFIX)
        .ok_or("not a BT2I2 record")?;
    let (kind, rest) = match body {
        [k, b' ', rest @ ..] => (*k, rest),
        [k] => return Err(format!("BT2I2 {} record without fields", *k as char)),
        _ => return Err("BT2I2 record without a kind".into()),
    };
    let bad = |e: String| format!("BT2I2 {} record: {e}", kind as char);
    match kind {
        b'B' => {
            let f = fields(rest, 3).map_err(bad)?;
            let a = Announced {
                chunk: num(f[0], "chunk").map_err(bad)?,
                head_bytes: num(f[1], "head bytes").map_err(bad)?,
                tail_bytes: num(f[2], "tail bytes").map_err(bad)?,
            };
            // Bounded so that no input can make one line expect more chunks than the script
            // can send (each expected chunk costs the assembler memory).
            let sane = a.chunk > 0
                && a.chunk <= 4096
                && a.head_bytes % a.chunk == 0
                && a.tail_bytes % a.chunk == 0
                && a.head_bytes > 0
                && a.head_bytes / a.chunk <= MAX_LINE_BYTES.div_ceil(CHUNK) as u64
                && a.tail_bytes / a.chunk <= TAIL_BYTES.div_ceil(CHUNK) as u64;
            if !sane {
                return Err(bad(format!("layout out of range: {a:?}")));
            }
            Ok(Record::Begin(a))
        }
        // C: hex (`%rx`) chunks; S: the last partial chunk as a string.
        b'C' | b'S' => {
            let f = fields(rest, 4).map_err(bad)?;
            let data = if kind == b'C' {
                unhex(f[3]).map_err(bad)?
            } else {
                f[3].to_vec()
            };
            if data.is_empty() {
                return Err(bad("empty chunk".into()));
            }
            let off: u64 = num(f[2], "offset").map_err(bad)?;
            // A line's bytes have offsets far below this; past it, off + len could overflow.
            if off > MAX_CHUNK_OFFSET {
                return Err(bad(format!("offset {off} out of range")));
            }
            Ok(Record::Chunk {
                tid: num(f[0], "tid").map_err(bad)?,
                id: num(f[1], "id").map_err(bad)?,
                off,
                data,
            })
        }
        // Q: a command run without readline; N: a line read with line editing off.
        b'Q' | b'N' => {
            let f = fields(rest, 14).map_err(bad)?;
            let cut = flag(f[3], "cut").map_err(bad)?;
            let p = Prov {
                pid: num(f[0], "pid").map_err(bad)?,
                executed: (kind == b'Q').then_some(cut),
                noedit: (kind == b'N').then_some(cut),
                stored: true,
                eof: false,
                len: num(f[4], "len").map_err(bad)?,
                ppid: num(f[5], "ppid").map_err(bad)?,
                uid: num(f[6], "uid").map_err(bad)?,
                gid: num(f[7], "gid").map_err(bad)?,
                loginuid: num(f[8], "loginuid").map_err(bad)?,
                sessionid: num(f[9], "sessionid").map_err(bad)?,
                cgroup: num(f[10], "cgroup").map_err(bad)?,
                probe: String::from_utf8_lossy(f[11]).into_owned(),
                tty: f[12].to_vec(),
                comm: f[13].to_vec(),
            };
            let max = if kind == b'Q' {
                EXEC_MAX_BYTES
            } else {
                READ_MAX_BYTES
            };
            if p.len > max {
                return Err(bad(format!("length {} over {max}", p.len)));
            }
            Ok(Record::Prov(
                num(f[1], "tid").map_err(bad)?,
                num(f[2], "id").map_err(bad)?,
                Box::new(p),
            ))
        }
        b'M' | b'R' => {
            let f = fields(rest, 3).map_err(bad)?;
            let (pid, tid) = (
                num(f[0], "pid").map_err(bad)?,
                num(f[1], "tid").map_err(bad)?,
            );
            Ok(if kind == b'M' {
                Record::Missing { pid, tid }
            } else {
                Record::ReadBeforeAttach { pid, tid }
            })
        }
        b'X' => Ok(Record::Unrendered),
        b'P' => {
            let f = fields(rest, 15).map_err(bad)?;
            let p = Prov {
                pid: num(f[0], "pid").map_err(bad)?,
                executed: None,
                noedit: None,
                stored: flag(f[3], "stored").map_err(bad)?,
                eof: flag(f[4], "eof").map_err(bad)?,
                len: num(f[5], "len").map_err(bad)?,
                ppid: num(f[6], "ppid").map_err(bad)?,
                uid: num(f[7], "uid").map_err(bad)?,
                gid: num(f[8], "gid").map_err(bad)?,
                loginuid: num(f[9], "loginuid").map_err(bad)?,
                sessionid: num(f[10], "sessionid").map_err(bad)?,
                cgroup: num(f[11], "cgroup").map_err(bad)?,
                probe: String::from_utf8_lossy(f[12]).into_owned(),
                tty: f[13].to_vec(),
                comm: f[14].to_vec(),
            };
            Ok(Record::Prov(
                num(f[1], "tid").map_err(bad)?,
                num(f[2], "id").map_err(bad)?,
                Box::new(p),
            ))
        }
        _ => Err(format!("unknown BT2I2 record kind {:?}", kind as char)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Announced = Announced {
        chunk: 200,
        head_bytes: 400,
        tail_bytes: 200,
    };

    #[test]
    fn computed_layout_agrees_with_the_listed_one() {
        for layout in [
            SMALL,
            Announced {
                chunk: 7,
                head_bytes: 21,
                tail_bytes: 0,
            },
            Announced {
                chunk: 200,
                head_bytes: 1_048_600,
                tail_bytes: 65_600,
            },
        ] {
            for len in (0..3000).chain([1_048_599, 1_048_600, 1_048_601, 1_200_000, 9_999_999]) {
                let (list, t0) = layout.layout(len);
                assert_eq!(layout.tail_start(len), t0, "{layout:?} {len}");
                assert_eq!(
                    layout.chunk_count(len),
                    list.len() as u64,
                    "{layout:?} {len}"
                );
                for &(off, size) in &list {
                    assert_eq!(layout.chunk_size_at(len, off), Some(size), "{len} {off}");
                }
                // Nothing else is part of the line: every other aligned offset, and a few
                // unaligned ones.
                let listed: HashSet<u64> = list.iter().map(|c| c.0).collect();
                let probe_end = len.min(5000) + 2 * layout.chunk;
                for off in (0..probe_end).chain(len.saturating_sub(3000)..len + 3) {
                    if !listed.contains(&off) {
                        assert_eq!(
                            layout.chunk_size_at(len, off),
                            None,
                            "{layout:?} {len} {off}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn layout_lists_exactly_the_chunks_the_script_prints() {
        let full = |offs: &[u64]| offs.iter().map(|&o| (o, 200)).collect::<Vec<_>>();
        assert_eq!(SMALL.layout(0), (vec![], None));
        assert_eq!(SMALL.layout(1), (vec![(0, 1)], None));
        assert_eq!(SMALL.layout(200), (full(&[0]), None));
        assert_eq!(SMALL.layout(399), (vec![(0, 200), (200, 199)], None));
        assert_eq!(SMALL.layout(400), (full(&[0, 200]), None));
        // Cut: the head, then the tail from max(head, full_end - tail).
        assert_eq!(
            SMALL.layout(401),
            (vec![(0, 200), (200, 200), (400, 1)], Some(400))
        );
        assert_eq!(SMALL.layout(600), (full(&[0, 200, 400]), Some(400)));
        assert_eq!(
            SMALL.layout(799),
            (
                vec![(0, 200), (200, 200), (400, 200), (600, 199)],
                Some(400)
            )
        );
        assert_eq!(SMALL.layout(800), (full(&[0, 200, 600]), Some(600)));
        assert_eq!(
            SMALL.layout(1234),
            (
                vec![(0, 200), (200, 200), (1000, 200), (1200, 34)],
                Some(1000)
            )
        );
        // However long the line, the layout is the head and the tail.
        let (chunks, t0) = SMALL.layout(u64::MAX);
        assert_eq!(chunks.len(), 2 + 1 + 1);
        assert_eq!(t0, Some(u64::MAX - u64::MAX % 200 - 200));
        // The real layout: 5,571 chunks at most (and the partial one).
        let real = Announced {
            chunk: CHUNK as u64,
            head_bytes: 1_048_600,
            tail_bytes: TAIL_BYTES as u64,
        };
        assert_eq!(real.layout(1 << 40).0.len(), 5243 + 328 + 1);
        assert_eq!(real.layout(1_048_600).0.len(), 5243);
    }

    #[test]
    fn replace_word_replaces_whole_identifiers_only() {
        assert_eq!(
            replace_word("if (PART_INDEX == 0) { x(PART_INDEX); }", "PART_INDEX", "3"),
            "if (3 == 0) { x(3); }"
        );
        assert_eq!(replace_word("PART_INDEX", "PART_INDEX", "7"), "7");
        for same in [
            "MY_PART_INDEX + PART_INDEX_2",
            "#define PART_INDEXES 1",
            "xRL_END_SYM",
            "",
        ] {
            assert_eq!(replace_word(same, "PART_INDEX", "9"), same);
        }
        assert_eq!(
            replace_word("$base + RL_END_SYM) - TEARDOWN_SYM", "RL_END_SYM", "0x10"),
            "$base + 0x10) - TEARDOWN_SYM"
        );
        // A rejected match does not hide a real one right after it.
        assert_eq!(
            replace_word("A_SYMX_SYM X_SYM", "X_SYM", "1"),
            "A_SYMX_SYM 1"
        );
    }

    #[test]
    fn unhex_reads_rx_escapes_of_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let text: String = all.iter().map(|b| format!("\\x{b:02x}")).collect();
        assert_eq!(unhex(text.as_bytes()).unwrap(), all);
        assert_eq!(unhex(b"\\xAb\\xFF").unwrap(), vec![0xab, 0xff]);
        assert_eq!(unhex(b"").unwrap(), Vec::<u8>::new());
        for bad in [&b"\\x4"[..], b"\\xg0", b"/x41", b"\\X41", b"\\x41\\x4"] {
            assert!(unhex(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn p_record_keeps_an_empty_tty_and_spaces_in_comm() {
        let rec = b"BT2I2 P 10 11 12 1 0 5 9 1000 1001 4294967295 3 77 \
uprobe:/usr/bin/bash:readline_internal_teardown  my  comm ";
        let Ok(Record::Prov(tid, id, p)) = parse_record(rec) else {
            panic!("not a P record")
        };
        assert_eq!((tid, id), (11, 12));
        assert_eq!(
            (p.pid, p.stored, p.eof, p.len, p.ppid),
            (10, true, false, 5, 9)
        );
        assert_eq!(
            (p.uid, p.gid, p.loginuid, p.sessionid),
            (1000, 1001, u32::MAX, 3)
        );
        assert_eq!(p.cgroup, 77);
        assert_eq!(p.probe, "uprobe:/usr/bin/bash:readline_internal_teardown");
        assert_eq!(p.tty, b"");
        assert_eq!(p.comm, b"my  comm ");
        // A uid beyond 32 bits is not a uid.
        let big = b"BT2I2 P 10 11 12 1 0 5 9 4294967296 1 1 1 1 probe tty comm";
        assert!(parse_record(big).is_err());
    }

    #[test]
    fn s_record_is_the_rest_of_the_record_byte_for_byte() {
        let Ok(Record::Chunk { tid, id, off, data }) =
            parse_record(b"BT2I2 S 1 2 400  a \\x41\n\xff ")
        else {
            panic!("not a chunk")
        };
        assert_eq!((tid, id, off), (1, 2, 400));
        assert_eq!(data, b" a \\x41\n\xff ");
    }

    #[test]
    fn layout_before_the_b_record_is_the_configured_one() {
        let a = Assembler::new(ReadlineOptions {
            max_line_bytes: 1001,
            ..Default::default()
        });
        assert_eq!(
            a.layout(),
            Announced {
                chunk: 200,
                head_bytes: 1200,
                tail_bytes: TAIL_BYTES as u64
            }
        );
    }
}
