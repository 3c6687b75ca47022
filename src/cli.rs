//! Command-line definitions. Names follow immuclient's flags and environment variables so
//! people who already use immudb's tools need nothing new.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_VERIFICATION: i32 = 3;
pub const EXIT_REFUSED: i32 = 4;

const EXIT_CODES: &str = "\
Exit codes:
  0  success; also after SIGINT/SIGTERM once everything captured is written to immudb or,
     if immudb cannot be reached then, kept in the spool (sent at the next start; it says so)
  1  error (bpftrace kept failing, not root, I/O, ...; `ingest`: records left in the spool)
  2  bad usage or unreadable input
  3  VERIFICATION FAILED: a proof did not check, the server rolled back or changed identity,
     the trusted state was altered, a record was overwritten, deleted or forged, or a
     signature did not match (possible tampering)
  4  the script was refused as unsafe (unsafe builtins, or writable by non-root users)";

const RUN_HELP: &str = "\
Examples:
  sudo bt2immu scripts/bashreadline.bt                        every line typed into bash
  sudo bt2immu run --stdout scripts/bashreadline.bt           ... also printed as JSON lines
  sudo bt2immu run --immudb-address 10.0.0.5 --password-file /etc/bt2immu/password \\
       scripts/bashreadline.bt                                to a remote immudb
  sudo bt2immu run scripts/examples/execsnoop.bt              your own script: printf -> fields
  sudo bt2immu run -e 'tracepoint:syscalls:sys_enter_execve { printf(\"%d %s\\n\", pid, comm); }'

immudb is unreachable? Capture goes on into the spool (<state-dir>/spool) and is written when
it is back. Nothing at 127.0.0.1:3322 and no --immudb-address: a local immudb is started under
the state dir and stopped on exit.";

const INGEST_HELP: &str = "\
Examples:
  bpftrace -f json x.bt | bt2immu ingest --script x.bt -     stream bpftrace's output in
  bt2immu ingest --script scripts/bashreadline.bt capture.jsonl   a recorded bashreadline capture
  bt2immu ingest --source opensnoop opensnoop.txt             text output, no script at hand";

const CHECK_HELP: &str = "\
Examples:
  bt2immu check scripts/examples/execsnoop.bt                 safe? which fields?
  bt2immu check --json my.bt                                  the same, as JSON
  bt2immu check --render scripts/bashreadline.bt > probe.bt   the script as run would start it

Exit codes: 0 safe to run, 2 unreadable script, 4 refused (with the reason).";

const QUERY_HELP: &str = "\
Examples:
  bt2immu query --prefix bash: --format table                 who typed what, verified
  bt2immu query --prefix bash:web1:20261204T09                one host, one hour (key prefix)
  bt2immu query --prefix bash: | jq -r .value.line            JSON lines for scripts

Keys are <source>:<host>:<UTC time>:<seq>. Every record is read with a verified get; the
whole history is checked for overwritten, deleted and forged records and missing numbers.";

const EXAMPLES: &str = "\
Examples:
  sudo bt2immu scripts/bashreadline.bt               record every line typed into bash
  sudo bt2immu --stdout scripts/bashreadline.bt      ... and print each record as JSON
  sudo bt2immu run scripts/examples/execsnoop.bt     any bpftrace script: printf lines -> fields
  sudo bt2immu run -e 'tracepoint:syscalls:sys_enter_execve { printf(\"%d %s\\n\", pid, comm); }'
  bt2immu check scripts/examples/execsnoop.bt        is it safe, which fields will it produce
  bpftrace -f json x.bt | bt2immu ingest -           write recorded bpftrace output
  bt2immu query --prefix bash: --format table        read the trail back, verified";

#[derive(Debug, Parser)]
#[command(
    name = "bt2immu",
    version,
    about = "Turns what bpftrace sees into a tamper-evident, verified audit trail in immudb",
    long_about = "Runs a bpftrace script (printf output only, never --unsafe), turns every \
                  line it prints into a record with provenance, keeps it in a durable spool, and \
                  writes it to immudb with verified writes whose proofs bt2immu checks itself.\n\n\
                  `bt2immu SCRIPT.bt` is short for `bt2immu run SCRIPT.bt`.",
    after_help = EXAMPLES,
    after_long_help = format!("{EXAMPLES}\n\n{EXIT_CODES}")
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log output (-v info, -vv debug); RUST_LOG also works.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a bpftrace script and record its output (the default command; needs root).
    #[command(after_help = RUN_HELP, after_long_help = format!("{RUN_HELP}\n\n{EXIT_CODES}"))]
    Run(RunArgs),
    /// Decode recorded bpftrace output (text or -f json) and write it through the pipeline.
    #[command(after_help = INGEST_HELP, after_long_help = format!("{INGEST_HELP}\n\n{EXIT_CODES}"))]
    Ingest(IngestArgs),
    /// Say whether a script is safe to run and which fields its output will have.
    #[command(after_help = CHECK_HELP)]
    Check(CheckArgs),
    /// Read records back from immudb, each one verified.
    #[command(after_help = QUERY_HELP, after_long_help = format!("{QUERY_HELP}\n\n{EXIT_CODES}"))]
    Query(QueryArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// immudb server address. Default: 127.0.0.1, and when nothing listens there `run` starts
    /// a local immudb under the state dir (which `query` then starts again to read).
    #[arg(long, env = "IMMUCLIENT_IMMUDB_ADDRESS")]
    pub immudb_address: Option<String>,
    /// immudb server port.
    #[arg(long, env = "IMMUCLIENT_IMMUDB_PORT", default_value_t = 3322,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub immudb_port: u16,
    /// immudb user.
    #[arg(long, env = "IMMUCLIENT_USERNAME", default_value = "immudb")]
    pub username: String,
    /// File holding the password (first line). Or set IMMUCLIENT_PASSWORD; there is no
    /// password flag, so the password never shows on a command line.
    #[arg(long, env = "IMMUCLIENT_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// immudb database.
    #[arg(long, env = "IMMUCLIENT_DATABASE", default_value = "defaultdb")]
    pub database: String,
    /// Pin the server's state-signing public key (PEM): every state must carry a valid
    /// signature by it.
    #[arg(long, env = "IMMUCLIENT_SERVER_SIGNING_PUB_KEY")]
    pub server_signing_pub_key: Option<PathBuf>,
    /// CA certificate (PEM) to connect with TLS.
    #[arg(long, env = "BT2IMMU_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Where the trusted state, the spool and a local immudb live.
    #[arg(long, env = "BT2IMMU_STATE_DIR", default_value = "/var/lib/bt2immu")]
    pub state_dir: PathBuf,
    /// TOML config file with the same keys as these flags (e.g. immudb-address = "10.0.0.5").
    #[arg(long, env = "BT2IMMU_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The bpftrace script to run.
    #[arg(required_unless_present = "program", conflicts_with = "program")]
    pub script: Option<PathBuf>,
    /// A bpftrace program given inline, like `bpftrace -e`.
    #[arg(short = 'e', long = "program", value_name = "PROGRAM")]
    pub program: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Also print every record as a JSON line on stdout.
    #[arg(long)]
    pub stdout: bool,
    /// bpftrace binary.
    #[arg(long, env = "BT2IMMU_BPFTRACE", default_value = "bpftrace")]
    pub bpftrace: PathBuf,
    /// The head of a typed line the bashreadline script captures (1 to 2097600; rounded up
    /// to whole 200-byte chunks). Lines up to this plus 65600 bytes are stored whole; a longer
    /// line is stored cut, flagged, with its exact length, this head and its last 65600
    /// bytes. Each 262200 bytes add a BPF program to load at start.
    #[arg(long, default_value_t = crate::readline::DEFAULT_MAX_LINE_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(1..=crate::readline::MAX_LINE_BYTES as u64))]
    pub max_line_bytes: usize,
    /// Shell binaries whose readline to probe (default: /bin/bash and bash from /etc/shells).
    #[arg(long = "shell", value_name = "PATH")]
    pub shells: Vec<PathBuf>,
    /// bpftrace output mode for your own scripts (the bashreadline script always uses json).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub bpftrace_format: OutputFormat,
    /// Name of the record source (key prefix); default: `bash` for the bashreadline script,
    /// else the script's file name without `.bt` (`bpftrace` for -e).
    #[arg(long)]
    pub source: Option<String>,
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// File with bpftrace output, or - for stdin.
    #[arg(default_value = "-")]
    pub input: PathBuf,
    /// Input format; auto looks at the first bytes.
    #[arg(long, short = 'f', value_enum, default_value_t = OutputFormat::Auto)]
    pub format: OutputFormat,
    /// The script that produced the output: gives field names (and recognises the
    /// bashreadline protocol).
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// Name of the record source (key prefix).
    #[arg(long)]
    pub source: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Also print every record as a JSON line on stdout.
    #[arg(long)]
    pub stdout: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The bpftrace script to check.
    pub script: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// For the bashreadline script: print the script as `run` would start it on this host
    /// (symbol addresses, line limit filled in) and the environment to run it by hand.
    #[arg(long, conflicts_with = "json")]
    pub render: bool,
    /// With --render: the line limit (see `run --max-line-bytes`).
    #[arg(long, default_value_t = crate::readline::DEFAULT_MAX_LINE_BYTES, requires = "render",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(1..=crate::readline::MAX_LINE_BYTES as u64))]
    pub max_line_bytes: usize,
    /// With --render: shell binaries whose readline to probe.
    #[arg(long = "shell", value_name = "PATH", requires = "render")]
    pub shells: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueryFormat {
    Jsonl,
    Table,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Key prefix, e.g. `bash:` or `bash:web1:`.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// At most this many records (the first in key order); default: all of them. The check
    /// for deleted records needs them all.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// jsonl: one JSON object per record ({key, tx, verified, tampered, value}); table: for
    /// people (time, pid, uid, user, tty, line).
    #[arg(long, value_enum, default_value_t = QueryFormat::Jsonl)]
    pub format: QueryFormat,
    /// Verify each record (verified_get); without it records are only listed.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub verify: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `bt2immu SCRIPT.bt ...` is `bt2immu run SCRIPT.bt ...`: insert `run` when the first
/// argument that is not a global flag is not a subcommand.
pub fn normalize_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const SUBCOMMANDS: &[&str] = &["run", "ingest", "check", "query", "help"];
    const TOP_LEVEL: &[&str] = &["-h", "--help", "-V", "--version"];
    let first = args
        .iter()
        .skip(1)
        .position(|a| {
            let s = a.to_string_lossy();
            !(s == "-v" || s == "-vv" || s == "-vvv" || s == "--verbose")
        })
        .map(|i| i + 1);
    if let Some(i) = first {
        let s = args[i].to_string_lossy().into_owned();
        // A mistyped subcommand (`qurey`) that is no file is left to clap, which names the
        // subcommand meant.
        let mistyped = !std::path::Path::new(&s).exists()
            && SUBCOMMANDS.iter().any(|c| edit_distance(&s, c) <= 2);
        if !SUBCOMMANDS.contains(&s.as_str()) && !TOP_LEVEL.contains(&s.as_str()) && !mistyped {
            args.insert(i, "run".into());
        }
    } else if args.len() == 1 {
        // bare `bt2immu`: show help
    }
    args
}

/// Levenshtein distance, for telling a mistyped subcommand from a script name.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        let v = normalize_args(args.iter().map(|s| s.into()).collect());
        Cli::try_parse_from(v).unwrap()
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn short_form_means_run() {
        let c = parse(&["bt2immu", "scripts/bashreadline.bt"]);
        match c.command {
            Command::Run(r) => {
                assert_eq!(r.script.unwrap(), PathBuf::from("scripts/bashreadline.bt"))
            }
            other => panic!("{other:?}"),
        }
        let c = parse(&["bt2immu", "--stdout", "x.bt"]);
        assert!(matches!(
            c.command,
            Command::Run(RunArgs { stdout: true, .. })
        ));
        let c = parse(&["bt2immu", "-v", "check", "x.bt"]);
        assert!(matches!(c.command, Command::Check(_)));
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn there_is_no_password_flag() {
        let v = normalize_args(
            ["bt2immu", "run", "--password", "x", "a.bt"]
                .iter()
                .map(|s| s.into())
                .collect(),
        );
        assert!(Cli::try_parse_from(v).is_err());
    }

    #[test]
    fn inline_program() {
        let c = parse(&["bt2immu", "run", "-e", "BEGIN { printf(\"hi\\n\"); }"]);
        match c.command {
            Command::Run(r) => {
                assert!(r.script.is_none());
                assert!(r.program.unwrap().contains("BEGIN"));
            }
            other => panic!("{other:?}"),
        }
    }
}
