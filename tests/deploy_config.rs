//! The configs we ship parse and validate with the real config code: the annotated example
//! and the Kubernetes ConfigMap's embedded keygate.toml (a typo there would only surface in
//! a cluster otherwise).
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

#[test]
fn shipped_configs_validate() {
    validate(Config::EXAMPLE, "config/keygate.toml");
    let cm = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/base/configmap.yaml"),
    )
    .unwrap();
    let start = cm
        .find("keygate.toml: |")
        .expect("configmap embeds keygate.toml")
        + "keygate.toml: |".len();
    let toml: String = cm[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    validate(&toml, "deploy/kubernetes/base/configmap.yaml");
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
