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
        // Access lines (target keygate::access) are opt-in: KEYGATE_LOG=info,keygate::access=info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,keygate::access=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Keys(cmd) => keygate::cli::run_keys(&Config::load(&cli.config)?, *cmd),
        Command::Serve => Ok(runtime()?.block_on(keygate::server::serve(&cli.config))?),
        Command::Demo { dir, listen, admin } => runtime()?
            .block_on(keygate::demo::run(&dir, &listen, &admin))
            .map_err(|e| Failure(e.to_string())),
        Command::Control => Ok(runtime()?.block_on(keygate::control::run(&cli.config))?),
        Command::AdminToken(cmd) => keygate::cli::run_admin_token(&Config::load(&cli.config)?, cmd),
        Command::Secret(cmd) => keygate::cli::run_secret(&Config::load(&cli.config)?, cmd),
        Command::Check => {
            let (problems, notes) = keygate::check::check(&cli.config);
            for n in &notes {
                eprintln!("note: {n}");
            }
            if problems.is_empty() {
                println!("{}: ok", cli.config.display());
                Ok(())
            } else {
                for p in &problems {
                    eprintln!("problem: {p}");
                }
                Err(Failure(format!(
                    "{} problem(s) in {}",
                    problems.len(),
                    cli.config.display()
                )))
            }
        }
    }
}
