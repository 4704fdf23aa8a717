//! `tenctl --remote URL`: the same calls as on the admin socket, made through the management
//! API (docs/API.md) with a token.
//!
//! Each RPC request becomes its HTTP twin with `tenement_proto::api::to_http` (the table the
//! proxy reads them back with), and each answer is the RPC response as JSON, so every verb
//! renders exactly as it does locally. A `list` is fetched a page at a time and handed out
//! as the supervisor's several `instances` messages; `logs --follow` reads Server-Sent
//! Events. Blocking I/O (ureq, rustls); the token never leaves this module but in the
//! `Authorization` header, and only over HTTPS or to this host.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tenement_proto::api::{self, HttpCall};
use tenement_proto::auth::{self, Secret};
use tenement_proto::rpc::{ErrorCode, ListQuery, Request, Response};

use crate::client::RemoteError;
use crate::commands::UsageError;

/// Where and as whom: from `--remote`, `--token-file` (or `TENEMENT_TOKEN`) and `--ca-file`.
#[derive(Debug, Clone)]
pub struct Remote {
    /// `https://example.com`, no trailing slash.
    pub url: String,
    pub token: Secret,
    pub ca_file: Option<PathBuf>,
}

impl Remote {
    /// Checks the URL and reads the token. Plain `http://` only to this host: a token must
    /// not cross a network in the clear.
    pub fn new(
        url: &str,
        token_file: Option<&Path>,
        token_env: Option<String>,
        ca_file: Option<PathBuf>,
    ) -> Result<Remote, UsageError> {
        let url = url.trim_end_matches('/').to_owned();
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            UsageError(format!(
                "--remote {url:?} is not a URL; write it like https://example.com"
            ))
        })?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if host.is_empty() || rest.len() != host.len() {
            return Err(UsageError(format!(
                "--remote {url:?} must be the bare domain of the tenement, like https://example.com (no path)"
            )));
        }
        let hostname = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        let loopback = hostname == "localhost"
            || hostname.ends_with(".localhost")
            || hostname
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match scheme {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                return Err(UsageError(format!(
                    "--remote {url}: a token goes over https:// only (plain http:// to this host is allowed)"
                )))
            }
            other => {
                return Err(UsageError(format!(
                    "--remote {url}: {other}:// is not http:// or https://"
                )))
            }
        }
        let text = match (token_file, token_env) {
            (Some(path), _) => std::fs::read_to_string(path).map_err(|e| {
                UsageError(format!(
                    "cannot read the token file {}: {e}",
                    path.display()
                ))
            })?,
            (None, Some(token)) => token,
            (None, None) => {
                return Err(UsageError(
                    "--remote needs a token: --token-file FILE or TENEMENT_TOKEN".to_owned(),
                ))
            }
        };
        let token = text.lines().next().unwrap_or_default().trim().to_owned();
        if auth::split_credential(&token).is_none() {
            return Err(UsageError(
                "the token is not of the form tnm_<id>_<secret> (as tenctl token create prints it)"
                    .to_owned(),
            ));
        }
        Ok(Remote {
            url,
            token: Secret(token),
            ca_file,
        })
    }
}

/// A stream of Server-Sent Events being read.
type Events = BufReader<Box<dyn Read + Send + Sync>>;

/// One remote session: an agent, the next page of a `list`, or an event stream.
pub struct RemoteClient {
    remote: Remote,
    agent: ureq::Agent,
    /// The rest of a `list` after the page just handed out.
    next_page: Option<ListQuery>,
    events: Option<Events>,
}

fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<ureq::tls::TlsConfig> {
    let mut builder = ureq::tls::TlsConfig::builder();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", path.display());
        }
        builder = builder.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(builder.build())
}

/// The exit-status code of an API error code (the API has a few the RPC does not).
fn code_of(text: &str) -> ErrorCode {
    match text {
        "https_required" => ErrorCode::Forbidden,
        "not_found" | "method_not_allowed" | "request_timeout" | "body_too_large" => {
            ErrorCode::BadRequest
        }
        "timeout" => ErrorCode::Unavailable,
        other => serde_json::from_value(serde_json::Value::String(other.to_owned()))
            .unwrap_or(ErrorCode::Internal),
    }
}

impl RemoteClient {
    /// `timeout` bounds each whole call (`None`: a stream, which may last forever).
    pub fn new(remote: &Remote, timeout: Option<Duration>) -> anyhow::Result<RemoteClient> {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(timeout)
            .timeout_connect(Some(Duration::from_secs(10)))
            .tls_config(tls_config(remote.ca_file.as_deref())?)
            .user_agent(format!("tenctl/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(RemoteClient {
            remote: remote.clone(),
            agent,
            next_page: None,
            events: None,
        })
    }

    fn send(&self, call: &HttpCall) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let url = format!("{}{}", self.remote.url, call.path);
        let authorization = format!("Bearer {}", self.remote.token.0);
        let query = call.query.iter().map(|(k, v)| (*k, v.as_str()));
        let sent = match (call.method, &call.body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &authorization)
                .query_pairs(query)
                .call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &authorization)
                .query_pairs(query)
                .call(),
            (method, body) => {
                let builder = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                let body = body.as_ref().map(ToString::to_string).unwrap_or_default();
                builder
                    .header("Authorization", &authorization)
                    .header("Content-Type", "application/json")
                    .query_pairs(query)
                    .send(body.as_bytes())
            }
        };
        sent.map_err(|e| match e {
            ureq::Error::Timeout(_) => anyhow!("no answer from {} in time", self.remote.url),
            other => anyhow!("cannot reach {}: {other}", self.remote.url),
        })
    }

    /// An answer that is not 2xx, as the error it carries.
    fn refused(&self, mut response: ureq::http::Response<ureq::Body>) -> anyhow::Error {
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        let doc: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        let error = doc.as_ref().and_then(|d| d.get("error"));
        match (
            error.and_then(|e| e["code"].as_str()),
            error.and_then(|e| e["message"].as_str()),
        ) {
            (Some(code), Some(message)) => RemoteError {
                code: code_of(code),
                message: message.to_owned(),
            }
            .into(),
            _ => anyhow!(
                "{} answered {status} without an API error; is it the bare domain of a tenement?",
                self.remote.url
            ),
        }
    }

    fn decode(&self, mut response: ureq::http::Response<ureq::Body>) -> anyhow::Result<Response> {
        let text = response
            .body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .read_to_string()
            .with_context(|| format!("the answer from {} broke off", self.remote.url))?;
        serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "cannot understand the answer from {} ({e}); are tenctl and the server the same release?",
                self.remote.url
            )
        })
    }

    /// One call and its answer; a `list` without a limit comes a page at a time.
    pub fn call(&mut self, request: &Request) -> anyhow::Result<Response> {
        self.next_page = None;
        self.events = None;
        let mut request = request.clone();
        if let Request::List { query } = &mut request {
            if query.limit.is_none() {
                query.limit = Some(1000);
                return self.page(query.clone());
            }
        }
        let Some(call) = api::to_http(&request) else {
            bail!("{} is not offered by the management API", request.name());
        };
        let response = self.send(&call)?;
        if !response.status().is_success() {
            return Err(self.refused(response));
        }
        if matches!(request, Request::Logs { follow: true, .. }) {
            let reader: Box<dyn Read + Send + Sync> = Box::new(response.into_body().into_reader());
            self.events = Some(BufReader::new(reader));
            return self
                .next_event()?
                .ok_or_else(|| anyhow!("the log stream from {} ended at once", self.remote.url));
        }
        self.decode(response)
    }

    /// One page of a `list`, marked `more` when another follows.
    fn page(&mut self, query: ListQuery) -> anyhow::Result<Response> {
        let Some(call) = api::to_http(&Request::List {
            query: query.clone(),
        }) else {
            bail!("list is not offered by the management API");
        };
        let response = self.send(&call)?;
        if !response.status().is_success() {
            return Err(self.refused(response));
        }
        match self.decode(response)? {
            Response::Instances {
                instances,
                next,
                total,
                ..
            } => {
                let more = next.is_some();
                self.next_page = next.map(|after| ListQuery {
                    after: Some(after),
                    ..query
                });
                Ok(Response::Instances {
                    instances,
                    more,
                    next: None,
                    total,
                })
            }
            other => Ok(other),
        }
    }

    /// The next message of a stream: a page of a `list`, or an event of `logs --follow`.
    pub fn next_streamed(&mut self) -> anyhow::Result<Option<Response>> {
        if let Some(query) = self.next_page.take() {
            return self.page(query).map(Some);
        }
        if self.events.is_some() {
            return self.next_event();
        }
        Ok(None)
    }

    /// Reads Server-Sent Events up to the next one with data; `None` at the end.
    fn next_event(&mut self) -> anyhow::Result<Option<Response>> {
        let Some(events) = self.events.as_mut() else {
            return Ok(None);
        };
        let mut kind = String::new();
        let mut data = String::new();
        loop {
            let mut line = String::new();
            let read = events
                .read_line(&mut line)
                .with_context(|| format!("the log stream from {} broke off", self.remote.url))?;
            if read == 0 {
                return Ok(None);
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                if kind == "error" {
                    let doc: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                    return Err(RemoteError {
                        code: code_of(doc["error"]["code"].as_str().unwrap_or("internal")),
                        message: doc["error"]["message"]
                            .as_str()
                            .unwrap_or("the log stream ended with an error")
                            .to_owned(),
                    }
                    .into());
                }
                return serde_json::from_str(&data).map(Some).map_err(|e| {
                    anyhow!("cannot understand an event from {} ({e})", self.remote.url)
                });
            }
            if let Some(k) = line.strip_prefix("event:") {
                kind = k.trim().to_owned();
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> String {
        format!("tnm_0123456789abcdef_{}", "a".repeat(64))
    }

    #[test]
    fn urls_and_tokens_are_checked_before_anything_is_sent() {
        let ok = |url: &str| Remote::new(url, None, Some(token()), None);
        assert_eq!(
            ok("https://example.com/").expect("valid").url,
            "https://example.com"
        );
        assert!(ok("http://localhost:8080").is_ok());
        assert!(ok("http://127.0.0.1:8080").is_ok());
        assert!(ok("http://[::1]:8080").is_ok());
        for (url, says) in [
            ("http://example.com", "https:// only"),
            ("example.com", "is not a URL"),
            ("https://example.com/api/v1", "no path"),
            ("ftp://example.com", "is not http"),
        ] {
            let e = ok(url).expect_err(url);
            assert!(e.0.contains(says), "{url}: {e}");
        }
        let e = Remote::new("https://example.com", None, None, None).expect_err("no token");
        assert!(e.0.contains("TENEMENT_TOKEN"), "{e}");
        let e = Remote::new("https://example.com", None, Some("hunter2".into()), None)
            .expect_err("not a token");
        assert!(e.0.contains("tnm_"), "{e}");
        // A token file's first line, whitespace trimmed.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{}\n", token())).expect("write");
        let remote = Remote::new("https://example.com", Some(&path), None, None).expect("valid");
        assert_eq!(remote.token.0, token());
    }

    #[test]
    fn api_only_error_codes_keep_their_exit_status() {
        assert_eq!(code_of("https_required"), ErrorCode::Forbidden);
        assert_eq!(code_of("forbidden"), ErrorCode::Forbidden);
        assert_eq!(code_of("unknown_instance"), ErrorCode::UnknownInstance);
        assert_eq!(code_of("not_found"), ErrorCode::BadRequest);
        assert_eq!(code_of("something_new"), ErrorCode::Internal);
    }
}
