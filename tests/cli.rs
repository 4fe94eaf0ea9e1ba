//! Integration tests of the `keygate keys …` command line: the real binary as a subprocess, on
//! a temporary directory with a config written by each test.
//!
//! No fixed ports, no sleeps for synchronisation: children are waited for with a deadline,
//! time-dependent states (expiry) are polled with a deadline, and every loop is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod common;

/// 48 characters: well above the 32-byte minimum.
const SECRET: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL";
const SECRET_VAR: &str = "API_KEY_HASH_SECRET";
/// Upper bound for any one CLI invocation.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for a polled condition.
const POLL_DEADLINE: Duration = Duration::from_secs(15);

const CONFIG: &str = r#"[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"

[policy]
max_ttl = "365d"
require_owner = true

[plans.default]
rate = "100/s"
"#;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A finished CLI invocation.
#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim_end())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:?}"))
    }
}

/// Wait for a child with a deadline, collecting its output; kills it on timeout.
fn finish(mut child: Child, what: &str) -> Run {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > CLI_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: did not finish within {CLI_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Run {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// One test's world: a temp dir with a config, a store and an audit log.
struct Env {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Env {
    fn new() -> Env {
        Env::with_config(CONFIG)
    }

    fn with_config(text: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("keygate.toml");
        std::fs::write(&config, text).unwrap();
        Env { dir, config }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn store(&self) -> PathBuf {
        self.path("keys.jsonl")
    }

    fn audit(&self) -> PathBuf {
        self.path("audit.jsonl")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.keygate_command(&["keys"]);
        c.args(args);
        c
    }

    /// `keygate --config <config> <args…>` (any subcommand), with the test environment.
    fn keygate_command(&self, args: &[&str]) -> Command {
        self.wrapped_command(&[], args)
    }

    /// [`Env::keygate_command`] run through `wrapper` (a program and its arguments, such as
    /// `setpriv --reuid …`), or directly when it is empty.
    fn wrapped_command(&self, wrapper: &[&std::ffi::OsStr], args: &[&str]) -> Command {
        let bin = std::ffi::OsStr::new(env!("CARGO_BIN_EXE_keygate"));
        let mut c = match wrapper {
            [program, rest @ ..] => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            [] => Command::new(bin),
        };
        c.arg("--config")
            .arg(&self.config)
            .args(args)
            .env(SECRET_VAR, SECRET)
            .env("USER", "cli-tester")
            .env_remove("KEYGATE_CONFIG")
            .env_remove("KEYGATE_LOG")
            .env_remove("RUST_LOG")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().unwrap()
    }

    fn run_cmd(&self, mut c: Command, what: &str) -> Run {
        finish(c.spawn().unwrap(), what)
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_cmd(self.command(args), &format!("keys {args:?}"))
    }

    /// Run any `keygate` subcommand (not only `keys …`).
    fn keygate(&self, args: &[&str]) -> Run {
        self.run_cmd(self.keygate_command(args), &format!("keygate {args:?}"))
    }

    fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert!(r.status.success(), "keys {args:?} failed: {r:?}");
        r
    }

    fn fail(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert!(!r.status.success(), "keys {args:?} should fail: {r:?}");
        r
    }

    /// `keys create --json` with a default name/owner; returns (record incl. key, key).
    fn create(&self, extra: &[&str]) -> (Value, String) {
        let mut args = vec!["create", "--json"];
        if !extra.contains(&"--name") {
            args.extend(["--name", "svc"]);
        }
        if !extra.contains(&"--owner") {
            args.extend(["--owner", "team-a"]);
        }
        args.extend(extra);
        let v = self.ok(&args).json();
        let key = v["key"].as_str().unwrap().to_owned();
        (v, key)
    }

    fn create_id(&self, extra: &[&str]) -> String {
        id(&self.create(extra).0)
    }

    fn show(&self, id: &str) -> Value {
        self.ok(&["show", id, "--json"]).json()
    }

    fn list(&self, filters: &[&str]) -> Vec<Value> {
        let mut args = vec!["list", "--json"];
        args.extend(filters);
        let r = self.ok(&args);
        assert!(!r.stderr.contains("skipped"), "{r:?}");
        r.json().as_array().unwrap().clone()
    }

    fn list_ids(&self, filters: &[&str]) -> BTreeSet<String> {
        self.list(filters).iter().map(id).collect()
    }

    fn store_text(&self) -> String {
        std::fs::read_to_string(self.store()).unwrap_or_default()
    }

    /// Every record and meta line of the store, parsed (the header naming the log is left
    /// out); panics on a line that is not JSON.
    fn store_lines(&self) -> Vec<Value> {
        self.store_text()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("store line {l:?}: {e}"))
            })
            .filter(|v| v.get("header").is_none())
            .collect()
    }

    /// The store's log id (its header line).
    fn store_log(&self) -> keygate::store::seal::LogId {
        let first: Value = serde_json::from_str(self.store_text().lines().next().unwrap()).unwrap();
        first["log"].as_str().unwrap().parse().unwrap()
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(self.audit()).unwrap_or_default()
    }

    fn audit_lines(&self) -> Vec<Value> {
        self.audit_text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The audit lines of one `event`, in order.
    fn audit_events(&self, event: &str) -> Vec<Value> {
        self.audit_lines()
            .into_iter()
            .filter(|e| e["event"] == event)
            .collect()
    }

    /// Poll `list --state expired` until `id` shows up there.
    fn await_expired(&self, id: &str) {
        let start = Instant::now();
        loop {
            if self.list_ids(&["--state", "expired"]).contains(id) {
                return;
            }
            assert!(
                start.elapsed() < POLL_DEADLINE,
                "{id} did not expire within {POLL_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The real uid of the test process (the first number of `Uid:` in `/proc/self/status`).
fn real_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

fn ids<'a>(v: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    v.into_iter().map(str::to_owned).collect()
}

/// `kg_<env>_` + 43 + 6 base62 characters.
fn assert_key_shape(key: &str, env: &str) {
    let prefix = format!("kg_{env}_");
    assert!(key.starts_with(&prefix), "{key}");
    let body = &key[prefix.len()..];
    assert_eq!(body.len(), 49, "{key}");
    assert!(body.bytes().all(|b| b.is_ascii_alphanumeric()), "{key}");
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

// ---------------------------------------------------------------------------------------------
// 1. create
// ---------------------------------------------------------------------------------------------

#[test]
fn create_prints_the_key_alone_and_json_carries_the_record() {
    let env = Env::new();

    // Default: stdout is exactly the key and a newline; the id goes to stderr.
    let r = env.ok(&["create", "--name", "billing", "--owner", "team-a"]);
    assert!(
        r.stdout.ends_with('\n') && r.stdout.lines().count() == 1,
        "{r:?}"
    );
    let key = r.stdout.trim_end_matches('\n');
    assert_key_shape(key, "live");
    let listed = env.list(&[]);
    assert_eq!(listed.len(), 1);
    let first = id(&listed[0]);
    assert!(first.starts_with("key_"), "{first}");
    assert!(r.stderr.contains(&first), "stderr names the id: {r:?}");
    assert!(!r.stderr.contains(key));

    // --json: one object with the record and the key, never the digest.
    let t0 = now();
    let r = env.ok(&[
        "create",
        "--name",
        "billing",
        "--owner",
        "team-a",
        "--scope",
        "invoices:read",
        "--scope",
        "invoices:write",
        "--expires-in",
        "30d",
        "--json",
    ]);
    assert_eq!(r.stdout.lines().count(), 1, "{r:?}");
    let v = r.json();
    let obj = v.as_object().unwrap();
    assert!(id(&v).starts_with("key_"));
    assert_key_shape(v["key"].as_str().unwrap(), "live");
    assert_eq!(v["state"], "active");
    assert_eq!(
        v["scopes"],
        serde_json::json!(["invoices:read", "invoices:write"])
    );
    let exp = v["expires_at"].as_i64().unwrap();
    assert!(
        (t0 + 30 * 86_400..=now() + 30 * 86_400).contains(&exp),
        "{exp}"
    );
    assert!(!obj.contains_key("digest"), "{v}");
    assert!(r.stderr.contains(&id(&v)));

    // --env test
    let (v, key) = env.create(&["--env", "test"]);
    assert_key_shape(&key, "test");
    assert_eq!(v["env"], "test");

    // --canary
    let (v, _) = env.create(&["--canary"]);
    assert_eq!(v["state"], "canary");
    assert_eq!(v["canary"], true);
    assert_eq!(env.show(&id(&v))["state"], "canary");

    // Network, origin, label and plan round-trip through `show --json`.
    let (v, _) = env.create(&[
        "--allow-ip",
        "10.0.0.0/8",
        "--allow-origin",
        "https://app.example",
        "--label",
        "team=x",
        "--plan",
        "default",
    ]);
    let shown = env.show(&id(&v));
    assert_eq!(shown["allow_ips"], serde_json::json!(["10.0.0.0/8"]));
    assert_eq!(
        shown["allow_origins"],
        serde_json::json!(["https://app.example"])
    );
    assert_eq!(shown["labels"], serde_json::json!({"team": "x"}));
    assert_eq!(shown["plan"], "default");
    assert_eq!(shown["owner"], "team-a");
    assert_eq!(shown["state"], "active");
    assert!(shown.get("digest").is_none() && shown.get("key").is_none());
    let mut minted = v.clone();
    minted.as_object_mut().unwrap().remove("key");
    assert_eq!(shown, minted, "show agrees with what create printed");
}

// ---------------------------------------------------------------------------------------------
// 2. secrets
// ---------------------------------------------------------------------------------------------

#[test]
fn plaintext_keys_and_digests_stay_where_they_belong() {
    let env = Env::new();
    let mut stderr = String::new();
    let mut stdouts = String::new();
    let mut keys = vec![];

    let r = env.ok(&["create", "--name", "a", "--owner", "o"]);
    let k1 = r.stdout.trim_end().to_owned();
    assert_eq!(count(&r.stdout, &k1), 1);
    stderr += &r.stderr;
    stdouts += &r.stdout;
    keys.push(k1.clone());
    let k1_id = id(&env.list(&[])[0]);

    let r = env.ok(&["create", "--name", "b", "--owner", "o", "--json"]);
    let k2 = r.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(count(&r.stdout, &k2), 1);
    stderr += &r.stderr;
    stdouts += &r.stdout;
    keys.push(k2);

    let r = env.ok(&["rotate", &k1_id]);
    let k3 = r.stdout.trim_end().to_owned();
    assert_key_shape(&k3, "live");
    assert_eq!(count(&r.stdout, &k3), 1);
    stderr += &r.stderr;
    stdouts += &r.stdout;
    keys.push(k3.clone());
    let k3_id = env
        .list(&[])
        .iter()
        .find(|v| v["rotated_from"] == k1_id.as_str())
        .map(id)
        .unwrap();

    let r = env.ok(&["rotate", &k3_id, "--json"]);
    let k4 = r.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(count(&r.stdout, &k4), 1);
    stderr += &r.stderr;
    stdouts += &r.stdout;
    keys.push(k4);

    let store = env.store_text();
    let audit = env.audit_text();
    for k in &keys {
        assert_eq!(count(&store, k), 0, "key in store");
        assert_eq!(count(&audit, k), 0, "key in audit log");
        assert_eq!(count(&stderr, k), 0, "key on stderr");
        assert_eq!(count(&stdouts, k), 1, "key printed exactly once");
        // Not even the secret part without its prefix.
        assert_eq!(count(&store, &k[8..]), 0);
    }

    // Digests: in the store (that is their place), in no command's stdout, not in the audit log.
    let digests: BTreeSet<String> = env
        .store_lines()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(digests.len(), 4);
    let id_list: Vec<String> = env.list(&[]).iter().map(id).collect();
    let mut outputs = vec![
        stdouts,
        env.ok(&["list", "--json"]).stdout,
        env.ok(&["list"]).stdout,
        env.ok(&["expiring", "--within", "365d", "--json"]).stdout,
        env.ok(&["update", &id_list[1], "--scope", "x:y", "--json"])
            .stdout,
        env.ok(&["update", &id_list[1], "--scope", "x:z"]).stdout,
    ];
    for i in &id_list {
        outputs.push(env.ok(&["show", i, "--json"]).stdout);
        outputs.push(env.ok(&["show", i]).stdout);
    }
    outputs.push(env.ok(&["revoke", &id_list[1], "--json"]).stdout);
    outputs.push(
        env.ok(&["revoke", "--owner", "o", "--yes", "--json"])
            .stdout,
    );
    let audit = env.audit_text();
    for d in &digests {
        for o in &outputs {
            assert!(!o.contains(d.as_str()), "digest in stdout: {o}");
        }
        assert!(!audit.contains(d.as_str()), "digest in audit log");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. error paths
// ---------------------------------------------------------------------------------------------

#[test]
fn errors_exit_non_zero_and_name_the_problem() {
    let env = Env::new();
    let live = env.create_id(&[]);
    let revoked = env.create_id(&[]);
    env.ok(&["revoke", &revoked]);
    let before = env.store_text();
    let audit_before = env.audit_text();

    let create = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut a = vec!["create", "--name", "n", "--owner", "o"];
        a.extend(extra);
        a
    };
    let cases: Vec<(&str, Vec<&str>, &[&str])> = vec![
        (
            "bad duration",
            create(&["--expires-in", "soon"]),
            &["bad duration", "soon"],
        ),
        (
            "unknown plan",
            create(&["--plan", "gold"]),
            &["unknown plan", "gold", "default"],
        ),
        (
            "bad rate",
            create(&["--rate", "fast"]),
            &["bad rate", "fast"],
        ),
        ("zero rate", create(&["--rate", "0/s"]), &["bad rate"]),
        (
            "ttl over policy",
            create(&["--expires-in", "400d"]),
            &["400 days", "365", "max_ttl"],
        ),
        (
            "owner required",
            vec!["create", "--name", "n"],
            &["requires an owner", "--owner"],
        ),
        (
            "invalid env",
            create(&["--env", "prod"]),
            &["unknown env", "prod"],
        ),
        ("bad scope", create(&["--scope", "a b"]), &["bad scope"]),
        (
            "bad origin",
            create(&["--allow-origin", "*"]),
            &["bad origin"],
        ),
        ("bad label", create(&["--label", "nolabel"]), &["bad label"]),
        (
            "show unknown id",
            vec!["show", "key_nosuchkey"],
            &["no key with id key_nosuchkey"],
        ),
        (
            "update unknown id",
            vec!["update", "key_nosuchkey", "--scope", "a"],
            &["no key with id key_nosuchkey"],
        ),
        (
            "revoke unknown id",
            vec!["revoke", "key_nosuchkey"],
            &["no key with id key_nosuchkey"],
        ),
        (
            "rotate unknown id",
            vec!["rotate", "key_nosuchkey"],
            &["no key with id key_nosuchkey"],
        ),
        (
            "mass revoke without --yes",
            vec!["revoke", "--owner", "team-a"],
            &["--yes"],
        ),
        (
            "update ttl over policy",
            vec!["update", &live, "--expires-in", "400d"],
            &["max_ttl"],
        ),
        (
            "update revoked",
            vec!["update", &revoked, "--scope", "a"],
            &["revoked"],
        ),
        (
            "rotate revoked",
            vec!["rotate", &revoked],
            &["revoked", "only active keys"],
        ),
        (
            "rotate bad grace",
            vec!["rotate", &live, "--grace", "later"],
            &["bad duration", "later"],
        ),
    ];
    for (what, args, needles) in &cases {
        let r = env.fail(args);
        assert_eq!(r.status.code(), Some(1), "{what}: {r:?}");
        assert!(r.stderr.contains("keygate: error:"), "{what}: {r:?}");
        for n in *needles {
            assert!(r.stderr.contains(n), "{what}: stderr lacks {n:?}: {r:?}");
        }
        assert!(r.stdout.is_empty(), "{what}: {r:?}");
    }
    assert_eq!(env.store_text(), before, "failed commands wrote nothing");
    assert_eq!(
        env.audit_text(),
        audit_before,
        "failed commands audited nothing"
    );
    assert_eq!(env.list_ids(&["--state", "active"]), ids([live.as_str()]));

    // Secret problems: missing, and too short.
    let mut c = env.command(&["create", "--name", "n", "--owner", "o"]);
    c.env_remove(SECRET_VAR);
    let r = env.run_cmd(c, "missing secret");
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    assert!(r.stderr.contains("API_KEY_HASH_SECRET"), "{r:?}");
    assert!(r.stderr.contains("not set"), "{r:?}");
    let mut c = env.command(&["list"]);
    c.env(SECRET_VAR, &SECRET[..31]);
    let r = env.run_cmd(c, "short secret");
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    assert!(r.stderr.contains("32"), "{r:?}");
    assert!(r.stderr.contains("31 bytes"), "{r:?}");
    assert_eq!(env.store_text(), before);

    // A typo in the config names the field.
    let typo = Env::with_config(&CONFIG.replace("store =", "stroe ="));
    let r = typo.fail(&["list"]);
    assert!(r.stderr.contains("stroe"), "{r:?}");
    assert!(r.stderr.contains("keygate.toml"), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. list
// ---------------------------------------------------------------------------------------------

#[test]
fn list_filters_by_owner_env_and_state_in_table_and_json() {
    let env = Env::new();
    // The short-lived key first, so it is expired by the time the rest exist.
    let e = env.create_id(&["--owner", "alice", "--expires-in", "1s"]);
    let a = env.create_id(&["--owner", "alice", "--expires-in", "30d"]);
    let b = env.create_id(&["--owner", "bob", "--env", "test"]);
    let c = env.create_id(&["--owner", "alice", "--canary"]);
    let d = env.create_id(&["--owner", "bob"]);
    env.ok(&["revoke", &d]);
    env.await_expired(&e);

    let all = ids([a.as_str(), b.as_str(), c.as_str(), d.as_str(), e.as_str()]);
    let cases: Vec<(&[&str], BTreeSet<String>)> = vec![
        (&[], all.clone()),
        (
            &["--owner", "alice"],
            ids([a.as_str(), c.as_str(), e.as_str()]),
        ),
        (&["--owner", "bob"], ids([b.as_str(), d.as_str()])),
        (&["--owner", "nobody"], ids([])),
        (&["--env", "test"], ids([b.as_str()])),
        (
            &["--env", "live"],
            ids([a.as_str(), c.as_str(), d.as_str(), e.as_str()]),
        ),
        (&["--state", "active"], ids([a.as_str(), b.as_str()])),
        (&["--state", "revoked"], ids([d.as_str()])),
        (&["--state", "canary"], ids([c.as_str()])),
        (&["--state", "expired"], ids([e.as_str()])),
        (&["--owner", "bob", "--state", "active"], ids([b.as_str()])),
        (&["--owner", "alice", "--env", "test"], ids([])),
    ];
    for (filters, want) in &cases {
        let listed = env.list(filters);
        let got: BTreeSet<String> = listed.iter().map(id).collect();
        assert_eq!(&got, want, "list {filters:?}");
        assert_eq!(listed.len(), want.len(), "no duplicates for {filters:?}");
        for r in &listed {
            assert!(r.get("digest").is_none());
            if let Some(s) = filters
                .iter()
                .position(|f| *f == "--state")
                .map(|i| filters[i + 1])
            {
                assert_eq!(r["state"], s);
            }
        }
        // The human table: a header and one row per key, naming each id.
        let mut args = vec!["list"];
        args.extend(*filters);
        let table = env.ok(&args).stdout;
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ID"), "{table}");
        assert!(
            lines[0].contains("STATE") && lines[0].contains("OWNER"),
            "{table}"
        );
        assert_eq!(lines.len(), 1 + want.len(), "{table}");
        for i in want {
            let row = lines.iter().find(|l| l.starts_with(i.as_str())).unwrap();
            let state = env.show(i)["state"].as_str().unwrap().to_owned();
            assert!(row.contains(&state), "{row}");
        }
    }
    // JSON is sorted by creation and states are right.
    let states: BTreeMap<String, String> = env
        .list(&[])
        .iter()
        .map(|r| (id(r), r["state"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(states[&a], "active");
    assert_eq!(states[&b], "active");
    assert_eq!(states[&c], "canary");
    assert_eq!(states[&d], "revoked");
    assert_eq!(states[&e], "expired");
    // An unknown state value is a usage error.
    let r = env.fail(&["list", "--state", "zombie"]);
    assert!(r.stderr.contains("zombie"), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. update
// ---------------------------------------------------------------------------------------------

#[test]
fn update_replaces_grants_edits_labels_and_refuses_revoked_keys() {
    let env = Env::with_config(&format!("{CONFIG}\n[plans.bulk]\nrate = \"1000/s\"\n"));
    let (v, key) = env.create(&[
        "--scope",
        "a:read",
        "--scope",
        "b:read",
        "--plan",
        "default",
        "--label",
        "team=x",
        "--label",
        "tier=gold",
        "--expires-in",
        "30d",
        "--allow-ip",
        "10.0.0.0/8",
    ]);
    let k = id(&v);

    let u = env
        .ok(&[
            "update", &k, "--scope", "c:write", "--scope", "d:read", "--json",
        ])
        .json();
    assert_eq!(u["scopes"], serde_json::json!(["c:write", "d:read"]));
    assert_eq!(u["plan"], "default", "untouched fields stay");
    assert_eq!(u["allow_ips"], serde_json::json!(["10.0.0.0/8"]));

    let u = env.ok(&["update", &k, "--plan", "bulk", "--json"]).json();
    assert_eq!(u["plan"], "bulk");
    assert_eq!(u["scopes"], serde_json::json!(["c:write", "d:read"]));

    let u = env.ok(&["update", &k, "--rate", "5/s", "--json"]).json();
    assert_eq!(u["rate"], "5/s");
    assert!(u.get("plan").is_none(), "a rate replaces the plan: {u}");

    let u = env
        .ok(&[
            "update", &k, "--label", "site=eu", "--label", "team=", "--json",
        ])
        .json();
    assert_eq!(
        u["labels"],
        serde_json::json!({"site": "eu", "tier": "gold"})
    );

    assert!(u["expires_at"].is_i64());
    let u = env.ok(&["update", &k, "--no-expiry", "--json"]).json();
    assert!(u.get("expires_at").is_none(), "{u}");
    assert_eq!(u["state"], "active");

    let r = env.ok(&["update", &k, "--name", "renamed"]);
    assert!(r.stderr.contains(&format!("updated {k}")), "{r:?}");
    let shown = env.show(&k);
    assert_eq!(shown["name"], "renamed");
    assert_eq!(
        shown["owner"], "team-a",
        "owners are fixed (see update_refuses_owner_changes_like_the_api)"
    );
    assert_eq!(shown["scopes"], serde_json::json!(["c:write", "d:read"]));
    assert_eq!(shown["hint"], v["hint"], "the key itself is unchanged");
    assert!(!env.store_text().contains(&key));

    // Conflicting flags are usage errors.
    env.fail(&["update", &k, "--no-expiry", "--expires-in", "1d"]);
    env.fail(&["update", &k, "--plan", "bulk", "--rate", "1/s"]);
    // Any owner change is refused, an empty one too.
    let r = env.fail(&["update", &k, "--owner", ""]);
    assert!(r.stderr.contains("owner"), "{r:?}");

    env.ok(&["revoke", &k]);
    let before = env.store_text();
    let r = env.fail(&["update", &k, "--scope", "e:read"]);
    assert!(r.stderr.contains("revoked"), "{r:?}");
    assert_eq!(env.store_text(), before);
    assert_eq!(env.show(&k)["state"], "revoked");
}

// ---------------------------------------------------------------------------------------------
// 6. revoke
// ---------------------------------------------------------------------------------------------

#[test]
fn revoke_single_is_idempotent_and_audited_once() {
    let env = Env::new();
    let k = env.create_id(&[]);
    let other = env.create_id(&[]);
    let r = env.ok(&["revoke", &k, "--reason", "leaked in a ticket"]);
    assert!(r.stderr.contains(&format!("revoked {k}")), "{r:?}");
    let shown = env.show(&k);
    assert_eq!(shown["state"], "revoked");
    assert_eq!(shown["revoked_reason"], "leaked in a ticket");
    let revoked_at = shown["revoked_at"].as_i64().unwrap();
    let lines = env.store_lines().len();

    // Again: exit 0, nothing written, the first reason and time stay.
    let r = env.ok(&["revoke", &k, "--reason", "second", "--json"]);
    assert_eq!(r.json()["state"], "revoked");
    let shown = env.show(&k);
    assert_eq!(shown["revoked_reason"], "leaked in a ticket");
    assert_eq!(shown["revoked_at"].as_i64().unwrap(), revoked_at);
    assert_eq!(env.store_lines().len(), lines);

    let revoked_events = env.audit_events("key.revoked");
    assert_eq!(revoked_events.len(), 1, "{revoked_events:?}");
    assert_eq!(revoked_events[0]["key_id"], k.as_str());
    assert_eq!(env.show(&other)["state"], "active");
}

#[test]
fn mass_revoke_hits_exactly_the_selected_keys() {
    let env = Env::new();
    let a1 = env.create_id(&["--owner", "alice"]);
    let a2 = env.create_id(&["--owner", "alice", "--env", "test"]);
    let b1 = env.create_id(&["--owner", "bob", "--label", "team=red"]);
    let b2 = env.create_id(&["--owner", "bob", "--label", "team=blue"]);
    let c1 = env.create_id(&["--owner", "carol", "--env", "test"]);
    let c2 = env.create_id(&["--owner", "carol"]);
    let c3 = env.create_id(&["--owner", "carol", "--label", "team=red"]);

    let revoked = |env: &Env| env.list_ids(&["--state", "revoked"]);

    // Without --yes nothing happens.
    let r = env.fail(&["revoke", "--owner", "alice"]);
    assert!(r.stderr.contains("--yes"), "{r:?}");
    assert!(revoked(&env).is_empty());
    // An id and a selector do not mix.
    env.fail(&["revoke", &a1, "--owner", "alice", "--yes"]);

    let r = env.ok(&[
        "revoke",
        "--owner",
        "alice",
        "--yes",
        "--json",
        "--reason",
        "offboarded",
    ]);
    let got: BTreeSet<String> = r.json()["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ids([a1.as_str(), a2.as_str()]));
    assert!(r.stderr.contains("revoked 2 keys"), "{r:?}");
    assert_eq!(revoked(&env), ids([a1.as_str(), a2.as_str()]));
    assert_eq!(env.show(&a1)["revoked_reason"], "offboarded");

    env.ok(&["revoke", "--label", "team=red", "--yes"]);
    assert_eq!(
        revoked(&env),
        ids([a1.as_str(), a2.as_str(), b1.as_str(), c3.as_str()])
    );

    env.ok(&["revoke", "--env", "test", "--yes"]);
    assert_eq!(
        revoked(&env),
        ids([
            a1.as_str(),
            a2.as_str(),
            b1.as_str(),
            c3.as_str(),
            c1.as_str()
        ])
    );
    assert_eq!(
        env.list_ids(&["--state", "active"]),
        ids([b2.as_str(), c2.as_str()])
    );

    // A selector matching only revoked keys revokes nothing and writes no events.
    let events = env.audit_lines().len();
    let r = env.ok(&["revoke", "--owner", "alice", "--yes"]);
    assert!(r.stderr.contains("revoked 0 keys"), "{r:?}");
    assert_eq!(env.audit_lines().len(), events);
    let per_key: Vec<String> = env
        .audit_lines()
        .iter()
        .filter(|e| e["event"] == "key.revoked")
        .map(|e| e["key_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(per_key.len(), 5, "one event per revoked key: {per_key:?}");
    assert_eq!(per_key.iter().collect::<BTreeSet<_>>().len(), 5);
}

// ---------------------------------------------------------------------------------------------
// 7. rotate
// ---------------------------------------------------------------------------------------------

#[test]
fn rotate_mints_a_successor_and_sets_the_grace_period() {
    let env = Env::new();
    let (v1, k1) = env.create(&[
        "--scope",
        "a:read",
        "--label",
        "team=x",
        "--expires-in",
        "200d",
    ]);
    let id1 = id(&v1);

    let t0 = now();
    let r = env.ok(&["rotate", &id1, "--grace", "1h", "--json"]);
    assert_eq!(r.stdout.lines().count(), 1);
    let v2 = r.json();
    let id2 = id(&v2);
    let k2 = v2["key"].as_str().unwrap().to_owned();
    assert_key_shape(&k2, "live");
    assert_ne!(k1, k2);
    assert_eq!(v2["rotated_from"], id1.as_str());
    assert_eq!(v2["state"], "active");
    assert!(v2.get("digest").is_none());
    assert_eq!(v2["scopes"], v1["scopes"]);
    assert_eq!(v2["labels"], v1["labels"]);
    assert_eq!(v2["owner"], v1["owner"]);
    let (created1, exp1) = (
        v1["created_at"].as_i64().unwrap(),
        v1["expires_at"].as_i64().unwrap(),
    );
    let exp2 = v2["expires_at"].as_i64().unwrap();
    assert!(
        (t0 + (exp1 - created1)..=now() + (exp1 - created1)).contains(&exp2),
        "successor gets a fresh lifetime as long as the old key's: {exp2}"
    );
    assert!(r.stderr.contains(&id1) && r.stderr.contains(&id2), "{r:?}");

    let old = env.show(&id1);
    let exp = old["expires_at"].as_i64().unwrap();
    assert!(
        (t0 + 3600..=now() + 3600).contains(&exp),
        "old expiry {exp} vs {t0}"
    );
    assert_eq!(old["rotated_to"], id2.as_str());
    assert_eq!(
        old["state"], "active",
        "still working during the grace period"
    );
    assert_eq!(old["lineage"], id1.as_str());
    assert_eq!(env.show(&id2)["lineage"], id1.as_str());

    // Plain output: just the new key.
    let r = env.ok(&["rotate", &id2]);
    let k3 = r.stdout.trim_end_matches('\n');
    assert_eq!(r.stdout, format!("{k3}\n"));
    assert_key_shape(k3, "live");
    let id3 = env
        .list(&[])
        .into_iter()
        .find(|v| v["rotated_from"] == id2.as_str())
        .map(|v| id(&v))
        .unwrap();
    assert_eq!(env.show(&id3)["lineage"], id1.as_str());
    // Default grace is keys.rotate_grace (48h).
    let exp2 = env.show(&id2)["expires_at"].as_i64().unwrap();
    assert!(
        (t0 + 48 * 3600..=now() + 48 * 3600).contains(&exp2),
        "{exp2}"
    );

    // A revoked key cannot be rotated.
    env.ok(&["revoke", &id3]);
    let r = env.fail(&["rotate", &id3]);
    assert!(r.stderr.contains("revoked"), "{r:?}");
    // Nor a canary.
    let canary = env.create_id(&["--canary"]);
    let r = env.fail(&["rotate", &canary]);
    assert!(r.stderr.contains("canary"), "{r:?}");
    assert_eq!(env.list(&[]).len(), 4);
}

// ---------------------------------------------------------------------------------------------
// 8. expiring
// ---------------------------------------------------------------------------------------------

#[test]
fn expiring_lists_only_active_keys_in_the_window() {
    let env = Env::new();
    let gone = env.create_id(&["--expires-in", "1s"]);
    let soon = env.create_id(&["--expires-in", "7d"]);
    let sooner = env.create_id(&["--expires-in", "2d"]);
    let later = env.create_id(&["--expires-in", "30d"]);
    let _never = env.create_id(&[]);
    let revoked = env.create_id(&["--expires-in", "7d"]);
    env.ok(&["revoke", &revoked]);
    let _canary = env.create_id(&["--expires-in", "7d", "--canary"]);
    env.await_expired(&gone);

    let got: Vec<String> = env
        .ok(&["expiring", "--within", "14d", "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(id)
        .collect();
    assert_eq!(got, vec![sooner.clone(), soon.clone()], "sorted by expiry");

    let table = env.ok(&["expiring", "--within", "14d"]).stdout;
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains(&soon) && table.contains(&sooner));

    let got = env.ok(&["expiring", "--json"]).json();
    assert_eq!(got.as_array().unwrap().len(), 2, "default window is 14d");
    let got = env.ok(&["expiring", "--within", "60d", "--json"]).json();
    assert_eq!(got.as_array().unwrap().len(), 3);
    assert!(got.to_string().contains(&later));
    let got = env.ok(&["expiring", "--within", "1d", "--json"]).json();
    assert_eq!(got, serde_json::json!([]));
    env.fail(&["expiring", "--within", "soonish"]);
}

// ---------------------------------------------------------------------------------------------
// 9. import
// ---------------------------------------------------------------------------------------------

#[test]
fn import_counts_imported_duplicates_and_invalid_lines() {
    let env = Env::new();
    let file = env.path("legacy.txt");
    let lines = [
        "legacy-key-aaaaaaaaaaaaaaaa-0001",
        "legacy-key-bbbbbbbbbbbbbbbb-0002",
        "",
        "# a comment",
        "legacy-key-cccccccccccccccc-0003",
        r#"{"key":"legacy-key-dddddddddddddddd-0004","name":"billing","owner":"team-b","scopes":["invoices:read"],"labels":{"from":"oldgw"}}"#,
        "legacy-key-aaaaaaaaaaaaaaaa-0001",
        "short",
    ];
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let f = file.to_str().unwrap();

    // The good lines are imported; the refused one is named and fails the exit status.
    let r = env.fail(&["import", "--file", f, "--owner", "migration", "--json"]);
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    assert!(
        r.stderr.contains("imported 4, duplicates 1, invalid 1"),
        "{r:?}"
    );
    assert!(r.stderr.contains("line 8"), "names the invalid line: {r:?}");
    assert!(
        r.stderr.contains("1 lines refused (lines 8)"),
        "the failure names the lines: {r:?}"
    );
    assert_eq!(
        r.json(),
        serde_json::json!({"imported": 4, "duplicates": 1, "invalid": 1})
    );

    let listed = env.list(&[]);
    assert_eq!(listed.len(), 4);
    for v in &listed {
        assert_eq!(v["imported"], true, "{v}");
        assert_eq!(v["state"], "active");
        assert!(v["hint"].as_str().unwrap().starts_with('…'), "{v}");
    }
    let json_one = listed.iter().find(|v| v["name"] == "billing").unwrap();
    assert_eq!(json_one["owner"], "team-b");
    assert_eq!(json_one["scopes"], serde_json::json!(["invoices:read"]));
    assert_eq!(json_one["labels"], serde_json::json!({"from": "oldgw"}));
    assert_eq!(json_one["hint"], "…0004");
    assert_eq!(env.list(&["--owner", "migration"]).len(), 3);
    let store = env.store_text();
    let audit = env.audit_text();
    for l in &lines[..6] {
        if l.starts_with("legacy") {
            assert!(
                !store.contains(l) && !audit.contains(l),
                "plaintext stored: {l}"
            );
        }
    }
    assert_eq!(
        env.audit_lines()
            .iter()
            .filter(|e| e["event"] == "key.imported")
            .count(),
        4
    );

    // Importing the same file again imports nothing.
    let r = env.fail(&["import", "--file", f, "--owner", "migration"]);
    assert!(r.stderr.contains("imported 0,"), "{r:?}");
    assert!(r.stderr.contains("duplicates 5, invalid 1"), "{r:?}");
    assert_eq!(env.list(&[]).len(), 4);

    // Without an owner, policy (require_owner) marks the bare lines invalid.
    let other = env.path("other.txt");
    std::fs::write(&other, "another-legacy-key-0000000005\n").unwrap();
    let r = env.fail(&["import", "--file", other.to_str().unwrap()]);
    assert!(
        r.stderr.contains("imported 0, duplicates 0, invalid 1"),
        "{r:?}"
    );
    assert!(r.stderr.contains("owner"), "{r:?}");
    // A missing file is an error naming it.
    let r = env.fail(&["import", "--file", "no-such-file.txt", "--owner", "o"]);
    assert!(r.stderr.contains("no-such-file.txt"), "{r:?}");
}

#[test]
fn import_of_100k_keys_completes() {
    let env = Env::new();
    let file = env.path("big.txt");
    let mut text = String::with_capacity(100_000 * 40);
    for i in 0..100_000u32 {
        text.push_str(&format!("legacy-bulk-key-{i:010}-abcdefgh\n"));
    }
    std::fs::write(&file, text).unwrap();
    let start = Instant::now();
    let r = env.ok(&[
        "import",
        "--file",
        file.to_str().unwrap(),
        "--owner",
        "bulk",
        "--json",
    ]);
    let elapsed = start.elapsed();
    eprintln!("import of 100k keys (debug build): {elapsed:?}");
    assert_eq!(
        r.json(),
        serde_json::json!({"imported": 100_000, "duplicates": 0, "invalid": 0})
    );
    assert_eq!(env.store_lines().len(), 100_000);
    // The store stays usable: a create after it gets the next revision.
    let (v, _) = env.create(&[]);
    assert_eq!(v["rev"], 100_001);
}

/// A refused line past the first batch is named with its line number, the good lines around
/// it (several batches) are imported, the exit status is 1; a re-run finds them all stored.
/// Progress goes to a terminal only: none here (stderr is a pipe).
#[test]
fn import_streams_in_batches_and_names_refused_lines() {
    let env = Env::new();
    let file = env.path("mixed.txt");
    let mut text = String::new();
    for i in 1..=45_000u32 {
        if i == 30_001 || i == 44_999 {
            text.push_str("too-short\n");
        } else {
            text.push_str(&format!("legacy-mixed-key-{i:010}-abcdefgh\n"));
        }
    }
    std::fs::write(&file, text).unwrap();
    let f = file.to_str().unwrap();
    let r = env.fail(&["import", "--file", f, "--owner", "mixed", "--json"]);
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    assert!(r.stderr.contains("lines 30001, 44999"), "{r:?}");
    assert!(
        !r.stderr.contains("importing:"),
        "no progress off a terminal: {r:?}"
    );
    assert_eq!(
        r.json(),
        serde_json::json!({"imported": 44_998, "duplicates": 0, "invalid": 2})
    );
    assert_eq!(env.store_lines().len(), 44_998);
    let r = env.fail(&["import", "--file", f, "--owner", "mixed", "--json"]);
    assert_eq!(
        r.json(),
        serde_json::json!({"imported": 0, "duplicates": 44_998, "invalid": 2})
    );
    assert_eq!(env.store_lines().len(), 44_998);
}

// ---------------------------------------------------------------------------------------------
// 10. compact
// ---------------------------------------------------------------------------------------------

#[test]
fn compact_keeps_one_line_per_key_and_the_revision() {
    let env = Env::new();
    let ids_: Vec<String> = (0..6).map(|_| env.create_id(&[])).collect();
    env.ok(&["update", &ids_[0], "--scope", "a:b"]);
    env.ok(&["update", &ids_[0], "--scope", "a:c"]);
    env.ok(&["update", &ids_[1], "--label", "x=y"]);
    env.ok(&["revoke", &ids_[2]]);
    env.ok(&["revoke", &ids_[3], "--reason", "r"]);
    env.ok(&["rotate", &ids_[4], "--grace", "1h"]);
    let before: BTreeMap<String, Value> = env.list(&[]).into_iter().map(|v| (id(&v), v)).collect();
    assert_eq!(before.len(), 7);
    let lines_before = env.store_lines();
    assert!(lines_before.len() > 7);
    let max_rev = lines_before
        .iter()
        .map(|l| l["rev"].as_u64().unwrap())
        .max()
        .unwrap();

    let r = env.ok(&["compact"]);
    assert!(r.stderr.contains("kept 7"), "{r:?}");
    let lines = env.store_lines();
    assert_eq!(lines.len(), 7 + 1, "one line per id plus the meta line");
    let last = lines.last().unwrap();
    assert_eq!(last["meta"], "compacted");
    assert_eq!(last["rev"].as_u64().unwrap(), max_rev);
    let line_ids: BTreeSet<&str> = lines[..7]
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert_eq!(line_ids.len(), 7);

    let after: BTreeMap<String, Value> = env.list(&[]).into_iter().map(|v| (id(&v), v)).collect();
    assert_eq!(after, before, "every key, same versions and states");
    assert!(!env.path("keys.compact.tmp").exists());

    let (v, _) = env.create(&[]);
    assert!(v["rev"].as_u64().unwrap() > max_rev, "{v}");
    env.ok(&["revoke", &ids_[0]]);
    assert!(env.show(&ids_[0])["rev"].as_u64().unwrap() > v["rev"].as_u64().unwrap());
    // Compacting twice is fine.
    env.ok(&["compact"]);
    assert_eq!(env.list(&[]).len(), 8);
}

/// A one-key change (revoke, update) reads only that key's lines, not the whole log: on a
/// compacted store with writes after the compaction it still acts on the key's latest
/// version, touches no other key, and the revocation stays final.
#[test]
fn revoke_after_compaction_and_later_writes_hits_the_right_key_and_is_final() {
    let env = Env::new();
    let ids_: Vec<String> = (0..4).map(|_| env.create_id(&[])).collect();
    env.ok(&["update", &ids_[1], "--label", "stage=one"]);
    env.ok(&["compact"]);
    env.ok(&["update", &ids_[1], "--label", "stage=two"]);
    let later = env.create_id(&[]);
    env.ok(&["revoke", &ids_[1], "--reason", "leaked"]);

    let shown = env.show(&ids_[1]);
    assert_eq!(shown["state"], "revoked");
    assert_eq!(shown["revoked_reason"], "leaked");
    assert_eq!(
        shown["labels"],
        serde_json::json!({"stage": "two"}),
        "the revocation is written on the latest version"
    );
    for other in [&ids_[0], &ids_[2], &ids_[3], &later] {
        assert_eq!(env.show(other)["state"], "active", "{other}");
    }
    // Final: no update brings it back, a second revoke writes nothing.
    let lines = env.store_lines().len();
    let r = env.fail(&["update", &ids_[1], "--label", "stage=three"]);
    assert!(r.stderr.contains("revoked"), "{r:?}");
    env.ok(&["revoke", &ids_[1], "--reason", "again"]);
    assert_eq!(env.store_lines().len(), lines);
    assert_eq!(env.show(&ids_[1])["revoked_reason"], "leaked");
    // And it survives the next compaction.
    env.ok(&["compact"]);
    assert_eq!(env.show(&ids_[1])["state"], "revoked");
    assert_eq!(env.list(&["--state", "active"]).len(), 4);
}

// ---------------------------------------------------------------------------------------------
// 11. audit
// ---------------------------------------------------------------------------------------------

#[test]
fn every_change_writes_one_audit_line_without_secrets() {
    let env = Env::new();
    let (v, key) = env.create(&[]);
    let k = id(&v);
    let hint = format!("kg_live_…{}", &key[key.len() - 4..]);
    assert_eq!(v["hint"], hint.as_str());

    let check = |env: &Env, expect_event: &str, expect_id: &str, expect_hint: &str| {
        let lines = env.audit_lines();
        let e = lines.last().unwrap();
        for f in ["timestamp", "event", "actor", "key_id", "owner", "hint"] {
            assert!(e.get(f).is_some(), "{f} missing: {e}");
        }
        assert_eq!(e["event"], expect_event);
        assert_eq!(e["key_id"], expect_id);
        assert_eq!(e["hint"], expect_hint);
        assert_eq!(
            e["actor"],
            keygate::audit::os_user().as_str(),
            "the OS user, not $USER"
        );
        assert_eq!(e["owner"], "team-a");
        let t = e["timestamp"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(t).is_ok(), "{t}");
        let h = e["hint"].as_str().unwrap();
        let tail = h.strip_prefix("kg_live_…").unwrap();
        assert_eq!(tail.chars().count(), 4);
        assert!(tail.chars().all(|c| c.is_ascii_alphanumeric()));
        lines.len()
    };
    assert_eq!(check(&env, "key.created", &k, &hint), 1);
    env.ok(&["update", &k, "--scope", "x:y"]);
    assert_eq!(check(&env, "key.updated", &k, &hint), 2);

    let r = env.ok(&["rotate", &k, "--json"]).json();
    let k2 = id(&r);
    let key2 = r["key"].as_str().unwrap();
    let hint2 = format!("kg_live_…{}", &key2[key2.len() - 4..]);
    let lines = env.audit_lines();
    let rotated: Vec<&Value> = lines
        .iter()
        .filter(|e| e["event"] == "key.rotated")
        .collect();
    // One event links the old key to its successor.
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    assert_eq!(rotated[0]["key_id"], k.as_str());
    assert_eq!(rotated[0]["hint"], hint.as_str());
    assert_eq!(rotated[0]["successor_id"], k2.as_str());
    assert_eq!(rotated[0]["successor_hint"], hint2.as_str());
    let n = lines.len();

    env.ok(&["revoke", &k2]);
    assert_eq!(check(&env, "key.revoked", &k2, &hint2), n + 1);
    // No-ops write nothing.
    env.ok(&["revoke", &k2]);
    env.ok(&["list"]);
    env.ok(&["show", &k]);
    env.ok(&["compact"]);
    assert_eq!(env.audit_lines().len(), n + 1);

    let audit = env.audit_text();
    assert!(!audit.contains(&key) && !audit.contains(key2));
    for l in env.store_lines() {
        if let Some(d) = l["digest"].as_str() {
            assert!(!audit.contains(d));
        }
    }
}

#[test]
fn audit_failure_refuses_the_change_and_leaves_the_store_alone() {
    if !Path::new("/dev/full").exists() {
        eprintln!("skipping: no /dev/full");
        return;
    }
    let broken = CONFIG.replace("audit_log = \"audit.jsonl\"", "audit_log = \"/dev/full\"");
    assert!(broken.contains("/dev/full"));

    // Nothing exists yet: create must fail and not create the store.
    let env = Env::with_config(&broken);
    let r = env.fail(&["create", "--name", "n", "--owner", "o"]);
    assert!(r.stderr.contains("audit log /dev/full"), "{r:?}");
    assert!(r.stderr.contains("not made"), "{r:?}");
    assert!(
        r.stdout.is_empty(),
        "no key printed for a refused change: {r:?}"
    );
    assert!(!env.store().exists());

    // With an existing store: every kind of change is refused, byte for byte.
    let env = Env::new();
    let k = env.create_id(&[]);
    env.create_id(&["--owner", "other"]);
    std::fs::write(&env.config, &broken).unwrap();
    let before = std::fs::read(env.store()).unwrap();
    let legacy = env.path("legacy.txt");
    std::fs::write(&legacy, "legacy-key-for-audit-failure-01\n").unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["create", "--name", "n", "--owner", "o"],
        vec!["update", &k, "--scope", "a:b"],
        vec!["revoke", &k],
        vec!["revoke", "--owner", "other", "--yes"],
        vec!["rotate", &k],
        vec!["import", "--file", legacy.to_str().unwrap(), "--owner", "o"],
    ];
    for args in &cases {
        let r = env.fail(args);
        assert!(r.stderr.contains("/dev/full"), "{args:?}: {r:?}");
        assert!(r.stdout.is_empty(), "{args:?}: {r:?}");
        assert_eq!(std::fs::read(env.store()).unwrap(), before, "{args:?}");
    }
    // Reads still work.
    assert_eq!(env.list(&["--state", "active"]).len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 12. concurrency
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_creates_get_unique_consecutive_revisions() {
    let env = Env::new();
    let mut children = vec![];
    for set in ["a", "b"] {
        for i in 0..20 {
            let name = format!("{set}-{i}");
            let owner = format!("owner-{set}");
            children.push(env.spawn(&["create", "--name", &name, "--owner", &owner, "--json"]));
        }
    }
    let runs: Vec<Run> = children
        .into_iter()
        .map(|c| finish(c, "concurrent create"))
        .collect();
    let mut keys = BTreeSet::new();
    for r in &runs {
        assert!(r.status.success(), "{r:?}");
        keys.insert(r.json()["key"].as_str().unwrap().to_owned());
    }
    assert_eq!(keys.len(), 40);

    let lines = env.store_lines();
    assert_eq!(lines.len(), 40);
    let mut revs: Vec<u64> = lines.iter().map(|l| l["rev"].as_u64().unwrap()).collect();
    let in_file_order = revs.clone();
    revs.sort_unstable();
    assert_eq!(revs, (1..=40).collect::<Vec<u64>>());
    assert_eq!(in_file_order, revs, "revisions increase in file order");
    assert_eq!(env.list(&[]).len(), 40);
    assert_eq!(env.list(&["--owner", "owner-a"]).len(), 20);
    assert_eq!(env.audit_lines().len(), 40);
}

// ---------------------------------------------------------------------------------------------
// 13. kill -9
// ---------------------------------------------------------------------------------------------

/// Every store line parses and revisions strictly increase.
fn assert_store_intact(env: &Env, context: &str) -> u64 {
    let text = env.store_text();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{context}: partial tail left"
    );
    let mut last = 0;
    for l in text.lines() {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{context}: line {l:?}: {e}"));
        if v.get("header").is_some() {
            continue;
        }
        let rev = v["rev"].as_u64().unwrap();
        if v.get("meta").is_none() {
            assert!(rev > last, "{context}: rev {rev} after {last}");
        }
        last = last.max(rev);
    }
    last
}

#[test]
fn killed_writers_never_corrupt_the_store() {
    let env = Env::new();
    let file = env.path("big.txt");
    let mut text = String::new();
    for i in 0..10_000u32 {
        text.push_str(&format!("legacy-kill-key-{i:08}-xyzxyzxyz\n"));
    }
    std::fs::write(&file, text).unwrap();
    let f = file.to_str().unwrap().to_owned();
    let import = ["import", "--file", f.as_str(), "--owner", "mig"];

    // A seed store that every iteration starts from.
    env.create(&[]);
    env.create(&["--owner", "team-b"]);
    let seed = std::fs::read(env.store()).unwrap();

    // Calibrate: how long one whole import takes here.
    let start = Instant::now();
    env.ok(&import);
    let mut full = start.elapsed();
    eprintln!("kill test: one 10k import takes {full:?}");

    let mut outcomes = BTreeMap::<&str, usize>::new();
    for i in 0..30u32 {
        std::fs::write(env.store(), &seed).unwrap();
        let creating = i % 5 == 4;
        // Every third import is killed once the store file starts growing, 0-3 MiB into
        // its ~4 MiB append (to tear the write); the others after a time-based delay.
        let on_growth = !creating && i % 3 == 0;
        let args: Vec<&str> = if creating {
            vec!["create", "--name", "k", "--owner", "o"]
        } else {
            import.to_vec()
        };
        // Kill points from "at once" to just past the full run.
        let delay = if creating {
            Duration::from_micros(u64::from(i) * 400)
        } else {
            full.mul_f64(0.3 + 0.8 * f64::from(i % 10) / 9.0)
        };
        let grown = seed.len() as u64 + u64::from(i / 3 % 4) * (1 << 20);
        let mut child = env.spawn(&args);
        let start = Instant::now();
        let finished = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if on_growth {
                assert!(start.elapsed() < CLI_TIMEOUT, "iteration {i}: import hangs");
                let len = std::fs::metadata(env.store()).map_or(0, |m| m.len());
                if len > grown {
                    break None;
                }
                std::thread::yield_now();
            } else {
                if start.elapsed() >= delay {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let killed = finished.is_none();
        if !killed && !creating && !on_growth {
            // Track how long an import takes now (other tests share the cores).
            full = start.elapsed();
        }
        if killed {
            child.kill().unwrap();
        }
        let status = child.wait().unwrap();
        if !killed {
            assert!(status.success(), "iteration {i}: {status:?}");
        }

        // A partial tail, if any, is ignored by readers without a warning…
        let raw = env.store_text();
        let partial = !raw.is_empty() && !raw.ends_with('\n');
        *outcomes
            .entry(match (killed, partial) {
                (false, _) => "finished",
                (true, true) => "killed-partial",
                (true, false) if raw.len() > seed.len() => "killed-after-write",
                (true, false) => "killed-before-write",
            })
            .or_default() += 1;
        let listed = env.list(&["--owner", "nobody"]);
        assert!(listed.is_empty());
        let r = env.ok(&["list", "--state", "revoked"]);
        assert!(!r.stderr.contains("skipped"), "iteration {i}: {r:?}");
        // …and the next writer drops it: its own line is complete and parses.
        let (v, _) = env.create(&["--name", &format!("after-{i}")]);
        let max = assert_store_intact(&env, &format!("iteration {i}"));
        let last_line = env.store_text().lines().last().unwrap().to_owned();
        let last: Value = serde_json::from_str(&last_line).unwrap();
        assert_eq!(last["id"], v["id"], "iteration {i}");
        assert_eq!(last["rev"].as_u64().unwrap(), max);
        assert_eq!(env.show(&id(&v))["state"], "active");
    }

    // A torn write (simulated: half a record, no newline) is dropped by the next writer.
    // Writing the seed back is also a restore: the next write continues after the highest
    // revision ever issued, never reusing one.
    let issued = assert_store_intact(&env, "before the torn write");
    std::fs::write(env.store(), &seed).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(env.store())
        .unwrap();
    f.write_all(br#"{"rev":3,"id":"key_torn","digest":"00"#)
        .unwrap();
    drop(f);
    assert_eq!(env.list(&[]).len(), 2);
    let (v, _) = env.create(&[]);
    assert!(v["rev"].as_u64().unwrap() > issued, "{v} reuses a revision");
    assert_store_intact(&env, "torn write");
    assert!(!env.store_text().contains("key_torn"));
    eprintln!("kill test outcomes: {outcomes:?}");
}

// ---------------------------------------------------------------------------------------------
// 14. rotate racing revoke (J8)
// ---------------------------------------------------------------------------------------------

/// Versions of `id` in file order.
fn versions(env: &Env, id: &str) -> Vec<Value> {
    env.store_lines()
        .into_iter()
        .filter(|l| l["id"] == id)
        .collect()
}

#[test]
fn concurrent_rotate_and_revoke_always_end_revoked() {
    let env = Env::new();
    let mut rotated = 0;
    for i in 0..10 {
        let k = env.create_id(&["--name", &format!("race-{i}")]);
        let (rot, rev) = if i % 2 == 0 {
            let a = env.spawn(&["rotate", &k, "--grace", "1h"]);
            let b = env.spawn(&["revoke", &k, "--reason", "race"]);
            (a, b)
        } else {
            let b = env.spawn(&["revoke", &k, "--reason", "race"]);
            let a = env.spawn(&["rotate", &k, "--grace", "1h"]);
            (a, b)
        };
        let rot = finish(rot, "rotate");
        let rev = finish(rev, "revoke");
        assert!(rev.status.success(), "revoke must always succeed: {rev:?}");
        assert_eq!(env.show(&k)["state"], "revoked", "iteration {i}");
        let vs = versions(&env, &k);
        let first_revoked = vs
            .iter()
            .position(|v| v.get("revoked_at").is_some())
            .unwrap();
        assert_eq!(
            first_revoked,
            vs.len() - 1,
            "iteration {i}: nothing may be written to {k} after its revocation: {vs:?}"
        );
        if rot.status.success() {
            rotated += 1;
            // The rotation came first: the successor exists and predates the revocation.
            let old = vs.last().unwrap();
            let succ = old["rotated_to"].as_str().unwrap();
            assert!(env.show(succ)["rev"].as_u64() < old["rev"].as_u64());
        } else {
            assert!(rot.stderr.contains("revoked"), "{rot:?}");
            assert!(vs.last().unwrap().get("rotated_to").is_none());
        }
    }
    eprintln!("rotate won the race {rotated}/10 times");
}

/// A rotation that read the clock before a revocation but took the store lock after it must
/// still see the key as revoked (the clock is not a lock). The test holds the store lock itself,
/// lets `rotate` start and block on it, writes the competing revocation once the wall clock has
/// moved on to the next second, and releases the lock.
#[test]
fn rotate_that_waited_for_the_lock_sees_a_later_revocation() {
    let env = Env::new();
    let k = env.create_id(&[]);

    // Start just after a second boundary, so `rotate` reads its clock early in that second.
    let deadline = Instant::now() + Duration::from_secs(3);
    let s0 = now();
    while now() == s0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    let store = std::fs::OpenOptions::new()
        .append(true)
        .open(env.store())
        .unwrap();
    store.lock().unwrap();
    let t_rotate = now();
    let child = env.spawn(&["rotate", &k, "--grace", "1h"]);
    // Wait for the clock to move past the second rotate started in.
    while now() <= t_rotate {
        assert!(Instant::now() < deadline + Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(5));
    }
    // The competing revocation, written (and signed) as `keys revoke` writes it, under the lock.
    let mut latest: keygate::keys::record::KeyRecord =
        serde_json::from_value(versions(&env, &k).pop().unwrap()).unwrap();
    latest.rev += 1;
    latest.revoked_at = Some(now());
    latest.revoked_reason = Some("compromised".into());
    let hasher = keygate::keys::digest::Hasher::new(vec![(1, SECRET.as_bytes().to_vec())]);
    keygate::store::seal::Signer::new(&hasher).sign(env.store_log(), &mut latest);
    let mut line = serde_json::to_string(&latest).unwrap();
    line.push('\n');
    let mut w = &store;
    w.write_all(line.as_bytes()).unwrap();
    w.flush().unwrap();
    store.unlock().unwrap();
    drop(store);

    let r = finish(child, "rotate");
    assert_eq!(env.show(&k)["state"], "revoked");
    assert!(
        !r.status.success(),
        "rotating a revoked key must fail, but it minted a successor: {r:?}\n{}",
        env.store_text()
    );
    assert!(r.stderr.contains("revoked"), "{r:?}");
    assert_eq!(env.list(&[]).len(), 1, "no successor");
    assert_eq!(versions(&env, &k).len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 14. lifecycle defects (issue 14): each test failed before its fix
// ---------------------------------------------------------------------------------------------

/// The RFC 3339 form the CLI prints for Unix seconds `t`.
fn rfc3339(t: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t as u64)).to_string()
}

/// Defect 1: rotating an already-rotated key is refused, naming the current successor; the
/// first successor stays the one the old key points to, and its expiry is a fresh lifetime
/// (never the grace window).
#[test]
fn rotating_a_rotated_key_is_refused_naming_its_successor() {
    let env = Env::new();
    let t0 = now();
    let old = env.create_id(&["--expires-in", "200d"]);
    let s1 = id(&env.ok(&["rotate", &old, "--grace", "1h", "--json"]).json());
    let succ = env.show(&s1);
    let exp = succ["expires_at"].as_i64().unwrap();
    assert!(
        (t0 + 200 * 86_400..=now() + 200 * 86_400).contains(&exp),
        "the successor's lifetime comes from the key's own, not the 1h grace: {succ}"
    );

    let r = env.fail(&["rotate", &old, "--grace", "1h"]);
    assert!(
        r.stderr.contains(&s1),
        "the error names the successor: {r:?}"
    );
    assert!(r.stdout.is_empty(), "no key minted: {r:?}");
    assert_eq!(env.show(&old)["rotated_to"], s1.as_str());
    assert_eq!(env.list(&[]).len(), 2, "no second successor");
    // The successor itself rotates normally.
    env.ok(&["rotate", &s1, "--grace", "1h"]);
}

/// Defect 2: the rotate message prints the old key's stored expiry, which can be earlier than
/// now + grace.
#[test]
fn rotate_prints_the_stored_expiry_of_the_old_key() {
    let env = Env::new();
    let old = env.create_id(&["--expires-in", "1h"]);
    let r = env.ok(&["rotate", &old, "--grace", "300d"]);
    let stored = env.show(&old)["expires_at"].as_i64().unwrap();
    assert!(stored <= now() + 3600);
    let want = format!("{old} keeps working until {}", rfc3339(stored));
    assert!(r.stderr.contains(&want), "want {want:?} in {r:?}");
}

/// Defect 3: mass revoke skips canaries (which would silently disarm the alarm) unless a
/// canary is named by id.
#[test]
fn mass_revoke_spares_canaries_unless_named_by_id() {
    let env = Env::new();
    let live = env.create_id(&["--owner", "alice"]);
    let canary = env.create_id(&["--owner", "alice", "--canary"]);
    let r = env.ok(&["revoke", "--owner", "alice", "--yes", "--json"]);
    assert_eq!(
        r.json()["revoked"],
        serde_json::json!([live.clone()]),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("canary"),
        "says canaries were left armed: {r:?}"
    );
    assert_eq!(env.show(&canary)["state"], "canary");
    env.ok(&["revoke", &canary, "--reason", "retired"]);
    assert_eq!(env.show(&canary)["state"], "revoked");
}

/// Defect 5: `keygate check` counts keys per secret version and refuses a version in use with
/// no configured secret, unless `on_missing_secret_version = "warn"`.
#[test]
fn check_refuses_a_secret_version_in_use_without_a_secret() {
    let base = format!("{CONFIG}\n");
    let env = Env::with_config(&base.replace("[keys]\n", "[keys]\ntouch_interval_seconds = 60\n"));
    env.create_id(&[]);
    env.create_id(&[]);
    let r = env.keygate(&["check"]);
    assert!(r.status.success(), "clean config: {r:?}");

    // The secret was "rotated" by bumping the version without listing the old one.
    let bumped = base.replace(
        "[keys]\n",
        "[keys]\ntouch_interval_seconds = 60\nhash_secret_version = 2\n",
    );
    std::fs::write(&env.config, &bumped).unwrap();
    let r = env.keygate(&["check"]);
    assert!(!r.status.success(), "{r:?}");
    assert!(
        r.stderr.contains("secret version 1") && r.stderr.contains("2 key"),
        "names the version and the count: {r:?}"
    );

    std::fs::write(
        &env.config,
        bumped.replace(
            "hash_secret_version = 2\n",
            "hash_secret_version = 2\non_missing_secret_version = \"warn\"\n",
        ),
    )
    .unwrap();
    let r = env.keygate(&["check"]);
    assert!(r.status.success(), "warn mode passes: {r:?}");
    assert!(r.stderr.contains("secret version 1"), "but says so: {r:?}");
}

/// Issue 14 "retiring the old version is refused while keys still use it unless forced (those
/// keys are listed)": `check` names the keys on a version that has no secret by id (the first
/// 20 in id order, then "and N more"; revoked keys do not count), and `secret status` lists
/// them too (`ids` in JSON, a line under the version in text). Never a key or a digest.
#[test]
fn the_keys_on_a_secret_version_without_a_secret_are_listed_by_id() {
    let base = CONFIG.replace("[keys]\n", "[keys]\ntouch_interval_seconds = 60\n");
    let env = Env::with_config(&base);
    let made: Vec<(String, String)> = (0..23)
        .map(|_| {
            let (v, key) = env.create(&[]);
            (id(&v), key)
        })
        .collect();
    let revoked = &made[0].0;
    env.ok(&["revoke", revoked, "--reason", "gone"]);
    let live: Vec<&String> = made[1..]
        .iter()
        .map(|(id, _)| id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(live.len(), 22);
    let (listed, unlisted) = live.split_at(20);
    let secrets: Vec<String> = env
        .store_lines()
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .chain(made.iter().map(|(_, key)| key.clone()))
        .collect();
    let assert_listed = |text: &str| {
        for id in listed {
            assert!(text.contains(id.as_str()), "{id} not listed: {text}");
        }
        for id in unlisted.iter().chain([&revoked]) {
            assert!(!text.contains(id.as_str()), "{id} listed: {text}");
        }
        assert!(text.contains("and 2 more"), "{text}");
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "a key or digest printed: {text}"
            );
        }
    };

    std::fs::write(
        &env.config,
        base.replace("[keys]\n", "[keys]\nhash_secret_version = 2\n"),
    )
    .unwrap();
    let r = env.keygate(&["check"]);
    assert!(!r.status.success(), "{r:?}");
    assert!(
        r.stderr.contains("secret version 1") && r.stderr.contains("22 key(s)"),
        "{r:?}"
    );
    assert_listed(&r.stderr);

    let r = env.keygate(&["secret", "status", "--json"]);
    assert!(r.status.success(), "{r:?}");
    let rows = r.json();
    let v1 = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == 1)
        .unwrap_or_else(|| panic!("{rows}"));
    assert_eq!(v1["live_keys"], 22, "{v1}");
    let ids: Vec<&str> = v1["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert_eq!(ids, listed.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    for s in &secrets {
        assert!(!r.stdout.contains(s.as_str()), "{r:?}");
    }
    let r = env.keygate(&["secret", "status"]);
    assert!(r.status.success(), "{r:?}");
    assert_listed(&r.stdout);
}

/// The files the gateway replaces whole (temp file + rename beside a `.lock`: the usage file
/// and its forensics file, the store, the feed cache) need a writable directory, not only a
/// writable file: a writable usage file in a read-only directory is a problem for `check`
/// (the gateway would log "usage flush failed").
///
/// Permission bits bind only an unprivileged user, so `check` runs as uid 65534 through
/// `setpriv` (util-linux) when the tests run as root; otherwise as the test's own user. Either
/// way the same directory first passes (writable) and then fails (read-only): a run that cannot
/// make the directory read-only for `check` fails the test instead of passing it.
#[test]
fn check_refuses_a_read_only_directory_for_files_replaced_whole() {
    let env = Env::with_config(&CONFIG.replace(
        "[keys]\n",
        "[keys]\ntouch_interval_seconds = 60\nusage_file = \"ro/usage.json\"\n",
    ));
    env.create_id(&[]);
    let ro = env.path("ro");
    std::fs::create_dir(&ro).unwrap();
    // Both files it replaces there exist and are writable: only the directory is wrong.
    std::fs::write(ro.join("usage.json"), "{}").unwrap();
    std::fs::write(ro.join("usage.json.forensics.json"), "{}").unwrap();
    let setpriv;
    let wrapper: Vec<&std::ffi::OsStr> = if real_uid() == 0 {
        setpriv = common::require_tool("setpriv", "util-linux");
        // Hand the whole tree to the unprivileged user (the temp dir is 0700 root).
        for path in walk(env.dir.path()) {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        }
        [
            setpriv.as_os_str(),
            "--reuid=65534".as_ref(),
            "--regid=65534".as_ref(),
            "--clear-groups".as_ref(),
        ]
        .to_vec()
    } else {
        Vec::new()
    };
    let check = || {
        let mut c = env.wrapped_command(&wrapper, &["check"]);
        c.env_remove("ALLOWED_ORIGINS")
            .env_remove("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS");
        env.run_cmd(c, "keygate check (unprivileged)")
    };
    let r = check();
    assert!(r.status.success(), "writable directory: {r:?}");

    let mode = |m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(m)).unwrap();
    };
    mode(0o555);
    let r = check();
    mode(0o755);
    assert!(!r.status.success(), "read-only directory passed: {r:?}");
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains(&format!("directory {}", ro.display())))
        .unwrap_or_else(|| panic!("the directory is not named: {r:?}"));
    assert!(
        line.contains("keys.usage_file, keys.usage_file (forensics)")
            && line.contains("not writable"),
        "{line}"
    );
    assert!(
        r.stderr.contains("1 problem(s)"),
        "only the directory: {r:?}"
    );
}

/// Every path under `dir` (itself included), depth first.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A fresh install passes `check` (the gateway creates the missing store empty and comes up
/// Ready); a missing store directory (a volume not mounted) is a problem, and `check` writes
/// nothing either way.
#[test]
fn check_passes_a_fresh_install_and_refuses_a_missing_store_directory() {
    let env =
        Env::with_config(&CONFIG.replace("[keys]\n", "[keys]\ntouch_interval_seconds = 60\n"));
    let r = env.keygate(&["check"]);
    assert!(r.status.success(), "fresh install: {r:?}");
    assert!(r.stderr.contains("creates it empty"), "{r:?}");
    assert!(!env.store().exists(), "check must not write the store");

    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        text.replace("store = \"keys.jsonl\"", "store = \"state/keys.jsonl\""),
    )
    .unwrap();
    let r = env.keygate(&["check"]);
    assert!(!r.status.success(), "{r:?}");
    assert!(
        r.stderr.contains("directory") && r.stderr.contains("state"),
        "{r:?}"
    );
}

/// Completions and the man page come from the same clap definitions as `--help`.
#[test]
fn completions_and_man_page_are_generated() {
    let env = Env::new();
    for shell in ["bash", "zsh", "fish"] {
        let r = env.keygate(&["completions", shell]);
        assert!(r.status.success(), "{shell}: {r:?}");
        for word in ["keygate", "revoke", "log-format", "completions"] {
            assert!(r.stdout.contains(word), "{shell} script lacks {word}");
        }
    }
    // The bash script is valid bash.
    let script = env.path("keygate.bash");
    std::fs::write(&script, env.keygate(&["completions", "bash"]).stdout).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(syntax.status.success(), "{syntax:?}");
    let r = env.keygate(&["completions", "tcsh"]);
    assert!(!r.status.success(), "unknown shell accepted");

    let man = env.keygate(&["man"]);
    assert!(man.status.success(), "{man:?}");
    assert!(
        man.stdout.starts_with(".ie") || man.stdout.contains(".TH keygate"),
        "{}",
        man.stdout
    );
    assert!(man.stdout.contains("health") && man.stdout.contains("check"));
}

/// `check --json` and `keys compact --json` print one JSON object on stdout.
#[test]
fn check_and_compact_print_json() {
    let env =
        Env::with_config(&CONFIG.replace("[keys]\n", "[keys]\ntouch_interval_seconds = 60\n"));
    env.create_id(&[]);
    let r = env.keygate(&["check", "--json"]);
    assert!(r.status.success(), "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["problems"].as_array().unwrap().is_empty());
    assert!(v["notes"].is_array());

    let broken = env.path("broken.toml");
    std::fs::write(&broken, "[keys]\nstore = \"keys.jsonl\"\n").unwrap();
    let mut c = env.keygate_command(&["check", "--json"]);
    c.args(["--config", broken.to_str().unwrap()]);
    let r = env.run_cmd(c, "check broken");
    assert!(!r.status.success(), "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(!v["problems"].as_array().unwrap().is_empty(), "{v}");

    let r = env.keygate(&["keys", "compact", "--json"]);
    assert!(r.status.success(), "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["kept"], 1, "{v}");
    assert!(v["dropped"].is_u64() && v["tombstoned"].is_u64(), "{v}");
}

/// Defect 8: with no `[policy]` the defaults are what config/keygate.toml documents: an owner
/// is required and lifetimes are capped at 365 days.
#[test]
fn policy_defaults_match_the_documented_config() {
    let env = Env::with_config("[keys]\nstore = \"keys.jsonl\"\naudit_log = \"audit.jsonl\"\n");
    let r = env.fail(&["create", "--name", "n"]);
    assert!(r.stderr.contains("owner"), "{r:?}");
    let with_lifetime =
        |d: &str| env.run(&["create", "--name", "n", "--owner", "o", "--expires-in", d]);
    let r = with_lifetime("5000d");
    assert!(!r.status.success() && r.stderr.contains("365"), "{r:?}");
    let r = with_lifetime("365d");
    assert!(r.status.success(), "{r:?}");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/keygate.toml"))
            .unwrap();
    assert!(example.contains("max_ttl = \"365d\"") && example.contains("require_owner = true"));
}

/// Defect 9: one rule for owner changes: the CLI refuses them like the REST API.
#[test]
fn update_refuses_owner_changes_like_the_api() {
    let env = Env::new();
    let k = env.create_id(&["--owner", "team-a"]);
    let before = env.store_text();
    let r = env.fail(&["update", &k, "--owner", "team-b"]);
    assert!(r.stderr.contains("owner"), "{r:?}");
    assert_eq!(env.store_text(), before, "nothing written");
    assert_eq!(env.show(&k)["owner"], "team-a");
}

/// Defect 11: the revoke reason is in the audit event, `key.updated` names the changed
/// fields, and `key.rotated` links old and new in one event.
#[test]
fn audit_events_carry_reason_changed_fields_and_rotation_link() {
    let env = Env::new();
    let k = env.create_id(&["--scope", "a:read"]);
    env.ok(&["update", &k, "--scope", "b:read", "--label", "x=1"]);
    let e = env.audit_lines().pop().unwrap();
    assert_eq!(e["event"], "key.updated");
    assert_eq!(e["changed"], serde_json::json!(["labels", "scopes"]), "{e}");

    let new = id(&env.ok(&["rotate", &k, "--json"]).json());
    let rotated = env.audit_events("key.rotated");
    assert_eq!(rotated.len(), 1, "one event per rotation: {rotated:?}");
    assert_eq!(rotated[0]["key_id"], k.as_str());
    assert_eq!(rotated[0]["successor_id"], new.as_str());
    assert!(rotated[0]["successor_hint"]
        .as_str()
        .unwrap()
        .starts_with("kg_live_…"));

    env.ok(&["revoke", &new, "--reason", "leaked in a ticket"]);
    let e = env.audit_lines().pop().unwrap();
    assert_eq!(e["event"], "key.revoked");
    assert_eq!(e["reason"], "leaked in a ticket", "{e}");
}

/// Defect 12: the CLI's audit actor is the OS user (uid and name), not `$USER`.
#[test]
fn audit_actor_is_the_os_user_not_the_user_variable() {
    let env = Env::new();
    env.create_id(&[]);
    let e = env.audit_lines().pop().unwrap();
    let actor = e["actor"].as_str().unwrap();
    assert_ne!(
        actor, "cli-tester",
        "$USER is set by the test; it must not be trusted"
    );
    assert!(actor.contains(&format!("uid {}", real_uid())), "{actor}");
    assert_eq!(actor, keygate::audit::os_user());
}

/// Defect 13 and THREATS J7: scopes are letters, digits, `_` and `-` in segments joined by one
/// `:` or `.`; `*`, `..`, `%2f` and friends are refused by create, update and import alike.
#[test]
fn bad_scopes_are_refused_everywhere() {
    let env = Env::new();
    let k = env.create_id(&["--scope", "invoices:read"]);
    let bad = [
        "*",
        "invoices:*",
        "..",
        "a..b",
        ".a",
        "a.",
        "a::b",
        "a%2fb",
        "a/b",
        "",
    ];
    let import = env.path("import.txt");
    for s in bad {
        let r = env.fail(&["create", "--name", "n", "--owner", "o", "--scope", s]);
        assert!(r.stderr.contains("scope"), "create {s:?}: {r:?}");
        let r = env.fail(&["update", &k, "--scope", s]);
        assert!(r.stderr.contains("scope"), "update {s:?}: {r:?}");
        let line =
            serde_json::json!({"key": "legacy-0123456789abcdef", "owner": "o", "scopes": [s]});
        std::fs::write(&import, format!("{line}\n")).unwrap();
        let r = env.fail(&["import", "--file", import.to_str().unwrap(), "--json"]);
        assert_eq!(r.json()["invalid"], 1, "import {s:?}: {r:?}");
    }
    assert_eq!(env.list(&[]).len(), 1);
    for s in ["invoices:read", "a.b-c_d:E9"] {
        env.ok(&["create", "--name", "n", "--owner", "o", "--scope", s]);
    }
}

/// Defect 14: a zero lifetime is refused (it would mint a key that is already expired).
#[test]
fn zero_lifetimes_are_refused() {
    let env = Env::new();
    let k = env.create_id(&[]);
    for d in ["0s", "0d", "0ms"] {
        let r = env.fail(&["create", "--name", "n", "--owner", "o", "--expires-in", d]);
        assert!(r.stderr.contains("expires"), "{d}: {r:?}");
        let r = env.fail(&["update", &k, "--expires-in", d]);
        assert!(r.stderr.contains("expires"), "{d}: {r:?}");
    }
    let r = env.fail(&["create", "--name", "n", "--owner", "o", "--expires-in=-1d"]);
    assert!(
        r.stderr.contains("duration") || r.stderr.contains("expires"),
        "{r:?}"
    );
    assert_eq!(env.list(&[]).len(), 1);
}

/// Defect 15: `keys show` carries last use like `keys list`, and its human form prints RFC
/// 3339 times like the list table.
#[test]
fn show_has_last_use_and_rfc3339_times() {
    let env = Env::new();
    let (v, _) = env.create(&["--expires-in", "30d"]);
    let k = id(&v);
    let used_at = now() - 100;
    std::fs::write(
        env.path("usage.json"),
        serde_json::json!({ k.clone(): {"last_used": used_at, "requests": 7} }).to_string(),
    )
    .unwrap();
    let shown = env.show(&k);
    assert_eq!(shown["last_used"], used_at);
    assert_eq!(shown["requests"], 7);
    let listed = env.list(&[]).pop().unwrap();
    assert_eq!(shown, listed, "show and list agree");

    let text = env.ok(&["show", &k]).stdout;
    let created = v["created_at"].as_i64().unwrap();
    let expires = v["expires_at"].as_i64().unwrap();
    for t in [created, expires, used_at] {
        assert!(text.contains(&rfc3339(t)), "{} in {text}", rfc3339(t));
        assert!(!text.contains(&t.to_string()), "no epoch seconds: {text}");
    }
}

/// Defect 16: atomic rewrites keep the store's mode: a 0600 keys.jsonl stays 0600.
#[test]
fn compact_keeps_the_store_file_mode() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let k = env.create_id(&[]);
    env.ok(&["revoke", &k]);
    std::fs::set_permissions(env.store(), std::fs::Permissions::from_mode(0o600)).unwrap();
    env.ok(&["compact"]);
    let mode = std::fs::metadata(env.store()).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "{mode:o}");
}

/// Issue 14 feature "not-before": `--not-before` (duration or RFC 3339) on create and import
/// makes a pending key; past, unparsable or after-expiry values are refused; update refuses it.
#[test]
fn not_before_makes_pending_keys_on_create_and_import() {
    let env = Env::new();
    let before = now();
    let (v, _) = env.create(&["--not-before", "1h", "--expires-in", "2h"]);
    let nb = v["not_before"].as_i64().unwrap();
    assert!((before + 3600..=now() + 3600).contains(&nb), "{v}");
    assert_eq!(v["state"], "pending");
    assert_eq!(env.show(&id(&v))["state"], "pending");
    assert!(env.list_ids(&["--state", "pending"]).contains(&id(&v)));
    // RFC 3339, with an offset: the same instant as in UTC.
    let (v, _) = env.create(&["--not-before", "2099-01-01T01:00:00+01:00"]);
    assert_eq!(v["not_before"], 4_070_908_800i64);
    let human = env.ok(&["show", &id(&v)]).stdout;
    assert!(human.contains("2099-01-01T00:00:00Z"), "{human}");
    for bad in [
        &["--not-before", "soon"][..],
        &["--not-before", "2000-01-01T00:00:00Z"],
        &["--not-before", "2h", "--expires-in", "1h"],
    ] {
        let r = env.fail(&[&["create", "--name", "x", "--owner", "o"], bad].concat());
        assert!(r.stderr.contains("not_before"), "{bad:?}: {r:?}");
    }
    let r = env.fail(&["update", &id(&v), "--not-before", "1h"]);
    assert!(r.stderr.contains("creation only"), "{r:?}");
    // Import: the flag is the default, a line's own `not_before` wins.
    let file = env.path("import.txt");
    std::fs::write(
        &file,
        "legacy_key_aaaaaaaaaaaaaaaa\n{\"key\":\"legacy_key_bbbbbbbbbbbbbbbb\",\"not_before\":4070908800}\n",
    )
    .unwrap();
    env.ok(&[
        "import",
        "--file",
        file.to_str().unwrap(),
        "--owner",
        "o",
        "--not-before",
        "30m",
    ]);
    let imported: Vec<Value> = env
        .list(&["--state", "pending"])
        .into_iter()
        .filter(|r| r["imported"] == true)
        .collect();
    let mut nbs: Vec<i64> = imported
        .iter()
        .map(|r| r["not_before"].as_i64().unwrap())
        .collect();
    nbs.sort();
    assert_eq!(nbs.len(), 2, "{imported:?}");
    assert!((before + 1800..=now() + 1800).contains(&nbs[0]));
    assert_eq!(nbs[1], 4_070_908_800);
    // Rotating a pending key never brings its not-before forward.
    let (v, _) = env.create(&["--not-before", "1h"]);
    let successor = env.ok(&["rotate", &id(&v), "--json"]).json();
    assert_eq!(successor["not_before"], v["not_before"]);
    assert_eq!(successor["state"], "pending");
}

/// Issue 14 feature "rotation that finishes itself": `rotate --abort SUCCESSOR_ID` revokes the
/// successor and restores the old key's expiry (audited); it is refused for anything but the
/// successor of an open rotation, and once the old key is revoked (revocation is final).
#[test]
fn rotate_abort_restores_the_old_key_and_is_refused_once_final() {
    let env = Env::new();
    let (v, _) = env.create(&["--expires-in", "30d"]);
    let old = id(&v);
    let exp0 = v["expires_at"].as_i64().unwrap();
    let r = env
        .ok(&[
            "rotate",
            &old,
            "--grace",
            "1h",
            "--complete-when-idle",
            "1h",
            "--json",
        ])
        .json();
    let succ = id(&r);
    let shown = env.show(&old);
    assert!(shown["expires_at"].as_i64().unwrap() <= now() + 3600);
    assert_eq!(shown["rotation"]["prior_expires_at"], exp0);
    assert_eq!(shown["rotation"]["complete_when_idle_secs"], 3600);
    assert_eq!(shown["rotation_status"]["state"], "in_progress");
    assert_eq!(
        env.show(&succ)["rotation_status"]["old"]["id"],
        old.as_str()
    );

    let r = env.ok(&["rotate", "--abort", &succ]);
    assert!(r.stderr.contains("aborted"), "{r:?}");
    let restored = env.show(&old);
    assert_eq!(restored["expires_at"], exp0);
    assert!(restored.get("rotated_to").is_none() && restored.get("rotation").is_none());
    let gone = env.show(&succ);
    assert_eq!(gone["state"], "revoked");
    assert_eq!(gone["revoked_reason"], "rotation aborted");
    let aborted = env.audit_events("key.rotation_aborted");
    assert_eq!(aborted.len(), 1);
    assert_eq!(aborted[0]["key_id"], old.as_str());
    assert_eq!(aborted[0]["successor_id"], succ.as_str());

    // Only the successor of an open rotation can be aborted.
    for bad in [&succ, &old] {
        let r = env.fail(&["rotate", "--abort", bad]);
        assert!(
            r.stderr
                .contains("not the successor of a rotation in progress"),
            "{r:?}"
        );
    }
    // The old key rotates again; once it is revoked, that rotation is final.
    let succ2 = id(&env.ok(&["rotate", &old, "--json"]).json());
    env.ok(&["revoke", &old]);
    let r = env.fail(&["rotate", "--abort", &succ2]);
    assert!(r.stderr.contains("final"), "{r:?}");
    assert_eq!(env.show(&succ2)["state"], "active");
    assert_eq!(env.show(&old)["state"], "revoked");
    let other = env.create_id(&[]);
    let r = env.fail(&["rotate", &other, "--complete-when-idle", "0s"]);
    assert!(r.stderr.contains("complete_when_idle"), "{r:?}");
    env.fail(&["rotate", "--abort", &succ2, "--grace", "1h"]);
}

/// Issue 14 feature "`keygate check` covers the release checklist": origins that are not bare
/// `scheme://host[:port]` (paths, `null`, wildcards, plain http outside localhost) are refused,
/// from `[cors]` or `ALLOWED_ORIGINS`; a touch interval of 0 is refused; the store, audit log
/// and usage file must be writable (or creatable).
#[test]
fn check_covers_the_release_checklist() {
    let base = CONFIG.replace("[keys]\n", "[keys]\ntouch_interval_seconds = 60\n");
    let env = Env::with_config(&format!(
        "{base}\n[cors]\nallowed_origins = [\"https://app.example.com\", \"http://localhost:3000\"]\n"
    ));
    env.create_id(&[]);
    let check = |vars: &[(&str, &str)]| {
        let mut c = env.keygate_command(&["check"]);
        c.env_remove("ALLOWED_ORIGINS")
            .env_remove("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS");
        for (k, v) in vars {
            c.env(k, v);
        }
        env.run_cmd(c, "keygate check")
    };
    let r = check(&[]);
    assert!(r.status.success(), "clean config: {r:?}");

    let bad = [
        "https://app.example.com/",
        "https://app.example.com/v1",
        "null",
        "https://*.example.com",
        "http://app.example.com",
    ];
    let r = check(&[("ALLOWED_ORIGINS", &bad.join(","))]);
    assert!(!r.status.success(), "{r:?}");
    for o in bad {
        assert!(
            r.stderr.contains(&format!("allowed origin {o:?}")),
            "{o}: {r:?}"
        );
    }
    assert!(r.stderr.contains("5 problem(s)"), "{r:?}");
    // The same rule for the config file's list.
    std::fs::write(
        &env.config,
        format!("{base}\n[cors]\nallowed_origins = [\"null\"]\n"),
    )
    .unwrap();
    let r = check(&[]);
    assert!(
        !r.status.success() && r.stderr.contains("\"null\""),
        "{r:?}"
    );
    std::fs::write(&env.config, &base).unwrap();

    let r = check(&[("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS", "0")]);
    assert!(!r.status.success(), "{r:?}");
    assert!(
        r.stderr
            .contains("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS is 0"),
        "{r:?}"
    );
    std::fs::write(&env.config, base.replace("= 60", "= 0")).unwrap();
    let r = check(&[]);
    assert!(
        r.stderr.contains("keys.touch_interval_seconds is 0"),
        "{r:?}"
    );
    // The shrink guard is a share of the live keys.
    std::fs::write(
        &env.config,
        base.replace("[keys]\n", "[keys]\nmax_snapshot_drop_percent = 101\n"),
    )
    .unwrap();
    let r = check(&[]);
    assert!(
        !r.status.success() && r.stderr.contains("keys.max_snapshot_drop_percent"),
        "{r:?}"
    );
    // A send timeout of 0 would cut every client whose socket is ever full.
    std::fs::write(
        &env.config,
        format!("{base}\n[server]\nsend_timeout_ms = 0\n"),
    )
    .unwrap();
    let r = check(&[]);
    assert!(
        !r.status.success() && r.stderr.contains("server.send_timeout_ms"),
        "{r:?}"
    );
    // Nor may an HTTP/2 connection be idle for 0 ms: it would be closed between requests.
    std::fs::write(
        &env.config,
        format!("{base}\n[server]\nh2_idle_timeout_ms = 0\n"),
    )
    .unwrap();
    let r = check(&[]);
    assert!(
        !r.status.success() && r.stderr.contains("server.h2_idle_timeout_ms"),
        "{r:?}"
    );

    // Unwritable paths (a directory; a path under a regular file: refused even for root).
    std::fs::create_dir(env.path("usage-dir")).unwrap();
    std::fs::write(
        &env.config,
        base.replace(
            "audit_log = \"audit.jsonl\"",
            "audit_log = \"keys.jsonl/audit.jsonl\"\nusage_file = \"usage-dir\"",
        ),
    )
    .unwrap();
    let r = check(&[]);
    assert!(!r.status.success(), "{r:?}");
    assert!(r.stderr.contains("keys.audit_log"), "{r:?}");
    assert!(
        r.stderr.contains("keys.usage_file") && r.stderr.contains("not a regular file"),
        "{r:?}"
    );
    assert!(
        !r.stderr.contains("keys.store"),
        "the store is writable: {r:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".keygate-check")
        })
        .collect();
    assert!(leftovers.is_empty(), "probe files left behind");
}

/// Issue 14 feature "hash-secret migration" (the status part): `keygate secret status` counts
/// live keys per secret version, says when each version was last seen (usage data), which is
/// current, and which can be retired (not current, no live key).
#[test]
fn secret_status_counts_keys_per_version_and_names_retirable_ones() {
    let env = Env::new();
    let a = env.create_id(&[]);
    let b = env.create_id(&[]);
    let status = |vars: &[(&str, &str)]| -> Vec<Value> {
        let mut c = env.keygate_command(&["secret", "status", "--json"]);
        for (k, v) in vars {
            c.env(k, v);
        }
        let r = env.run_cmd(c, "secret status");
        assert!(r.status.success(), "{r:?}");
        r.json().as_array().unwrap().clone()
    };
    let rows = status(&[]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["version"], 1);
    assert_eq!(rows[0]["live_keys"], 2);
    assert_eq!(
        (rows[0]["current"].as_bool(), rows[0]["retirable"].as_bool()),
        (Some(true), Some(false))
    );

    // Rotate the secret: version 2 is current, version 1 is still accepted.
    std::fs::write(
        &env.config,
        format!(
            "{}\n[[keys.previous_secrets]]\nversion = 1\nenv = \"OLD_SECRET\"\n",
            CONFIG.replace("[keys]\n", "[keys]\nhash_secret_version = 2\n")
        ),
    )
    .unwrap();
    let new_secret = "zyxwvutsrqponmlkjihgfedcba9876543210ZYXWVUTSRQP";
    let rotated = [(SECRET_VAR, new_secret), ("OLD_SECRET", SECRET)];
    let mut c = env.command(&["create", "--name", "v2", "--owner", "o", "--json"]);
    c.envs(rotated);
    let v2 = id(&env.run_cmd(c, "create under v2").json());
    let seen = now() - 60;
    std::fs::write(
        env.path("usage.json"),
        serde_json::json!({ v2.clone(): {"last_used": seen, "requests": 3}, a.clone(): {"last_used": seen - 100, "requests": 1} }).to_string(),
    )
    .unwrap();
    let mut c = env.command(&["revoke", &b]);
    c.envs(rotated);
    env.run_cmd(c, "revoke b");
    let rows = status(&rotated);
    let by: BTreeMap<u64, &Value> = rows
        .iter()
        .map(|r| (r["version"].as_u64().unwrap(), r))
        .collect();
    assert_eq!(by[&1]["live_keys"], 1, "{rows:?}");
    assert_eq!(by[&1]["last_seen"], seen - 100);
    assert_eq!(by[&1]["retirable"], false);
    assert_eq!(by[&2]["live_keys"], 1);
    assert_eq!(by[&2]["last_seen"], seen);
    assert_eq!(by[&2]["current"], true);
    // Once no live key uses version 1, it can go.
    let mut c = env.command(&["revoke", &a]);
    c.envs(rotated);
    env.run_cmd(c, "revoke a");
    let rows = status(&rotated);
    assert_eq!(rows[0]["retirable"], true, "{rows:?}");
    let mut c = env.keygate_command(&["secret", "status"]);
    c.envs(rotated);
    let human = env.run_cmd(c, "secret status").stdout;
    assert!(
        human.contains("RETIRABLE") && human.contains("LIVE KEYS"),
        "{human}"
    );
}

/// `pub` marks publishable keys (`kg_pub_live_…`), so it cannot be an env; and a canary cannot
/// be publishable.
#[test]
fn an_env_named_pub_is_refused() {
    let env = Env::with_config(&CONFIG.replace("[keys]\n", "[keys]\nenvs = [\"live\", \"pub\"]\n"));
    let r = env.fail(&["create", "--name", "n", "--owner", "o"]);
    assert!(
        r.stderr.contains("keys.envs") && r.stderr.contains("pub"),
        "{r:?}"
    );
    let env = Env::new();
    let r = env.fail(&[
        "create",
        "--name",
        "n",
        "--owner",
        "o",
        "--publishable",
        "--canary",
        "--allow-origin",
        "https://a.example",
    ]);
    assert!(
        r.stderr.contains("publishable") || r.stderr.contains("canary"),
        "{r:?}"
    );
}

/// Every config error names the file, the line and the field, on one line: syntax errors,
/// wrong types and unknown fields (from the deserializer's span) as well as values that
/// parse but fail validation (from the field's path), inside `[keys]` and `[[routes]]` alike.
#[test]
fn config_errors_name_file_line_and_field() {
    let base = "[plans.default]\nrate = \"100/s\"\n\n[keys]\ntouch_interval_seconds = 60\n";
    let upstream = "\n[[upstreams]]\nname = \"u\"\ntargets = [\"127.0.0.1:9\"]\n";
    let route = |name: &str| {
        format!("{base}{upstream}\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/\"\nupstream = \"u\"\n")
    };
    let cases: [(&str, String, &str, &str); 11] = [
        ("duration in [keys]", format!("{base}rotate_grace = \"soon\"\n"), ":6:16:", "`keys.rotate_grace`"),
        ("wrong type", format!("{base}\n[server]\nmax_headers = \"ten\"\n"), ":8:15:", "`server.max_headers`"),
        ("unknown field", format!("{base}stroe = \"x\"\n"), ":6:1:", "`keys.stroe`"),
        ("missing field", format!("{base}{upstream}\n[[routes]]\nname = \"a\"\npath_prefix = \"/\"\n"), ":11:1:", "`routes[0]`"),
        ("validation in [[routes]]", format!("{base}{upstream}\n[[routes]]\nname = \"a\"\npath_prefix = \"/\"\nupstream = \"nope\"\n"), ":14:12:", "`routes[0].upstream`"),
        ("syntax", format!("{base}[server\n"), ":6:8:", "invalid table header"),
        ("listen address", format!("{base}\n[server]\nlisten = \"nohost\"\n"), ":8:10:", "`server.listen`"),
        ("admin listen address", format!("{base}\n[admin]\nlisten = \"127.0.0.1\"\n"), ":8:10:", "`admin.listen`"),
        // A route's name is a metrics label and a field of relayed events, which the control
        // plane refuses over 256 bytes: one over the limit or with other characters is refused.
        ("route name over 64 bytes", route(&"r".repeat(300)), ":12:8:", "`routes[0].name`"),
        ("route name with a newline", route("a\\nb"), ":12:8:", "`routes[0].name`"),
        ("empty route name", route(""), ":12:8:", "`routes[0].name`"),
    ];
    for (what, text, line, field) in cases {
        let env = Env::with_config(&text);
        for json in [false, true] {
            let r = if json {
                env.keygate(&["check", "--json"])
            } else {
                env.keygate(&["check"])
            };
            assert!(!r.status.success(), "{what}: {r:?}");
            let problem = if json {
                r.json()["problems"][0].as_str().unwrap().to_owned()
            } else {
                let l = r.stderr.lines().find(|l| l.starts_with("problem:"));
                l.unwrap_or_else(|| panic!("{what}: {r:?}")).to_owned()
            };
            let file = format!("{}{line}", env.config.display());
            assert!(problem.contains(&file), "{what}: no {file} in {problem:?}");
            assert!(problem.contains(field), "{what}: no {field} in {problem:?}");
            assert!(
                !problem.contains("expected number at"),
                "{what}: {problem:?}"
            );
        }
        assert_eq!(
            env.keygate(&["check"])
                .stderr
                .lines()
                .filter(|l| l.starts_with("problem:"))
                .count(),
            1,
            "{what}: one problem, on one line"
        );
    }
}

/// The `KEYGATE_*` variables a container sets instead of templating the file: applied after
/// the file is parsed (so they win), noted by `check`, and a bad value is refused naming the
/// variable, not a flag or a line the operator never wrote.
#[test]
fn env_overrides_win_over_the_file_and_errors_name_the_variable() {
    let env =
        Env::with_config(&CONFIG.replace("[keys]\n", "[keys]\ntouch_interval_seconds = 60\n"));
    let check = |vars: &[(&str, &str)]| {
        let mut c = env.keygate_command(&["check"]);
        c.envs(vars.iter().copied());
        env.run_cmd(c, &format!("check {vars:?}"))
    };
    let r = check(&[("KEYGATE_ADMIN_LISTEN", "0.0.0.0:9999")]);
    assert!(r.status.success(), "{r:?}");
    assert!(
        r.stderr
            .contains("admin.listen set by KEYGATE_ADMIN_LISTEN"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("admin listener 0.0.0.0:9999"),
        "the value is used: {r:?}"
    );

    for var in [
        "KEYGATE_LISTEN",
        "KEYGATE_ADMIN_LISTEN",
        "KEYGATE_CONTROL_LISTEN",
    ] {
        let r = check(&[(var, "8080")]);
        assert!(!r.status.success(), "{var}: {r:?}");
        assert!(r.stderr.contains(&format!("(from {var})")), "{r:?}");
        assert!(r.stderr.contains("is not host:port"), "{r:?}");
    }

    let r = check(&[("KEYGATE_LOG_FORMAT", "json")]);
    assert!(r.status.success(), "{r:?}");
    for line in r.stderr.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v["message"].is_string(), "{line}");
    }
    let r = check(&[("KEYGATE_LOG_FORMAT", "xml")]);
    assert_eq!(r.status.code(), Some(2), "{r:?}");
    assert!(
        r.stderr.contains("KEYGATE_LOG_FORMAT") && r.stderr.contains("xml"),
        "{r:?}"
    );

    // KEYGATE_CONFIG names the file when --config is not given.
    let mut c = Command::new(env!("CARGO_BIN_EXE_keygate"));
    c.arg("check")
        .env(SECRET_VAR, SECRET)
        .env("KEYGATE_CONFIG", &env.config)
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let r = env.run_cmd(c, "check via KEYGATE_CONFIG");
    assert!(r.status.success(), "{r:?}");
    assert!(
        r.stdout.contains(&format!("{}: ok", env.config.display())),
        "{r:?}"
    );
}

/// `secret rotate` prints the config steps for a new hash-secret version (no secret, nothing
/// written, no secret needed to run it); following them literally gives a config that `check`
/// accepts, where old keys stay on version 1 (still configured) and new keys use version 2.
#[test]
fn secret_rotate_prints_steps_that_work_when_followed() {
    let env = Env::new();
    let old = env.create_id(&[]);
    let before = std::fs::read(&env.config).unwrap();
    let mut c = env.keygate_command(&["secret", "rotate", "--json"]);
    c.env_remove(SECRET_VAR);
    let plan = env.run_cmd(c, "secret rotate").json();
    assert_eq!(
        std::fs::read(&env.config).unwrap(),
        before,
        "nothing written"
    );
    assert_eq!(plan["current_version"], 1);
    assert_eq!(plan["new_version"], 2);
    assert_eq!(
        plan["previous_secret"]["env"], "API_KEY_HASH_SECRET_V1",
        "{plan}"
    );
    assert!(!plan.to_string().contains(SECRET), "no secret printed");
    let text = env
        .run_cmd(env.keygate_command(&["secret", "rotate"]), "text")
        .stdout;
    assert!(
        text.contains("hash_secret_version = 2") && text.contains("[[keys.previous_secrets]]"),
        "{text}"
    );
    assert!(!text.contains(SECRET));

    // Follow the plan: the version line goes into [keys], the rest is appended; the shell
    // steps keep the old secret under API_KEY_HASH_SECRET_V1 and make a new current one.
    let snippet = plan["config"].as_str().unwrap();
    let (keys_part, previous) = snippet.split_once("\n\n").unwrap();
    let version_line = keys_part.strip_prefix("[keys]\n").unwrap();
    std::fs::write(
        &env.config,
        format!(
            "{}\n{previous}",
            CONFIG.replace(
                "[keys]\n",
                &format!("[keys]\ntouch_interval_seconds = 60\n{version_line}\n")
            )
        ),
    )
    .unwrap();
    let new_secret = "zyxwvutsrqponmlkjihgfedcba9876543210ZYXWVUTSRQP";
    let rotated = [(SECRET_VAR, new_secret), ("API_KEY_HASH_SECRET_V1", SECRET)];
    let mut c = env.keygate_command(&["check"]);
    c.envs(rotated);
    let r = env.run_cmd(c, "check after rotation");
    assert!(r.status.success(), "{r:?}");
    let mut c = env.command(&["create", "--name", "v2", "--owner", "o", "--json"]);
    c.envs(rotated);
    let new = id(&env.run_cmd(c, "create under v2").json());
    let mut c = env.keygate_command(&["secret", "status", "--json"]);
    c.envs(rotated);
    let rows = env.run_cmd(c, "secret status").json();
    let by: BTreeMap<u64, &Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["version"].as_u64().unwrap(), r))
        .collect();
    assert_eq!(by[&1]["configured"], true, "{rows}");
    assert_eq!(by[&1]["live_keys"], 1, "{rows}");
    assert_eq!(
        (by[&2]["current"].as_bool(), by[&2]["live_keys"].as_u64()),
        (Some(true), Some(1))
    );
    assert_ne!(old, new);
}

/// `n` labels `k=v` with keys of exactly `key_len` bytes (numbered, zero-padded) and values
/// of `value_len` bytes, as `--label` arguments.
fn label_args(from: usize, n: usize, key_len: usize, value_len: usize) -> Vec<String> {
    (from..from + n)
        .flat_map(|i| {
            [
                "--label".to_owned(),
                format!("{i:0key_len$}={}", "v".repeat(value_len)),
            ]
        })
        .collect()
}

/// Review 134 defect 1: labels, names and owners had no bound, so repeated updates grew one
/// record past the feed's line limit and wedged every feed gateway. `create`, `update` and
/// `import` refuse what is over a bound, naming the field; a loop of updates stops at the
/// label count, and the stored record stays small.
#[test]
fn labels_and_free_form_fields_are_bounded_on_every_path() {
    let env = Env::new();
    let base = ["create", "--name", "n", "--owner", "o"];
    let refused = |extra: Vec<String>, field: &str| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter().map(String::as_str));
        let r = env.fail(&args);
        assert!(r.stderr.contains(field), "{field}: {r:?}");
        assert!(r.stdout.is_empty(), "no key printed: {r:?}");
    };
    refused(label_args(0, 65, 2, 1), "labels");
    refused(label_args(0, 1, 64, 1), "labels");
    refused(label_args(0, 1, 2, 257), "labels");
    refused(vec!["--label".into(), "=v".into()], "label");
    let r = env.fail(&["create", "--name", &"n".repeat(257), "--owner", "o"]);
    assert!(r.stderr.contains("name"), "{r:?}");
    let r = env.fail(&["create", "--name", "n", "--owner", &"o".repeat(257)]);
    assert!(r.stderr.contains("owner"), "{r:?}");
    assert!(env.store_text().is_empty() || env.list(&[]).is_empty());

    // At the bounds: accepted.
    let mut args: Vec<String> = base.iter().map(|s| (*s).to_owned()).collect();
    args.extend(["--json".to_owned()]);
    args.extend(label_args(0, 64, 63, 256));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let full = id(&env.ok(&args).json());
    assert_eq!(env.show(&full)["labels"].as_object().unwrap().len(), 64);

    // The update loop of the defect: 60 KB labels are refused, every time.
    let k = env.create_id(&[]);
    for i in 0..20 {
        let label = format!("big{i}={}", "x".repeat(60_000));
        let r = env.fail(&["update", &k, "--label", &label]);
        assert!(r.stderr.contains("labels"), "{r:?}");
    }
    // Labels at the value bound, eight at a time: the ninth update would make 65.
    for round in 0..8 {
        let mut args = vec!["update".to_owned(), k.clone()];
        args.extend(label_args(round * 8, 8, 63, 256));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.ok(&args);
    }
    let mut args = vec!["update".to_owned(), k.clone()];
    args.extend(label_args(64, 1, 63, 256));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = env.fail(&args);
    assert!(r.stderr.contains("labels"), "{r:?}");
    assert_eq!(env.show(&k)["labels"].as_object().unwrap().len(), 64);
    // Every line of the store stays within the record bound (64 KiB), far below a feed line's limit.
    let longest = env.store_text().lines().map(str::len).max().unwrap();
    assert!(longest <= 64 * 1024, "{longest} bytes");

    // Import: the line is refused and named, the good line imported.
    let labels: serde_json::Map<String, Value> = (0..65)
        .map(|i| (format!("k{i}"), Value::from("v")))
        .collect();
    let file = env.path("import.jsonl");
    let lines = [
        serde_json::json!({"key": "legacy-key-bounded-000001", "owner": "o", "labels": labels})
            .to_string(),
        serde_json::json!({"key": "legacy-key-bounded-000002", "owner": "o", "name": "n".repeat(257)})
            .to_string(),
        serde_json::json!({"key": "legacy-key-bounded-000003", "owner": "o"}).to_string(),
    ];
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let r = env.fail(&["import", "--file", file.to_str().unwrap(), "--json"]);
    assert_eq!(
        r.json(),
        serde_json::json!({"imported": 1, "duplicates": 0, "invalid": 2}),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("line 1: labels"),
        "names the line and the field: {r:?}"
    );
    assert!(r.stderr.contains("line 2: name"), "{r:?}");
}
