//! The dashboard's pages as maud templates: compiled into the proxy, every value escaped by
//! maud, no inline script or style (the content security policy allows neither). Each page
//! reads whole without JavaScript; `app.js` adds live state, the live log tail and
//! confirmations.

use std::time::Duration;

use maud::{html, Markup, DOCTYPE};
use tenement_proto::api::ApiError;
use tenement_proto::auth::Scope;
use tenement_proto::display::{days_to_civil, human_duration};
use tenement_proto::rpc::{InstanceInfo, InstanceState, ListSort, LogLine, LogStream};
use tenement_proto::ServiceName;

use super::{Filters, Listed, Overview, Viewer, PAGE_ROWS};
use crate::recent::quantile;

fn opt_duration(secs: Option<u64>) -> String {
    secs.map_or_else(|| "-".to_owned(), human_duration)
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn bytes(n: Option<u64>) -> String {
    match n {
        None => "-".to_owned(),
        Some(n) if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        Some(n) if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        Some(n) => format!("{} KiB", n / 1024),
    }
}

/// `2026-12-03 10:00:00 UTC` from milliseconds since the epoch.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (year, month, day) = days_to_civil(i64::try_from(secs / 86_400).unwrap_or(i64::MAX));
    let rest = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60
    )
}

fn state_class(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Running => "ok",
        InstanceState::Starting | InstanceState::Stopping => "busy",
        InstanceState::Unhealthy | InstanceState::Failed => "bad",
        InstanceState::Stopped => "idle",
    }
}

fn scope_words(scope: &Scope) -> String {
    match scope {
        Scope::Admin => "admin".to_owned(),
        Scope::Service(s) => format!("service {s}"),
        Scope::Tenant(i) => format!("tenant {i}"),
    }
}

/// The frame of every page: title, navigation by scope, who is logged in, log out.
fn layout(viewer: Option<&Viewer>, title: &str, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(viewer) = viewer {
                    meta name="csrf" content=(viewer.csrf);
                }
                title { (title) " · tenement" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/static/style.css";
                script src="/static/app.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "tenement" }
                    @if let Some(viewer) = viewer {
                        nav {
                            a href="/" { "Overview" }
                            a href="/tenants" { "Tenants" }
                            @if !matches!(viewer.scope(), Scope::Tenant(_)) {
                                a href="/services" { "Services" }
                            }
                        }
                        form.logout method="post" action="/logout" {
                            span.who {
                                (viewer.token.name.as_deref().unwrap_or(viewer.token.id.as_str()))
                                " · " (scope_words(viewer.scope()))
                                @if viewer.token.read_only { " · read-only" }
                            }
                            input type="hidden" name="csrf" value=(viewer.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
    .into_string()
}

pub fn login(csrf: &str, message: Option<&str>) -> String {
    layout(
        None,
        "Log in",
        html! {
            section.login {
                h1 { "Log in" }
                p { "Paste a token made with " code { "tenctl token create" } "." }
                @if let Some(message) = message {
                    p.error role="alert" { (message) }
                }
                form method="post" action="/login" {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="token" { "Token" }
                    input #token type="password" name="token" autocomplete="off" required
                        placeholder="tnm_...";
                    button type="submit" { "Log in" }
                }
            }
        },
    )
}

pub fn error(viewer: Option<&Viewer>, e: &ApiError) -> String {
    layout(
        viewer,
        "Error",
        html! {
            h1 { "Error " (e.status) }
            p.error role="alert" { (e.message) }
            p { a href="/" { "Back to the overview" } }
        },
    )
}

fn instance_row(info: &InstanceInfo) -> Markup {
    html! {
        tr {
            td { a href={ "/tenants/" (info.instance) } { (info.instance) } }
            td { span class={ "state " (state_class(info.state)) } { (info.state.as_str()) } }
            td { (info.release.map_or_else(|| "-".to_owned(), |r| r.to_string())) }
            td.num { (opt_duration(info.uptime_s)) }
            td.num { (opt_duration(info.idle_s)) }
            td.num { (info.restarts) }
            td.num { (bytes(info.memory_bytes)) }
        }
    }
}

fn instance_table(instances: &[InstanceInfo]) -> Markup {
    html! {
        table.instances {
            thead { tr {
                th { "Instance" } th { "State" } th { "Release" } th { "Uptime" }
                th { "Idle" } th { "Restarts" } th { "Memory" }
            } }
            tbody { @for info in instances { (instance_row(info)) } }
        }
    }
}

pub fn overview(viewer: &Viewer, o: &Overview) -> String {
    let running = o
        .by_state
        .iter()
        .find(|(s, _)| *s == InstanceState::Running)
        .map_or(0, |(_, n)| *n);
    let mut ok: Vec<Duration> = o.wakes.iter().filter(|w| w.ok).map(|w| w.elapsed).collect();
    ok.sort();
    let failed_wakes = o.wakes.iter().filter(|w| !w.ok).count();
    layout(
        Some(viewer),
        "Overview",
        html! {
            h1 { "Overview" }
            section.cards {
                div.card { div.big #running { (running) } div { "running now" } }
                div.card { div.big #registered { (o.registered) } div { "registered" } }
                @for (state, n) in &o.by_state {
                    @if *state != InstanceState::Running {
                        div.card { div.big { (n) } div { (state.as_str()) } }
                    }
                }
            }
            section {
                h2 { "Wakes in the last hour" }
                @if ok.is_empty() && failed_wakes == 0 {
                    p { "No wakes through this proxy in the last hour." }
                } @else {
                    table.compact {
                        tr { th { "Wakes" } td { (ok.len()) } th { "Failed" } td { (failed_wakes) } }
                        tr {
                            th { "p50" } td { (quantile(&ok, 0.5).map_or_else(|| "-".to_owned(), millis)) }
                            th { "p90" } td { (quantile(&ok, 0.9).map_or_else(|| "-".to_owned(), millis)) }
                            th { "p99" } td { (quantile(&ok, 0.99).map_or_else(|| "-".to_owned(), millis)) }
                        }
                    }
                    h3 { "Latest" }
                    table {
                        thead { tr { th { "When" } th { "Instance" } th { "Took" } th { "Result" } } }
                        tbody {
                            @for w in o.wakes.iter().rev().take(10) {
                                tr {
                                    td { (utc(w.at_ms)) }
                                    td { a href={ "/tenants/" (w.instance) } { (w.instance) } }
                                    td.num { (millis(w.elapsed)) }
                                    td { @if w.ok { "ok" } @else { span.state.bad { "failed" } } }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Failed" }
                @if o.failed.is_empty() { p { "None." } } @else { (instance_table(&o.failed)) }
            }
            section {
                h2 { "Most restarts" }
                @if o.restarted.is_empty() { p { "None restarted." } } @else { (instance_table(&o.restarted)) }
            }
            @if !o.rollouts.is_empty() {
                section {
                    h2 { "Rollouts in progress" }
                    table {
                        thead { tr { th { "Service" } th { "Release" } th { "State" } th { "Step" } th { "Moved" } th { "To go" } th { "Failed" } } }
                        tbody {
                            @for (service, r) in &o.rollouts {
                                tr {
                                    td { (service) } td { (r.release) }
                                    td { (r.state) @if let Some(reason) = &r.reason { " (" (reason) ")" } }
                                    td { (r.step) "/" (r.steps) } td.num { (r.moved) } td.num { (r.pending) }
                                    td.num { (r.failed.len()) }
                                }
                            }
                        }
                    }
                }
            }
            @if !o.certificates.is_empty() {
                section {
                    h2 { "Certificates, soonest to expire" }
                    table {
                        thead { tr { th { "Name" } th { "Source" } th { "Days left" } } }
                        tbody {
                            @for (name, source, days) in &o.certificates {
                                tr {
                                    td { (name) } td { (source) }
                                    td.num { @if *days < 14 { span.state.bad { (days) } } @else { (days) } }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

fn tenants_link(filters: &Filters, page: u32) -> String {
    let mut pairs = form_urlencoded::Serializer::new(String::new());
    if !filters.search.is_empty() {
        pairs.append_pair("search", &filters.search);
    }
    if let Some(service) = &filters.service {
        pairs.append_pair("service", service.as_str());
    }
    if let Some(state) = filters.state {
        pairs.append_pair("state", state.as_str());
    }
    if filters.sort != ListSort::Id {
        pairs.append_pair("sort", filters.sort.as_str());
    }
    if page > 0 {
        pairs.append_pair("page", &page.to_string());
    }
    let query = pairs.finish();
    if query.is_empty() {
        "/tenants".to_owned()
    } else {
        format!("/tenants?{query}")
    }
}

pub fn tenants(
    viewer: &Viewer,
    services: &[ServiceName],
    filters: &Filters,
    listed: &Listed,
) -> String {
    let first = filters.page * PAGE_ROWS;
    let last = first + listed.instances.len() as u32;
    let more = last < listed.total;
    layout(
        Some(viewer),
        "Tenants",
        html! {
            h1 { "Tenants" }
            form.filters method="get" action="/tenants" {
                input type="search" name="search" value=(filters.search) placeholder="Search ids"
                    aria-label="Search ids" maxlength="63";
                @if !services.is_empty() {
                    select name="service" aria-label="Service" {
                        option value="" { "All services" }
                        @for s in services {
                            option value=(s) selected[filters.service.as_ref() == Some(s)] { (s) }
                        }
                    }
                }
                select name="state" aria-label="State" {
                    option value="" { "Any state" }
                    @for st in super::STATES {
                        option value=(st.as_str()) selected[filters.state == Some(st)] { (st.as_str()) }
                    }
                }
                select name="sort" aria-label="Order" {
                    @for order in ListSort::ALL {
                        option value=(order.as_str()) selected[filters.sort == order] {
                            "by " (order.as_str())
                        }
                    }
                }
                button type="submit" { "Show" }
            }
            p.count #count {
                @if listed.total == 0 { "No instance matches." }
                @else { (first + 1) "–" (last) " of " (listed.total) }
            }
            @if !listed.instances.is_empty() { (instance_table(&listed.instances)) }
            nav.pages {
                @if filters.page > 0 { a rel="prev" href=(tenants_link(filters, filters.page - 1)) { "← Previous" } }
                @if more { a rel="next" href=(tenants_link(filters, filters.page + 1)) { "Next →" } }
            }
        },
    )
}

fn stream_name(stream: LogStream) -> &'static str {
    match stream {
        LogStream::Stdout => "out",
        LogStream::Stderr => "err",
        LogStream::Event => "event",
    }
}

/// The most of one log line a page shows.
const LINE_CHARS: usize = 2000;
/// The most log text the tenant page holds, so it stays far below 100 KB however long an
/// app's lines are (the live tail adds to it in the browser, not on the server).
const TAIL_BYTES: usize = 48 * 1024;

fn shortened(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(LINE_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]).into(),
        None => text.into(),
    }
}

fn log_line(line: &LogLine) -> Markup {
    html! {
        div class={ "line " (stream_name(line.stream)) } {
            span.ts { (utc(line.ts_ms)) } " " (shortened(&line.line))
        }
    }
}

/// The newest of `lines` that fit in [`TAIL_BYTES`] (at most 200), oldest first.
fn tail<'a>(lines: &[&'a LogLine]) -> Vec<&'a LogLine> {
    let mut budget = TAIL_BYTES;
    let mut kept: Vec<&LogLine> = Vec::new();
    for line in lines.iter().rev().take(200) {
        let cost = line.line.len().min(LINE_CHARS * 4) + 80;
        if cost > budget {
            break;
        }
        budget -= cost;
        kept.push(line);
    }
    kept.reverse();
    kept
}

pub fn tenant(
    viewer: &Viewer,
    info: &InstanceInfo,
    lines: &[LogLine],
    search: &str,
    done: Option<&str>,
) -> String {
    let events: Vec<&LogLine> = lines
        .iter()
        .filter(|l| l.stream == LogStream::Event)
        .collect();
    let shown: Vec<&LogLine> = lines
        .iter()
        .filter(|l| search.is_empty() || l.line.contains(search))
        .collect();
    let tail = tail(&shown);
    let may_act = !viewer.token.read_only;
    let title = info.instance.to_string();
    layout(
        Some(viewer),
        &title,
        html! {
            h1 { (info.instance) }
            @if let Some(done) = done { p.notice role="status" { "Asked to " (done) "." } }
            section #status data-instance=(info.instance) {
                dl.facts {
                    dt { "State" } dd { span #state data-field="state" class={ "state " (state_class(info.state)) } { (info.state.as_str()) } }
                    dt { "Release" } dd data-field="release" { (info.release.map_or_else(|| "-".to_owned(), |r| r.to_string())) }
                    dt { "Address" } dd data-field="address" { (info.address) }
                    dt { "Uptime" } dd data-field="uptime" { (opt_duration(info.uptime_s)) }
                    dt { "Idle" } dd data-field="idle" { (opt_duration(info.idle_s)) }
                    dt { "Restarts" } dd data-field="restarts" { (info.restarts) }
                    dt { "Health" } dd data-field="health" { (info.health) }
                    dt { "Memory" } dd data-field="memory" { (bytes(info.memory_bytes)) }
                    dt { "CPU" } dd data-field="cpu" { (info.cpu_seconds.map_or_else(|| "-".to_owned(), |s| format!("{s:.2} s"))) }
                    dt { "Processes" } dd data-field="pids" { (info.pids.map_or_else(|| "-".to_owned(), |p| p.to_string())) }
                    dt { "Isolation" } dd { (info.isolation) }
                    @if let Some(reason) = &info.reason { dt { "Reason" } dd.error { (reason) } }
                    @if let Some(exit) = &info.last_exit { dt { "Last exit" } dd { (exit) } }
                }
                @if may_act {
                    div.actions {
                        @for (action, label, confirm) in [
                            ("wake", "Wake", "Wake this instance?"),
                            ("restart", "Restart", "Restart this instance? Requests in flight finish first."),
                            ("stop", "Stop", "Stop this instance? The next request wakes it again."),
                        ] {
                            form.act method="post" action={ "/tenants/" (info.instance) "/" (action) } data-confirm=(confirm) {
                                input type="hidden" name="csrf" value=(viewer.csrf);
                                button type="submit" id={ "do-" (action) } { (label) }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Recent events" }
                @if events.is_empty() { p { "None buffered." } }
                @else { div.log { @for line in events.iter().rev().take(10).rev() { (log_line(line)) } } }
            }
            section {
                h2 { "Log" }
                form.filters method="get" {
                    input #log-search type="search" name="search" value=(search) placeholder="Search the log"
                        aria-label="Search the log";
                    button type="submit" { "Search" }
                    span #live.muted {}
                }
                div #log.log data-stream={ "/ui/logs/" (info.instance) } {
                    @for line in &tail { (log_line(line)) }
                }
            }
        },
    )
}

/// Releases a service shows, newest first (`tenctl releases` has them all).
const RELEASES_SHOWN: usize = 30;

/// One service's releases for the services page.
pub struct ServiceReleases {
    pub service: ServiceName,
    pub current: u32,
    pub releases: Vec<tenement_proto::rpc::ReleaseInfo>,
    pub rollout: Option<tenement_proto::rpc::RolloutInfo>,
}

pub fn services(viewer: &Viewer, shown: &[ServiceReleases]) -> String {
    layout(
        Some(viewer),
        "Services",
        html! {
            h1 { "Services and releases" }
            @if shown.is_empty() { p { "No service to show." } }
            @for s in shown {
                section {
                    h2 { (s.service) " " span.muted { "current release " (s.current) } }
                    @if let Some(r) = &s.rollout {
                        p {
                            "Rollout of release " (r.release) ": " (r.state)
                            ", step " (r.step) "/" (r.steps) ", " (r.moved) " moved, " (r.pending) " to go"
                            @if let Some(reason) = &r.reason { " (" (reason) ")" }
                        }
                    }
                    table {
                        thead { tr { th { "Release" } th { "Made" } th { "Origin" } th { "Tenants" } th { "Running" } th { "Changes" } th { "Command" } } }
                        tbody {
                            @for r in s.releases.iter().rev().take(RELEASES_SHOWN) {
                                tr {
                                    td { (r.number) @if r.number == s.current { " (current)" } }
                                    td { (utc(r.created_ms)) } td { (r.origin) }
                                    td.num { (r.tenants) } td.num { (r.running) }
                                    td { @if r.changes.is_empty() { "-" } @else { (r.changes.join(", ")) } }
                                    td { code { (shortened(&r.command)) } }
                                }
                            }
                        }
                    }
                    @if s.releases.len() > RELEASES_SHOWN {
                        p.muted { (s.releases.len() - RELEASES_SHOWN) " older releases: " code { "tenctl releases " (s.service) } }
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dates_read_well() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_764_756_000_000), "2025-12-03 10:00:00 UTC");
        assert_eq!(bytes(Some(3 << 20)), "3.0 MiB");
        assert_eq!(bytes(None), "-");
    }

    #[test]
    fn the_log_tail_stays_small_however_long_the_lines() {
        let long = LogLine {
            ts_ms: 0,
            stream: LogStream::Stdout,
            line: "x".repeat(100_000),
        };
        let lines: Vec<&LogLine> = std::iter::repeat_n(&long, 1000).collect();
        let kept = tail(&lines);
        let html: usize = kept.iter().map(|l| log_line(l).into_string().len()).sum();
        assert!(
            !kept.is_empty() && html < 64 * 1024,
            "{} lines, {html} bytes",
            kept.len()
        );
    }
}
