//! The `imdsd` binary: reads the configuration, sets up logging, runs the daemon until SIGTERM or
//! SIGINT (or runs a tool: `probe`, `doctor`, `network`), and maps the outcome to an exit code (0 clean, 64 configuration, 1 runtime failure).
//!
//! The daemon writes nothing with `print!`/`eprint!`, which panic when stdout or stderr is closed
//! (`imdsd … | head`): messages go through the log's writer, which drops what it cannot write.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use imdsd::app::{App, StartError};
use imdsd::config::{self, Parsed};
use tokio_util::sync::CancellationToken;

const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let config = match config::parse(std::env::args_os(), &env) {
        Ok(Parsed::Run(config)) => *config,
        Ok(Parsed::Info(text)) => {
            // `imdsd --help | head` closes stdout early; that is no failure.
            let _ = std::io::stdout().write_all(text.as_bytes());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Probe(args)) => return tool(imdsd::probe::run(args)),
        Ok(Parsed::Doctor(args)) => return tool(imdsd::doctor::run(args)),
        Ok(Parsed::Network(args)) => return tool(imdsd::network::run(args)),
        Err(e) => {
            report(&format!("imdsd: {e}"));
            return ExitCode::from(EX_USAGE);
        }
    };
    imdsd::logging::init(config.log_format, &config.log_filter);
    imdsd::server::raise_descriptor_limit();
    let code = daemon(config);
    // The last lines ("stopped"), unless stderr stopped taking them.
    imdsd::log_writer::flush(FLUSH_AT_EXIT);
    code
}

/// How long the last log lines may take to be written at exit.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

/// Writes a message that is not a log event (a configuration error) to stderr, as the log's
/// writer does: never panicking, never waiting on stderr for long.
fn report(text: &str) {
    let mut text = text.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    imdsd::log_writer::install_stderr().append(text.as_bytes());
    imdsd::log_writer::flush(FLUSH_AT_EXIT);
}

fn daemon(config: config::Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(&format!("imdsd: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let app = match App::build(config).await {
            Ok(app) => app,
            Err(StartError::Config(e)) => {
                report(&format!("imdsd: {e}"));
                return ExitCode::from(EX_USAGE);
            }
            Err(StartError::Runtime(e)) => {
                report(&format!("imdsd: {e:#}"));
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        app.run(shutdown).await;
        ExitCode::SUCCESS
    })
}

/// A tool subcommand (`probe`, `doctor`, `network`): a small single-threaded runtime and no
/// daemon logging; the tool prints its own results.
fn tool(run: impl std::future::Future<Output = u8>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => ExitCode::from(rt.block_on(run)),
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "imdsd: cannot start the async runtime: {e}"
            );
            ExitCode::FAILURE
        }
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop imdsd with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
