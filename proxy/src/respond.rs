//! Every error the proxy answers, and the one function that maps them to HTTP responses.
//!
//! Bodies are short plain text saying which error it is; they never carry internal paths,
//! addresses or supervisor messages (those go to the log).

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

use crate::host::HostError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Seconds a client is told to wait after a 503.
const RETRY_AFTER_S: u32 = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("bad host: {0}")]
    BadHost(#[from] HostError),
    /// A request target the instance may not get: `*` with another method than OPTIONS
    /// (RFC 9112 3.2.4), or anything else that is not a path.
    #[error("bad request target: not a path, nor * for OPTIONS")]
    BadTarget,
    #[error("no such host")]
    UnknownHost,
    #[error("no such instance")]
    UnknownInstance,
    #[error("no such service")]
    UnknownService,
    /// `/.well-known/acme-challenge/TOKEN` with a token no order of this proxy has.
    #[error("no such ACME challenge")]
    UnknownChallenge,
    /// The wake failed (the app did not start) or the supervisor could not be reached in time.
    #[error("wake failed: {0}")]
    WakeFailed(String),
    /// The instance is `failed` and waits for an operator.
    #[error("instance failed: {0}")]
    InstanceFailed(String),
    /// The upstream broke: connection refused or reset, malformed response.
    #[error("upstream error: {0}")]
    Upstream(String),
    /// The upstream did not send its response head in time.
    #[error("upstream timeout")]
    UpstreamTimeout,
    #[error("request body too large")]
    BodyTooLarge,
    /// The client's own body was malformed (bad chunked framing) or cut short.
    #[error("bad request body: {0}")]
    BadBody(String),
    /// Every connection the instance may have (`max_upstream_connections`) stayed busy until
    /// the request's deadline.
    #[error("instance busy: {0}")]
    Busy(String),
    /// The client asked for too many unknown tenants of `auto_spawn` services too fast.
    #[error("too many new tenants from this client")]
    TooManyNewTenants,
    /// CONNECT: tenement is not a forward proxy.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A fleet host asked for a tenant that is not (or no longer) placed on it: the proxy
    /// that forwarded the request waits for the placement to change and sends it again.
    #[error("not placed here: {0}")]
    NotPlacedHere(String),
}

/// The one place a [`ProxyError`] becomes a response.
pub fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    let (status, text) = match error {
        ProxyError::BadHost(HostError::Missing) => (
            StatusCode::BAD_REQUEST,
            "400 bad request: missing Host header\n",
        ),
        ProxyError::BadHost(HostError::Duplicate) => (
            StatusCode::BAD_REQUEST,
            "400 bad request: more than one Host header\n",
        ),
        ProxyError::BadHost(HostError::Mismatch) => (
            StatusCode::BAD_REQUEST,
            "400 bad request: the Host header does not match the request target\n",
        ),
        ProxyError::BadHost(_) => (
            StatusCode::BAD_REQUEST,
            "400 bad request: invalid host name\n",
        ),
        ProxyError::BadTarget => (
            StatusCode::BAD_REQUEST,
            "400 bad request: the request target must be a path (* only with OPTIONS)\n",
        ),
        ProxyError::UnknownHost => (
            StatusCode::NOT_FOUND,
            "404 not found: no site at this host\n",
        ),
        ProxyError::UnknownInstance | ProxyError::UnknownService => {
            (StatusCode::NOT_FOUND, "404 not found: no such instance\n")
        }
        ProxyError::UnknownChallenge => (
            StatusCode::NOT_FOUND,
            "404 not found: no such ACME challenge\n",
        ),
        ProxyError::WakeFailed(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: the instance could not be started, try again shortly\n",
        ),
        ProxyError::InstanceFailed(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: the instance is down\n",
        ),
        ProxyError::Upstream(_) => (
            StatusCode::BAD_GATEWAY,
            "502 bad gateway: the instance did not answer properly\n",
        ),
        ProxyError::UpstreamTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "504 gateway timeout: the instance was too slow\n",
        ),
        ProxyError::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "413 payload too large\n"),
        ProxyError::BadBody(_) => (
            StatusCode::BAD_REQUEST,
            "400 bad request: malformed request body\n",
        ),
        ProxyError::Busy(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: the instance is busy, try again shortly\n",
        ),
        ProxyError::TooManyNewTenants => (
            StatusCode::TOO_MANY_REQUESTS,
            "429 too many requests: slow down\n",
        ),
        ProxyError::MethodNotAllowed => (
            StatusCode::METHOD_NOT_ALLOWED,
            "405 method not allowed: CONNECT is not served here\n",
        ),
        ProxyError::NotPlacedHere(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: the instance is moving between hosts, try again shortly\n",
        ),
    };
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(
            header::ALLOW,
            header::HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
    }
    if matches!(error, ProxyError::NotPlacedHere(_)) {
        headers.insert(
            crate::fleet::REFUSED,
            header::HeaderValue::from_static("not-placed-here"),
        );
    }
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        headers.insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(RETRY_AFTER_S),
        );
    }
    response
}

pub fn full(text: impl Into<Bytes>) -> ProxyBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_contract() {
        let cases = [
            (ProxyError::BadHost(HostError::Missing), 400),
            (ProxyError::BadHost(HostError::Malformed), 400),
            (ProxyError::UnknownHost, 404),
            (ProxyError::UnknownInstance, 404),
            (ProxyError::WakeFailed("x".into()), 503),
            (ProxyError::InstanceFailed("x".into()), 503),
            (ProxyError::Upstream("x".into()), 502),
            (ProxyError::UpstreamTimeout, 504),
            (ProxyError::BodyTooLarge, 413),
            (ProxyError::BadHost(HostError::Duplicate), 400),
            (ProxyError::BadHost(HostError::Mismatch), 400),
            (ProxyError::BadBody("x".into()), 400),
            (ProxyError::BadTarget, 400),
            (ProxyError::MethodNotAllowed, 405),
            (ProxyError::Busy("x".into()), 503),
            (ProxyError::TooManyNewTenants, 429),
        ];
        for (error, status) in cases {
            let response = error_response(&error);
            assert_eq!(response.status().as_u16(), status, "{error:?}");
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                status == 503 || status == 429
            );
        }
    }

    #[tokio::test]
    async fn bodies_say_which_error_and_never_leak_details() {
        let detail = "/var/lib/tenement/data/notes/alice: EACCES";
        for error in [
            ProxyError::WakeFailed(detail.into()),
            ProxyError::InstanceFailed(detail.into()),
            ProxyError::Upstream(detail.into()),
            ProxyError::BadBody(detail.into()),
        ] {
            let response = error_response(&error);
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            let text = String::from_utf8_lossy(&body);
            assert!(text.starts_with(&status.to_string()), "{text}");
            assert!(
                !text.contains("/var/lib") && !text.contains("EACCES"),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn a_bad_target_is_a_400_that_says_what_a_target_may_be() {
        let response = error_response(&ProxyError::BadTarget);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(
            body,
            "400 bad request: the request target must be a path (* only with OPTIONS)\n"
        );
    }
}
