//! `GatewayError`: every way the request path can end other than a forwarded response, with
//! its status, its stable body `code`, its metric `Outcome`, and the problem+json response.
//!
//! `status()`, `code()` and `outcome()` are exhaustive matches (no `_` arm), so a new variant
//! cannot ship without deciding all three. The six ways a presented key can fail share one
//! variant and one byte-identical response: the caller must not learn *why* (RFC 6750 §3,
//! OWASP API2); only `outcome()` tells metrics and logs.

use crate::extract::ExtractError;
use crate::hygiene::HygieneError;
use crate::keys::format::FormatError;
use crate::keys::table::{AuthError, TokenRefusal};
use crate::limit::Verdict;
use crate::path::PathError;
use crate::route::RouteError;
use crate::trace::TraceId;
use bytes::Bytes;
use http::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("no route")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: Vec<Method> },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("bad path: {0}")]
    BadPath(#[from] PathError),
    #[error("bad header: {0}")]
    BadHeader(#[from] HygieneError),
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("no API key presented")]
    KeyMissing,
    #[error("two different API keys presented")]
    KeyAmbiguous,
    #[error("{0}")]
    KeyInvalid(AuthError),
    #[error("too many failed authentications from this client")]
    AuthBudgetExceeded { retry_after_secs: u64 },
    #[error("key lacks a required scope")]
    ScopeDenied,
    #[error("client address not allowed for this key")]
    NetworkDenied,
    #[error("key environment does not match the route")]
    EnvDenied,
    #[error("browser origin not allowed")]
    OriginDenied,
    #[error("publishable key on a route that does not accept them")]
    PublishableDenied,
    #[error("rate limited")]
    RateLimited(Verdict),
    #[error("quota exceeded")]
    QuotaExceeded(Verdict),
    #[error("request body too large")]
    BodyTooLarge,
    #[error("request body not received in time")]
    BodyTimeout,
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("upstream protocol error: {0}")]
    UpstreamError(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("too many requests in flight")]
    Overloaded,
    #[error("no key table loaded")]
    TableUnavailable,
    /// The request path panicked (`unwind`): a defect of the gateway's, its report on stderr.
    #[error("the request failed inside the gateway (a panic, reported on stderr)")]
    Internal,
}

impl From<RouteError> for GatewayError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NotFound => GatewayError::RouteNotFound,
            RouteError::ParamsChangeRoute => {
                GatewayError::BadRequest("path parameters change the route")
            }
            RouteError::MethodNotAllowed { allow } => GatewayError::MethodNotAllowed { allow },
        }
    }
}

impl From<ExtractError> for GatewayError {
    fn from(e: ExtractError) -> Self {
        match e {
            ExtractError::Missing => GatewayError::KeyMissing,
            ExtractError::Ambiguous => GatewayError::KeyAmbiguous,
            // A credential that is not even well-formed is refused like a malformed key.
            ExtractError::Malformed => {
                GatewayError::KeyInvalid(AuthError::Malformed(FormatError::BadCharacter))
            }
        }
    }
}

/// What a route's settings allow to happen under its name (`Outcome::reachable`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteTraits {
    /// `accept_tokens` is set.
    pub tokens: bool,
    /// The route demands scopes.
    pub scopes: bool,
    /// The route demands an env.
    pub env: bool,
    /// `publishable = true`.
    pub publishable: bool,
    /// `[redis]` is configured, so a plan's or key's quota is checked.
    pub quota: bool,
}

/// The closed set of request outcomes: the `outcome` label of `keygate_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    KeyMissing,
    KeyMalformed,
    KeyUnknown,
    KeyRevoked,
    KeyExpired,
    KeyNotYetValid,
    KeyCanary,
    TokenInvalid,
    TokenExpired,
    TokenNotAccepted,
    KeyAmbiguous,
    ScopeDenied,
    NetworkDenied,
    EnvDenied,
    OriginDenied,
    PublishableDenied,
    RateLimited,
    QuotaExceeded,
    AuthBudgetExceeded,
    RouteNotFound,
    MethodNotAllowed,
    BadRequest,
    HeadersTooLarge,
    BodyTooLarge,
    BodyTimeout,
    UpstreamUnavailable,
    UpstreamTimeout,
    UpstreamError,
    Overloaded,
    TableUnavailable,
    Internal,
}

impl Outcome {
    pub const ALL: [Outcome; 32] = [
        Outcome::Ok,
        Outcome::KeyMissing,
        Outcome::KeyMalformed,
        Outcome::KeyUnknown,
        Outcome::KeyRevoked,
        Outcome::KeyExpired,
        Outcome::KeyNotYetValid,
        Outcome::KeyCanary,
        Outcome::TokenInvalid,
        Outcome::TokenExpired,
        Outcome::TokenNotAccepted,
        Outcome::KeyAmbiguous,
        Outcome::ScopeDenied,
        Outcome::NetworkDenied,
        Outcome::EnvDenied,
        Outcome::OriginDenied,
        Outcome::PublishableDenied,
        Outcome::RateLimited,
        Outcome::QuotaExceeded,
        Outcome::AuthBudgetExceeded,
        Outcome::RouteNotFound,
        Outcome::MethodNotAllowed,
        Outcome::BadRequest,
        Outcome::HeadersTooLarge,
        Outcome::BodyTooLarge,
        Outcome::BodyTimeout,
        Outcome::UpstreamUnavailable,
        Outcome::UpstreamTimeout,
        Outcome::UpstreamError,
        Outcome::Overloaded,
        Outcome::TableUnavailable,
        Outcome::Internal,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::KeyMissing => "key_missing",
            Outcome::KeyMalformed => "key_malformed",
            Outcome::KeyUnknown => "key_unknown",
            Outcome::KeyRevoked => "key_revoked",
            Outcome::KeyExpired => "key_expired",
            Outcome::KeyNotYetValid => "key_not_yet_valid",
            Outcome::KeyCanary => "key_canary",
            Outcome::TokenInvalid => "token_invalid",
            Outcome::TokenExpired => "token_expired",
            Outcome::TokenNotAccepted => "token_not_accepted",
            Outcome::KeyAmbiguous => "key_ambiguous",
            Outcome::ScopeDenied => "scope_denied",
            Outcome::NetworkDenied => "network_denied",
            Outcome::EnvDenied => "env_denied",
            Outcome::OriginDenied => "origin_denied",
            Outcome::PublishableDenied => "publishable_key_denied",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExceeded => "quota_exceeded",
            Outcome::AuthBudgetExceeded => "auth_budget_exceeded",
            Outcome::RouteNotFound => "route_not_found",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::BadRequest => "bad_request",
            Outcome::HeadersTooLarge => "headers_too_large",
            Outcome::BodyTooLarge => "body_too_large",
            Outcome::BodyTimeout => "body_timeout",
            Outcome::UpstreamUnavailable => "upstream_unavailable",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Overloaded => "overloaded",
            Outcome::TableUnavailable => "table_unavailable",
            Outcome::Internal => "internal_error",
        }
    }

    /// Can this outcome be counted under a route with these settings (`Some`), or under
    /// `route="none"` (`None`: decided before a route matched)? The answer follows the
    /// order of `pipeline`: admission, the table, the request head, the path and the router
    /// run before a route is known; everything from the credential on runs under one. Only
    /// reachable pairs are pre-created (`Metrics::route_series`); an outcome answered `false`
    /// here is still counted if it happens, its series created then.
    pub fn reachable(self, route: Option<&RouteTraits>) -> bool {
        let Some(r) = route else {
            return self.before_route();
        };
        match self {
            // Decided before routing: never under a route's name.
            Outcome::RouteNotFound
            | Outcome::MethodNotAllowed
            | Outcome::HeadersTooLarge
            | Outcome::Overloaded
            | Outcome::TableUnavailable => false,
            // Only a route with `accept_tokens` checks a token's signature and lifetime;
            // every other route refuses any token as `token_not_accepted`.
            Outcome::TokenInvalid | Outcome::TokenExpired => r.tokens,
            Outcome::ScopeDenied => r.scopes,
            Outcome::EnvDenied => r.env,
            // A publishable key is refused only where publishable keys are not accepted.
            Outcome::PublishableDenied => !r.publishable,
            // Quotas are counted in Redis; without `[redis]` none is ever checked.
            Outcome::QuotaExceeded => r.quota,
            // Any key may carry its own rate and allowlist; a preflight may carry any origin;
            // the body, the forwarding headers and the upstream can fail on every route.
            Outcome::Ok
            | Outcome::KeyMissing
            | Outcome::KeyMalformed
            | Outcome::KeyUnknown
            | Outcome::KeyRevoked
            | Outcome::KeyExpired
            | Outcome::KeyNotYetValid
            | Outcome::KeyCanary
            | Outcome::TokenNotAccepted
            | Outcome::KeyAmbiguous
            | Outcome::NetworkDenied
            | Outcome::OriginDenied
            | Outcome::RateLimited
            | Outcome::AuthBudgetExceeded
            | Outcome::BadRequest
            | Outcome::BodyTooLarge
            | Outcome::BodyTimeout
            | Outcome::UpstreamUnavailable
            | Outcome::UpstreamTimeout
            | Outcome::UpstreamError
            // A defect can panic anywhere on the path; the series exists from the start so
            // that an alert's `increase()` sees the first.
            | Outcome::Internal => true,
        }
    }

    /// The outcomes `pipeline` decides before `ctx.route` is set: admission (`overloaded`),
    /// the table, the head's framing and Host (`bad_request`, CONNECT as
    /// `method_not_allowed`, `headers_too_large`), the path (`bad_request`) and the router;
    /// and a panic (`internal_error`), which can come anywhere.
    fn before_route(self) -> bool {
        matches!(
            self,
            Outcome::Overloaded
                | Outcome::TableUnavailable
                | Outcome::Internal
                | Outcome::BadRequest
                | Outcome::MethodNotAllowed
                | Outcome::HeadersTooLarge
                | Outcome::RouteNotFound
        )
    }

    /// Is this a failed authentication of a presented key (counted against the client's
    /// failure budget and in `keygate_auth_failures_total`)?
    pub fn is_auth_failure(self) -> bool {
        matches!(
            self,
            Outcome::KeyMalformed
                | Outcome::KeyUnknown
                | Outcome::KeyRevoked
                | Outcome::KeyExpired
                | Outcome::KeyNotYetValid
                | Outcome::KeyCanary
                | Outcome::TokenInvalid
                | Outcome::TokenExpired
                | Outcome::TokenNotAccepted
        )
    }
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::RouteNotFound => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::BadRequest(_)
            | GatewayError::BadPath(_)
            | GatewayError::BadHeader(_)
            | GatewayError::KeyAmbiguous => StatusCode::BAD_REQUEST,
            GatewayError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::KeyMissing | GatewayError::KeyInvalid(_) => StatusCode::UNAUTHORIZED,
            GatewayError::ScopeDenied
            | GatewayError::NetworkDenied
            | GatewayError::EnvDenied
            | GatewayError::OriginDenied
            | GatewayError::PublishableDenied => StatusCode::FORBIDDEN,
            GatewayError::RateLimited(_)
            | GatewayError::QuotaExceeded(_)
            | GatewayError::AuthBudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::UpstreamUnavailable(_) | GatewayError::UpstreamError(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Overloaded | GatewayError::TableUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable `code` in the problem+json body.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::RouteNotFound => "route_not_found",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::BadRequest(_) | GatewayError::BadHeader(_) => "bad_request",
            GatewayError::BadPath(_) => "bad_path",
            GatewayError::HeadersTooLarge => "headers_too_large",
            GatewayError::KeyMissing => "missing_api_key",
            GatewayError::KeyAmbiguous => "ambiguous_api_key",
            GatewayError::KeyInvalid(_) => "invalid_api_key",
            GatewayError::AuthBudgetExceeded { .. } => "too_many_auth_failures",
            GatewayError::ScopeDenied => "scope_denied",
            GatewayError::NetworkDenied => "network_denied",
            GatewayError::EnvDenied => "env_denied",
            GatewayError::OriginDenied => "origin_denied",
            GatewayError::PublishableDenied => "publishable_key_denied",
            GatewayError::RateLimited(_) => "rate_limited",
            GatewayError::QuotaExceeded(_) => "quota_exceeded",
            GatewayError::BodyTooLarge => "body_too_large",
            GatewayError::BodyTimeout => "body_timeout",
            GatewayError::UpstreamUnavailable(_) => "upstream_unavailable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::UpstreamError(_) => "upstream_error",
            GatewayError::Overloaded => "overloaded",
            GatewayError::TableUnavailable => "table_unavailable",
            GatewayError::Internal => "internal_error",
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            GatewayError::RouteNotFound => Outcome::RouteNotFound,
            GatewayError::MethodNotAllowed { .. } => Outcome::MethodNotAllowed,
            GatewayError::BadRequest(_) | GatewayError::BadPath(_) | GatewayError::BadHeader(_) => {
                Outcome::BadRequest
            }
            GatewayError::HeadersTooLarge => Outcome::HeadersTooLarge,
            GatewayError::KeyMissing => Outcome::KeyMissing,
            GatewayError::KeyAmbiguous => Outcome::KeyAmbiguous,
            GatewayError::KeyInvalid(e) => match e {
                AuthError::Malformed(_) => Outcome::KeyMalformed,
                AuthError::Unknown => Outcome::KeyUnknown,
                AuthError::Revoked(_) => Outcome::KeyRevoked,
                AuthError::Expired(_) => Outcome::KeyExpired,
                AuthError::NotYetValid(_) => Outcome::KeyNotYetValid,
                AuthError::Canary(_) => Outcome::KeyCanary,
                AuthError::Token(TokenRefusal::Invalid) => Outcome::TokenInvalid,
                AuthError::Token(TokenRefusal::Expired) => Outcome::TokenExpired,
                AuthError::Token(TokenRefusal::NotAccepted) => Outcome::TokenNotAccepted,
            },
            GatewayError::AuthBudgetExceeded { .. } => Outcome::AuthBudgetExceeded,
            GatewayError::ScopeDenied => Outcome::ScopeDenied,
            GatewayError::NetworkDenied => Outcome::NetworkDenied,
            GatewayError::EnvDenied => Outcome::EnvDenied,
            GatewayError::OriginDenied => Outcome::OriginDenied,
            GatewayError::PublishableDenied => Outcome::PublishableDenied,
            GatewayError::RateLimited(_) => Outcome::RateLimited,
            GatewayError::QuotaExceeded(_) => Outcome::QuotaExceeded,
            GatewayError::BodyTooLarge => Outcome::BodyTooLarge,
            GatewayError::BodyTimeout => Outcome::BodyTimeout,
            GatewayError::UpstreamUnavailable(_) => Outcome::UpstreamUnavailable,
            GatewayError::UpstreamTimeout => Outcome::UpstreamTimeout,
            GatewayError::UpstreamError(_) => Outcome::UpstreamError,
            GatewayError::Overloaded => Outcome::Overloaded,
            GatewayError::TableUnavailable => Outcome::TableUnavailable,
            GatewayError::Internal => Outcome::Internal,
        }
    }

    fn title(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::TOO_MANY_REQUESTS => "Too Many Requests",
            StatusCode::NOT_FOUND => "Not Found",
            StatusCode::METHOD_NOT_ALLOWED => "Method Not Allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "Content Too Large",
            StatusCode::REQUEST_TIMEOUT => "Request Timeout",
            StatusCode::BAD_GATEWAY => "Bad Gateway",
            StatusCode::GATEWAY_TIMEOUT => "Gateway Timeout",
            StatusCode::SERVICE_UNAVAILABLE => "Service Unavailable",
            StatusCode::INTERNAL_SERVER_ERROR => "Internal Server Error",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "Request Header Fields Too Large",
            _ => "Bad Request",
        }
    }

    /// The problem+json response (RFC 9457). Built only from the closed code and status: no
    /// request data, no key, no internal detail ever reaches the body.
    /// The problem+json response. `trace_id` (the request's W3C trace) lets a caller's report
    /// be found in the logs; it is random or the caller's own, so it tells nothing about why a
    /// key failed (the 401s stay uniform apart from it).
    pub fn to_response(&self, trace_id: &TraceId) -> Response<Full<Bytes>> {
        let status = self.status();
        let body = format!(
            r#"{{"type":"about:blank","title":"{}","status":{},"code":"{}","trace_id":"{}"}}"#,
            self.title(),
            status.as_u16(),
            self.code(),
            trace_id
        );
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            GatewayError::KeyMissing => {
                h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            GatewayError::KeyInvalid(_) => {
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                );
            }
            GatewayError::MethodNotAllowed { allow } => {
                let list: Vec<&str> = allow.iter().map(Method::as_str).collect();
                if let Ok(v) = HeaderValue::from_str(&list.join(", ")) {
                    h.insert(ALLOW, v);
                }
            }
            GatewayError::RateLimited(v) | GatewayError::QuotaExceeded(v) => {
                v.refusal_headers(h);
            }
            GatewayError::AuthBudgetExceeded { retry_after_secs } => {
                h.insert(RETRY_AFTER, HeaderValue::from((*retry_after_secs).max(1)));
            }
            GatewayError::Overloaded | GatewayError::TableUnavailable => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::RouteNotFound
            | GatewayError::BadRequest(_)
            | GatewayError::BadPath(_)
            | GatewayError::BadHeader(_)
            | GatewayError::HeadersTooLarge
            | GatewayError::KeyAmbiguous
            | GatewayError::ScopeDenied
            | GatewayError::NetworkDenied
            | GatewayError::EnvDenied
            | GatewayError::OriginDenied
            | GatewayError::PublishableDenied
            | GatewayError::BodyTooLarge
            | GatewayError::BodyTimeout
            | GatewayError::UpstreamUnavailable(_)
            | GatewayError::UpstreamTimeout
            | GatewayError::UpstreamError(_)
            | GatewayError::Internal => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::format::FormatError;

    #[test]
    fn outcome_table_is_dense_and_named_uniquely() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
        let names: std::collections::HashSet<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(names.len(), Outcome::ALL.len());
    }

    #[test]
    fn invalid_keys_share_one_response() {
        let a = GatewayError::KeyInvalid(AuthError::Unknown).to_response(&TraceId([7; 16]));
        let b = GatewayError::KeyInvalid(AuthError::Malformed(FormatError::BadChecksum))
            .to_response(&TraceId([7; 16]));
        assert_eq!(a.status(), 401);
        assert_eq!(a.headers(), b.headers());
        assert_eq!(format!("{:?}", a.body()), format!("{:?}", b.body()));
        assert_eq!(
            a.headers()[WWW_AUTHENTICATE],
            r#"Bearer error="invalid_token""#
        );
        let m = GatewayError::KeyMissing.to_response(&TraceId([7; 16]));
        assert_eq!(m.headers()[WWW_AUTHENTICATE], "Bearer");
    }
}
