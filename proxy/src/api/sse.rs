//! `GET .../logs?follow=true` as Server-Sent Events: each `logs` message of the supervisor's
//! stream is one `data:` event (the same JSON as the non-streaming answer; the first, the
//! buffered lines, even when there are none), an error that
//! ends the stream (the token revoked, the instance removed) is an `error` event, and a
//! comment every 15 s keeps idle connections open through other proxies.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tenement_proto::api::ApiError;
use tenement_proto::frame;
use tenement_proto::rpc;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{matching, open, receive};
use crate::forward::Proxy;
use crate::respond::{BoxError, ProxyBody};

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events queued for a slow client before the stream waits for it.
const QUEUE: usize = 64;

/// A response body fed by a channel: the stream ends when the sender goes.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|next| next.map(|b| Ok(Frame::data(b))))
    }
}

fn event(kind: Option<&str>, json: &str) -> Bytes {
    match kind {
        Some(kind) => Bytes::from(format!("event: {kind}\ndata: {json}\n\n")),
        None => Bytes::from(format!("data: {json}\n\n")),
    }
}

/// The event of one `logs` message; `None` when the search leaves no line (`always`: the
/// backlog, which a client waits for even when it is empty).
fn logs_event(lines: Vec<rpc::LogLine>, search: Option<&str>, always: bool) -> Option<Bytes> {
    let lines = matching(lines, search);
    if lines.is_empty() && !always {
        return None;
    }
    let json = serde_json::to_string(&rpc::Response::Logs { lines }).ok()?;
    Some(event(None, &json))
}

/// Opens the stream: an error before the backlog (a refused token, an unknown instance) is an
/// ordinary JSON error answer; after it, everything is an event.
pub async fn follow(
    proxy: &Proxy,
    authed: rpc::Request,
    search: Option<String>,
    deadline: Instant,
) -> Result<Response<ProxyBody>, ApiError> {
    let mut open = open(proxy, &authed, deadline).await?;
    let backlog = match receive(&mut open.stream, deadline).await? {
        rpc::Response::Logs { lines } => lines,
        other => {
            return Err(ApiError::new(
                500,
                "internal",
                format!("unexpected answer to logs: {}", other.name()),
            ))
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    // An open comment first, so the client sees the stream start even with no backlog.
    let _ = tx.try_send(Bytes::from_static(b": tenement log stream\n\n"));
    if let Some(first) = logs_event(backlog, search.as_deref(), true) {
        let _ = tx.try_send(first);
    }
    tokio::spawn(async move {
        // The whole of it, slot and all: the slot is given back when the stream ends.
        let mut open = open;
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        keep_alive.tick().await;
        loop {
            let next = tokio::select! {
                // The client went away: dropping the connection ends the supervisor's side.
                () = tx.closed() => return,
                _ = keep_alive.tick() => Some(Bytes::from_static(b": keep-alive\n\n")),
                message = frame::read_message_async::<_, rpc::Response>(&mut open.stream) => match message {
                    Ok(rpc::Response::Logs { lines }) => logs_event(lines, search.as_deref(), false),
                    Ok(rpc::Response::Error { code, message }) => {
                        let e = super::from_rpc(code, message);
                        let _ = tx.send(event(Some("error"), &e.body().to_string())).await;
                        return;
                    }
                    // The instance was removed, or the supervisor went away.
                    Ok(_) | Err(_) => return,
                },
            };
            if let Some(bytes) = next {
                if tx.send(bytes).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut response = Response::new(ChannelBody(rx).boxed());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(response)
}
