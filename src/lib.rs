//! keygate: a reverse-proxy gateway that enforces API keys in front of internal HTTP services.
//!
//! The request path, in order (`pipeline::handle` reads top to bottom):
//!
//! 1. `route`     — host + longest path prefix + method, on the canonical path (`path`)
//! 2. `extract`   — the key from `Authorization: Bearer` or the configured header
//! 3. authenticate — format check, HMAC-SHA256 digest, table lookup (`keys::table`); or,
//!    for a short-lived token, signature and parent key by id (`credential`, `tokens`)
//! 4. `authz`     — scopes, client network, env, browser origin
//! 5. `limit`     — the key lineage's token bucket
//! 6. `forward`   — header hygiene (`hygiene`), identity headers, pooled upstream client
//! 7. record      — one metrics update and (when warranted) one audit event
//!
//! Keys live in a record log (`store`) that the CLI appends to and the gateway follows.

pub mod access;
pub mod admin;
pub mod ascii;
pub mod audit;
pub mod authz;
pub mod boxed;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod cpu;
pub mod credential;
pub mod deadline;
pub mod demo;
pub mod direct;
pub mod error;
pub mod extract;
pub mod fastmap;
#[cfg(feature = "test-panic")]
pub mod fault;
pub mod forensics;
pub mod forward;
pub mod gateway;
pub mod gcra;
pub mod governance;
pub mod health;
pub mod hygiene;
pub mod keepalive;
pub mod keys;
pub mod lifetime;
pub mod limit;
pub mod locate;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod path;
pub mod pipeline;
pub mod protocol_errors;
pub mod redigest;
pub mod redis;
pub mod reload;
pub mod rotations;
pub mod route;
pub mod scan;
pub mod send_deadline;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod sync;
pub mod systemd;
pub mod timerwheel;
pub mod tls;
pub mod tokens;
pub mod trace;
pub mod unwind;
pub mod usage;
pub mod webhooks;
