//! The thin CLI: parse arguments, set up logging, hand over to `bt2immu::app`, map the result
//! to the documented exit code.

use clap::Parser;

use bt2immu::app;
use bt2immu::cli::{self, Cli, Command};

/// Like `eprintln!`, but a closed stderr is not a reason to panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "bt2immu=warn",
        1 => "bt2immu=info",
        _ => "bt2immu=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour codes only for a person at a terminal, not in a journal or a log file.
    use std::io::IsTerminal as _;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| QuietStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(verbose > 0);
    if verbose > 0 {
        fmt.init();
    } else {
        // Warnings stand next to the `bt2immu:` lines; a journal adds its own time.
        fmt.without_time().init();
    }
}

/// stderr for the log: when it is closed (`bt2immu -v … 2>&1 | tee log`, and Ctrl-C killed
/// tee first) a log line is dropped, never a panic that would cut the agent's flush short.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn config_path_from_args(args: &[std::ffi::OsString]) -> Option<std::path::PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(Into::into);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(v.into());
        }
    }
    std::env::var_os("BT2IMMU_CONFIG").map(Into::into)
}

fn main() {
    let args = cli::normalize_args(std::env::args_os().collect());
    if let Err(e) = app::apply_config_file(config_path_from_args(&args).as_deref()) {
        say!("bt2immu: {}", app::describe(&e));
        std::process::exit(cli::EXIT_USAGE);
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                cli::EXIT_USAGE
            } else {
                cli::EXIT_OK
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    init_logging(cli.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(a) => app::run(a).await,
            Command::Ingest(a) => app::ingest(a).await,
            Command::Check(a) => app::check(a),
            Command::Query(a) => app::query(a).await,
        }
    });
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            let code = app::exit_code(&e);
            if code == cli::EXIT_VERIFICATION {
                say!(
                    "bt2immu: *** VERIFICATION FAILED (possible tampering) ***\nbt2immu: {}",
                    app::describe(&e)
                );
            } else {
                say!("bt2immu: {}", app::describe(&e));
            }
            code
        }
    };
    // Everything that matters was awaited; a blocking read of stdin (`ingest -`) that is
    // still waiting must not keep the process from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}
