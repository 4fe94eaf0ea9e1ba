//! `keygate demo`: a working gateway in one command on a fresh machine. Starts a demo
//! upstream on loopback, writes a config and a random hash secret into a directory, mints one
//! key (printed once), starts the gateway, and prints curl lines that return 200 and 401.

use crate::config::Config;
use crate::keys::ops::{Grants, Keys};
use crate::keys::KeySettings;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo: {0}")]
    Setup(String),
}

/// The demo upstream: answers every request with what the gateway told it about the caller.
async fn upstream(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let body = serde_json::json!({
        "service": "demo-upstream",
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "key_id": h("x-keygate-key-id"),
        "owner": h("x-keygate-owner"),
        "scopes": h("x-keygate-scopes"),
    });
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

async fn start_upstream() -> Result<SocketAddr, DemoError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(upstream)),
            );
        }
    });
    Ok(addr)
}

fn replace_line(text: &str, starts: &str, with: &str) -> Result<String, DemoError> {
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if !found && l.trim_start().starts_with(starts) {
                found = true;
                with.to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !found {
        return Err(DemoError::Setup(format!(
            "example config has no line starting with {starts:?}"
        )));
    }
    Ok(out.join("\n") + "\n")
}

pub async fn run(dir: &Path, listen: &str, admin: &str) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let up = start_upstream().await?;
    let secret = dir.join("secret");
    if !secret.exists() {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| DemoError::Setup(e.to_string()))?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&secret, hex)?;
    }
    let mut text = Config::EXAMPLE.to_owned();
    text = replace_line(&text, "# hash_secret_file", "hash_secret_file = \"secret\"")?;
    text = replace_line(
        &text,
        "listen = \"127.0.0.1:8080\"",
        &format!("listen = \"{listen}\""),
    )?;
    text = replace_line(
        &text,
        "listen = \"127.0.0.1:9090\"",
        &format!("listen = \"{admin}\""),
    )?;
    text = replace_line(
        &text,
        "targets = [\"127.0.0.1:9000\"]",
        &format!("targets = [\"{up}\"]"),
    )?;
    text = replace_line(
        &text,
        "# touch_interval_seconds",
        "touch_interval_seconds = 60",
    )?;
    let config_path = dir.join("keygate.toml");
    std::fs::write(&config_path, text)?;

    let config = Config::load(&config_path)?;
    let settings = KeySettings::from_config(&config)?;
    let grants = Grants {
        name: "demo".into(),
        owner: "demo-team".into(),
        env: "live".into(),
        scopes: vec!["invoices:read".into()],
        expires_in_secs: Some(30 * 86_400),
        ..Grants::default()
    };
    let minted = Keys::new(&settings, "demo").create(&grants, crate::clock::unix_secs())?;

    let (gw, bound, shutdown) = crate::server::start(&config_path).await?;
    // Wait (bounded) for the store follower's first load so the printed curl works at once.
    for _ in 0..500 {
        if gw.table_loaded() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stop = crate::server::stop_signal();
    let base = format!("http://{}", bound.http);
    println!(
        "keygate demo: gateway {base}, admin http://{}, upstream http://{up}, files in {}",
        bound.admin,
        dir.display()
    );
    println!("demo key (shown once): {}", minted.key);
    println!(
        "try (200): curl -H 'Authorization: Bearer {}' {base}/invoices/42",
        minted.key
    );
    println!("try (401): curl -i {base}/invoices/42");
    println!("metrics:   curl http://{}/metrics", bound.admin);
    println!("Ctrl-C to stop.");
    stop.await;
    shutdown.shutdown().await;
    Ok(())
}
