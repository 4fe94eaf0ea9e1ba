//! `keygate scan` (issue 15) against the real binary, and the control plane's
//! `POST /v1/api-keys/lookup` and `POST /v1/api-keys/verify`.
//!
//! One generated tree holds live, revoked, expired, not-yet-valid, canary, unknown and
//! corrupted-checksum keys in plain text, JSON, gzip, tar and tar.gz (archives built by the
//! system's `tar` and `gzip`), plus a `.git` directory and a binary file. Scans must report
//! exactly the expected places and hints and never a key; `--check` and `--revoke` run against
//! the file store, the Redis store and a control plane; SARIF output is validated against the
//! official SARIF 2.1.0 schema (tests/fixtures/sarif-schema-2.1.0.json) with Python's
//! `jsonschema`, which must be installed (a missing validator fails the test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::redis::RedisServer;
use common::*;
use http::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const CONFIG: &str = r#"[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"
usage_file = "usage.json"
poll_interval_ms = 50
touch_interval_seconds = 1

[plans.default]
rate = "100/s"

[control]
listen = "127.0.0.1:0"
tokens = "admin-tokens.jsonl"
heartbeat_ms = 200
"#;

/// The keys planted in the tree, by what they are.
struct Planted {
    live: Key,
    revoked: Key,
    expired: Key,
    pending: Key,
    canary: Key,
    unknown: String,
    corrupted: String,
}

impl Planted {
    /// Every string that must never appear in any output.
    fn secrets(&self) -> Vec<&str> {
        vec![
            &self.live.key,
            &self.revoked.key,
            &self.expired.key,
            &self.pending.key,
            &self.canary.key,
            &self.unknown,
            &self.corrupted,
        ]
    }
}

/// `kg_live_…` + the last four characters: the hint, computed independently of keygate.
fn hint(key: &str) -> String {
    let head = if key.starts_with("kg_pub_") { 3 } else { 2 };
    let parts: Vec<&str> = key.splitn(head + 1, '_').collect();
    format!("{}_…{}", parts[..head].join("_"), &key[key.len() - 4..])
}

/// 1-based (line, column in code points) of `needle` in `text`.
fn place(text: &str, needle: &str) -> (u64, u64) {
    for (i, line) in text.split('\n').enumerate() {
        if let Some(at) = line.find(needle) {
            return ((i + 1) as u64, (line[..at].chars().count() + 1) as u64);
        }
    }
    panic!("{needle} not in text");
}

/// A finding as the tests compare them: (file, line, column, hint).
type Place = (String, u64, u64, String);

struct Tree {
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    root: PathBuf,
    keys: Planted,
    /// What a default scan must report.
    expected: BTreeSet<Place>,
    /// Found only with `--include-git` / `--binary`.
    in_git: Place,
    in_binary: Place,
}

/// Mint the keys with the CLI (file store, or whatever `config` names), wait until the
/// expiring one has expired, and write the tree.
async fn tree(config: &str, envs: &[(&str, &str)]) -> Tree {
    let dir = tempdir();
    let base = dir.path().to_path_buf();
    let cfg = write_file(&base, "keygate.toml", config);
    let ok = |args: &[&str]| {
        let mut all = SECRET_ENV.to_vec();
        all.extend_from_slice(envs);
        let out = cli(&cfg, args, &all);
        assert!(out.status.success(), "{args:?}: {}", stderr_str(&out));
        stdout_str(&out)
    };
    let create = |extra: &[&str]| {
        let mut args = vec![
            "keys", "create", "--name", "n", "--owner", "team-a", "--json",
        ];
        args.extend_from_slice(extra);
        let v: Value = serde_json::from_str(ok(&args).trim()).unwrap();
        Key {
            id: v["id"].as_str().unwrap().to_owned(),
            key: v["key"].as_str().unwrap().to_owned(),
        }
    };
    let live = create(&["--scope", "invoices:read"]);
    let revoked = create(&[]);
    ok(&["keys", "revoke", &revoked.id, "--reason", "rotated out"]);
    let expired = create(&["--expires-in", "1s"]);
    let pending = create(&["--not-before", "1h"]);
    let canary = create(&["--canary"]);
    let format = keygate::keys::format::KeyFormat::new("kg", &["live".into(), "test".into()]);
    let unknown = format.generate("test").unwrap();
    let mut corrupted = live.key.clone();
    let last = corrupted.pop().unwrap();
    corrupted.push(if last == 'a' { 'b' } else { 'a' });
    let keys = Planted {
        live,
        revoked,
        expired,
        pending,
        canary,
        unknown,
        corrupted,
    };

    let root = base.join("tree");
    let staging = base.join("staging");
    std::fs::create_dir_all(root.join(".git")).unwrap();
    std::fs::create_dir_all(staging.join("pkg")).unwrap();
    std::fs::create_dir_all(staging.join("pkg2/deep")).unwrap();
    let mut expected = BTreeSet::new();
    let mut plant = |file: &str, text: &str, key: &str| {
        let (line, col) = place(text, key);
        expected.insert((file.to_owned(), line, col, hint(key)));
    };

    // Plain text: the live key, a corrupted copy (not a key), the revoked key after it.
    let plain = format!(
        "# settings\nAPI_KEY={}\n  old = \"{}\" and {}\n",
        keys.live.key, keys.corrupted, keys.revoked.key
    );
    write_file(&root, "plain.txt", &plain);
    plant("plain.txt", &plain, &keys.live.key);
    plant("plain.txt", &plain, &keys.revoked.key);

    // JSON: unknown and not-yet-valid keys.
    let config_json = serde_json::to_string_pretty(
        &json!({"primary": keys.unknown, "next": {"key": keys.pending.key}}),
    )
    .unwrap();
    write_file(&root, "config.json", &config_json);
    plant("config.json", &config_json, &keys.unknown);
    plant("config.json", &config_json, &keys.pending.key);

    // Gzip (by flate2 here; the system gzip below): the expired key after non-ASCII text.
    let notes = format!("étude ✓\n\t→ {}\n", keys.expired.key);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(notes.as_bytes()).unwrap();
    std::fs::write(root.join("notes.txt.gz"), gz.finish().unwrap()).unwrap();
    plant("notes.txt.gz", &notes, &keys.expired.key);

    // A tar by the system's tar: the live key in an entry, a corrupted one in another.
    let app_env = format!("LIVE={}\n", keys.live.key);
    write_file(&staging.join("pkg"), "app.env", &app_env);
    write_file(
        &staging.join("pkg"),
        "readme.md",
        &format!("see {}\n", keys.corrupted),
    );
    plant("bundle.tar!pkg/app.env", &app_env, &keys.live.key);
    let tar = require_tool("tar", "tar");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {}", stderr_str(&out));
    };
    run(Command::new(&tar)
        .arg("-cf")
        .arg(root.join("bundle.tar"))
        .arg("-C")
        .arg(&staging)
        .arg("pkg"));
    // A tar.gz by tar + gzip: the canary, one directory deeper.
    let canary_txt = format!("x {}\n", keys.canary.key);
    write_file(&staging.join("pkg2/deep"), "canary.txt", &canary_txt);
    plant(
        "bundle.tar.gz!pkg2/deep/canary.txt",
        &canary_txt,
        &keys.canary.key,
    );
    require_tool("gzip", "gzip");
    run(Command::new(&tar)
        .arg("-czf")
        .arg(root.join("bundle.tar.gz"))
        .arg("-C")
        .arg(&staging)
        .arg("pkg2"));

    // Skipped by default: .git, and binary content.
    let git_config = format!("[remote]\n\turl = https://x:{}@example\n", keys.live.key);
    write_file(&root.join(".git"), "config", &git_config);
    let (l, c) = place(&git_config, &keys.live.key);
    let in_git = (".git/config".to_owned(), l, c, hint(&keys.live.key));
    let mut bin = b"\x00\x01\x02 ".to_vec();
    bin.extend_from_slice(keys.live.key.as_bytes());
    std::fs::write(root.join("image.bin"), &bin).unwrap();
    let in_binary = ("image.bin".to_owned(), 1, 5, hint(&keys.live.key));

    // The expiring key must have expired before any scan looks it up.
    let expired_id = keys.expired.id.clone();
    let list = || {
        let mut all = SECRET_ENV.to_vec();
        all.extend_from_slice(envs);
        let out = cli(&cfg, &["keys", "list", "--json"], &all);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    eventually_named("key expired", Duration::from_secs(10), || {
        let v = list();
        let id = expired_id.clone();
        async move {
            v.as_array()
                .unwrap()
                .iter()
                .any(|r| r["id"] == id.as_str() && r["state"] == "expired")
                .then_some(())
        }
    })
    .await;

    Tree {
        _dir: dir,
        cfg,
        root,
        keys,
        expected,
        in_git,
        in_binary,
    }
}

/// `keygate --config <cfg> scan <args>` run in `cwd` (so paths print relative to it), with
/// `envs` only (no hash secret unless given); ≤ 60 s.
fn scan(cfg: &Path, cwd: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(keygate_bin());
    cmd.arg("--config")
        .arg(cfg)
        .arg("scan")
        .args(args)
        .current_dir(cwd)
        .env_remove("API_KEY_HASH_SECRET")
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .env_remove("KEYGATE_CONTROL_PLANE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("scan finished within 60 s")
        .unwrap()
}

/// The scan's exit code, after checking that no output carries a planted key.
fn code(out: &Output, keys: &Planted) -> i32 {
    let text = format!("{}{}", stdout_str(out), stderr_str(out));
    for k in keys.secrets() {
        assert!(!text.contains(k), "a key in the scan's output:\n{text}");
    }
    out.status.code().expect("exit code")
}

fn places(report: &Value) -> BTreeSet<Place> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["file"].as_str().unwrap().to_owned(),
                f["line"].as_u64().unwrap(),
                f["column"].as_u64().unwrap(),
                f["hint"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout_str(out), stderr_str(out)))
}

/// The state `--check` reported for each hint's findings.
fn states(report: &Value) -> BTreeSet<(String, String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["file"].as_str().unwrap().to_owned(),
                f["state"].as_str().unwrap().to_owned(),
                f["id"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect()
}

fn expected_states(t: &Tree) -> BTreeSet<(String, String, String)> {
    let k = &t.keys;
    [
        ("plain.txt", "live", k.live.id.as_str()),
        ("plain.txt", "revoked", &k.revoked.id),
        ("config.json", "unknown", "-"),
        ("config.json", "not_yet_valid", &k.pending.id),
        ("notes.txt.gz", "expired", &k.expired.id),
        ("bundle.tar!pkg/app.env", "live", &k.live.id),
        ("bundle.tar.gz!pkg2/deep/canary.txt", "canary", &k.canary.id),
    ]
    .into_iter()
    .map(|(f, s, i)| (f.to_owned(), s.to_owned(), i.to_owned()))
    .collect()
}

/// Validate `sarif` against the vendored official schema with Python's `jsonschema`
/// (Draft 4, the schema's own `$schema`). Fails when python3 or jsonschema is missing.
fn assert_valid_sarif(sarif: &Value, dir: &Path) {
    let python = require_tool("python3", "python3");
    let schema = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sarif-schema-2.1.0.json"
    );
    let doc = dir.join("scan.sarif");
    std::fs::write(&doc, sarif.to_string()).unwrap();
    let script = r#"
import json, sys
try:
    import jsonschema
except ImportError:
    sys.exit("python3 cannot import jsonschema: install it (apt-get install -y python3-jsonschema, or pip install jsonschema)")
schema = json.load(open(sys.argv[1]))
doc = json.load(open(sys.argv[2]))
jsonschema.Draft4Validator.check_schema(schema)
errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(doc), key=str)
for e in errors:
    print(list(e.absolute_path), e.message)
sys.exit(1 if errors else 0)
"#;
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(schema)
        .arg(&doc)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SARIF invalid against the 2.1.0 schema:\n{}{}",
        stdout_str(&out),
        stderr_str(&out)
    );
}

/// Plain scans: exact places and hints in text, JSON, gzip, tar and tar.gz; corrupted
/// checksums never reported; `.git` and binaries only when asked; exit 0/1/2.
#[tokio::test]
async fn finds_exactly_the_valid_keys_in_text_json_gzip_and_tar() {
    let t = tree(CONFIG, &[]).await;
    let out = scan(&t.cfg, &t.root, &["--json", "."], &[]);
    assert_eq!(code(&out, &t.keys), 1, "{}", stderr_str(&out));
    let r = report(&out);
    assert_eq!(places(&r), t.expected);
    assert_eq!(r["findings"].as_array().unwrap().len(), t.expected.len());
    assert_eq!(
        r["exposed"],
        t.expected.len(),
        "without --check every key counts"
    );
    assert!(r["findings"][0].get("state").is_none());
    let skipped: Vec<&str> = r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert_eq!(skipped, vec!["image.bin"]);

    // Text output: one `file:line:column: hint` per finding.
    let out = scan(&t.cfg, &t.root, &["."], &[]);
    assert_eq!(code(&out, &t.keys), 1);
    let lines: BTreeSet<String> = stdout_str(&out).lines().map(str::to_owned).collect();
    let want: BTreeSet<String> = t
        .expected
        .iter()
        .map(|(f, l, c, h)| format!("{f}:{l}:{c}: {h}"))
        .collect();
    assert_eq!(lines, want);

    // Asked for: .git and binary content.
    let out = scan(
        &t.cfg,
        &t.root,
        &["--json", "--include-git", "--binary", "."],
        &[],
    );
    let mut all = t.expected.clone();
    all.insert(t.in_git.clone());
    all.insert(t.in_binary.clone());
    assert_eq!(places(&report(&out)), all);

    // Without archives: nothing from inside them.
    let out = scan(&t.cfg, &t.root, &["--json", "--no-archives", "."], &[]);
    let r = places(&report(&out));
    assert!(
        r.iter()
            .all(|p| !p.0.contains(".gz") && !p.0.contains(".tar")),
        "{r:?}"
    );
    assert_eq!(r.len(), 4);

    // Stdin, a single file, a clean tree, and errors.
    let keys = t.keys.live.key.clone();
    let mut child = Command::new(keygate_bin())
        .args(["--config", t.cfg.to_str().unwrap(), "scan", "--json", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || stdin.write_all(format!("a\n b {keys}").as_bytes()));
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out, &t.keys), 1);
    assert_eq!(
        places(&report(&out)),
        BTreeSet::from([("-".to_owned(), 2, 4, hint(&t.keys.live.key))])
    );
    let clean = t.root.join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    write_file(
        &clean,
        "a.txt",
        &format!("nothing here: kg_live_ {}\n", t.keys.corrupted),
    );
    assert_eq!(code(&scan(&t.cfg, &t.root, &["clean"], &[]), &t.keys), 0);
    let missing = scan(&t.cfg, &t.root, &["clean", "no-such-file"], &[]);
    assert_eq!(code(&missing, &t.keys), 2);
    assert!(stderr_str(&missing).contains("no-such-file"));
    // Content over --max-size is not read, and the scan says so: exit 2, naming the file,
    // for a plain file and for a decompressed entry (a key inside must not pass unseen).
    let big = scan(&t.cfg, &t.root, &["--max-size", "16", "clean"], &[]);
    assert_eq!(code(&big, &t.keys), 2, "{}", stderr_str(&big));
    assert!(
        stderr_str(&big).contains("clean/a.txt: not scanned"),
        "{}",
        stderr_str(&big)
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&vec![b'a'; 1 << 20]).unwrap();
    gz.write_all(t.keys.live.key.as_bytes()).unwrap();
    std::fs::write(t.root.join("bomb.txt.gz"), gz.finish().unwrap()).unwrap();
    let out = scan(
        &t.cfg,
        &t.root,
        &["--max-size", "64KiB", "bomb.txt.gz"],
        &[],
    );
    assert_eq!(code(&out, &t.keys), 2, "{}", stderr_str(&out));
    assert!(
        stderr_str(&out).contains("bomb.txt.gz: not scanned"),
        "{}",
        stderr_str(&out)
    );
    std::fs::remove_file(t.root.join("bomb.txt.gz")).unwrap();
    // An unreadable path beats found keys: the scan is incomplete, exit 2.
    assert_eq!(
        code(&scan(&t.cfg, &t.root, &[".", "nope"], &[]), &t.keys),
        2
    );
    // --revoke without --yes refuses before reading anything.
    let out = scan(
        &t.cfg,
        &t.root,
        &["--revoke", "--reason", "leaked", "."],
        &[],
    );
    assert_eq!(code(&out, &t.keys), 2);
    assert!(stderr_str(&out).contains("--yes"));
}

/// SARIF: valid against the official 2.1.0 schema, one result per finding with its place,
/// errors for exposed keys; with `--check` the levels follow the states.
#[tokio::test]
async fn sarif_output_is_valid_sarif_2_1_0() {
    let t = tree(CONFIG, &[]).await;
    let out = scan(&t.cfg, &t.root, &["--sarif", "."], &[]);
    assert_eq!(code(&out, &t.keys), 1);
    let sarif = report(&out);
    assert_valid_sarif(&sarif, t.root.parent().unwrap());
    assert_eq!(sarif["version"], "2.1.0");
    let results = sarif["runs"][0]["results"].as_array().unwrap();
    let got: BTreeSet<Place> = results
        .iter()
        .map(|r| {
            let loc = &r["locations"][0]["physicalLocation"];
            let text = r["message"]["text"].as_str().unwrap();
            let hint = text.split_whitespace().nth(3).unwrap().to_owned();
            (
                loc["artifactLocation"]["uri"].as_str().unwrap().to_owned(),
                loc["region"]["startLine"].as_u64().unwrap(),
                loc["region"]["startColumn"].as_u64().unwrap(),
                hint,
            )
        })
        .collect();
    assert_eq!(got, t.expected);
    assert!(results.iter().all(|r| r["level"] == "error"));

    let out = scan(
        &t.cfg,
        &t.root,
        &["--sarif", "--check", "."],
        &[(SECRET_VAR, SECRET)],
    );
    assert_eq!(code(&out, &t.keys), 1);
    let sarif = report(&out);
    assert_valid_sarif(&sarif, t.root.parent().unwrap());
    let levels: Vec<&str> = sarif["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["level"].as_str().unwrap())
        .collect();
    assert_eq!(
        levels.iter().filter(|l| **l == "error").count(),
        3,
        "{levels:?}"
    );
    assert_eq!(
        levels.iter().filter(|l| **l == "note").count(),
        1,
        "{levels:?}"
    );
}

/// `--check` and `--revoke` against the local file store: states with id and owner; only the
/// exposed keys (live, not yet valid) are revoked, each once, audited with where it was found.
#[tokio::test]
async fn check_and_revoke_against_the_local_store() {
    let t = tree(CONFIG, &[]).await;
    let secret = [(SECRET_VAR, SECRET)];
    // --check needs the hash secret for the local store: without it, exit 2.
    let out = scan(&t.cfg, &t.root, &["--check", "."], &[]);
    assert_eq!(code(&out, &t.keys), 2);
    assert!(
        stderr_str(&out).contains("API_KEY_HASH_SECRET"),
        "{}",
        stderr_str(&out)
    );

    let out = scan(&t.cfg, &t.root, &["--check", "--json", "."], &secret);
    assert_eq!(code(&out, &t.keys), 1);
    let r = report(&out);
    assert_eq!(states(&r), expected_states(&t));
    assert_eq!(r["exposed"], 3);
    let live = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["state"] == "live")
        .unwrap();
    assert_eq!(live["owner"], "team-a");
    revoke_and_verify(&t, &secret, "(uid").await;
}

/// Runs `scan --revoke` (with `envs`) and checks the store and the audit log afterwards.
async fn revoke_and_verify(t: &Tree, envs: &[(&str, &str)], actor: &str) {
    let audit_before = read_lossy(&t.cfg.with_file_name("audit.jsonl"));
    let out = scan(
        &t.cfg,
        &t.root,
        &["--revoke", "--reason", "leaked", "--yes", "--json", "."],
        envs,
    );
    assert_eq!(code(&out, &t.keys), 1, "{}", stderr_str(&out));
    let r = report(&out);
    let revoked: BTreeSet<String> = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["revoked"] == true)
        .map(|f| f["file"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        revoked,
        BTreeSet::from([
            "plain.txt".to_owned(),
            "bundle.tar!pkg/app.env".to_owned(),
            "config.json".to_owned()
        ])
    );
    // The store: live and pending revoked for "leaked"; the others untouched.
    let list = cli(&t.cfg, &["keys", "list", "--json"], &store_envs(envs));
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let by_id = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()
            .clone()
    };
    let k = &t.keys;
    for id in [&k.live.id, &k.pending.id] {
        assert_eq!(by_id(id)["state"], "revoked");
        assert_eq!(by_id(id)["revoked_reason"], "leaked");
    }
    assert_eq!(by_id(&k.revoked.id)["revoked_reason"], "rotated out");
    assert_eq!(by_id(&k.expired.id)["state"], "expired");
    assert_eq!(
        by_id(&k.canary.id)["state"],
        "canary",
        "canaries stay armed"
    );
    // The audit: one key.revoked per revoked key, naming every place, never a key.
    let audit = read_lossy(&t.cfg.with_file_name("audit.jsonl"));
    let new: Vec<Value> = audit[audit_before.len()..]
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &Value| e["event"] == "key.revoked")
        .collect();
    assert_eq!(new.len(), 2, "{new:?}");
    let live_event = new
        .iter()
        .find(|e| e["key_id"] == k.live.id.as_str())
        .unwrap();
    let (l1, c1) = place(&read_lossy(&t.root.join("plain.txt")), &k.live.key);
    assert_eq!(
        live_event["found_in"],
        json!([
            format!("bundle.tar!pkg/app.env:1:6"),
            format!("plain.txt:{l1}:{c1}")
        ])
    );
    assert_eq!(live_event["reason"], "leaked");
    assert!(
        live_event["actor"].as_str().unwrap().contains(actor),
        "{live_event}"
    );
    for s in k.secrets() {
        assert!(!audit.contains(s), "a key in the audit log");
    }
    // Scanned again: nothing exposed any more, exit 0 (a control plane follows the store
    // within its poll interval).
    eventually_named(
        "nothing exposed after --revoke",
        Duration::from_secs(10),
        || {
            let out = scan(&t.cfg, &t.root, &["--check", "."], envs);
            let done = code(&out, &t.keys) == 0;
            async move { done.then_some(()) }
        },
    )
    .await;
}

/// The env a CLI call needs to read the same store as the scan did (the hash secret for
/// `keys list`, plus whatever the scan had).
fn store_envs<'a>(envs: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = SECRET_ENV.to_vec();
    all.extend(envs.iter().filter(|(k, _)| *k != SECRET_VAR));
    all
}

/// The same against the Redis store: the config names it, the scan reads and revokes there.
#[tokio::test]
async fn check_and_revoke_against_the_redis_store() {
    let redis = RedisServer::start();
    let config = format!(
        "[keys]\nsource = \"redis\"\nstore = \"unused.jsonl\"\naudit_log = \"audit.jsonl\"\n\n[redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let t = tree(&config, &[]).await;
    let secret = [(SECRET_VAR, SECRET)];
    let out = scan(&t.cfg, &t.root, &["--check", "--json", "."], &secret);
    assert_eq!(code(&out, &t.keys), 1, "{}", stderr_str(&out));
    assert_eq!(states(&report(&out)), expected_states(&t));
    assert!(!t.cfg.with_file_name("unused.jsonl").exists());
    revoke_and_verify(&t, &secret, "(uid").await;
}

/// `--check` and `--revoke` through a control plane: no hash secret on the scanning side, a
/// read token checks, a read token cannot revoke (exit 2), a write token can; the control
/// plane logs no key.
#[tokio::test]
async fn check_and_revoke_through_the_control_plane() {
    let t = tree(CONFIG, &[]).await;
    let cp = ControlPlane::spawn(&t.cfg).await;
    let url = format!("http://{}", cp.addr);
    let read = mint(&t.cfg, "read");
    let write = mint(&t.cfg, "write");
    let token_file = write_file(t.root.parent().unwrap(), "read.token", &format!("{read}\n"));

    let out = scan(
        &t.cfg,
        &t.root,
        &[
            "--check",
            "--json",
            "--control-plane",
            &url,
            "--token-file",
            token_file.to_str().unwrap(),
            ".",
        ],
        &[],
    );
    assert_eq!(code(&out, &t.keys), 1, "{}", stderr_str(&out));
    assert_eq!(states(&report(&out)), expected_states(&t));

    // A read token cannot revoke: 403, exit 2, nothing revoked.
    let out = scan(
        &t.cfg,
        &t.root,
        &["--revoke", "--reason", "leaked", "--yes", "."],
        &[
            ("KEYGATE_CONTROL_PLANE", &url),
            ("KEYGATE_ADMIN_TOKEN", &read),
        ],
    );
    assert_eq!(code(&out, &t.keys), 2);
    assert!(stderr_str(&out).contains("403"), "{}", stderr_str(&out));
    // A bad token: 401, exit 2.
    let out = scan(
        &t.cfg,
        &t.root,
        &["--check", "."],
        &[
            ("KEYGATE_CONTROL_PLANE", &url),
            ("KEYGATE_ADMIN_TOKEN", "kgadm_nope"),
        ],
    );
    assert_eq!(code(&out, &t.keys), 2);
    assert!(stderr_str(&out).contains("401"), "{}", stderr_str(&out));

    let envs = [
        ("KEYGATE_CONTROL_PLANE", url.as_str()),
        ("KEYGATE_ADMIN_TOKEN", write.as_str()),
    ];
    revoke_and_verify(&t, &envs, "admin:adm_").await;
    let log = read_lossy(&t.cfg.with_file_name("control.stderr.log"));
    for s in t.keys.secrets() {
        assert!(!log.contains(s), "a key in the control plane's log");
    }
}

fn mint(cfg: &Path, role: &str) -> String {
    let out = cli(
        cfg,
        &["admin-token", "create", "--json", "--role", role],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

/// One JSON request to the control plane; asserts the answer never echoes `secret`.
async fn post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Value,
    secret: &str,
) -> (u16, http::HeaderMap, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let (status, h, b) = request(
        addr,
        Method::POST,
        path,
        &headers,
        Bytes::from(body.to_string()),
    )
    .await;
    let text = String::from_utf8_lossy(&b);
    assert!(
        secret.is_empty() || !text.contains(secret),
        "key echoed: {text}"
    );
    assert!(!text.contains("digest"), "{text}");
    (status, h, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// `POST /v1/api-keys/lookup` (read role) and `POST /v1/api-keys/verify` (verify role): states,
/// ids and owners; `{"valid": false}` and nothing else for every refused key; the key's own
/// rate limit (429 with Retry-After); outcomes counted; a canary audited; roles enforced; no
/// key in any answer or log.
#[tokio::test]
async fn lookup_and_verify_endpoints() {
    let dir = tempdir();
    let cfg = write_file(dir.path(), "keygate.toml", CONFIG);
    let live = create_key(
        &cfg,
        &["--scope", "invoices:read", "--scope", "invoices:write"],
    );
    let limited = create_key(&cfg, &["--rate", "2/m"]);
    let revoked = create_key(&cfg, &[]);
    cli_ok(&cfg, &["keys", "revoke", &revoked.id]);
    let canary = create_key(&cfg, &["--canary"]);
    let unknown = keygate::keys::format::KeyFormat::new("kg", &["live".into(), "test".into()])
        .generate("live")
        .unwrap();
    // What a gateway following this store had already added to the usage file: verify adds
    // to it and never replaces it.
    let usage = json!({ &live.id: {"last_used": 100, "requests": 5, "s2xx": 5} });
    write_file(dir.path(), "usage.json", &usage.to_string());
    let cp = ControlPlane::spawn(&cfg).await;
    let a = cp.addr;
    let read = mint(&cfg, "read");
    let verify = mint(&cfg, "verify");
    let feed = mint(&cfg, "feed");
    let lookup = "/v1/api-keys/lookup";
    let verify_path = "/v1/api-keys/verify";

    // Lookup: state, id, owner; unknown and garbage alike are just "unknown".
    let r = post(a, lookup, Some(&read), json!({"key": live.key}), &live.key).await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    assert_eq!(r.2["state"], "live");
    assert_eq!(r.2["id"], live.id.as_str());
    assert_eq!(r.2["owner"], "o");
    assert_eq!(r.2["hint"], hint(&live.key));
    let r = post(
        a,
        lookup,
        Some(&read),
        json!({"key": revoked.key}),
        &revoked.key,
    )
    .await;
    assert_eq!(
        (r.2["state"].as_str(), r.2["id"].as_str()),
        (Some("revoked"), Some(revoked.id.as_str()))
    );
    let r = post(
        a,
        lookup,
        Some(&read),
        json!({"key": canary.key}),
        &canary.key,
    )
    .await;
    assert_eq!(r.2["state"], "canary");
    for k in [unknown.as_str(), "hello", &"x".repeat(10_000)] {
        let r = post(a, lookup, Some(&read), json!({"key": k}), k).await;
        assert_eq!(r.0, 200);
        assert_eq!(r.2, json!({"state": "unknown"}));
    }
    // Roles and bad bodies.
    assert_eq!(
        post(a, lookup, None, json!({"key": live.key}), &live.key)
            .await
            .0,
        401
    );
    assert_eq!(
        post(
            a,
            lookup,
            Some(&verify),
            json!({"key": live.key}),
            &live.key
        )
        .await
        .0,
        403
    );
    assert_eq!(
        post(a, lookup, Some(&feed), json!({"key": live.key}), &live.key)
            .await
            .0,
        403
    );
    let r = post(a, lookup, Some(&read), json!({}), "").await;
    assert_eq!((r.0, r.2["code"].as_str()), (400, Some("invalid_request")));
    let r = post(
        a,
        lookup,
        Some(&read),
        json!({"key": live.key, "x": 1}),
        &live.key,
    )
    .await;
    assert_eq!((r.0, r.2["code"].as_str()), (400, Some("unknown_field")));
    let read_auth = format!("Bearer {read}");
    let r = request(
        a,
        Method::GET,
        lookup,
        &[("authorization", read_auth.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.0, 405);
    assert_eq!(r.1["allow"], "POST");

    // Verify: a verify token sees nothing else.
    let verify_auth = format!("Bearer {verify}");
    let r = request(
        a,
        Method::GET,
        "/v1/api-keys",
        &[("authorization", verify_auth.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.0, 403);
    let r = post(
        a,
        verify_path,
        Some(&verify),
        json!({"key": live.key}),
        &live.key,
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    assert_eq!(r.2["valid"], true);
    assert_eq!(r.2["id"], live.id.as_str());
    assert_eq!(r.2["env"], "live");
    assert_eq!(r.2["scopes"], json!(["invoices:read", "invoices:write"]));
    assert_eq!(r.2["limit"], 100, "the default plan's 100/s");
    assert!(r.2["remaining"].as_u64().unwrap() < 100);
    // Read tokens may verify too.
    assert_eq!(
        post(
            a,
            verify_path,
            Some(&read),
            json!({"key": live.key}),
            &live.key
        )
        .await
        .2["valid"],
        true
    );
    assert_eq!(
        post(
            a,
            verify_path,
            Some(&feed),
            json!({"key": live.key}),
            &live.key
        )
        .await
        .0,
        403
    );
    for k in [
        revoked.key.as_str(),
        unknown.as_str(),
        "garbage",
        canary.key.as_str(),
    ] {
        let r = post(a, verify_path, Some(&verify), json!({"key": k}), k).await;
        assert_eq!(r.0, 200);
        assert_eq!(r.2, json!({"valid": false}), "never why");
    }
    // The key's own limit: 2 per minute, then the gateway's 429.
    for left in [1, 0] {
        let r = post(
            a,
            verify_path,
            Some(&verify),
            json!({"key": limited.key}),
            &limited.key,
        )
        .await;
        assert_eq!(
            (r.0, r.2["remaining"].as_u64()),
            (200, Some(left)),
            "{:?}",
            r.2
        );
    }
    let r = post(
        a,
        verify_path,
        Some(&verify),
        json!({"key": limited.key}),
        &limited.key,
    )
    .await;
    assert_eq!((r.0, r.2["code"].as_str()), (429, Some("rate_limited")));
    assert!(r.1["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);

    // Counted by outcome.
    let (_, _, m) = request(a, Method::GET, "/metrics", &[], Bytes::new()).await;
    let m = String::from_utf8_lossy(&m);
    for line in [
        r#"keygate_control_verify_total{outcome="valid"} 4"#,
        r#"keygate_control_verify_total{outcome="rate_limited"} 1"#,
        r#"keygate_control_verify_total{outcome="key_revoked"} 1"#,
        r#"keygate_control_verify_total{outcome="key_unknown"} 1"#,
        r#"keygate_control_verify_total{outcome="key_malformed"} 1"#,
        r#"keygate_control_verify_total{outcome="key_canary"} 1"#,
        r#"keygate_control_requests_total{operation="lookup",status="200"} 6"#,
    ] {
        assert!(m.contains(line), "{line} missing:\n{m}");
    }
    // Counted like proxied requests: each check is a use of its key (last use, requests and
    // status classes in the API, as gateways report theirs), and leak forensics see it with
    // its source, refused checks included.
    let api_key = |id: String| {
        let auth = read_auth.clone();
        async move {
            let r = request(
                a,
                Method::GET,
                &format!("/v1/api-keys/{id}"),
                &[("authorization", auth.as_str())],
                Bytes::new(),
            )
            .await;
            assert_eq!(r.0, 200, "{:?}", r.2);
            serde_json::from_slice::<Value>(&r.2).unwrap()
        }
    };
    let v = eventually_named("verify usage flushed", Duration::from_secs(10), || async {
        let v = api_key(limited.id.clone()).await;
        (v["requests"] == 2 && v["status_classes"]["4xx"] == 1).then_some(v)
    })
    .await;
    assert_eq!(v["status_classes"]["2xx"], 2, "{v}");
    assert!(v["last_used"].as_i64().unwrap() > 0, "{v}");
    let v = api_key(live.id.clone()).await;
    assert_eq!(
        (v["requests"].as_u64(), v["status_classes"]["2xx"].as_u64()),
        (Some(7), Some(7)),
        "{v}"
    );
    let forensics = |id: &str| {
        let out = cli_ok(&cfg, &["keys", "usage", id, "--json"]);
        serde_json::from_str::<Value>(out.trim()).unwrap()
    };
    let f = eventually_named(
        "verify forensics flushed",
        Duration::from_secs(10),
        || async {
            let f = forensics(&limited.id);
            (f["requests"] == 3).then_some(f)
        },
    )
    .await;
    assert_eq!(
        f["by_status"],
        json!({"2xx": 2, "3xx": 0, "4xx": 1, "5xx": 0}),
        "{f}"
    );
    assert_eq!(f["by_route"][0]["value"], "verify", "{f}");
    assert_eq!(f["top_ips"][0]["value"], "127.0.0.1", "{f}");
    let f = forensics(&revoked.id);
    assert_eq!(f["attempts_after_revocation"]["count"], 1, "{f}");
    // The canary raised the alarm, audited without the key.
    let audit_path = cfg.with_file_name("audit.jsonl");
    let canary_id = canary.id.clone();
    eventually_named("canary audited", Duration::from_secs(10), || {
        let audit = read_lossy(&audit_path);
        let id = canary_id.clone();
        async move {
            audit
                .lines()
                .any(|l| l.contains("key.canary_used") && l.contains(&id) && l.contains("verify"))
                .then_some(())
        }
    })
    .await;
    // A revocation reaches verify without a restart.
    cli_ok(&cfg, &["keys", "revoke", &live.id]);
    let key = live.key.clone();
    let token = verify.clone();
    eventually_named("revoked key refused", Duration::from_secs(10), || {
        let (key, token) = (key.clone(), token.clone());
        async move {
            let r = post(a, verify_path, Some(&token), json!({"key": key}), &key).await;
            (r.2 == json!({"valid": false})).then_some(())
        }
    })
    .await;
    let log = read_lossy(&cfg.with_file_name("control.stderr.log"));
    let audit = read_lossy(&cfg.with_file_name("audit.jsonl"));
    for k in [&live.key, &limited.key, &revoked.key, &canary.key, &unknown] {
        assert!(
            !log.contains(k.as_str()) && !audit.contains(k.as_str()),
            "a key logged"
        );
    }
}

/// Verify charges a key where gateways do: with `[limits] backend = "redis"` its rate limit
/// and calendar quota are counted in Redis (a restarted control plane, with nothing in
/// memory, still refuses), and its checks are added to the fleet's usage in Redis, which the
/// API reads.
#[tokio::test]
async fn verify_charges_limits_and_usage_in_redis() {
    let redis = RedisServer::start();
    let dir = tempdir();
    let config = format!(
        "{CONFIG}\n[redis]\nurl = \"{}\"\n\n[limits]\nbackend = \"redis\"\n",
        redis.url()
    );
    let cfg = write_file(dir.path(), "keygate.toml", &config);
    let rated = create_key(&cfg, &["--rate", "2/m"]);
    let quota = create_key(&cfg, &["--quota", "3/day"]);
    let verify = mint(&cfg, "verify");
    let read_auth = format!("Bearer {}", mint(&cfg, "read"));
    let check = |a: SocketAddr, k: &Key| {
        let (token, key) = (verify.clone(), k.key.clone());
        async move {
            let (s, _, v) = post(
                a,
                "/v1/api-keys/verify",
                Some(&token),
                json!({ "key": key }),
                &key,
            )
            .await;
            (
                s,
                v["valid"].as_bool(),
                v["code"].as_str().map(str::to_owned),
            )
        }
    };
    let requests = |a: SocketAddr, id: String| {
        let auth = read_auth.clone();
        async move {
            let path = format!("/v1/api-keys/{id}");
            let (s, _, v) = request(
                a,
                Method::GET,
                &path,
                &[("authorization", &auth)],
                Bytes::new(),
            )
            .await;
            assert_eq!(s, 200);
            let v: Value = serde_json::from_slice(&v).unwrap();
            (v["requests"].as_u64(), v["status_classes"]["4xx"].as_u64())
        }
    };
    let cp = ControlPlane::spawn(&cfg).await;
    for _ in 0..2 {
        assert_eq!(check(cp.addr, &rated).await, (200, Some(true), None));
    }
    for _ in 0..3 {
        assert_eq!(check(cp.addr, &quota).await, (200, Some(true), None));
    }
    let refused = (429, None, Some("quota_exceeded".to_owned()));
    assert_eq!(check(cp.addr, &quota).await, refused);
    // The uses reach Redis (flushed every touch interval), before this control plane goes.
    let id = rated.id.clone();
    eventually_named("verify usage in redis", Duration::from_secs(10), || async {
        (requests(cp.addr, id.clone()).await == (Some(2), Some(0))).then_some(())
    })
    .await;
    drop(cp);
    let cp = ControlPlane::spawn(&cfg).await;
    let limited = (429, None, Some("rate_limited".to_owned()));
    assert_eq!(check(cp.addr, &rated).await, limited);
    assert_eq!(check(cp.addr, &quota).await, refused);
    let id = rated.id.clone();
    eventually_named(
        "refusal counted in redis",
        Duration::from_secs(10),
        || async { (requests(cp.addr, id.clone()).await == (Some(2), Some(1))).then_some(()) },
    )
    .await;
}
