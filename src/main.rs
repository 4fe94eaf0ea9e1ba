//! The `keygate` binary: parse arguments, set up logging, hand over to the library.

use clap::Parser;
use keygate::cli::{Cli, Command, Failure, LogFormat};
use keygate::config::Config;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.into(),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Keys(cmd) => keygate::cli::run_keys(&Config::load(&cli.config)?, cmd),
        Command::Serve | Command::Check | Command::Demo { .. } => {
            Err(Failure("not built yet".into()))
        }
    }
}
