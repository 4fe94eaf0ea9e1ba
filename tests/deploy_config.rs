//! The configs we ship parse and validate with the real config code: the annotated example
//! and the Kubernetes ConfigMaps' embedded keygate.toml (the base's, and the fleet overlay's
//! gateway and control-plane configs); a typo there would only surface in a cluster otherwise.
//! Also what the build bakes into the binary: the allocator's setting from `.cargo/config.toml`.
// Test-only crate: helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keygate::config::Config;
use keygate::metrics::Metrics;
use keygate::snapshot::Snapshot;
use std::path::Path;

fn validate(text: &str, name: &str) {
    // Snapshot validation needs the secret; it reads the env var the config names.
    std::env::set_var(
        "API_KEY_HASH_SECRET",
        "deploy-config-test-secret-0123456789abcdef",
    );
    let config = Config::parse(text, Path::new(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    Snapshot::build(config, &Metrics::new(0)).unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// The keygate.toml embedded in a ConfigMap file of the repository.
fn embedded_toml(file: &str) -> String {
    let cm = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    let start = cm
        .find("keygate.toml: |")
        .expect("configmap embeds keygate.toml")
        + "keygate.toml: |".len();
    cm[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn shipped_configs_validate() {
    validate(Config::EXAMPLE, "config/keygate.toml");
    let toml = embedded_toml("deploy/kubernetes/base/configmap.yaml");
    validate(&toml, "deploy/kubernetes/base/configmap.yaml");
}

/// The fleet overlay's gateway and control-plane configs: the Redis key store, the hash
/// secret read from the mounted file (here a real file with a test secret, at the path the
/// config names swapped for a temporary one), state on the pod's emptyDir, and fleet-wide
/// limits on the gateways.
#[test]
fn fleet_configs_validate_on_the_redis_store_with_the_secret_as_a_file() {
    const MOUNTED: &str = "/run/secrets/keygate/hash-secret";
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hash-secret");
    std::fs::write(&secret, "fleet-config-test-secret-0123456789abcdef\n").unwrap();
    std::env::set_var("KEYGATE_REDIS_PASSWORD", "test-password");
    for (file, gateway) in [
        ("deploy/kubernetes/overlays/fleet/gateway-config.yaml", true),
        ("deploy/kubernetes/overlays/fleet/control-plane.yaml", false),
    ] {
        let toml = embedded_toml(file);
        let config = Config::parse(&toml, Path::new("/etc/keygate/keygate.toml"))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(config.keys.source, "redis", "{file}");
        assert_eq!(
            config.keys.hash_secret_file.as_deref(),
            Some(Path::new(MOUNTED)),
            "{file}"
        );
        let redis = config.redis.as_ref().expect("[redis]");
        assert_eq!(redis.username.as_deref(), Some("keygate"), "{file}");
        assert_eq!(
            redis.password_env.as_deref(),
            Some("KEYGATE_REDIS_PASSWORD"),
            "{file}"
        );
        let mut state = vec![&config.keys.audit_log, &config.keys.usage_file];
        if gateway {
            state.push(&config.keys.feed_cache);
            assert_eq!(config.limits.backend, "redis", "{file}: fleet-wide limits");
            assert_eq!(config.server.listen, "0.0.0.0:8080");
        } else {
            assert_eq!(config.control.listen, "0.0.0.0:7070");
        }
        for p in state {
            assert!(
                config.resolve(p).starts_with("/var/lib/keygate/"),
                "{file}: {} is not on the state emptyDir",
                p.display()
            );
        }
        let mut snapshot_config = config.clone();
        snapshot_config.keys.hash_secret_file = Some(secret.clone());
        Snapshot::build(snapshot_config, &Metrics::new(0))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

/// The image's version label follows the crate version.
#[test]
fn dockerfile_version_label_follows_cargo() {
    let dockerfile = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/docker/Dockerfile"),
    )
    .unwrap();
    let want = format!("ARG VERSION={}\n", env!("CARGO_PKG_VERSION"));
    assert!(dockerfile.contains(&want), "Dockerfile lacks {want:?}");
    assert!(dockerfile.contains("org.opencontainers.image.version=\"${VERSION}\""));
}

/// The systemd unit's config validates, and every state file it names is absolute under the
/// unit's StateDirectory (relative paths would land in the read-only /etc/keygate).
#[test]
fn systemd_config_validates_with_absolute_state_paths() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/keygate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    validate(&text, "/etc/keygate/keygate.toml");
    let config = Config::parse(&text, Path::new("/etc/keygate/keygate.toml")).unwrap();
    for p in [
        &config.keys.store,
        &config.keys.audit_log,
        &config.keys.usage_file,
    ] {
        let resolved = config.resolve(p);
        assert!(
            resolved.starts_with("/var/lib/keygate/"),
            "{} resolves to {}",
            p.display(),
            resolved.display()
        );
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/keygate.service"),
    )
    .unwrap();
    assert!(unit.contains("deploy/systemd/keygate.toml /etc/keygate/keygate.toml"));
    assert!(unit.contains("StateDirectory=keygate"));
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
}

/// Every base image is pinned by digest (`tag@sha256:<64 hex>`): a re-pushed tag must not
/// change what gets built. The same for the images the fleet overlay runs (Redis).
#[test]
fn base_images_are_pinned_by_digest() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("deploy/docker/Dockerfile")).unwrap();
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "builder and runtime stages: {froms:?}");
    for from in froms {
        // `FROM [--platform=…] image[:tag]@sha256:<digest> [AS name]`
        let image = from
            .split_whitespace()
            .skip(1)
            .find(|w| !w.starts_with("--"))
            .unwrap_or("");
        assert!(pinned(image), "not pinned by digest: {from:?}");
    }
    let redis =
        std::fs::read_to_string(root.join("deploy/kubernetes/overlays/fleet/redis.yaml")).unwrap();
    let images: Vec<&str> = redis
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(|v| v.split_whitespace().next().unwrap_or(""))
        .collect();
    assert!(!images.is_empty(), "the fleet overlay runs Redis");
    for image in images {
        assert!(pinned(image), "not pinned by digest: {image:?}");
    }
}

/// `name:tag@sha256:` followed by exactly 64 lowercase hex digits.
fn pinned(image: &str) -> bool {
    image.split_once("@sha256:").is_some_and(|(name, digest)| {
        name.contains(':')
            && digest.len() == 64
            && digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The unit's `ExecStartPre=keygate check` passes on a fresh install: the shipped config
/// with its state directory (here a temporary one standing for `/var/lib/keygate`, which
/// `StateDirectory=` creates empty), the secret file the install steps write, read the way
/// `EnvironmentFile=` does, and the unit's `Environment=` lines. Run with the real binary
/// and nothing else from this process's environment.
#[test]
fn systemd_exec_start_pre_check_passes_on_a_fresh_install() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/systemd/keygate.service")).unwrap();
    let directive = |name: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("var/lib/keygate");
    let etc = dir.path().join("etc/keygate");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&etc).unwrap();
    let config = std::fs::read_to_string(root.join("deploy/systemd/keygate.toml")).unwrap();
    assert!(config.contains("\"/var/lib/keygate/"), "{config}");
    std::fs::write(
        etc.join("keygate.toml"),
        config.replace("/var/lib/keygate", state.to_str().unwrap()),
    )
    .unwrap();
    // The install step: printf 'API_KEY_HASH_SECRET=%s\n' "$(openssl rand -base64 48)".
    let secret_line = "API_KEY_HASH_SECRET=q3VhXb0yU2VjcmV0LWZvci10aGUtc3lzdGVtZC10ZXN0LTAxMjM0NTY3ODlhYmNkZWY=\n";
    assert!(
        unit.contains("printf 'API_KEY_HASH_SECRET=%s\\n'"),
        "install step changed"
    );
    std::fs::write(etc.join("secret.env"), secret_line).unwrap();
    assert_eq!(
        directive("EnvironmentFile"),
        ["/etc/keygate/secret.env"],
        "the unit reads its secret from the file the install writes"
    );
    let mut env: Vec<(String, String)> = Vec::new();
    let env_file = std::fs::read_to_string(etc.join("secret.env")).unwrap();
    for assignment in env_file
        .lines()
        .chain(directive("Environment").iter().map(String::as_str))
    {
        let (k, v) = assignment.split_once('=').unwrap();
        env.push((k.to_owned(), v.to_owned()));
    }
    let pre = directive("ExecStartPre");
    assert_eq!(pre.len(), 1, "{pre:?}");
    let mut words = pre[0].split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/keygate"));
    let args: Vec<String> = words
        .map(|w| w.replace("/etc/keygate", etc.to_str().unwrap()))
        .collect();
    assert_eq!(args[0], "check", "{args:?}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(&args)
        .env_clear()
        .envs(env)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ExecStartPre failed on a fresh install: {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    assert!(stdout.trim_end().ends_with(": ok"), "{stdout}");
    // The only thing a fresh install lacks is the store, which `serve` creates empty.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.contains("creates it empty"),
            "check said more than the store note: {line:?}\n{stderr}"
        );
    }
}

/// `.cargo/config.toml` hands jemalloc's build its per-thread cache size
/// (`JEMALLOC_SYS_WITH_MALLOC_CONF`); a cargo or `tikv-jemalloc-sys` change that stopped
/// passing it on would lose the CPU it saves without any error, so the binary's own
/// statistics (printed at exit when asked) must show it compiled in and in force.
#[test]
fn the_binary_carries_the_allocator_cache_setting() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stats = String::from_utf8_lossy(&out.stderr);
    let compiled = stats
        .lines()
        .find(|l| l.trim_start().starts_with("config.malloc_conf:"))
        .unwrap_or_else(|| panic!("no jemalloc statistics at exit:\n{stats}"));
    assert!(
        compiled.contains("tcache_nslots_small_min:64"),
        "not compiled in: {compiled}"
    );
    assert!(
        stats.contains("opt.tcache_nslots_small_min: 64"),
        "not in force:\n{stats}"
    );
}
