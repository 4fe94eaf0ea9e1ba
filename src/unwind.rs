//! A panic on one request's path becomes that request's answer: a 500 problem+json
//! (`GatewayError::Internal`), counted in `keygate_requests_total{outcome="internal_error"}`
//! and written in its access line like any other refusal (THREATS K3). The token exchange
//! beside the path (`tokens::issue`) answers its own 500 the same way, counted under
//! `route="none"`. Without this, hyper reset the HTTP/2 stream or closed the HTTP/1
//! connection, and the request left no record beyond the panic's report on stderr, which
//! stays as it was (the standard hook).
//!
//! Why it is safe to go on: the request's own state is dropped with its future, and the
//! guards it held (in-flight slot, connection cap) are drop guards that unwinding gives back
//! either way. Shared state is behind atomics, or behind locks whose users never panic on
//! a poisoned one (they take the state as it is, or skip their bookkeeping).
//! Why it is free: a `catch_unwind` that does not catch costs no instruction on the way
//! (unwinding is table-driven), and the future is polled in place, not moved or boxed.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A future panicked while it was polled; its caller answers for it (the request path with
/// `GatewayError::Internal`, the token exchange with its own 500).
#[derive(Debug)]
pub struct Panicked;

/// Poll `f` once; a panic inside it is `Err(Panicked)`. The caller must not poll `f` again
/// after that (it is left mid-way); `poll_fn` around this ends with it.
pub fn poll_caught<F: Future>(
    f: Pin<&mut F>,
    cx: &mut Context<'_>,
) -> Poll<Result<F::Output, Panicked>> {
    match catch_unwind(AssertUnwindSafe(|| f.poll(cx))) {
        Ok(polled) => polled.map(Ok),
        Err(_) => Poll::Ready(Err(Panicked)),
    }
}
