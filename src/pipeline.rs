//! The capture half of the agent: bytes from bpftrace (or a file) → decoded events → records
//! → the spool. Everything that arrives ends up as a record: lines that cannot be split are
//! kept raw and flagged, and losses (bpftrace's "Lost N events", bpftrace exits, torn spool
//! tails) become records of their own so the trail shows each gap.

use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::decode::{Decoder, Event, Format};
use crate::readline;
use crate::record::{Process, Record, Shaper, TypedLine};
use crate::script::{FieldValue, ScriptInfo, Split};
use crate::spool::{Entry, Spool, SpoolError};
use crate::supervisor::ChildMsg;

/// How output lines are turned into records.
pub enum Interpretation {
    /// The bashreadline chunk protocol: chunks are reassembled into whole typed lines.
    Readline(Box<readline::Assembler>),
    /// A user's script: printf lines split into named fields where possible.
    Script(Box<ScriptInfo>),
    /// No script known (ingest without --script): every line is kept as it is.
    Plain,
}

/// Counters of everything that passed, so a summary can account for every line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub records: u64,
    pub typed_lines: u64,
    pub events: u64,
    pub raw: u64,
    pub lost_events: u64,
    pub bpftrace_errors: u64,
    /// Times the capture announced it was attached and ready (once per bpftrace start).
    pub ready: u64,
    /// Events of the agent's own processes (bt2immu, its bpftrace, its local immudb), left
    /// out: recording them would feed back (each write causes more events to write).
    pub own_events: u64,
    /// Typed lines that did not arrive whole (stored flagged, with what arrived); part of
    /// `raw`.
    pub incomplete_lines: u64,
    /// Times bpftrace said its probes were attached.
    pub attached: u64,
}

pub struct Pipeline {
    format: Format,
    decoder: Decoder,
    interp: Interpretation,
    shaper: Shaper,
    spool: Arc<Mutex<Spool>>,
    echo: bool,
    own_pids: std::collections::HashSet<u64>,
    pub counts: Counts,
    /// When bpftrace died unasked; cleared, with a `capture_gap` loss record, once capture
    /// is back.
    down_since: Option<(chrono::DateTime<chrono::Utc>, std::time::Instant)>,
}

impl Pipeline {
    pub fn new(
        format: Format,
        interp: Interpretation,
        shaper: Shaper,
        spool: Arc<Mutex<Spool>>,
        echo: bool,
    ) -> Pipeline {
        Pipeline {
            format,
            decoder: Decoder::new(format),
            interp,
            shaper,
            spool,
            echo,
            own_pids: [u64::from(std::process::id())].into_iter().collect(),
            counts: Counts::default(),
            down_since: None,
        }
    }

    /// A process of the agent itself (e.g. a local immudb) whose events are not recorded.
    pub fn add_own_pid(&mut self, pid: u32) {
        self.own_pids.insert(pid.into());
    }

    pub fn shaper_mut(&mut self) -> &mut Shaper {
        &mut self.shaper
    }

    /// Feeds raw stdout bytes; complete records are durable in the spool when this returns.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        let events = self.decoder.push(bytes);
        let mut out = Vec::new();
        for ev in events {
            self.handle_event(ev, &mut out);
        }
        self.commit(out)
    }

    /// Something the supervisor saw: starts, exits, stderr lines.
    pub fn child(&mut self, msg: ChildMsg) -> Result<(), SpoolError> {
        match msg {
            ChildMsg::Stdout(b) => self.feed(&b),
            ChildMsg::Started { pid, attempt } => {
                self.own_pids.insert(pid.into());
                let mut d = Map::new();
                d.insert("bpftrace_pid".into(), json!(pid));
                d.insert("attempt".into(), json!(attempt));
                let r = self.shaper.agent("bpftrace_started", d);
                self.commit(vec![r])
            }
            ChildMsg::Stderr(line) => {
                let mut out = Vec::new();
                // bpftrace >= 0.24 reports lost events on stderr.
                if let Some(n) = parse_lost(&line) {
                    self.lost(n, &mut out);
                } else {
                    let mut d = Map::new();
                    crate::record::put_bytes(&mut d, "stderr", &line);
                    self.counts.bpftrace_errors += 1;
                    out.push(self.shaper.agent("bpftrace_stderr", d));
                }
                self.commit(out)
            }
            ChildMsg::Exited {
                code,
                signal,
                ran_for,
                requested,
            } => {
                // Whatever is pending belongs to the run that just ended.
                let mut out = Vec::new();
                self.end_of_stream(&mut out);
                let mut d = Map::new();
                d.insert("exit_code".into(), json!(code));
                d.insert("signal".into(), json!(signal));
                d.insert("ran_for_ms".into(), json!(ran_for.as_millis() as u64));
                d.insert("requested".into(), json!(requested));
                let event = if requested {
                    "bpftrace_stopped"
                } else {
                    if self.down_since.is_none() {
                        self.down_since = Some((chrono::Utc::now(), std::time::Instant::now()));
                    }
                    "bpftrace_died"
                };
                out.push(self.shaper.agent(event, d));
                self.decoder = Decoder::new(self.format);
                if let Interpretation::Readline(asm) = &mut self.interp {
                    // The next bpftrace announces itself again: a fresh assembler makes that
                    // `capture_ready` show when capture resumed.
                    **asm = readline::Assembler::new(asm.options().clone());
                }
                self.commit(out)
            }
        }
    }

    /// Called about once a second: typed lines whose pieces stopped arriving long ago are
    /// recorded as malformed instead of waiting forever.
    pub fn tick(&mut self) -> Result<(), SpoolError> {
        let mut out = Vec::new();
        if let Interpretation::Readline(asm) = &mut self.interp {
            for a in asm.flush_stale(std::time::Instant::now()) {
                self.readline_event(a, &mut out);
            }
        }
        self.commit(out)
    }

    /// End of input: flush partial lines and incomplete typed lines.
    pub fn finish(&mut self) -> Result<(), SpoolError> {
        let mut out = Vec::new();
        self.end_of_stream(&mut out);
        self.commit(out)
    }

    /// Appends agent-level records (start, stop, spool recovery).
    pub fn note(&mut self, event: &str, detail: Map<String, Value>) -> Result<(), SpoolError> {
        let r = self.shaper.agent(event, detail);
        self.commit(vec![r])
    }

    /// Records a loss that happened outside the stream (e.g. a torn spool tail).
    pub fn note_loss(
        &mut self,
        cause: &str,
        count: u64,
        detail: Map<String, Value>,
    ) -> Result<(), SpoolError> {
        let r = self.shaper.loss(cause, count, detail);
        self.commit(vec![r])
    }

    /// A loss whose size nobody can know: `count` is null.
    pub fn note_loss_uncounted(
        &mut self,
        cause: &str,
        detail: Map<String, Value>,
    ) -> Result<(), SpoolError> {
        let r = self.shaper.loss_uncounted(cause, detail);
        self.commit(vec![r])
    }

    fn end_of_stream(&mut self, out: &mut Vec<Record>) {
        for ev in self.decoder.finish() {
            self.handle_event(ev, out);
        }
        if let Interpretation::Readline(asm) = &mut self.interp {
            let pending = asm.finish();
            for a in pending {
                self.readline_event(a, out);
            }
        }
    }

    fn lost(&mut self, n: u64, out: &mut Vec<Record>) {
        self.counts.lost_events = self.counts.lost_events.saturating_add(n);
        let mut d = Map::new();
        d.insert(
            "detail".into(),
            json!("bpftrace's perf buffer overflowed: events were dropped in the kernel"),
        );
        out.push(self.shaper.loss("bpftrace_lost_events", n, d));
    }

    /// Capture works again after bpftrace died: whatever happened in between was not seen,
    /// and the trail says so as a loss (of unknown size), not only as agent events.
    fn capture_back(&mut self, out: &mut Vec<Record>) {
        let Some((since, at)) = self.down_since.take() else {
            return;
        };
        let mut d = Map::new();
        d.insert(
            "from".into(),
            json!(since.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)),
        );
        d.insert(
            "to".into(),
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)),
        );
        d.insert("gap_ms".into(), json!(at.elapsed().as_millis() as u64));
        d.insert(
            "detail".into(),
            json!("bpftrace died and was restarted: events in between were not captured"),
        );
        tracing::warn!(
            gap_ms = at.elapsed().as_millis() as u64,
            "capture resumed after bpftrace died; what happened in between was not captured"
        );
        out.push(self.shaper.loss_uncounted("capture_gap", d));
    }

    fn handle_event(&mut self, ev: Event, out: &mut Vec<Record>) {
        match ev {
            Event::Output(line) => self.output_line(line, out),
            Event::Lost { events } => self.lost(events, out),
            Event::Attached { probes } => {
                self.counts.attached += 1;
                let mut d = Map::new();
                d.insert("probes".into(), json!(probes));
                out.push(self.shaper.agent("bpftrace_attached", d));
                // The bashreadline script says when it is really ready (its BEGIN record);
                // other scripts are capturing once bpftrace says it attached.
                if !matches!(self.interp, Interpretation::Readline(_)) {
                    self.capture_back(out);
                }
            }
            Event::HelperError {
                helper,
                retcode,
                line,
                col,
                msg,
            } => {
                self.counts.bpftrace_errors += 1;
                let mut d = Map::new();
                d.insert("helper".into(), json!(helper));
                d.insert("retcode".into(), json!(retcode));
                d.insert("line".into(), json!(line));
                d.insert("col".into(), json!(col));
                d.insert("msg".into(), json!(msg));
                out.push(self.shaper.agent("bpftrace_helper_error", d));
            }
            Event::RuntimeError { msg } => {
                self.counts.bpftrace_errors += 1;
                let mut d = Map::new();
                d.insert("msg".into(), json!(msg));
                out.push(self.shaper.agent("bpftrace_runtime_error", d));
            }
            Event::Map { raw } => {
                let mut d = Map::new();
                crate::record::put_bytes(&mut d, "map", &raw);
                out.push(self.shaper.agent("bpftrace_map", d));
            }
            Event::ExitMarker => {}
            Event::Raw { bytes, reason } => {
                self.counts.raw += 1;
                out.push(self.shaper.raw(&bytes, &reason));
            }
        }
    }

    fn output_line(&mut self, line: Vec<u8>, out: &mut Vec<Record>) {
        if line.len() > crate::record::MAX_FIELD_BYTES {
            // Too big to be split into fields as well: keep it whole (cut, with its length and
            // tail) and flagged.
            self.counts.raw += 1;
            out.push(self.shaper.raw(&line, "line too long to split into fields"));
            return;
        }
        match &mut self.interp {
            Interpretation::Readline(asm) => {
                let was_ready = asm.announced().is_some();
                let assembled = asm.push(&line);
                let ready = (!was_ready).then(|| asm.announced()).flatten();
                for a in assembled {
                    self.readline_event(a, out);
                }
                if let Some(a) = ready {
                    self.counts.ready += 1;
                    self.capture_back(out);
                    // The script's BEGIN runs after every probe is attached: from here on,
                    // every line typed is captured.
                    let mut d = Map::new();
                    d.insert("chunk_bytes".into(), json!(a.chunk));
                    d.insert("head_bytes".into(), json!(a.head_bytes));
                    d.insert("tail_bytes".into(), json!(a.tail_bytes));
                    out.push(self.shaper.agent("capture_ready", d));
                }
            }
            Interpretation::Script(info) => match info.split_line(&line) {
                Split::Fields { probe, fields, .. } => {
                    let pid = fields.iter().find_map(|(n, v)| match (n.as_str(), v) {
                        ("pid", FieldValue::Int(p)) => u64::try_from(*p).ok(),
                        ("pid", FieldValue::UInt(p)) => Some(*p),
                        _ => None,
                    });
                    if pid.is_some_and(|p| self.own_pids.contains(&p)) {
                        self.counts.own_events += 1;
                        return;
                    }
                    self.counts.events += 1;
                    let mut m = Map::new();
                    for (name, value) in fields {
                        match (value.to_json(), &value) {
                            (Some(v), _) => {
                                m.insert(name, v);
                            }
                            (None, FieldValue::Str(bytes)) => {
                                crate::record::put_bytes(&mut m, &name, bytes)
                            }
                            (None, _) => {}
                        }
                    }
                    out.push(self.shaper.fields(&probe, m, &line));
                }
                // The header and banners are the script's own constant text, not events.
                Split::Header { .. } | Split::Literal { .. } => {}
                Split::Raw { reason } => {
                    self.counts.raw += 1;
                    out.push(self.shaper.raw(&line, &reason));
                }
            },
            Interpretation::Plain => {
                self.counts.events += 1;
                out.push(self.shaper.fields("", Map::new(), &line));
            }
        }
    }

    fn readline_event(&mut self, a: readline::AssembledEvent, out: &mut Vec<Record>) {
        match a {
            readline::AssembledEvent::Line(l) => {
                self.counts.typed_lines += 1;
                if l.truncated {
                    // The record says so too; the operator should hear it now: the part of
                    // the line that was not kept could hold a command.
                    tracing::warn!(
                        pid = l.pid,
                        uid = l.uid,
                        tty = %String::from_utf8_lossy(&l.tty),
                        len = l.len,
                        kept_head = l.line.len(),
                        kept_tail = l.tail.as_ref().map_or(0, Vec::len),
                        "a typed line longer than the limit was stored cut; what lies between \
                         its head and its tail was not captured (raise --max-line-bytes)"
                    );
                }
                let p = process_of(&l);
                let mut extra = Map::new();
                if let Some(off) = l.tail_offset {
                    extra.insert("tail_offset".into(), json!(off));
                }
                if l.eof {
                    // Ctrl-D at an empty prompt: the shell got end-of-file, not a line.
                    extra.insert("eof".into(), json!(true));
                }
                if l.executed {
                    // Not typed as a line: run from the editor (C-x C-e, fc) or a bind -x key.
                    extra.insert("executed".into(), json!(true));
                    if l.executed_cut {
                        extra.insert("executed_cut".into(), json!(true));
                    }
                }
                if l.line_editing_off {
                    // Read from the terminal without readline (`set +o emacs`, --noediting).
                    extra.insert("line_editing_off".into(), json!(true));
                    if l.executed_cut {
                        extra.insert("read_cut".into(), json!(true));
                    }
                }
                let typed = TypedLine {
                    probe: &l.probe,
                    line: &l.line,
                    len: l.len,
                    truncated: l.truncated,
                    tail: l.tail.as_deref(),
                    extra,
                };
                out.push(self.shaper.readline(&p, Some(l.nsecs), &typed));
            }
            readline::AssembledEvent::Incomplete(inc) => {
                // Flagged like a raw record, but shaped as a typed line: the bytes that did
                // arrive are decoded and kept at their offsets, so losing one chunk cannot
                // hide a command in the others.
                self.counts.raw += 1;
                self.counts.incomplete_lines += 1;
                // Every one is in the trail; the log gets the first few and then every
                // power of two, so damaged input cannot flood it.
                let n = self.counts.incomplete_lines;
                if n <= 10 || n.is_power_of_two() {
                    tracing::warn!(tid = inc.tid, count = n, "{}", inc.reason);
                }
                let p = match &inc.about {
                    Some(l) => process_of(l),
                    None => Process {
                        tid: Some(inc.tid),
                        ..Process::default()
                    },
                };
                let mut extra = Map::new();
                extra.insert("incomplete".into(), json!(true));
                extra.insert("reason".into(), json!(inc.reason));
                if inc.about.is_none() {
                    extra.insert("provenance_lost".into(), json!(true));
                }
                let (head, rest): (&[u8], &[(u64, Vec<u8>)]) = match inc.pieces.first() {
                    Some((0, bytes)) => (bytes, &inc.pieces[1..]),
                    _ => (&[], &inc.pieces[..]),
                };
                let pieces: Vec<Value> = rest
                    .iter()
                    .map(|(off, bytes)| {
                        let mut m = Map::new();
                        m.insert("off".into(), json!(off));
                        crate::record::put_bytes_capped(
                            &mut m,
                            "text",
                            bytes,
                            crate::record::MAX_TYPED_LINE_BYTES,
                        );
                        Value::Object(m)
                    })
                    .collect();
                extra.insert("pieces".into(), Value::Array(pieces));
                let missing: Vec<Value> = inc.missing.iter().map(|(o, l)| json!([o, l])).collect();
                extra.insert("missing".into(), Value::Array(missing));
                let end = inc
                    .pieces
                    .last()
                    .map_or(0, |(o, b)| o.saturating_add(b.len() as u64));
                if let Some(off) = inc.about.as_ref().and_then(|l| l.tail_offset) {
                    extra.insert("tail_offset".into(), json!(off));
                }
                let typed = TypedLine {
                    probe: inc.about.as_ref().map_or("", |l| l.probe.as_str()),
                    line: head,
                    len: inc.about.as_ref().map_or(end, |l| l.len),
                    truncated: inc.about.as_ref().is_some_and(|l| l.truncated),
                    tail: None,
                    extra,
                };
                out.push(self.shaper.readline(&p, Some(inc.id), &typed));
            }
            readline::AssembledEvent::Malformed { raw, reason } => {
                self.counts.raw += 1;
                out.push(self.shaper.raw(&raw, &reason));
            }
        }
    }

    fn commit(&mut self, records: Vec<Record>) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        // In slices: a flush that gives up thousands of lines at once must not hold all of
        // their serialised values at the same time.
        for slice in records.chunks(1000) {
            let entries: Vec<Entry> = slice
                .iter()
                .map(|r| Entry {
                    seq: r.seq,
                    key: r.key.clone().into_bytes(),
                    value: r.value_bytes(),
                })
                .collect();
            self.spool.lock().expect("spool lock").append(&entries)?;
        }
        self.counts.records += records.len() as u64;
        if self.echo {
            use std::io::Write;
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            for r in &records {
                let line = json!({"key": r.key, "value": r.value});
                let _ = writeln!(lock, "{line}");
            }
            let _ = lock.flush();
        }
        Ok(())
    }
}

/// What the readline probe saw of the task that typed a line.
fn process_of(l: &readline::ReadlineLine) -> Process {
    Process {
        pid: Some(l.pid),
        tid: Some(l.tid),
        ppid: Some(l.ppid),
        uid: Some(l.uid),
        gid: Some(l.gid),
        loginuid: Some(l.loginuid),
        sessionid: Some(l.sessionid),
        tty: crate::record::tty_name(&l.tty),
        comm: Some(String::from_utf8_lossy(&l.comm).into_owned()),
        cgroup: Some(l.cgroup),
    }
}

/// `Lost 12 events` (bpftrace text, on stdout before 0.24 and on stderr from 0.24).
pub fn parse_lost(line: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(line).ok()?.trim();
    let n = s.strip_prefix("Lost ")?.strip_suffix(" events")?;
    n.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::HostContext;
    use std::time::Duration;

    fn values(spool: &Arc<Mutex<Spool>>) -> Vec<Value> {
        let mut r = spool.lock().unwrap().reader();
        r.read_batch(10_000, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| serde_json::from_slice(&e.value).unwrap())
            .collect()
    }

    fn exited(requested: bool) -> ChildMsg {
        ChildMsg::Exited {
            code: Some(if requested { 0 } else { 137 }),
            signal: None,
            ran_for: Duration::from_secs(3),
            requested,
        }
    }

    #[test]
    fn a_bpftrace_death_leaves_an_uncounted_loss_once_capture_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let spool = Arc::new(Mutex::new(spool));
        let shaper = Shaper::new(HostContext::new("h".into(), "b".into()), "t", None, 1);
        let mut p = Pipeline::new(
            Format::Json,
            Interpretation::Plain,
            shaper,
            spool.clone(),
            false,
        );
        let attached = b"{\"type\": \"attached_probes\", \"data\": {\"probes\": 1}}\n";
        p.child(ChildMsg::Started {
            pid: 10,
            attempt: 1,
        })
        .unwrap();
        p.feed(attached).unwrap();
        // Asked to stop: no gap.
        p.child(exited(true)).unwrap();
        p.child(ChildMsg::Started {
            pid: 11,
            attempt: 1,
        })
        .unwrap();
        p.feed(attached).unwrap();
        assert!(values(&spool).iter().all(|v| v["kind"] != "loss"));
        // Died: the gap is recorded when capture is back, once.
        p.child(exited(false)).unwrap();
        p.child(ChildMsg::Started {
            pid: 12,
            attempt: 2,
        })
        .unwrap();
        assert!(
            values(&spool).iter().all(|v| v["kind"] != "loss"),
            "not before it is back"
        );
        p.feed(attached).unwrap();
        p.feed(attached).unwrap();
        let losses: Vec<Value> = values(&spool)
            .into_iter()
            .filter(|v| v["kind"] == "loss")
            .collect();
        assert_eq!(losses.len(), 1, "{losses:?}");
        assert_eq!(losses[0]["cause"], "capture_gap");
        assert!(
            losses[0]["count"].is_null(),
            "an unknown count is null, not 0"
        );
        assert!(losses[0]["gap_ms"].as_u64().is_some());
        assert!(losses[0]["from"].as_str().unwrap() <= losses[0]["to"].as_str().unwrap());
    }
}
