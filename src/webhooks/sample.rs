//! `keygate webhooks test URL`: one signed sample delivery, sent now and not queued, so an
//! operator can check a receiver's signature verification before real events flow.

use super::{delivery_id, send, Delivery, Endpoint, EVENTS};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("unknown event {0:?}; known: {known}", known = EVENTS.join(", "))]
    Event(String),
    #[error(
        "{0} is not a configured [[webhooks]] url: pass --secret-env (and --ca-file for https://)"
    )]
    NoSecret(String),
    #[error("{0}")]
    Setup(String),
    #[error("delivery {id} to {url} failed: {error}")]
    Failed {
        id: String,
        url: String,
        error: send::AttemptError,
    },
}

/// The endpoint to test: the configured entry with this URL, or one built from the flags.
fn endpoint(
    config: &Config,
    url: &str,
    secret_env: Option<&str>,
    ca_file: Option<&std::path::Path>,
) -> Result<Endpoint, SampleError> {
    if let Some(ep) = super::endpoints(config)?
        .into_iter()
        .find(|e| e.name == url && secret_env.is_none())
    {
        return Ok(ep);
    }
    let var = secret_env.ok_or_else(|| SampleError::NoSecret(url.to_owned()))?;
    let mut c = config.clone();
    c.webhooks = vec![crate::config::WebhookConfig {
        url: url.to_owned(),
        events: EVENTS.iter().map(|e| (*e).to_owned()).collect(),
        secret_env: var.to_owned(),
        lead_times: vec!["1d".into()],
        retry_for: "0s".into(),
        retry_base_ms: 1,
        timeout_ms: 10_000,
        max_in_flight: 1,
        ca_file: ca_file.map(|p| p.to_owned()),
    }];
    super::endpoints(&c)?
        .pop()
        .ok_or_else(|| SampleError::Setup("no endpoint".into()))
}

/// The state the key of a real `kind` event is in, so a receiver's handling can be tried on
/// a sample that looks like the real thing.
fn sample_state(kind: &str) -> &'static str {
    match kind {
        "key.revoked" | "key.rotation_completed" => "revoked",
        _ => "active",
    }
}

/// A sample delivery of `kind` for a made-up key (`data.sample = true`).
pub fn sample(kind: &str, now: i64) -> Delivery {
    let mut nonce = [0u8; 8];
    let _ = getrandom::fill(&mut nonce);
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let mut data = serde_json::Map::new();
    data.insert("sample".into(), true.into());
    Delivery {
        id: delivery_id(&["sample", &nonce]),
        kind: kind.to_owned(),
        time: humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(now.max(0) as u64),
        )
        .to_string(),
        key: serde_json::json!({
            "id": "key_sample", "name": "sample", "owner": "keygate-sample", "env": "test",
            "hint": "kg_test_…0000", "created_at": now, "state": sample_state(kind),
            "lineage": "key_sample"
        }),
        data,
    }
}

/// Send one signed sample; the id and HTTP status on success.
pub fn run(
    config: &Config,
    url: &str,
    event: &str,
    secret_env: Option<&str>,
    ca_file: Option<&std::path::Path>,
) -> Result<(String, u16), SampleError> {
    if !EVENTS.contains(&event) {
        return Err(SampleError::Event(event.to_owned()));
    }
    let ep = endpoint(config, url, secret_env, ca_file)?;
    let now = crate::clock::unix_secs();
    let d = sample(event, now);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SampleError::Setup(e.to_string()))?;
    let sent = rt.block_on(send::attempt(&ep, &d.id, &d.kind, d.body().into(), now));
    match sent {
        Ok(status) => Ok((d.id, status)),
        Err(error) => Err(SampleError::Failed {
            id: d.id,
            url: url.to_owned(),
            error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_key_is_in_the_state_its_event_leaves_it() {
        assert_eq!(sample("key.revoked", 1).key["state"], "revoked");
        assert_eq!(sample("key.expiring", 1).key["state"], "active");
        let (a, b) = (sample("key.created", 1), sample("key.created", 1));
        assert_ne!(a.id, b.id, "every sample is a new delivery");
    }
}
