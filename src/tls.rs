//! TLS for the data listener: rustls (TLS 1.2 and 1.3 only, ALPN h2 and http/1.1, no 0-RTT),
//! with the certificate and key reloaded from disk when their files change, without a
//! restart, and the served certificate's expiry exported as a metric.

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
pub struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn load(cert_path: &Path, key_path: &Path) -> Result<(CertifiedKey, Option<i64>), TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cert_path.to_owned(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no PEM certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Key {
        path: key_path.to_owned(),
        message: e.to_string(),
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    let not_after = not_after(&certs[0]);
    Ok((CertifiedKey::new(certs, signer), not_after))
}

/// The server config, the resolver whose certificate `watch` keeps fresh, and notAfter.
pub type Setup = (Arc<rustls::ServerConfig>, Arc<ReloadingCert>, Option<i64>);

/// Build the server config and the resolver whose certificate `watch` keeps fresh.
pub fn server_config(cert_path: PathBuf, key_path: PathBuf) -> Result<Setup, TlsError> {
    let (ck, not_after) = load(&cert_path, &key_path)?;
    let resolver = Arc::new(ReloadingCert {
        current: ArcSwap::from_pointee(ck),
        cert_path,
        key_path,
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // 0-RTT stays off (rustls default 0): early data could replay keyed requests (THREATS K1).
    config.max_early_data_size = 0;
    Ok((Arc::new(config), resolver, not_after))
}

fn mtimes(r: &ReloadingCert) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(&r.cert_path), m(&r.key_path))
}

/// A client config that trusts only the CA certificates in `ca_path` (for the feed).
pub fn client_config(ca_path: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: ca_path.to_owned(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_path).map_err(|e| cert_err(e.to_string()))? {
        roots.add(cert.map_err(|e| cert_err(e.to_string()))?)?;
    }
    if roots.is_empty() {
        return Err(cert_err("no PEM certificate found".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Poll the files' modification times and reload on change; a bad new pair keeps the old one.
pub async fn watch(resolver: Arc<ReloadingCert>, every: Duration, on_reload: impl Fn(Option<i64>)) {
    let mut seen = mtimes(&resolver);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = mtimes(&resolver);
        if now == seen {
            continue;
        }
        match load(&resolver.cert_path, &resolver.key_path) {
            Ok((ck, not_after)) => {
                resolver.current.store(Arc::new(ck));
                seen = now;
                tracing::info!(cert = %resolver.cert_path.display(), "TLS certificate reloaded");
                on_reload(not_after);
            }
            // A writer may be between the cert and the key; retry on the next tick.
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate reload failed; serving the previous one")
            }
        }
    }
}

/// notAfter of an X.509 certificate as Unix seconds, by walking just enough DER
/// (Certificate → TBSCertificate → Validity). `None` if the shape is unexpected.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *b.first()?;
        let first = *b.get(1)?;
        let (len, hdr) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | usize::from(*b.get(2 + i)?);
            }
            (len, 2 + n)
        };
        let body = b.get(hdr..hdr.checked_add(len)?)?;
        Some((tag, body, &b[hdr + len..]))
    }
    let (_, cert, _) = tlv(cert)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit version
    }
    let (_, _, r) = tlv(rest)?; // serial
    let (_, _, r) = tlv(r)?; // signature algorithm
    let (_, _, r) = tlv(r)?; // issuer
    let (_, validity, _) = tlv(r)?;
    let (_, _, r) = tlv(validity)?; // notBefore
    let (tag, time, _) = tlv(r)?;
    let s = std::str::from_utf8(time).ok()?;
    let digits = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (year, off) = match tag {
        0x17 => {
            let yy = digits(0, 2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        0x18 => (digits(0, 4)?, 4),
        _ => return None,
    };
    let (mo, d, h, mi, se) = (
        digits(off, off + 2)?,
        digits(off + 2, off + 4)?,
        digits(off + 4, off + 6)?,
        digits(off + 6, off + 8)?,
        digits(off + 8, off + 10)?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_not_after_of_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 7, 15);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        // 2031-07-15T00:00:00Z
        assert_eq!(not_after(cert.der()), Some(1_941_840_000));
        assert_eq!(not_after(b"garbage"), None);
    }
}
