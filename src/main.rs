//! The `keygate` binary: parse arguments, set up logging, hand over to the library.

use clap::{CommandFactory, Parser, ValueEnum};
use keygate::cli::{say, Cli, Command, Failure, Level, LogFormat};
use keygate::config::Config;
use std::io::IsTerminal;
use std::process::ExitCode;

/// jemalloc rather than glibc malloc: a forwarded request allocates and frees a few dozen
/// small blocks (hyper's header maps and buffers, the gateway's header values), which
/// jemalloc's per-thread caches serve for less CPU (docs/performance.md, "Allocator": the A/B
/// figures, and what it costs in memory per idle connection). Those caches are sized for a
/// worker's requests in flight by the build (`.cargo/config.toml`,
/// `JEMALLOC_SYS_WITH_MALLOC_CONF`).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // First, before any code that may use the features in question (see `keygate::cpu`).
    if let Some(line) = keygate::cpu::unsupported() {
        use std::io::Write;
        let _ = std::io::stderr().write_all(line.as_bytes());
        return ExitCode::from(2);
    }
    cli_main()
}

/// Everything `main` does once the CPU is known to run this build; not inlined into `main`, so
/// none of it (stack set-up included) runs before the check.
#[inline(never)]
fn cli_main() -> ExitCode {
    if let Some(code) = bad_log_format_var() {
        return code;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    keygate::cli::set_log_format(cli.log_format);
    init_tracing(cli.log_format);
    match run(&cli.config, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(),
    }
}

/// clap's message for a bad `KEYGATE_LOG_FORMAT` names only `--log-format`, which the operator
/// never typed: say which variable it was.
fn bad_log_format_var() -> Option<ExitCode> {
    let value = std::env::var_os("KEYGATE_LOG_FORMAT")?;
    if LogFormat::from_str(&value.to_string_lossy(), false).is_ok() {
        return None;
    }
    say(
        Level::Error,
        &format!(
            "keygate: error: KEYGATE_LOG_FORMAT: {value:?} is not a log format (human or json)"
        ),
    );
    Some(ExitCode::from(2))
}

/// clap's own output (`--help`, `--version`, usage errors). A usage error under
/// `--log-format json` is one JSON line like every other; the format is read from the raw
/// arguments, since parsing is what failed.
fn usage_error(e: clap::Error) -> ExitCode {
    let json = std::env::args()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| (w[0] == "--log-format" && w[1] == "json") || w[1] == "--log-format=json")
        || std::env::var_os("KEYGATE_LOG_FORMAT").is_some_and(|v| v == "json");
    if !json || !e.use_stderr() {
        e.exit()
    }
    keygate::cli::set_log_format(LogFormat::Json);
    say(Level::Error, e.render().to_string().trim_end());
    ExitCode::from(2)
}

/// Colours only for a person at a terminal: journald, `kubectl logs` and files get plain text.
/// `NO_COLOR` (any non-empty value, no-color.org) turns them off even there.
fn use_ansi() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        // Access lines (target keygate::access) are opt-in: KEYGATE_LOG=info,keygate::access=info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,keygate::access=warn"));
    // Standard error, access lines through a queue (`access::subscriber`).
    let subscriber = keygate::access::subscriber(format, use_ansi(), filter);
    // Nothing has set a subscriber before `main` does.
    let _ = tracing::subscriber::set_global_default(subscriber);
    if format == LogFormat::Json {
        // A panic's default report is plain multi-line text: as JSON, it stays one line.
        std::panic::set_hook(Box::new(|info| {
            say(Level::Error, &format!("panic: {info}"));
        }));
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(config: &std::path::Path, command: Command) -> Result<(), Failure> {
    match command {
        Command::Keys(cmd) => keygate::cli::run_keys(&Config::load(config)?, *cmd),
        Command::Serve => Ok(runtime()?.block_on(keygate::server::serve(config))?),
        Command::Demo { dir, listen, admin } => runtime()?
            .block_on(keygate::demo::run(&dir, &listen, &admin))
            .map_err(|e| Failure::Error(e.to_string())),
        Command::Control => Ok(runtime()?.block_on(keygate::control::run(config))?),
        Command::AdminToken(cmd) => keygate::cli::run_admin_token(&Config::load(config)?, cmd),
        Command::Secret(cmd) => keygate::cli::run_secret(&Config::load(config)?, cmd),
        Command::Store(cmd) => keygate::cli::run_store(&Config::load(config)?, cmd),
        Command::Check { json } => check(config, json),
        // Exit statuses of its own: 0 nothing exposed, 1 exposed keys, 2 error.
        Command::Scan(args) => match keygate::scan::run(config, *args) {
            code if code == ExitCode::SUCCESS => Ok(()),
            code => Err(Failure::Status(code)),
        },
        Command::Health { addr, timeout } => health(config, addr, &timeout),
        Command::Tokens(cmd) => keygate::tokens::cli::run(&Config::load(config)?, cmd),
        Command::Webhooks(cmd) => keygate::cli::run_webhooks(&Config::load(config)?, cmd),
        Command::Report { json } => keygate::governance::run_report(&Config::load(config)?, json),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "keygate", &mut script);
            keygate::cli::out(String::from_utf8_lossy(&script).trim_end())
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            keygate::cli::out(String::from_utf8_lossy(&page).trim_end())
        }
    }
}

/// `keygate check`: notes and problems on stderr (or one JSON object on stdout with `--json`);
/// non-zero exit when there are problems.
fn check(config: &std::path::Path, json: bool) -> Result<(), Failure> {
    let (problems, notes) = keygate::check::check(config);
    if json {
        keygate::cli::out(
            &serde_json::json!({
                "config": config,
                "ok": problems.is_empty(),
                "problems": problems,
                "notes": notes,
            })
            .to_string(),
        )?;
    } else {
        for n in &notes {
            say(Level::Info, &format!("note: {n}"));
        }
        for p in &problems {
            say(Level::Error, &format!("problem: {p}"));
        }
        if problems.is_empty() {
            keygate::cli::out(&format!("{}: ok", config.display()))?;
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::Error(format!(
            "{} problem(s) in {}",
            problems.len(),
            config.display()
        )))
    }
}

/// `keygate health`: the admin address from `--addr` or the config, then one `/readyz`.
fn health(config: &std::path::Path, addr: Option<String>, timeout: &str) -> Result<(), Failure> {
    let timeout = keygate::config::parse_duration(timeout).map_err(Failure::Error)?;
    let listen = match addr {
        Some(a) => a,
        None => Config::load(config)?.admin.listen,
    };
    let target = keygate::health::target(&listen)?;
    let body = keygate::health::check(target, timeout)?;
    keygate::cli::out(&body)
}
