//! `imdsd doctor`: checks a setup piece by piece and says how to fix what is broken.

/// `imdsd doctor` options: the daemon's own flags, checked as the daemon would use them.
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// The daemon's flags (e.g. --config /etc/imdsd/imdsd.toml); its environment variables count too.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "DAEMON_FLAGS")]
    pub daemon_args: Vec<String>,
}

/// Runs every check; returns the exit code (0 only if all pass).
pub async fn run(args: DoctorArgs) -> u8 {
    let _ = args;
    eprintln!("imdsd doctor: not implemented yet");
    2
}
