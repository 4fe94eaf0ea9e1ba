//! TLS to `https://` upstream targets: the rustls client config of one upstream (trusting only
//! its configured CA bundle, optionally presenting a client certificate for mTLS, ALPN
//! http/1.1, TLS 1.2 and 1.3) and the name each target's certificate is checked against.
//!
//! keygate ships no public root store (none is in the dependency tree), so `ca` is required
//! for an https target: internal services are signed by an internal CA anyway, and trusting
//! the public web for them would only widen who can impersonate one.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

/// What went wrong, and which config field (relative to the upstream) it belongs to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(super) struct TlsSetupError {
    pub field: &'static str,
    pub message: String,
}

fn error(field: &'static str, message: impl Into<String>) -> TlsSetupError {
    TlsSetupError {
        field,
        message: message.into(),
    }
}

fn certificates(
    path: &Path,
    field: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let bad = |e: &dyn std::fmt::Display| error(field, format!("{}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no PEM certificate found"));
    }
    Ok(certs)
}

/// The client config for an upstream's https targets. `client` is the mTLS pair (chain, key).
pub(super) fn client_config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca, "ca")? {
        roots
            .add(cert)
            .map_err(|e| error("ca", format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| error("ca", e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(cert, "client_cert")?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| error("client_key", format!("{}: {e}", key.display())))?;
            // rustls checks that the key matches the certificate.
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| error("client_key", format!("{}: {e}", key.display())))?
        }
    };
    // We speak HTTP/1.1 upstream only; an upstream that insists on h2 fails the handshake
    // (502) instead of being spoken to in the wrong protocol.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The name a target's certificate must carry (and the SNI we send): `server_name` when
/// configured, else the target's host (a DNS name or an IP address).
pub(super) fn server_name(name: &str) -> Option<ServerName<'static>> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(bare.to_owned()).ok()
}
