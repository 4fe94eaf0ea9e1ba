//! A request that panics on purpose: the test of THREATS K3 (a panic inside a request task
//! fails that request alone; the process, the other connections and every guard survive).
//! Compiled only with the `test-panic` feature, which no release or profile-guided build
//! enables (`pgo/build.sh`, the Dockerfile); `ci/test` runs the suite with every feature.

/// The request field that asks for the panic.
pub const HEADER: &str = "x-keygate-test-panic";

/// Panics when the request carries `HEADER`. The request path calls it once the request is
/// authenticated, while its in-flight slot and its connection's cap slot and gauge are held,
/// so the test sees unwinding give them back; the token exchange (`tokens::issue`) once its
/// key is authenticated. The message names nothing of the request: the tests check that the
/// panic's report on stderr holds no key.
pub fn panic_if_asked(headers: &http::HeaderMap) {
    if headers.contains_key(HEADER) {
        panic!("test-panic: a request asked for a panic ({HEADER})");
    }
}
