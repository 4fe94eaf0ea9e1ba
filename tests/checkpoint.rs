//! The binary checkpoint end to end (`store::checkpoint`): `keys compact` writes it beside
//! the store, a restarted gateway loads it plus the log lines after it, and a checkpoint that
//! is cut, edited or sealed with another secret is refused loudly (error log, metric, set
//! aside) while the gateway reads the log instead. Revocation stays final across checkpoints.
//! Real binary, real CLI, real files, a recording upstream on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const POLL: Duration = Duration::from_secs(10);

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    _up: Upstream,
}

impl Setup {
    async fn new() -> Setup {
        let up = Upstream::start(Mode::Echo).await;
        let dir = tempdir();
        let config = write_file(
            dir.path(),
            "keygate.toml",
            &gateway_config(up.addr(), 1000, "", "", INVOICES_READ),
        );
        Setup {
            dir,
            config,
            _up: up,
        }
    }

    fn checkpoint(&self) -> PathBuf {
        self.dir.path().join("keys.jsonl.checkpoint")
    }

    fn create(&self) -> Key {
        create_key(&self.config, &["--scope", "invoices:read"])
    }

    fn revoke(&self, k: &Key) {
        cli_ok(&self.config, &["keys", "revoke", &k.id]);
    }
}

async fn status(gw: &Gateway, key: &str) -> u16 {
    let auth = format!("Bearer {key}");
    get(gw.http, "/invoices/1", &[("authorization", &auth)])
        .await
        .0
}

async fn metric(gw: &Gateway, series: &str) -> f64 {
    let (_, _, body) = get(gw.admin, "/metrics", &[]).await;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Start the gateway, wait for /readyz, and wait for its log to say how it loaded.
async fn serve(s: &Setup, logged: &str) -> Gateway {
    let gw = spawn_ready(&s.config, &[("KEYGATE_LOG", "info")], POLL).await;
    eventually_named(logged, POLL, || async {
        gw.stderr_contents().contains(logged).then_some(())
    })
    .await;
    gw
}

/// A way to spoil the checkpoint file at a path.
type Spoil<'a> = Box<dyn Fn(&Path) + 'a>;

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let at = at.min(b.len() - 1);
    b[at] ^= 0x20;
    std::fs::write(path, b).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_writes_a_checkpoint_a_restart_loads_it_and_the_log_after_it() {
    let s = Setup::new().await;
    let kept = s.create();
    let revoked_before = s.create();
    s.revoke(&revoked_before);
    let revoked_after = s.create();
    cli_ok(&s.config, &["keys", "compact"]);
    assert!(
        s.checkpoint().exists(),
        "keys compact writes the checkpoint"
    );
    // After the checkpoint: a revocation and a new key, in the log only.
    s.revoke(&revoked_after);
    let created_after = s.create();

    let gw = serve(&s, "key table loaded from the checkpoint").await;
    assert_eq!(status(&gw, &kept.key).await, 200);
    assert_eq!(status(&gw, &revoked_before.key).await, 401);
    assert_eq!(
        status(&gw, &revoked_after.key).await,
        401,
        "a revocation after the checkpoint is honoured"
    );
    assert_eq!(status(&gw, &created_after.key).await, 200);
    assert_eq!(
        metric(&gw, r#"keygate_source_errors_total{kind="checkpoint"}"#).await,
        0.0
    );
    // The gateway follows the log from where the checkpoint left it.
    let later = s.create();
    eventually_named("key created while serving", POLL, || async {
        (status(&gw, &later.key).await == 200).then_some(())
    })
    .await;
    s.revoke(&kept);
    eventually_named("revocation while serving", POLL, || async {
        (status(&gw, &kept.key).await == 401).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_edited_or_forged_checkpoint_falls_back_to_the_log_loudly() {
    let s = Setup::new().await;
    let a = s.create();
    let gone = s.create();
    s.revoke(&gone);
    cli_ok(&s.config, &["keys", "compact"]);
    let good = std::fs::read(s.checkpoint()).unwrap();

    // A checkpoint of the same shape sealed with another secret (a forger without ours).
    let other = Setup::new().await;
    let theirs = &[(SECRET_VAR, "another-secret-another-secret-another-secret-0")];
    for args in [
        &[
            "keys",
            "create",
            "--name",
            "n",
            "--owner",
            "o",
            "--scope",
            "invoices:read",
        ][..],
        &["keys", "compact"],
    ] {
        let out = cli(&other.config, args, theirs);
        assert!(out.status.success(), "{}", stderr_str(&out));
    }
    let forged = std::fs::read(other.checkpoint()).unwrap();

    let cases: Vec<(&str, Spoil)> = vec![
        (
            "cut",
            Box::new(|p| std::fs::write(p, &good[..good.len() / 2]).unwrap()),
        ),
        (
            "edited",
            Box::new(|p| {
                std::fs::write(p, &good).unwrap();
                flip_byte(p, good.len() / 2);
            }),
        ),
        ("forged", Box::new(|p| std::fs::write(p, &forged).unwrap())),
    ];
    for (what, spoil) in cases {
        spoil(&s.checkpoint());
        let gw = serve(&s, "key table checkpoint refused; loading the log instead").await;
        assert_eq!(
            status(&gw, &a.key).await,
            200,
            "{what}: served from the log"
        );
        assert_eq!(status(&gw, &gone.key).await, 401, "{what}");
        assert_eq!(
            metric(&gw, r#"keygate_source_errors_total{kind="checkpoint"}"#).await,
            1.0,
            "{what}"
        );
        assert!(
            s.dir.path().join("keys.jsonl.checkpoint.rejected").exists(),
            "{what}: set aside for forensics"
        );
        assert!(!s.checkpoint().exists(), "{what}");
        drop(gw);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_checkpoint_never_brings_a_revoked_key_back() {
    let s = Setup::new().await;
    let a = s.create();
    cli_ok(&s.config, &["keys", "compact"]);
    // A genuine checkpoint in which `a` is active, kept aside...
    let old = std::fs::read(s.checkpoint()).unwrap();
    s.revoke(&a);
    cli_ok(&s.config, &["keys", "compact"]);
    // ...and put back after a newer compaction: it is sealed, but it stands for other bytes.
    std::fs::write(s.checkpoint(), &old).unwrap();
    let gw = serve(&s, "key table loaded").await;
    assert_eq!(status(&gw, &a.key).await, 401);
    assert!(
        gw.stderr_contents()
            .contains("key table checkpoint does not match the log in place"),
        "{}",
        gw.stderr_contents()
    );
}

/// A gateway refuses to start while keys use a secret version it has no secret for; from a
/// checkpoint that is judged on the loaded table (no log parse), with the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_version_in_use_without_a_secret_is_refused_from_the_checkpoint_too() {
    let s = Setup::new().await;
    s.create();
    let text = std::fs::read_to_string(&s.config).unwrap();
    let v2 = text.replace("[keys]\n", "[keys]\nhash_secret_version = 2\n");
    std::fs::write(
        &s.config,
        format!("{v2}\n[[keys.previous_secrets]]\nversion = 1\nenv = \"OLD_SECRET\"\n"),
    )
    .unwrap();
    let new_secret = "zyxwvutsrqponmlkjihgfedcba9876543210ZYXWVUTSRQP";
    let rotated = [(SECRET_VAR, new_secret), ("OLD_SECRET", SECRET)];
    let out = cli(&s.config, &["keys", "compact"], &rotated);
    assert!(out.status.success(), "{}", stderr_str(&out));
    // Version 1 dropped from the config: the checkpoint (sealed under version 2) still loads.
    std::fs::write(&s.config, &v2).unwrap();
    let err = match Gateway::try_spawn(
        &s.config,
        &[(SECRET_VAR, new_secret), ("KEYGATE_LOG", "info")],
    )
    .await
    {
        Ok(_) => panic!("gateway started with keys it cannot verify"),
        Err(e) => e,
    };
    assert!(
        err.contains("key table loaded from the checkpoint"),
        "{err}"
    );
    assert!(
        err.contains("secret version 1") && err.contains("1 key"),
        "{err}"
    );
}
