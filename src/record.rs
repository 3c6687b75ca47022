//! Shaping decoded events into audit records: JSON values with provenance, and keys.
//!
//! A record's key is fixed the moment the record is made and travels with it through the spool,
//! so a replay after a crash writes the *same* key again and immudb's "key must not exist"
//! precondition turns the replay into a no-op instead of a duplicate.
//!
//! Key layout: `<source>:<host>:<UTC time, fixed width, ns>:<seq, 16 digits>` — unique (the
//! agent's sequence number is never reused), ordered in time, and scannable by prefix per source
//! (`bash:`) and per host (`bash:web1:`).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde_json::{json, Map, Value};

/// Version of the record schema (`v` in every record).
pub const SCHEMA_VERSION: u64 = 1;

/// Facts about the host the agent runs on, read once at start.
#[derive(Debug, Clone)]
pub struct HostContext {
    pub host: String,
    pub boot_id: String,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC in ns: bpftrace's `nsecs` is monotonic, and this turns
    /// it into wall-clock time of the event itself rather than of its arrival.
    mono_to_wall_ns: i128,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; the clocks used always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// The monotonic clock bpftrace's `nsecs` uses.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

impl HostContext {
    pub fn detect() -> io::Result<HostContext> {
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")?
            .trim()
            .to_string();
        Ok(HostContext::new(host, boot_id))
    }

    pub fn new(host: String, boot_id: String) -> HostContext {
        let mono_to_wall_ns = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC);
        HostContext {
            host,
            boot_id,
            mono_to_wall_ns,
        }
    }

    pub fn wall_from_mono(&self, mono_ns: u64) -> DateTime<Utc> {
        let ns = mono_ns as i128 + self.mono_to_wall_ns;
        Utc.timestamp_nanos(ns.clamp(0, i64::MAX as i128) as i64)
    }
}

/// Resolves uids to names from the passwd database, caching what it found.
#[derive(Debug, Default)]
pub struct Users {
    cache: HashMap<u32, Option<String>>,
}

impl Users {
    pub fn name(&mut self, uid: u32) -> Option<String> {
        self.cache
            .entry(uid)
            .or_insert_with(|| lookup_user(uid))
            .clone()
    }
}

fn lookup_user(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into pwd and buf, which outlive the call; result is checked.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: pw_name points into buf and is NUL-terminated on success.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// The kernel names a pty `pts3`; people and `ps` know it as `pts/3`. Other names stay as
/// they are; an empty name means no terminal.
pub fn tty_name(kernel: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(kernel);
    if s.is_empty() {
        return None;
    }
    match s.strip_prefix("pts") {
        Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            Some(format!("pts/{n}"))
        }
        _ => Some(s.into_owned()),
    }
}

/// Which script produced the records.
#[derive(Debug, Clone)]
pub struct ScriptRef {
    pub path: String,
    pub sha256: String,
}

/// Process facts an event carries (whatever the probe could see).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    pub pid: Option<u64>,
    pub tid: Option<u64>,
    pub ppid: Option<u64>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub loginuid: Option<u32>,
    pub sessionid: Option<u32>,
    pub tty: Option<String>,
    pub comm: Option<String>,
    pub cgroup: Option<u64>,
}

/// What a readline probe saw of one typed line.
#[derive(Debug, Clone, Default)]
pub struct TypedLine<'a> {
    pub probe: &'a str,
    /// The captured bytes (the head of the line when it was cut).
    pub line: &'a [u8],
    /// The real length of the line in bytes.
    pub len: u64,
    pub truncated: bool,
    /// The end of a cut line, so padding cannot push a command out of the record.
    pub tail: Option<&'a [u8]>,
    /// Anything else the capture knows (e.g. flags about how the line was assembled).
    pub extra: Map<String, Value>,
}

/// A shaped record, ready for the spool.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub key: String,
    pub value: Value,
}

impl Record {
    pub fn value_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.value).expect("a JSON value always serialises")
    }
}

/// Makes records for one source, numbering them with the agent's sequence.
pub struct Shaper {
    ctx: HostContext,
    source: String,
    script: Option<ScriptRef>,
    users: Users,
    next_seq: u64,
    /// Events happen now (from a running bpftrace), so `/proc/<pid>` describes their process.
    /// False for replayed output, where today's pid may be another process.
    live: bool,
}

/// The most bytes of one field kept in a record. Escaping can grow bytes sixfold in JSON
/// (`\u0001`), and a record must stay far below immudb's 32 MiB message limit, so a longer
/// field is stored cut: its head, its last [`TAIL_BYTES`] (`<name>_tail`), its real length
/// (`<name>_len`) and `<name>_cut: true`. Nothing is silently dropped.
pub const MAX_FIELD_BYTES: usize = 256 * 1024;
/// How much of the end of a cut field is kept.
pub const TAIL_BYTES: usize = 4096;
/// The cap for a typed line's own bytes: above the longest head the readline capture can be
/// set to (`readline::MAX_LINE_BYTES`), so the capture's limit is the one that applies, and
/// small enough that a worst-case escaped line stays below immudb's 32 MiB message limit.
pub const MAX_TYPED_LINE_BYTES: usize = 4 * 1024 * 1024;

/// Puts bytes into a record: a string when they are UTF-8, otherwise a readable form (invalid
/// bytes as `\xNN`) plus `<name>_b64` with the exact bytes. Over [`MAX_FIELD_BYTES`] the field
/// is cut (see there).
pub fn put_bytes(map: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    put_bytes_capped(map, name, bytes, MAX_FIELD_BYTES)
}

/// [`put_bytes`] with another cap than [`MAX_FIELD_BYTES`] (at least twice [`TAIL_BYTES`]).
pub fn put_bytes_capped(map: &mut Map<String, Value>, name: &str, bytes: &[u8], cap: usize) {
    if bytes.len() > cap {
        let head = &bytes[..cap - TAIL_BYTES];
        let tail = &bytes[bytes.len() - TAIL_BYTES..];
        put_exact(map, name, head);
        put_exact(map, &format!("{name}_tail"), tail);
        map.insert(format!("{name}_len"), json!(bytes.len()));
        map.insert(format!("{name}_cut"), json!(true));
    } else {
        put_exact(map, name, bytes);
    }
}

fn put_exact(map: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            map.insert(name.into(), Value::String(s.into()));
        }
        Err(_) => {
            map.insert(name.into(), Value::String(readable(bytes)));
            map.insert(
                format!("{name}_b64"),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
        }
    }
}

/// Valid UTF-8 runs as they are, each invalid byte as `\xNN`.
pub fn readable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The exact bytes of a field stored with [`put_bytes`].
pub fn get_bytes(map: &Map<String, Value>, name: &str) -> Option<Vec<u8>> {
    if let Some(Value::String(b64)) = map.get(&format!("{name}_b64")) {
        return base64::engine::general_purpose::STANDARD.decode(b64).ok();
    }
    match map.get(name) {
        Some(Value::String(s)) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// A record's key: made of its value's source, host, time and seq, so a value stored under any
/// other key is not where its agent put it.
fn key_of(source: &str, host: &str, ts: &DateTime<Utc>, seq: u64) -> String {
    format!(
        "{source}:{host}:{}:{seq:016}",
        ts.format("%Y%m%dT%H%M%S%.9fZ")
    )
}

/// The key a stored record must be under, from its value; `None` when the value lacks what an
/// agent writes into every record.
pub fn expected_key(value: &Value) -> Option<String> {
    let s = |k: &str| value.get(k).and_then(Value::as_str);
    let ts = DateTime::parse_from_rfc3339(s("ts")?)
        .ok()?
        .with_timezone(&Utc);
    let seq = value.get("seq").and_then(Value::as_u64)?;
    Some(key_of(s("source")?, s("host")?, &ts, seq))
}

/// A source name made safe for keys: `[a-z0-9_.-]`, never empty, no `:`.
pub fn source_name(raw: &str) -> String {
    let s: String = raw
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' | '-' | '.' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    // Not `.` or `..`: the source names a directory of the spool.
    let s = match s.strip_prefix('.') {
        Some(rest) => format!("_{rest}"),
        None => s,
    };
    if s.is_empty() {
        "bpftrace".into()
    } else {
        s
    }
}

/// The script's file stem as a source name (`execsnoop.bt` → `execsnoop`).
pub fn source_for_script(path: &Path) -> String {
    source_name(
        &path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

impl Shaper {
    pub fn new(ctx: HostContext, source: &str, script: Option<ScriptRef>, next_seq: u64) -> Self {
        Shaper {
            ctx,
            source: source_name(source),
            script,
            users: Users::default(),
            next_seq,
            live: true,
        }
    }

    /// Marks the events as replayed (`ingest`): nothing is looked up on the live system.
    pub fn replayed(mut self) -> Self {
        self.live = false;
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn host(&self) -> &HostContext {
        &self.ctx
    }

    /// The key prefix under which this agent's records for its source are scannable.
    pub fn key_prefix(&self) -> String {
        format!("{}:{}:", self.source, self.ctx.host)
    }

    fn make(&mut self, kind: &str, mono_ns: Option<u64>, body: Map<String, Value>) -> Record {
        let seq = self.next_seq;
        self.next_seq += 1;
        let ts = match mono_ns {
            Some(ns) => self.ctx.wall_from_mono(ns),
            None => Utc::now(),
        };
        let mut v = Map::new();
        v.insert("v".into(), json!(SCHEMA_VERSION));
        v.insert("kind".into(), json!(kind));
        v.insert("source".into(), json!(self.source));
        v.insert("host".into(), json!(self.ctx.host));
        v.insert("boot_id".into(), json!(self.ctx.boot_id));
        v.insert("seq".into(), json!(seq));
        v.insert(
            "ts".into(),
            json!(ts.to_rfc3339_opts(SecondsFormat::Nanos, true)),
        );
        if let Some(ns) = mono_ns {
            v.insert("mono_ns".into(), json!(ns));
        }
        if let Some(s) = &self.script {
            v.insert("script".into(), json!(s.path));
            v.insert("script_sha256".into(), json!(s.sha256));
        }
        for (k, val) in body {
            v.insert(k, val);
        }
        let key = key_of(&self.source, &self.ctx.host, &ts, seq);
        Record {
            seq,
            key,
            value: Value::Object(v),
        }
    }

    fn put_process(&mut self, m: &mut Map<String, Value>, p: &Process) {
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        put("pid", p.pid.map(|x| json!(x)));
        put("tid", p.tid.map(|x| json!(x)));
        put("ppid", p.ppid.map(|x| json!(x)));
        put("uid", p.uid.map(|x| json!(x)));
        put("gid", p.gid.map(|x| json!(x)));
        // The kernel reports "unset" as u32::MAX; keep it as -1 like auditd does.
        let unset = |x: u32| if x == u32::MAX { json!(-1) } else { json!(x) };
        put("loginuid", p.loginuid.map(unset));
        put("sessionid", p.sessionid.map(unset));
        put("tty", p.tty.as_ref().map(|x| json!(x)));
        put("comm", p.comm.as_ref().map(|x| json!(x)));
        put("cgroup", p.cgroup.map(|x| json!(x)));
        if let Some(uid) = p.uid {
            m.insert("user".into(), json!(self.users.name(uid)));
        }
        if let Some(luid) = p.loginuid.filter(|&x| x != u32::MAX) {
            m.insert("login_user".into(), json!(self.users.name(luid)));
        }
        if let Some(pid) = p.pid.filter(|_| self.live) {
            if let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe")) {
                m.insert("exe".into(), json!(exe.to_string_lossy()));
            }
        }
    }

    /// A line typed into an interactive shell.
    pub fn readline(&mut self, proc_: &Process, mono_ns: Option<u64>, typed: &TypedLine) -> Record {
        let mut m = Map::new();
        self.put_process(&mut m, proc_);
        m.insert("probe".into(), json!(typed.probe));
        put_bytes_capped(&mut m, "line", typed.line, MAX_TYPED_LINE_BYTES);
        m.insert("len".into(), json!(typed.len));
        m.insert("truncated".into(), json!(typed.truncated));
        if let Some(tail) = typed.tail {
            put_bytes(&mut m, "tail", tail);
        }
        for (k, v) in &typed.extra {
            m.insert(k.clone(), v.clone());
        }
        self.make("readline", mono_ns, m)
    }

    /// A printf line of a user's script, split into named fields.
    pub fn fields(&mut self, probe: &str, fields: Map<String, Value>, line: &[u8]) -> Record {
        let mut m = Map::new();
        let mut p = Process::default();
        if let Some(pid) = fields.get("pid").and_then(Value::as_u64) {
            p.pid = Some(pid);
        }
        if let Some(uid) = fields.get("uid").and_then(Value::as_u64) {
            p.uid = u32::try_from(uid).ok();
        }
        self.put_process(&mut m, &p);
        m.insert("probe".into(), json!(probe));
        m.insert("fields".into(), Value::Object(fields));
        put_bytes(&mut m, "line", line);
        self.make("event", None, m)
    }

    /// Output that could not be split or decoded: kept whole, flagged.
    pub fn raw(&mut self, bytes: &[u8], reason: &str) -> Record {
        let mut m = Map::new();
        m.insert("raw".into(), json!(true));
        m.insert("reason".into(), json!(reason));
        put_bytes(&mut m, "line", bytes);
        self.make("raw", None, m)
    }

    /// A gap in the trail that could not be avoided, recorded so the trail shows it.
    pub fn loss(&mut self, cause: &str, count: u64, detail: Map<String, Value>) -> Record {
        let mut m = detail;
        m.insert("cause".into(), json!(cause));
        m.insert("count".into(), json!(count));
        self.make("loss", None, m)
    }

    /// A loss whose size nobody can know (e.g. lines typed while bpftrace was restarting):
    /// `count` is null, never a made-up number.
    pub fn loss_uncounted(&mut self, cause: &str, detail: Map<String, Value>) -> Record {
        let mut m = detail;
        m.insert("cause".into(), json!(cause));
        m.insert("count".into(), Value::Null);
        self.make("loss", None, m)
    }

    /// A fact about the agent or bpftrace itself (start, stop, restart, errors).
    pub fn agent(&mut self, event: &str, detail: Map<String, Value>) -> Record {
        let mut m = detail;
        m.insert("event".into(), json!(event));
        m.insert("agent_pid".into(), json!(std::process::id()));
        self.make("agent", None, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_name_is_never_a_path_step() {
        assert_eq!(source_name(".."), "_.");
        assert_eq!(source_name("."), "_");
        assert_eq!(source_name(".hidden"), "_hidden");
        assert_eq!(source_name("a/../b"), "a_.._b");
        assert_eq!(source_name("Exec Snoop"), "exec_snoop");
        assert_eq!(source_name(""), "bpftrace");
    }

    fn shaper() -> Shaper {
        Shaper::new(
            HostContext::new("web1".into(), "b00t".into()),
            "bash",
            Some(ScriptRef {
                path: "scripts/bashreadline.bt".into(),
                sha256: "00".into(),
            }),
            7,
        )
    }

    #[test]
    fn readline_record_has_provenance_and_exact_bytes() {
        let mut s = shaper();
        let p = Process {
            pid: Some(42),
            uid: Some(0),
            loginuid: Some(u32::MAX),
            tty: Some("pts0".into()),
            comm: Some("bash".into()),
            ..Default::default()
        };
        let line = b"echo \xff\xfe caf\xc3\xa9";
        let typed = TypedLine {
            probe: "uretprobe",
            line,
            len: 13,
            ..Default::default()
        };
        let r = s.readline(&p, Some(monotonic_ns()), &typed);
        assert_eq!(r.seq, 7);
        assert!(r.key.starts_with("bash:web1:"), "{}", r.key);
        assert!(r.key.ends_with(":0000000000000007"), "{}", r.key);
        let v = r.value.as_object().unwrap();
        assert_eq!(v["user"], json!("root"));
        assert_eq!(v["loginuid"], json!(-1));
        assert_eq!(v["line"], json!("echo \\xff\\xfe café"));
        assert_eq!(get_bytes(v, "line").unwrap(), line.to_vec());
        assert_eq!(v["len"], json!(13));
        assert_eq!(v["truncated"], json!(false));
        assert_eq!(v["seq"], json!(7));
        assert_eq!(v["v"], json!(SCHEMA_VERSION));
        let ts = v["ts"].as_str().unwrap();
        assert!(DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
        assert_eq!(ts.len(), "2026-12-03T16:29:26.123456789Z".len());
        let next = s.raw(b"x", "test");
        assert_eq!(next.seq, 8);
    }

    #[test]
    fn a_huge_field_is_cut_with_its_length_and_tail() {
        let mut m = Map::new();
        let mut big = vec![1u8; MAX_FIELD_BYTES * 3];
        big.extend_from_slice(b"rm -rf /");
        put_bytes(&mut m, "line", &big);
        assert_eq!(m["line_len"], json!(big.len()));
        assert_eq!(m["line_cut"], json!(true));
        assert!(get_bytes(&m, "line_tail").unwrap().ends_with(b"rm -rf /"));
        let v = serde_json::to_vec(&Value::Object(m)).unwrap();
        assert!(v.len() < 2 * 1024 * 1024, "{}", v.len());
        let mut m = Map::new();
        put_bytes(&mut m, "line", &vec![0xffu8; MAX_FIELD_BYTES * 3]);
        let v = serde_json::to_vec(&Value::Object(m)).unwrap();
        assert!(v.len() < 2 * 1024 * 1024, "{}", v.len());
    }

    #[test]
    fn keys_sort_in_time_order() {
        let mut s = shaper();
        let t = TypedLine::default();
        let a = s.readline(&Process::default(), Some(1_000), &t);
        let b = s.readline(&Process::default(), Some(2_000), &t);
        assert!(a.key < b.key);
    }

    #[test]
    fn tty_names_read_like_ps() {
        assert_eq!(tty_name(b"pts12").as_deref(), Some("pts/12"));
        assert_eq!(tty_name(b"tty1").as_deref(), Some("tty1"));
        assert_eq!(tty_name(b"ptsx").as_deref(), Some("ptsx"));
        assert_eq!(tty_name(b""), None);
    }

    #[test]
    fn source_names_are_safe_for_keys() {
        assert_eq!(source_name("Exec:Snoop/1"), "exec_snoop_1");
        assert_eq!(source_name(""), "bpftrace");
        assert_eq!(source_for_script(Path::new("/x/execsnoop.bt")), "execsnoop");
    }
}
