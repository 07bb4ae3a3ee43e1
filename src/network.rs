//! `imdsd network up|down`: sets up, and removes exactly, what a layout needs on the host.

/// `imdsd network` options.
#[derive(Debug, Clone, clap::Args)]
pub struct NetworkArgs {
    #[command(subcommand)]
    pub action: NetworkAction,
}

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum NetworkAction {
    /// Create what the layout needs (idempotent).
    Up,
    /// Remove what `up` created, and nothing else.
    Down,
}

/// Runs the action; returns the exit code.
pub async fn run(args: NetworkArgs) -> u8 {
    let _ = args;
    eprintln!("imdsd network: not implemented yet");
    2
}
