//! The durable on-disk queue between capture and immudb.
//!
//! bpftrace's output cannot be replayed, so a record must be on disk before anything else
//! happens to it: the capture side appends and fsyncs, the sink reads forward from its own
//! cursor and acknowledges a record only after immudb committed it and the proof checked. A
//! crash at any point therefore loses nothing that was appended; on restart everything after
//! the last acknowledgement is sent again, and the sink's "key must not exist" writes make that
//! replay idempotent.
//!
//! Layout of the spool directory:
//! - `seg-<first seq, 20 digits>.log`: append-only segments of frames
//!   `u32 len (BE) | u32 crc32 (BE) of payload | payload`, payload = `u64 seq (BE) | u16 key len
//!   (BE) | key | value`.
//! - `ack`: the highest acknowledged sequence number, replaced atomically.
//!
//! A frame whose length or checksum does not match at the end of the newest segment is a torn
//! write from a crash: it is cut off and counted (`Recovery::torn_bytes`), never silently used.
//! The same damage anywhere else is corruption: `open` refuses it, and the agent moves the
//! damaged spool aside and carries on with what [`salvage`] can still read from it (every frame
//! with a good checksum), so a flipped bit costs the records it hit, not the recording.
//!
//! Sequence numbers are strictly increasing but may have gaps: records lost to damage keep
//! their numbers unused, so the trail shows where they were.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Segments are rotated at this size so acknowledged data can be deleted.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// A frame larger than this is corruption, not data (immudb values are at most 32 MiB).
const MAX_FRAME: u32 = 40 * 1024 * 1024;
const FRAME_HEADER: usize = 8;
/// Sequence numbers stay far below `u64::MAX`, so `+ 1` never wraps: a number above this (in
/// a frame, a floor, or a record found in immudb) is damage or forgery, not data.
pub const MAX_SEQ: u64 = 1 << 62;

#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("spool I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spool is corrupted at {path} offset {offset}: {reason}")]
    Corrupted {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("spool sequence must increase: got {got} after {last}")]
    OutOfOrder { got: u64, last: u64 },
    #[error("sequence number {0} is beyond what the spool accepts")]
    SeqTooLarge(u64),
    #[error("spool key too long ({0} bytes)")]
    KeyTooLong(usize),
    #[error("record of {0} bytes is larger than the spool accepts")]
    TooLarge(usize),
}

type Result<T> = std::result::Result<T, SpoolError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One spooled record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// What opening the spool found on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records appended but not acknowledged before the last stop: they will be sent again.
    pub pending: u64,
    /// Bytes of a torn last frame that was cut off (a crash during append).
    pub torn_bytes: u64,
    pub acked: u64,
    pub next_seq: u64,
}

/// Where the committed end of the spool is; the reader never reads past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
    pub last_seq: u64,
}

/// The writing side. Appends are durable when `append` returns.
pub struct Spool {
    dir: PathBuf,
    current: Segment,
    next_seq: u64,
    acked: u64,
    /// Unused sequence numbers above `acked` (inclusive ranges): what `pending` must not count.
    gaps: Vec<(u64, u64)>,
    segments: Vec<u64>,
    committed: tokio::sync::watch::Sender<Position>,
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
    file: File,
    len: u64,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("seg-{first_seq:020}.log"))
}

fn encode_frame(entry: &Entry, out: &mut Vec<u8>) -> Result<()> {
    let key_len =
        u16::try_from(entry.key.len()).map_err(|_| SpoolError::KeyTooLong(entry.key.len()))?;
    let payload_len = 8 + 2 + entry.key.len() + entry.value.len();
    if payload_len > MAX_FRAME as usize {
        // Never write a frame that reading back would call corruption.
        return Err(SpoolError::TooLarge(payload_len));
    }
    let mut payload = Vec::with_capacity(payload_len);
    payload.extend_from_slice(&entry.seq.to_be_bytes());
    payload.extend_from_slice(&key_len.to_be_bytes());
    payload.extend_from_slice(&entry.key);
    payload.extend_from_slice(&entry.value);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Outcome of reading one frame.
enum Frame {
    Entry(Entry, u64),
    /// Clean end of data.
    End,
    /// Incomplete or damaged frame; `declared_end` is where it claims to end, when its
    /// header was readable and plausible.
    Bad(String, Option<u64>),
}

fn read_frame<R: Read>(r: &mut R, offset: u64) -> io::Result<Frame> {
    let mut header = [0u8; FRAME_HEADER];
    let mut got = 0;
    while got < FRAME_HEADER {
        let n = r.read(&mut header[got..])?;
        if n == 0 {
            return Ok(if got == 0 {
                Frame::End
            } else {
                Frame::Bad(format!("frame header cut after {got} bytes"), None)
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(header[0..4].try_into().unwrap());
    let crc = u32::from_be_bytes(header[4..8].try_into().unwrap());
    if !(10..=MAX_FRAME).contains(&len) {
        return Ok(Frame::Bad(format!("implausible frame length {len}"), None));
    }
    let declared_end = Some(offset + FRAME_HEADER as u64 + len as u64);
    let mut payload = vec![0u8; len as usize];
    let mut filled = 0;
    while filled < payload.len() {
        let n = r.read(&mut payload[filled..])?;
        if n == 0 {
            return Ok(Frame::Bad(
                format!("frame cut after {filled} of {len} payload bytes"),
                declared_end,
            ));
        }
        filled += n;
    }
    if crc32fast::hash(&payload) != crc {
        return Ok(Frame::Bad("checksum mismatch".into(), declared_end));
    }
    let seq = u64::from_be_bytes(payload[0..8].try_into().unwrap());
    let key_len = u16::from_be_bytes(payload[8..10].try_into().unwrap()) as usize;
    if 10 + key_len > payload.len() {
        return Ok(Frame::Bad("key length beyond frame".into(), declared_end));
    }
    let key = payload[10..10 + key_len].to_vec();
    let value = payload[10 + key_len..].to_vec();
    Ok(Frame::Entry(
        Entry { seq, key, value },
        offset + FRAME_HEADER as u64 + len as u64,
    ))
}

/// A crash during an append can only damage the last frame of the newest segment: either the
/// frame runs to (or past) the end of the file, or what follows is the zero fill a file system
/// may leave after an interrupted extension. Anything else is corruption.
fn is_torn_tail(path: &Path, offset: u64, total: u64, declared_end: Option<u64>) -> Result<bool> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let rest = &bytes[(offset as usize).min(bytes.len())..];
    // Whatever the damaged frame claims, a complete, checksummed frame further on proves that
    // appends went on after it: that is damage to fsynced data, not a torn last write.
    if valid_frame_after(rest) {
        return Ok(false);
    }
    if declared_end.is_some_and(|end| end >= total) {
        return Ok(true);
    }
    let header_cut = rest.len() < FRAME_HEADER;
    Ok(header_cut || rest[FRAME_HEADER..].iter().all(|&b| b == 0) && declared_end.is_none())
}

/// Is there a whole frame with a good checksum anywhere after the first byte of `rest`?
fn valid_frame_after(rest: &[u8]) -> bool {
    next_valid_frame(rest).is_some()
}

/// Where the first whole frame with a good checksum after the first byte of `rest` starts.
fn next_valid_frame(rest: &[u8]) -> Option<usize> {
    (1..rest.len().saturating_sub(FRAME_HEADER)).find(|&p| {
        let len = u32::from_be_bytes(rest[p..p + 4].try_into().unwrap()) as usize;
        let end = p + FRAME_HEADER + len;
        if !(10..=MAX_FRAME as usize).contains(&len) || end > rest.len() {
            return false;
        }
        let crc = u32::from_be_bytes(rest[p + 4..p + 8].try_into().unwrap());
        crc32fast::hash(&rest[p + FRAME_HEADER..end]) == crc
    })
}

fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir).map_err(io_err(dir))? {
        let ent = ent.map_err(io_err(dir))?;
        let name = ent.file_name();
        let name = name.to_string_lossy();
        if let Some(num) = name
            .strip_prefix("seg-")
            .and_then(|s| s.strip_suffix(".log"))
        {
            if let Ok(n) = num.parse::<u64>() {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Replaces `dir/name` with `content` so that a crash leaves the old or the new file, whole.
fn write_atomic(dir: &Path, name: &str, content: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(content).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    fsync_dir(dir)
}

/// A number kept in a file of the spool (`ack`, `floor`); 0 when the file does not exist.
fn read_number(dir: &Path, name: &str) -> Result<u64> {
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|e| SpoolError::Corrupted {
            path: path.clone(),
            offset: 0,
            reason: format!("{name} file is not a number: {e}"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(&path)(e)),
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovering from a crash: a torn last
    /// frame is cut off and reported, damage elsewhere is an error.
    pub fn open(dir: impl AsRef<Path>) -> Result<(Spool, Recovery)> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        let acked = read_number(&dir, "ack")?;
        let floor = read_number(&dir, "floor")?;
        let segments = list_segments(&dir)?;
        let mut recovery = Recovery {
            acked,
            ..Default::default()
        };
        if floor > MAX_SEQ {
            return Err(SpoolError::Corrupted {
                path: dir.join("floor"),
                offset: 0,
                reason: format!("floor {floor} is beyond any sequence number the agent uses"),
            });
        }
        let mut last_seq = acked;
        let mut gaps = Vec::new();
        let mut last_pos = (0u64, 0u64);
        // The highest number in any frame: numbers only ever increase, across segments too,
        // and a segment is named after the first number it was created for.
        let mut max_frame = 0u64;
        for (i, &first) in segments.iter().enumerate() {
            let path = segment_path(&dir, first);
            if max_frame >= first {
                return Err(SpoolError::Corrupted {
                    path,
                    offset: 0,
                    reason: format!("segment named {first} follows records up to {max_frame}"),
                });
            }
            let file = File::open(&path).map_err(io_err(&path))?;
            let mut r = BufReader::new(file);
            let mut offset = 0u64;
            loop {
                match read_frame(&mut r, offset).map_err(io_err(&path))? {
                    Frame::Entry(e, next) => {
                        if e.seq <= max_frame || e.seq < first || e.seq > MAX_SEQ {
                            return Err(SpoolError::Corrupted {
                                path,
                                offset,
                                reason: format!(
                                    "sequence {} after {max_frame} in the segment named {first}",
                                    e.seq
                                ),
                            });
                        }
                        max_frame = e.seq;
                        if e.seq > acked {
                            recovery.pending += 1;
                            if e.seq > last_seq + 1 {
                                gaps.push((last_seq + 1, e.seq - 1));
                            }
                        }
                        last_seq = last_seq.max(e.seq);
                        offset = next;
                    }
                    Frame::End => break,
                    Frame::Bad(reason, declared_end) => {
                        let total = fs::metadata(&path).map_err(io_err(&path))?.len();
                        if i + 1 != segments.len()
                            || !is_torn_tail(&path, offset, total, declared_end)?
                        {
                            return Err(SpoolError::Corrupted {
                                path,
                                offset,
                                reason,
                            });
                        }
                        recovery.torn_bytes = total - offset;
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(io_err(&path))?;
                        f.set_len(offset).map_err(io_err(&path))?;
                        f.sync_all().map_err(io_err(&path))?;
                        break;
                    }
                }
            }
            last_pos = (first, offset);
        }
        if acked > max_frame {
            // The acknowledged record is always kept (only older segments are deleted): an
            // ack beyond every record would silently skip what is still unsent.
            return Err(SpoolError::Corrupted {
                path: dir.join("ack"),
                offset: 0,
                reason: format!("ack {acked} is beyond the last record in the spool ({max_frame})"),
            });
        }
        if floor > last_seq {
            gaps.push((last_seq + 1, floor));
        }
        let next_seq = last_seq.max(floor) + 1;
        recovery.next_seq = next_seq;
        let current = match segments.last() {
            Some(&first) => Segment::open_append(&dir, first)?,
            None => Segment::create(&dir, next_seq)?,
        };
        let mut segments = segments;
        if segments.is_empty() {
            segments.push(current.first_seq);
            last_pos = (current.first_seq, 0);
        }
        let (committed, _) = tokio::sync::watch::channel(Position {
            segment: last_pos.0,
            offset: last_pos.1,
            last_seq,
        });
        Ok((
            Spool {
                dir,
                current,
                next_seq,
                acked,
                gaps,
                segments,
                committed,
            },
            recovery,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sequence number the next appended entry must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The number of the last entry actually in the spool (or the ack point): what a reader
    /// can reach. Below `next_seq - 1` when numbers were skipped.
    pub fn last_appended(&self) -> u64 {
        self.committed.borrow().last_seq
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Entries appended but not yet acknowledged.
    pub fn pending(&self) -> u64 {
        let last = self.next_seq - 1;
        let unused: u64 = self
            .gaps
            .iter()
            .map(|&(a, b)| {
                let (a, b) = (a.max(self.acked + 1), b.min(last));
                if b >= a {
                    b - a + 1
                } else {
                    0
                }
            })
            .sum();
        last - self.acked - unused
    }

    /// Appends entries (sequence numbers must continue `next_seq`) and fsyncs once for all
    /// of them: when this returns, they survive a crash.
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        self.append_frames(entries, false)
    }

    /// Appends entries read back from a damaged spool: their numbers only have to increase, so
    /// the records lost between them keep their numbers unused.
    pub fn restore(&mut self, entries: &[Entry]) -> Result<()> {
        self.append_frames(entries, true)
    }

    /// Makes `next` the lowest number a new entry may carry, so numbers used before (by a
    /// spool that was lost or moved aside, or by an earlier install on this host) are never
    /// used again. Durable when it returns (the `floor` file), with or without a frame after.
    pub fn skip_to(&mut self, next: u64) -> Result<()> {
        if next <= self.next_seq {
            return Ok(());
        }
        if next > MAX_SEQ {
            return Err(SpoolError::SeqTooLarge(next));
        }
        write_atomic(&self.dir, "floor", format!("{}\n", next - 1).as_bytes())?;
        self.gaps.push((self.next_seq, next - 1));
        self.next_seq = next;
        Ok(())
    }

    fn append_frames(&mut self, entries: &[Entry], gaps_allowed: bool) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        let mut expect = self.next_seq;
        let mut gaps = Vec::new();
        for e in entries {
            if e.seq > MAX_SEQ {
                return Err(SpoolError::SeqTooLarge(e.seq));
            }
            if e.seq != expect && !(gaps_allowed && e.seq > expect) {
                return Err(SpoolError::OutOfOrder {
                    got: e.seq,
                    last: expect - 1,
                });
            }
            if e.seq > expect {
                gaps.push((expect, e.seq - 1));
            }
            encode_frame(e, &mut buf)?;
            expect = e.seq + 1;
        }
        if self.current.len > 0 && self.current.len + buf.len() as u64 > SEGMENT_BYTES {
            let seg = Segment::create(&self.dir, self.next_seq)?;
            self.segments.push(seg.first_seq);
            self.current = seg;
        }
        let path = self.current.path.clone();
        self.current.file.write_all(&buf).map_err(io_err(&path))?;
        self.current.file.sync_data().map_err(io_err(&path))?;
        self.current.len += buf.len() as u64;
        self.next_seq = expect;
        self.gaps.extend(gaps);
        self.committed.send_replace(Position {
            segment: self.current.first_seq,
            offset: self.current.len,
            last_seq: expect - 1,
        });
        Ok(())
    }

    /// Records that every entry up to `seq` is committed and verified in immudb, and deletes
    /// segments that hold nothing newer.
    pub fn ack(&mut self, seq: u64) -> Result<()> {
        if seq <= self.acked {
            return Ok(());
        }
        write_atomic(&self.dir, "ack", format!("{seq}\n").as_bytes())?;
        self.acked = seq;
        self.gaps.retain(|&(_, end)| end > seq);
        // A segment can go once the next segment starts at or below acked + 1.
        while self.segments.len() > 1 && self.segments[1] <= seq + 1 {
            let old = self.segments.remove(0);
            let p = segment_path(&self.dir, old);
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
        Ok(())
    }

    /// A reader that starts after the acknowledged entries and follows the appends.
    pub fn reader(&self) -> SpoolReader {
        SpoolReader {
            dir: self.dir.clone(),
            after_seq: self.acked,
            segment: None,
            committed: self.committed.subscribe(),
        }
    }
}

impl Segment {
    fn create(dir: &Path, first_seq: u64) -> Result<Segment> {
        let path = segment_path(dir, first_seq);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        fsync_dir(dir)?;
        Ok(Segment {
            first_seq,
            path,
            file,
            len: 0,
        })
    }

    fn open_append(dir: &Path, first_seq: u64) -> Result<Segment> {
        let path = segment_path(dir, first_seq);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        Ok(Segment {
            first_seq,
            path,
            file,
            len,
        })
    }
}

/// What [`salvage`] read back from a damaged spool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Salvage {
    /// The acknowledgement point, when the `ack` file was still readable.
    pub acked: Option<u64>,
    /// Unacknowledged entries with a good checksum that were handed on.
    pub recovered: u64,
    /// The highest sequence number seen anywhere (ack, floor or any readable frame): numbers
    /// up to it may be in immudb already and must not be used again.
    pub highest_seq: u64,
    /// Bytes that were not part of a readable frame.
    pub unreadable_bytes: u64,
    /// Readable frames left out because their number did not increase.
    pub out_of_order: u64,
    /// Numbers above the acknowledgement (above 0 when it is unreadable) up to `highest_seq`
    /// that no readable frame carries, as inclusive ranges: the records the damage cost.
    pub lost: Vec<(u64, u64)>,
}

/// Every frame with a good checksum in the segments of `dir`, in name order, resynchronising
/// after damage at the next valid frame. Returns the bytes that were no part of one.
fn each_readable_frame(dir: &Path, mut each: impl FnMut(Entry) -> Result<()>) -> Result<u64> {
    let mut unreadable = 0u64;
    for first in list_segments(dir)? {
        let path = segment_path(dir, first);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let mut pos = 0usize;
        while pos < bytes.len() {
            match read_frame(&mut &bytes[pos..], pos as u64).map_err(io_err(&path))? {
                Frame::Entry(e, next) => {
                    pos = next as usize;
                    each(e)?;
                }
                Frame::End => break,
                Frame::Bad(..) => {
                    let to = next_valid_frame(&bytes[pos..]).map_or(bytes.len(), |p| pos + p);
                    unreadable += (to - pos) as u64;
                    pos = to;
                }
            }
        }
    }
    Ok(unreadable)
}

/// Reads every frame with a good checksum from the spool in `dir` (which `Spool::open`
/// refused), in order, resynchronising after damage at the next valid frame, and hands the
/// unacknowledged ones to `each` in increasing sequence order. Never modifies `dir`.
pub fn salvage(
    dir: impl AsRef<Path>,
    mut each: impl FnMut(Entry) -> Result<()>,
) -> Result<Salvage> {
    let dir = dir.as_ref();
    // An ack beyond every readable frame cannot be told from damage (the acknowledged
    // record is always kept): then everything readable is resent, idempotently.
    let mut frames_max = 0u64;
    each_readable_frame(dir, |e| {
        if e.seq <= MAX_SEQ {
            frames_max = frames_max.max(e.seq);
        }
        Ok(())
    })?;
    let out_acked = read_number(dir, "ack").ok().filter(|&a| a <= frames_max);
    let mut out = Salvage {
        acked: out_acked,
        ..Default::default()
    };
    let acked = out.acked.unwrap_or(0);
    // Numbers at or below the floor were skipped on purpose, not lost.
    let floor = read_number(dir, "floor")
        .ok()
        .filter(|&f| f <= MAX_SEQ)
        .unwrap_or(0);
    out.highest_seq = acked.max(floor);
    let mut last = acked;
    let mut expect = acked.max(floor) + 1;
    out.unreadable_bytes = each_readable_frame(dir, |e| {
        if e.seq > MAX_SEQ || (e.seq > acked && e.seq <= last) {
            out.out_of_order += 1;
            return Ok(());
        }
        out.highest_seq = out.highest_seq.max(e.seq);
        if e.seq <= acked {
            return Ok(());
        }
        last = e.seq;
        out.recovered += 1;
        if e.seq > expect {
            out.lost.push((expect, e.seq - 1));
        }
        expect = e.seq + 1;
        each(e)
    })?;
    if out.highest_seq >= expect {
        out.lost.push((expect, out.highest_seq));
    }
    Ok(out)
}

/// Reads entries in order, never past what the writer has committed.
pub struct SpoolReader {
    dir: PathBuf,
    after_seq: u64,
    segment: Option<(u64, BufReader<File>, u64)>,
    committed: tokio::sync::watch::Receiver<Position>,
}

impl SpoolReader {
    /// Sequence number of the last entry returned (or the ack point at start).
    pub fn position(&self) -> u64 {
        self.after_seq
    }

    /// Returns up to `max_entries` entries (and at most about `max_bytes`) that are committed,
    /// without waiting. Empty when the reader is at the end.
    pub fn read_batch(&mut self, max_entries: usize, max_bytes: usize) -> Result<Vec<Entry>> {
        let end = *self.committed.borrow_and_update();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max_entries && bytes < max_bytes && self.after_seq < end.last_seq {
            if self.segment.is_none() {
                self.open_segment_for(self.after_seq + 1)?;
            }
            let (first, reader, offset) = self.segment.as_mut().expect("segment opened");
            let (first, pos) = (*first, *offset);
            let at_end = first == end.segment && pos >= end.offset;
            if at_end {
                break;
            }
            let path = segment_path(&self.dir, first);
            match read_frame(reader, pos).map_err(io_err(&path))? {
                Frame::Entry(e, next) => {
                    if let Some(seg) = self.segment.as_mut() {
                        seg.2 = next;
                    }
                    if e.seq <= self.after_seq {
                        continue; // already acknowledged before this run
                    }
                    self.after_seq = e.seq;
                    bytes += e.key.len() + e.value.len();
                    out.push(e);
                }
                Frame::End => {
                    // End of a finished segment: move on to the next one.
                    self.segment = None;
                    if first == end.segment {
                        break;
                    }
                }
                Frame::Bad(reason, _) => {
                    return Err(SpoolError::Corrupted {
                        path,
                        offset: pos,
                        reason,
                    })
                }
            }
        }
        Ok(out)
    }

    /// Waits until the writer commits something new (or the spool is dropped).
    pub async fn wait_for_more(&mut self) -> bool {
        loop {
            if self.committed.borrow().last_seq > self.after_seq {
                return true;
            }
            if self.committed.changed().await.is_err() {
                return self.committed.borrow().last_seq > self.after_seq;
            }
        }
    }

    fn open_segment_for(&mut self, seq: u64) -> Result<()> {
        let segments = list_segments(&self.dir)?;
        let first = segments
            .iter()
            .copied()
            .filter(|&s| s <= seq)
            .max()
            .or_else(|| segments.first().copied())
            .ok_or_else(|| SpoolError::Corrupted {
                path: self.dir.clone(),
                offset: 0,
                reason: format!("no segment holds sequence {seq}"),
            })?;
        let path = segment_path(&self.dir, first);
        let mut file = File::open(&path).map_err(io_err(&path))?;
        file.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
        self.segment = Some((first, BufReader::new(file), 0));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            key: format!("k{seq}").into_bytes(),
            value: format!("value number {seq}").into_bytes(),
        }
    }

    #[test]
    fn append_read_ack_and_reopen_replays_only_unacked() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, rec) = Spool::open(dir.path()).unwrap();
        assert_eq!(rec.next_seq, 1);
        spool
            .append(&(1..=10).map(entry).collect::<Vec<_>>())
            .unwrap();
        let mut r = spool.reader();
        let got = r.read_batch(4, usize::MAX).unwrap();
        assert_eq!(got, (1..=4).map(entry).collect::<Vec<_>>());
        spool.ack(4).unwrap();
        drop(r);
        drop(spool);

        let (spool, rec) = Spool::open(dir.path()).unwrap();
        assert_eq!(rec.pending, 6);
        assert_eq!(rec.acked, 4);
        assert_eq!(spool.next_seq(), 11);
        let mut r = spool.reader();
        let got = r.read_batch(100, usize::MAX).unwrap();
        assert_eq!(got, (5..=10).map(entry).collect::<Vec<_>>());
        assert!(r.read_batch(100, usize::MAX).unwrap().is_empty());
    }

    #[test]
    fn torn_tail_is_cut_and_counted_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.append(&[entry(1), entry(2)]).unwrap();
        drop(spool);
        let seg = segment_path(dir.path(), 1);
        let full = fs::metadata(&seg).unwrap().len();
        // Simulate a crash in the middle of a third append.
        let mut frame = Vec::new();
        encode_frame(&entry(3), &mut frame).unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&frame[..frame.len() - 3]).unwrap();
        drop(f);

        let (mut spool, rec) = Spool::open(dir.path()).unwrap();
        assert_eq!(rec.torn_bytes, frame.len() as u64 - 3);
        assert_eq!(fs::metadata(&seg).unwrap().len(), full);
        assert_eq!(spool.next_seq(), 3);
        spool.append(&[entry(3)]).unwrap();
        let got = spool.reader().read_batch(10, usize::MAX).unwrap();
        assert_eq!(got, (1..=3).map(entry).collect::<Vec<_>>());
    }

    #[test]
    fn damage_in_the_middle_is_an_error_not_a_silent_skip() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.append(&[entry(1), entry(2), entry(3)]).unwrap();
        drop(spool);
        let seg = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[FRAME_HEADER + 12] ^= 0x01; // inside the first frame's payload
        fs::write(&seg, &bytes).unwrap();
        // Acknowledged-or-not, fsynced frames follow the damaged one: that is corruption, and
        // opening must say so rather than cut them off.
        match Spool::open(dir.path()) {
            Err(SpoolError::Corrupted { offset, reason, .. }) => {
                assert_eq!(offset, 0);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected corruption, got {:?}", other.map(|(_, r)| r)),
        }
    }

    #[test]
    fn out_of_order_append_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        assert!(matches!(
            spool.append(&[entry(2)]),
            Err(SpoolError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn acked_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        let big = vec![b'x'; 1024 * 1024];
        for seq in 1..=70u64 {
            spool
                .append(&[Entry {
                    seq,
                    key: b"k".to_vec(),
                    value: big.clone(),
                }])
                .unwrap();
        }
        assert!(list_segments(dir.path()).unwrap().len() >= 2);
        let mut r = spool.reader();
        let mut n = 0;
        loop {
            let b = r.read_batch(7, usize::MAX).unwrap();
            if b.is_empty() {
                break;
            }
            n += b.len();
        }
        assert_eq!(n, 70);
        spool.ack(70).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
        drop(spool);
        let (spool, rec) = Spool::open(dir.path()).unwrap();
        assert_eq!(rec.pending, 0);
        assert_eq!(spool.next_seq(), 71);
    }

    #[test]
    fn salvage_keeps_every_good_frame_around_damage_and_the_numbers_stay_unused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        for seq in 1..=6 {
            spool.append(&[entry(seq)]).unwrap();
        }
        spool.ack(1).unwrap();
        drop(spool);
        let seg = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&seg).unwrap();
        let mut frame = Vec::new();
        encode_frame(&entry(1), &mut frame).unwrap();
        // Damage the payload of the third frame (seq 3): frames 4..6 follow it intact.
        let third = 2 * frame.len();
        bytes[third + FRAME_HEADER + 12] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        assert!(matches!(
            Spool::open(dir.path()),
            Err(SpoolError::Corrupted { .. })
        ));

        let mut got = Vec::new();
        let s = salvage(dir.path(), |e| {
            got.push(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![entry(2), entry(4), entry(5), entry(6)]);
        assert_eq!(s.acked, Some(1));
        assert_eq!(s.recovered, 4);
        assert_eq!(s.highest_seq, 6);
        assert_eq!(s.unreadable_bytes, frame.len() as u64);
        assert_eq!(s.lost, vec![(3, 3)]);
        assert_eq!(
            fs::read(&seg).unwrap(),
            bytes,
            "salvage must not modify the spool"
        );

        // A fresh spool takes the salvaged entries with their numbers, the gap stays unused,
        // and new entries continue after the highest number seen.
        let fresh = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(fresh.path()).unwrap();
        spool.skip_to(2).unwrap();
        spool.restore(&got).unwrap();
        spool.skip_to(s.highest_seq + 1).unwrap();
        assert_eq!(spool.pending(), 4);
        spool.append(&[entry(7)]).unwrap();
        assert_eq!(spool.pending(), 5);
        let mut r = spool.reader();
        let read: Vec<u64> = r
            .read_batch(100, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(read, vec![2, 4, 5, 6, 7]);
        spool.ack(5).unwrap();
        assert_eq!(spool.pending(), 2);
        drop(r);
        drop(spool);
        let (spool, rec) = Spool::open(fresh.path()).unwrap();
        assert_eq!(rec.pending, 2);
        assert_eq!(spool.pending(), 2);
        assert_eq!(spool.next_seq(), 8);
    }

    #[test]
    fn skipped_numbers_are_never_used_again_even_without_a_frame() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.skip_to(501).unwrap();
        assert_eq!(spool.next_seq(), 501);
        assert_eq!(spool.pending(), 0);
        drop(spool);
        let (mut spool, rec) = Spool::open(dir.path()).unwrap();
        assert_eq!(rec.next_seq, 501);
        assert_eq!(spool.pending(), 0);
        assert!(matches!(
            spool.append(&[entry(1)]),
            Err(SpoolError::OutOfOrder { .. })
        ));
        spool.append(&[entry(501)]).unwrap();
        assert_eq!(spool.pending(), 1);
        let got = spool.reader().read_batch(10, usize::MAX).unwrap();
        assert_eq!(got, vec![entry(501)]);
        // Lower than what is there: nothing changes.
        spool.skip_to(10).unwrap();
        assert_eq!(spool.next_seq(), 502);
    }

    #[test]
    fn salvage_of_an_unreadable_ack_resends_everything_readable() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.append(&[entry(1), entry(2), entry(3)]).unwrap();
        spool.ack(2).unwrap();
        drop(spool);
        fs::write(dir.path().join("ack"), b"\x00garbage").unwrap();
        assert!(matches!(
            Spool::open(dir.path()),
            Err(SpoolError::Corrupted { .. })
        ));
        let mut got = Vec::new();
        let s = salvage(dir.path(), |e| {
            got.push(e.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(s.acked, None);
        assert_eq!(got, vec![1, 2, 3]);
        assert!(s.lost.is_empty());
        assert_eq!(s.highest_seq, 3);
    }

    /// Found by an adversarial pass: a stray segment named inside the range of an older one
    /// made the reader start there and skip unsent records; an ack raised past every record
    /// silently dropped the unsent ones; numbers near `u64::MAX` wrapped to 0.
    #[test]
    fn impossible_spool_states_are_damage_not_data() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool
            .append(&(1..=10).map(entry).collect::<Vec<_>>())
            .unwrap();
        spool.ack(5).unwrap();
        drop(spool);

        fs::write(segment_path(dir.path(), 3), [0xabu8; 36]).unwrap();
        assert!(matches!(
            Spool::open(dir.path()),
            Err(SpoolError::Corrupted { reason, .. }) if reason.contains("segment named 3")
        ));
        let mut got = Vec::new();
        let s = salvage(dir.path(), |e| {
            got.push(e.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            got,
            vec![6, 7, 8, 9, 10],
            "the stray segment costs nothing readable"
        );
        assert_eq!(s.acked, Some(5));
        fs::remove_file(segment_path(dir.path(), 3)).unwrap();

        fs::write(dir.path().join("ack"), b"999\n").unwrap();
        assert!(matches!(
            Spool::open(dir.path()),
            Err(SpoolError::Corrupted { reason, .. }) if reason.contains("ack 999 is beyond")
        ));
        let mut got = Vec::new();
        let s = salvage(dir.path(), |e| {
            got.push(e.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(s.acked, None, "an ack beyond every record is not trusted");
        assert_eq!(got, (1..=10).collect::<Vec<_>>());
        fs::write(dir.path().join("ack"), b"5\n").unwrap();

        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        assert!(matches!(
            spool.skip_to(MAX_SEQ + 1),
            Err(SpoolError::SeqTooLarge(_))
        ));
        assert!(matches!(
            spool.restore(&[entry(u64::MAX)]),
            Err(SpoolError::SeqTooLarge(_))
        ));
        assert_eq!(spool.next_seq(), 11);
        drop(spool);
        fs::write(dir.path().join("floor"), format!("{}\n", u64::MAX)).unwrap();
        assert!(matches!(
            Spool::open(dir.path()),
            Err(SpoolError::Corrupted { .. })
        ));
    }
}
