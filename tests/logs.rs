//! What the real binary writes on stderr and stdout, as a log pipeline and a shell see it:
//! JSON-only output under `--log-format json` (fatal errors included), colours only on a
//! terminal (`script` gives the binary a real pty), and a closed stdout pipe ending quietly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const POLL: Duration = Duration::from_secs(10);

/// Every non-empty line of `text` is a JSON object with a non-empty string `message`.
fn assert_json_lines(text: &str) {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no output at all");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\n--- all ---\n{text}"));
        let message = v["message"].as_str().unwrap_or("");
        assert!(!message.is_empty(), "no message: {line}");
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
    }
}

fn keygate(args: &[&str]) -> Command {
    let mut c = Command::new(keygate_bin());
    c.args(args)
        .env(SECRET_VAR, SECRET)
        .env_remove("KEYGATE_CONFIG")
        .env_remove("KEYGATE_LOG")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    c
}

#[test]
fn json_log_format_writes_only_json_even_for_fatal_and_usage_errors() {
    let dir = tempdir();
    let bad = write_file(dir.path(), "bad.toml", "[server\nnot toml = = =\n");
    let cfg = bad.to_str().unwrap();
    for args in [
        // A fatal config error at start.
        vec!["--log-format", "json", "--config", cfg, "serve"],
        // The format given after the subcommand, and a CLI command.
        vec!["--config", cfg, "keys", "list", "--log-format=json"],
        // A usage error: clap fails before the config is read.
        vec!["--log-format", "json", "serve", "--no-such-flag"],
    ] {
        let out = keygate(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert_json_lines(&stderr_str(&out));
        assert!(stdout_str(&out).is_empty(), "{args:?}");
    }
    let out = keygate(&["--log-format", "json", "--config", cfg, "serve"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(stderr_str(&out).trim()).unwrap();
    assert_eq!(v["level"], "ERROR");
    assert!(
        v["message"].as_str().unwrap().contains("bad.toml"),
        "names the file: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_serve_access_and_shutdown_lines_are_all_json() {
    let up = Upstream::start(Mode::Echo).await;
    let dir = tempdir();
    let config = write_file(
        dir.path(),
        "keygate.toml",
        &gateway_config(
            up.addr(),
            100,
            "",
            "",
            "[[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"up\"\n",
        ),
    );
    let key = create_key(&config, &[]);
    let mut gw = spawn_ready_args(
        &config,
        &["--log-format", "json"],
        &[("KEYGATE_LOG", "info,keygate::access=info")],
        POLL,
    )
    .await;
    let auth = format!("Bearer {}", key.key);
    assert_eq!(get(gw.http, "/x", &[("authorization", &auth)]).await.0, 200);
    assert_eq!(get(gw.http, "/x", &[]).await.0, 401);
    eventually_named("two access lines", POLL, || async {
        (gw.stderr_contents().matches("\"request\"").count() >= 2).then_some(())
    })
    .await;
    gw.sigterm();
    assert!(gw.wait_exit(POLL).await.success());
    let stderr = gw.stderr_contents();
    assert_json_lines(&stderr);
    assert!(!stderr.contains('\u{1b}'), "escape codes in JSON logs");
    gw.assert_not_logged(&key.key);
}

const MINIMAL: &str =
    "[keys]\nstore = \"keys.jsonl\"\naudit_log = \"audit.jsonl\"\n[plans.default]\nrate = \"1/s\"\n";

/// `keygate keys create` on a fresh store: its "new key store log" line is a tracing event,
/// coloured when colours are on. `pty`: run under `script`, which gives it a real terminal
/// (stdout and stderr both end up in `script`'s stdout); else stderr is a pipe.
fn create_on_fresh_store(pty: bool, envs: &[(&str, &str)]) -> String {
    let dir = tempdir();
    let config = write_file(dir.path(), "keygate.toml", MINIMAL);
    let bin = keygate_bin();
    let cfg = config.to_str().unwrap();
    let args = [
        "--config", cfg, "keys", "create", "--name", "n", "--owner", "o",
    ];
    let mut c = if pty {
        let line = format!("{} {}", bin.display(), args.join(" "));
        let mut c = Command::new(require_tool("script", "bsdutils"));
        c.args(["-q", "-e", "-c", &line, "/dev/null"]);
        c
    } else {
        let mut c = Command::new(&bin);
        c.args(args);
        c
    };
    c.env(SECRET_VAR, SECRET)
        .env_remove("NO_COLOR")
        .env_remove("KEYGATE_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = if pty {
        stdout_str(&out)
    } else {
        stderr_str(&out)
    };
    assert!(text.contains("new key store log"), "{text:?}");
    text
}

#[test]
fn colours_only_on_a_terminal_and_never_with_no_color() {
    // A terminal gets colours (this proves the pty path works)...
    let tty = create_on_fresh_store(true, &[]);
    assert!(tty.contains('\u{1b}'), "no colours on a terminal: {tty:?}");
    // ...unless NO_COLOR says otherwise.
    let no_color = create_on_fresh_store(true, &[("NO_COLOR", "1")]);
    assert!(
        !no_color.contains('\u{1b}'),
        "NO_COLOR ignored: {no_color:?}"
    );
    // A pipe (journald, kubectl logs) never gets them.
    let piped = create_on_fresh_store(false, &[]);
    assert!(
        !piped.contains('\u{1b}'),
        "escape codes in a pipe: {piped:?}"
    );
}

#[test]
fn a_closed_stdout_pipe_exits_zero_quietly() {
    let dir = tempdir();
    let config = write_file(dir.path(), "keygate.toml", MINIMAL);
    for _ in 0..2 {
        create_key(&config, &[]);
    }
    let cfg = config.to_str().unwrap();
    // The reader is gone before the first write: every write is EPIPE, deterministically.
    for args in [
        vec!["--config", cfg, "keys", "list"],
        vec!["--config", cfg, "keys", "list", "--json"],
        vec!["--config", cfg, "check"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = keygate(&args)
            .env("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS", "60")
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = stderr_str(&out);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(
            !stderr.to_lowercase().contains("pipe"),
            "{args:?}: {stderr}"
        );
    }
    // And as a shell runs it.
    let sh = format!(
        "set -o pipefail; {} --config {cfg} keys list | head -1 >/dev/null",
        keygate_bin().display()
    );
    let out = Command::new("bash")
        .args(["-c", &sh])
        .env(SECRET_VAR, SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(stderr_str(&out).is_empty(), "{out:?}");
}
