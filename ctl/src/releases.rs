//! `tenctl deploy SERVICE`, `releases`, `rollout`, `rollback`, `pin` and `unpin`: releases
//! and rollouts (docs/DEPLOYS.md).

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use serde_json::json;
use tenement_proto::rpc::{
    ReleaseInfo, Request, Response, RolloutAction, RolloutInfo, RolloutOptions,
};
use tenement_proto::{InstanceId, ServiceName, TenantId};

use crate::client::unexpected;
use crate::commands::{parse_instance, parse_service, Context, UsageError, RPC_TIMEOUT};
use crate::render;

/// How a rollout proceeds, as typed: `--canary alice,bob` or `--canary 5%`, `--steps
/// 5%,25%,100%`, `--max-unavailable N`, `--bake 10s`.
#[derive(Debug, Clone, Default)]
pub struct RolloutFlags {
    pub canary: Option<String>,
    pub steps: Option<String>,
    pub max_unavailable: Option<u32>,
    pub bake: Option<Duration>,
}

impl RolloutFlags {
    pub fn is_empty(&self) -> bool {
        self.canary.is_none()
            && self.steps.is_none()
            && self.max_unavailable.is_none()
            && self.bake.is_none()
    }

    fn options(&self) -> Result<RolloutOptions, UsageError> {
        let mut options = RolloutOptions {
            max_unavailable: self.max_unavailable,
            bake_ms: self.bake.map(|d| d.as_millis() as u64),
            ..RolloutOptions::default()
        };
        if let Some(canary) = &self.canary {
            if let Some(share) = canary.strip_suffix('%') {
                options.canary_percent = Some(percent(share, "--canary")?);
            } else {
                for word in canary.split(',') {
                    let tenant = TenantId::new(word.trim()).map_err(|e| {
                        UsageError(format!(
                            "--canary: invalid tenant id {:?}: {e}",
                            render::sanitize(word)
                        ))
                    })?;
                    options.canary.push(tenant);
                }
            }
        }
        if let Some(steps) = &self.steps {
            for word in steps.split(',') {
                let share = word.trim().strip_suffix('%').ok_or_else(|| {
                    UsageError(format!(
                        "--steps: {:?} is not a share like 25%",
                        render::sanitize(word)
                    ))
                })?;
                options.steps.push(percent(share, "--steps")?);
            }
        }
        Ok(options)
    }
}

fn percent(text: &str, flag: &str) -> Result<u32, UsageError> {
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=100).contains(&n) => Ok(n),
        _ => Err(UsageError(format!(
            "{flag}: {:?} is not a share from 1% to 100%",
            render::sanitize(text)
        ))),
    }
}

/// `tenctl deploy SERVICE`: make a release of the service as configured now and roll it out.
pub fn deploy_service(
    ctx: &Context,
    service: &str,
    flags: &RolloutFlags,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let service = parse_service(service)?;
    let options = flags.options()?;
    call(ctx, Request::Release { service, options }, json, out)
}

/// `tenctl releases SERVICE`.
pub fn releases(
    ctx: &Context,
    service: &str,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let service = parse_service(service)?;
    call(ctx, Request::Releases { service }, json, out)
}

/// `tenctl rollout status|pause|resume|abort SERVICE`.
pub fn rollout(
    ctx: &Context,
    action: RolloutAction,
    service: &str,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let service = parse_service(service)?;
    call(ctx, Request::Rollout { service, action }, json, out)
}

/// `tenctl rollback SERVICE [--to N]`.
pub fn rollback(
    ctx: &Context,
    service: &str,
    to: Option<u32>,
    flags: &RolloutFlags,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let service = parse_service(service)?;
    let options = flags.options()?;
    let request = Request::Rollback {
        service,
        to,
        options,
    };
    call(ctx, request, json, out)
}

/// `tenctl pin INSTANCE N` and `tenctl unpin INSTANCE`.
pub fn pin(
    ctx: &Context,
    instance: &str,
    release: Option<u32>,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let instance: InstanceId = parse_instance(instance)?;
    if !json {
        // The service's releases follow; say first what happened to the instance.
        match release {
            Some(n) => writeln!(out, "{instance} pinned to release {n}")?,
            None => writeln!(out, "{instance} unpinned")?,
        }
    }
    call(ctx, Request::Pin { instance, release }, json, out)
}

fn call(ctx: &Context, request: Request, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut client = ctx.client(Some(RPC_TIMEOUT))?;
    let name = request.name();
    match client.call(&request)? {
        Response::Releases {
            service,
            current,
            releases,
            rollout,
        } => {
            if json {
                let doc = json!({
                    "service": service,
                    "current": current,
                    "releases": releases,
                    "rollout": rollout,
                });
                writeln!(out, "{doc}")?;
            } else {
                out.write_all(
                    render_releases(&service, current, &releases, rollout.as_deref()).as_bytes(),
                )?;
            }
            Ok(())
        }
        other => Err(unexpected(name, &other)),
    }
}

/// The text of every release answer: the table of releases, then the rollout.
pub fn render_releases(
    service: &ServiceName,
    current: u32,
    releases: &[ReleaseInfo],
    rollout: Option<&RolloutInfo>,
) -> String {
    let rows: Vec<Vec<String>> = releases
        .iter()
        .map(|r| {
            vec![
                if r.number == current {
                    format!("{}*", r.number)
                } else {
                    r.number.to_string()
                },
                render::iso_utc(r.created_ms),
                r.origin.clone(),
                r.tenants.to_string(),
                r.running.to_string(),
                if r.changes.is_empty() {
                    "-".to_owned()
                } else {
                    r.changes.join(",")
                },
                render::sanitize(&r.command),
            ]
        })
        .collect();
    let mut text = format!("{service}: current release {current} (*)\n");
    text.push_str(&render::table(
        &[
            "RELEASE", "CREATED", "ORIGIN", "TENANTS", "RUNNING", "CHANGES", "COMMAND",
        ],
        &rows,
    ));
    if let Some(r) = rollout {
        let _ = write!(
            text,
            "rollout of release {}: {}, step {}/{}, {} moved, {} to go",
            r.release, r.state, r.step, r.steps, r.moved, r.pending
        );
        if let Some(reason) = &r.reason {
            let _ = write!(text, " ({})", render::sanitize(reason));
        }
        text.push('\n');
        if !r.switching.is_empty() {
            let names: Vec<String> = r.switching.iter().map(ToString::to_string).collect();
            let _ = writeln!(text, "  switching: {}", names.join(", "));
        }
        for failure in &r.failed {
            let _ = writeln!(
                text,
                "  failed: {}: {}",
                failure.instance,
                render::sanitize(&failure.reason)
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_options_and_bad_ones_are_one_line() {
        let flags = RolloutFlags {
            canary: Some("alice,bob".into()),
            steps: None,
            max_unavailable: Some(2),
            bake: Some(Duration::from_secs(10)),
        };
        let options = flags.options().expect("valid in the test");
        assert_eq!(options.canary.len(), 2);
        assert_eq!(options.bake_ms, Some(10_000));
        let share = RolloutFlags {
            canary: Some("5%".into()),
            steps: Some("25%, 100%".into()),
            ..RolloutFlags::default()
        };
        let options = share.options().expect("valid in the test");
        assert_eq!(options.canary_percent, Some(5));
        assert_eq!(options.steps, vec![25, 100]);
        for bad in ["Alice", "a..b", "0%", "101%"] {
            let flags = RolloutFlags {
                canary: Some(bad.into()),
                ..RolloutFlags::default()
            };
            let error = flags.options().expect_err("must be refused").to_string();
            assert!(error.starts_with("--canary"), "{error}");
            assert!(!error.contains('\n'));
        }
        let steps = RolloutFlags {
            steps: Some("25".into()),
            ..RolloutFlags::default()
        };
        assert!(steps.options().is_err());
    }
}
