//! Robustness: a typed line that arrives with a chunk missing (bpftrace lost events, bpftrace
//! was killed mid-line, two long pastes on one CPU) is stored as one record flagged
//! `incomplete`. That record must still hold the bytes that *did* arrive, wherever they are
//! in the line:
//! otherwise the padding trick the capture's head + tail layout defends against (a command
//! placed behind hundreds of kilobytes of blanks) works again as soon as one chunk is lost.
//!
//! Found by hand: three shells pasting 1 MiB lines at once overflowed one CPU's perf buffer;
//! 4,613 of the 5,240 chunks of one line arrived, and its `raw` record kept the protocol text
//! (`BT2I2 C … \xNN\xNN…`, four characters per typed byte) cut at 256 KiB: 63 KB of the
//! ~920 KB that arrived. Here the same situation is fed to `bt2immu ingest` (what `run` does
//! with bpftrace's output) so that it needs no root: a 600,000-byte line whose last chunk is
//! missing, with a command at offset 300,010.
//!
//! Needs the immudb binaries (`scripts/install-immudb.sh`); fails without them.

mod common;

use base64::Engine as _;
use common::server;
use serde_json::Value;

const LEN: usize = 600_000;
const COMMAND: &[u8] = b"echo PADDED-MIDDLE-COMMAND";
const COMMAND_AT: usize = 300_010;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\x{b:02x}")).collect()
}

/// Every string in a record, and the decoded bytes of every `*_b64` field.
fn texts(v: &Value, out: &mut Vec<Vec<u8>>) {
    match v {
        Value::String(s) => out.push(s.as_bytes().to_vec()),
        Value::Object(m) => {
            for (k, x) in m {
                if let (true, Value::String(s)) = (k.ends_with("_b64"), x) {
                    if let Ok(b) = base64::engine::general_purpose::STANDARD.decode(s) {
                        out.push(b);
                    }
                }
                texts(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| texts(x, out)),
        _ => {}
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incomplete_line_keeps_the_bytes_that_arrived() {
    let srv = server().await;
    let work = tempfile::tempdir().unwrap();

    let mut line = vec![b' '; LEN];
    line[COMMAND_AT..COMMAND_AT + COMMAND.len()].copy_from_slice(COMMAND);
    let (tid, id) = (4242u64, 987_654_321u64);
    let mut input = String::from("BT2I2 B 200 1048600 65600\n");
    input.push_str(&format!(
        "BT2I2 P {tid} {tid} {id} 1 0 {LEN} 1 1000 1000 1000 3 77 \
         uprobe:/usr/bin/bash:readline_internal_teardown pts3 bash\n"
    ));
    // Every chunk but the last one: as if the perf buffer overflowed at the very end.
    for off in (0..LEN - 200).step_by(200) {
        input.push_str(&format!(
            "BT2I2 C {tid} {id} {off} {}\n",
            hex(&line[off..off + 200])
        ));
    }
    let file = work.path().join("capture.txt");
    std::fs::write(&file, &input).unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bashreadline.bt");
    let out = common::bt2immu(
        &[
            "ingest",
            "-f",
            "text",
            "--script",
            script,
            "--source",
            "partial",
            "--stdout",
            file.to_str().unwrap(),
        ],
        srv.port(),
        &work.path().join("state"),
    );
    assert!(
        out.status.success(),
        "ingest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<Value> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice::<Value>(l).unwrap()["value"].clone())
        .collect();

    // Nothing may pass the incomplete line off as a whole one: it is flagged `incomplete`,
    // says which bytes are missing, and keeps the rest.
    let flagged: Vec<&Value> = records.iter().filter(|r| r["kind"] == "readline").collect();
    assert_eq!(
        flagged.len(),
        1,
        "expected one record for the line; got {}",
        records
            .iter()
            .map(|r| format!("{} {}", r["kind"], r["reason"]))
            .collect::<Vec<_>>()
            .join("; ")
    );
    assert_eq!(flagged[0]["incomplete"], true);
    assert!(
        flagged[0]["reason"]
            .as_str()
            .unwrap()
            .contains("2999 of the 3000 chunks"),
        "{}",
        flagged[0]["reason"]
    );
    assert_eq!(flagged[0]["missing"], serde_json::json!([[LEN - 200, 200]]));
    assert_eq!(flagged[0]["len"], LEN);
    assert_eq!(flagged[0]["uid"], 1000);
    // The command arrived (its chunk is there): the record must keep it, as bytes or as the
    // protocol's \xNN text.
    let mut all = Vec::new();
    texts(flagged[0], &mut all);
    let found = all
        .iter()
        .any(|t| contains(t, COMMAND) || contains(t, hex(COMMAND).as_bytes()));
    assert!(
        found,
        "the flagged record of the incomplete {LEN}-byte line does not hold the command at \
         offset {COMMAND_AT}, although its chunk arrived; record fields: {:?}",
        flagged[0]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_string().len()))
            .collect::<Vec<_>>()
    );
}
