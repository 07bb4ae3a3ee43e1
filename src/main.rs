//! The `imdsd` binary: reads the configuration, sets up logging, runs the daemon until SIGTERM or
//! SIGINT (or runs a tool: `probe`, `doctor`, `network`), and maps the outcome to an exit code (0 clean, 64 configuration, 1 runtime failure).

use std::process::ExitCode;

use imdsd::app::{App, StartError};
use imdsd::config::{self, Parsed};
use tokio_util::sync::CancellationToken;

const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let config = match config::parse(std::env::args_os(), &env) {
        Ok(Parsed::Run(config)) => *config,
        Ok(Parsed::Info(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Probe(args)) => return tool(imdsd::probe::run(args)),
        Ok(Parsed::Doctor(args)) => return tool(imdsd::doctor::run(args)),
        Ok(Parsed::Network(args)) => return tool(imdsd::network::run(args)),
        Err(e) => {
            eprint!("imdsd: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    imdsd::logging::init(config.log_format, &config.log_filter);
    imdsd::server::raise_descriptor_limit();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imdsd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let app = match App::build(config).await {
            Ok(app) => app,
            Err(StartError::Config(e)) => {
                eprint!("imdsd: {e}");
                return ExitCode::from(EX_USAGE);
            }
            Err(StartError::Runtime(e)) => {
                eprintln!("imdsd: {e:#}");
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
            eprintln!("imdsd: cannot start the async runtime: {e}");
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
