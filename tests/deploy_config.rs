//! The configs we ship parse and validate with the real config code: the annotated example
//! and the Kubernetes ConfigMaps' embedded keygate.toml (the base's, and the fleet overlay's
//! gateway and control-plane configs); a typo there would only surface in a cluster otherwise.
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
