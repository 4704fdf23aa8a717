//! `tenctl token create|ls|rm`: the management API's tokens. A new token's secret is printed
//! once, alone on stdout (so `TOKEN=$(tenctl token create ...)` captures it), with what it is
//! on stderr; nothing else ever shows a secret.

use std::io::Write;
use std::time::Duration;

use serde_json::json;
use tenement_proto::auth::{Scope, TokenId, TokenInfo};
use tenement_proto::rpc::{Request, Response};

use crate::client::unexpected;
use crate::commands::{Context, UsageError, RPC_TIMEOUT};
use crate::render;

/// What `token create` was asked for.
pub struct CreateOptions<'a> {
    pub scope: &'a str,
    pub read_only: bool,
    pub expires: Option<Duration>,
    pub name: Option<&'a str>,
}

fn describe(info: &TokenInfo) -> String {
    let mut text = format!("token {} ({}", info.id, info.scope);
    if info.read_only {
        text.push_str(", read-only");
    }
    match info.expires_ms {
        Some(at) => text.push_str(&format!(", expires {}", render::iso_utc(at))),
        None => text.push_str(", never expires"),
    }
    text.push(')');
    text
}

pub fn create(
    ctx: &Context,
    options: &CreateOptions<'_>,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<()> {
    let scope: Scope = options
        .scope
        .parse()
        .map_err(|e: tenement_proto::auth::ScopeError| UsageError(e.to_string()))?;
    if let Some(name) = options.name {
        tenement_proto::auth::validate_name(name).map_err(UsageError)?;
    }
    let lifetime_s = match options.expires {
        Some(d) if d.as_secs() == 0 => {
            return Err(UsageError("--expires must be at least 1s".to_owned()).into())
        }
        other => other.map(|d| d.as_secs()),
    };
    let request = Request::TokenCreate {
        scope,
        read_only: options.read_only,
        lifetime_s,
        name: options.name.map(str::to_owned),
    };
    let mut client = ctx.client(Some(RPC_TIMEOUT))?;
    match client.call(&request)? {
        Response::TokenCreated { token, info } => {
            if json {
                writeln!(out, "{}", json!({ "token": token.0, "info": info }))?;
            } else {
                writeln!(out, "{}", token.0)?;
                writeln!(
                    err,
                    "{}: keep it now, it is not shown again",
                    describe(&info)
                )?;
            }
            Ok(())
        }
        other => Err(unexpected("token create", &other)),
    }
}

pub fn list(ctx: &Context, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut client = ctx.client(Some(RPC_TIMEOUT))?;
    let tokens = match client.call(&Request::TokenList)? {
        Response::Tokens { tokens } => tokens,
        other => return Err(unexpected("token ls", &other)),
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&tokens)?)?;
        return Ok(());
    }
    if tokens.is_empty() {
        writeln!(
            out,
            "no tokens; make one with tenctl token create --scope admin|service:NAME|tenant:SERVICE:ID"
        )?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.name
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), render::sanitize),
                t.scope.to_string(),
                if t.read_only { "read" } else { "read-write" }.to_owned(),
                render::iso_utc(t.created_ms),
                t.last_used_ms
                    .map_or_else(|| "never".to_owned(), render::iso_utc),
                t.expires_ms
                    .map_or_else(|| "never".to_owned(), render::iso_utc),
            ]
        })
        .collect();
    out.write_all(
        render::table(
            &[
                "ID",
                "NAME",
                "SCOPE",
                "ACCESS",
                "CREATED",
                "LAST USED",
                "EXPIRES",
            ],
            &rows,
        )
        .as_bytes(),
    )?;
    Ok(())
}

pub fn remove(ctx: &Context, id: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let id = TokenId::new(id).ok_or_else(|| {
        UsageError(format!(
            "{:?} is not a token id (16 hex digits, as tenctl token ls shows them)",
            id.chars().take(40).collect::<String>()
        ))
    })?;
    let mut client = ctx.client(Some(RPC_TIMEOUT))?;
    match client.call(&Request::TokenRemove { id })? {
        Response::Tokens { tokens } => {
            for info in tokens {
                writeln!(out, "{} revoked", describe(&info))?;
            }
            Ok(())
        }
        other => Err(unexpected("token rm", &other)),
    }
}
