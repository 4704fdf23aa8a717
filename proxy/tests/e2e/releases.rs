//! Releases and rollouts through the real tenctl, supervisor and proxy (docs/DEPLOYS.md).
//!
//! The service runs `./tiny-http` in `workdir = "current"`, a symlink to `releases/N`: each
//! release directory holds its own copy of the binary and a `VERSION` file that `/version`
//! answers with, so which release serves a tenant is visible from outside. `migrate` appends
//! the release's version to the tenant's `migrations` file and fails when the tenant's data
//! directory holds `fail-migrate`; `snapshot = true` copies the data directory before it.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::net::SocketAddr;

use serde_json::Value;

use crate::support::*;

const APPS: &str = r#"
[service.notes]
command = "./tiny-http"
workdir = "current"
ready = "tcp"
health = "/health"
health_interval = "1s"
rollout_bake = "1s"
snapshot = true
migrate = "sh -c 'cat VERSION >> {data_dir}/{id}/migrations && test ! -e {data_dir}/{id}/fail-migrate'"
"#;

/// `releases/N` with a copy of tiny-http (a copy, so each release's program is its own file)
/// and `VERSION`, and `current` pointing at it.
fn release_dir(sandbox: &Sandbox, n: u32) {
    let dir = sandbox.root.join(format!("releases/{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tiny_http(), dir.join("tiny-http")).unwrap();
    std::fs::write(dir.join("VERSION"), format!("{n}\n")).unwrap();
    point_current_at(sandbox, n);
}

fn point_current_at(sandbox: &Sandbox, n: u32) {
    let link = sandbox.root.join("current");
    let tmp = sandbox.root.join("current.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("releases/{n}"), &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
}

/// What `/version` of a tenant answers (retried while the proxy reconnects to a restarted
/// supervisor).
fn version(sandbox: &Sandbox, tenant: &str) -> String {
    let host = format!("{tenant}.notes.localhost");
    let mut last = String::new();
    let answered = wait_until(EVENT_DEADLINE, || {
        match try_get(sandbox.proxy_addr, &host, "/version") {
            Ok(reply) if reply.status() == 200 => {
                last = reply.text().trim().to_owned();
                true
            }
            Ok(reply) => {
                last = format!("{} {}", reply.status(), reply.text());
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    assert!(answered, "GET http://{host}/version: {last}");
    last
}

fn releases(sandbox: &Sandbox) -> Value {
    serde_json::from_str(&tenctl_ok(sandbox, &["releases", "notes", "--json"])).unwrap()
}

fn rollout_state(sandbox: &Sandbox) -> String {
    releases(sandbox)["rollout"]["state"]
        .as_str()
        .unwrap_or("none")
        .to_owned()
}

/// Until the rollout is in `state`; the last releases document.
fn wait_rollout(sandbox: &Sandbox, state: &str, within: Duration) -> Value {
    let mut last = Value::Null;
    let reached = wait_until(within, || {
        last = releases(sandbox);
        last["rollout"]["state"] == state
    });
    assert!(reached, "rollout never {state}: {last:#}");
    last
}

fn migrations(sandbox: &Sandbox, tenant: &str) -> String {
    std::fs::read_to_string(
        sandbox
            .data_dir
            .join("notes")
            .join(tenant)
            .join("migrations"),
    )
    .unwrap_or_default()
}

/// Each tenant's target release, from `ps --json`.
fn targets(sandbox: &Sandbox) -> BTreeMap<String, u64> {
    let ps: Value = serde_json::from_str(&tenctl_ok(sandbox, &["ps", "--json"])).unwrap();
    ps.as_array()
        .or_else(|| ps["instances"].as_array())
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_owned(),
                i["target_release"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn with_instances(ids: &[String]) -> String {
    let quoted: Vec<String> = ids.iter().map(|id| format!("{id:?}")).collect();
    format!("{APPS}\n[instances]\nnotes = [{}]\n", quoted.join(", "))
}

#[test]
fn a_rollout_switches_running_tenants_one_at_a_time_without_failing_a_request() {
    let ids: Vec<String> = (0..20).map(|n| format!("t{n}")).collect();
    let sandbox = Sandbox::new(&with_instances(&ids));
    release_dir(&sandbox, 1);
    let (_supervisor, _proxy) = sandbox.start();
    let running: Vec<String> = ids[..5].to_vec();
    for tenant in &running {
        assert_eq!(version(&sandbox, tenant), "1");
        assert_eq!(migrations(&sandbox, tenant), "1\n", "migrate ran once");
    }

    // A client loop on each running tenant, all through the rollout.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let clients: Vec<_> = running
        .iter()
        .map(|tenant| {
            let (stop, seen, failures) = (stop.clone(), seen.clone(), failures.clone());
            let (addr, host) = (sandbox.proxy_addr, format!("{tenant}.notes.localhost"));
            let tenant = tenant.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match try_get(addr, &host, "/version") {
                        Ok(reply) if reply.status() == 200 => {
                            let v = reply.text().trim().to_owned();
                            seen.lock().unwrap().push((tenant.clone(), v));
                        }
                        Ok(reply) => failures.lock().unwrap().push(format!(
                            "{tenant}: {} {}",
                            reply.status(),
                            reply.text()
                        )),
                        Err(e) => failures.lock().unwrap().push(format!("{tenant}: {e}")),
                    }
                }
            })
        })
        .collect();

    release_dir(&sandbox, 2);
    let said = tenctl_ok(&sandbox, &["deploy", "notes"]);
    assert!(said.contains("rollout of release 2: running"), "{said}");
    // Never more than one tenant switching at a time.
    let mut most = 0;
    let done = wait_until(Duration::from_secs(120), || {
        let doc = releases(&sandbox);
        most = most.max(doc["rollout"]["switching"].as_array().map_or(0, Vec::len));
        doc["rollout"]["state"] == "done"
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    assert!(done, "{:#}", releases(&sandbox));
    assert_eq!(most, 1, "at most one tenant switches at a time");
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    // Every running tenant went from 1 to 2, once.
    let seen = seen.lock().unwrap();
    for tenant in &running {
        let mut versions: Vec<&str> = seen
            .iter()
            .filter(|(t, _)| t == tenant)
            .map(|(_, v)| v.as_str())
            .collect();
        versions.dedup();
        assert_eq!(
            versions,
            ["1", "2"],
            "{tenant}: never 1 again once 2 answered"
        );
        assert_eq!(migrations(&sandbox, tenant), "1\n2\n", "{tenant}");
    }
    // The sleeping ones come up on release 2 at their next request, migrated once.
    for tenant in &ids[5..] {
        assert_eq!(version(&sandbox, tenant), "2", "{tenant}");
        assert_eq!(migrations(&sandbox, tenant), "2\n", "{tenant}");
    }
    let doc = releases(&sandbox);
    assert_eq!(doc["current"], 2);
    assert_eq!(doc["releases"][1]["origin"], "deploy");
    assert_eq!(
        doc["releases"][1]["changes"],
        serde_json::json!(["command", "workdir"])
    );
    assert_eq!(doc["releases"][1]["tenants"], 20);
    assert_eq!(doc["rollout"]["moved"], 20);
    // The supervisor's log has one event per switch.
    let log = sandbox.supervisor_log();
    let switches = log.matches("switched from release 1 to 2").count();
    assert!(switches >= 5, "{switches} switch events in\n{log}");
    let text = tenctl_ok(&sandbox, &["releases", "notes"]);
    assert!(text.starts_with("notes: current release 2"), "{text}");
    let ps = tenctl_ok(&sandbox, &["ps"]);
    assert!(ps.contains("RELEASE"), "{ps}");
}

#[test]
fn a_failing_migrate_sends_that_tenant_back_and_pauses_then_resume_finishes() {
    let ids: Vec<String> = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
    let sandbox = Sandbox::new(&with_instances(&ids));
    release_dir(&sandbox, 1);
    let _supervisor = sandbox.start_supervisor();
    let metrics = SocketAddr::from(([127, 0, 0, 1], sandbox.spare_port()));
    let mut command = sandbox.proxy_command();
    command.arg("--metrics-listen").arg(metrics.to_string());
    let _proxy = sandbox.start_proxy_with(command);
    crate::tls::accepting(metrics);
    for tenant in &ids {
        assert_eq!(version(&sandbox, tenant), "1");
    }
    let b_data = sandbox.data_dir.join("notes/b");
    std::fs::write(b_data.join("notes.txt"), "b's data").unwrap();
    std::fs::write(b_data.join("fail-migrate"), "").unwrap();

    release_dir(&sandbox, 2);
    tenctl_ok(&sandbox, &["deploy", "notes"]);
    let doc = wait_rollout(&sandbox, "paused", Duration::from_secs(60));
    assert_eq!(
        doc["rollout"]["failed"][0]["instance"], "notes:b",
        "{doc:#}"
    );
    let reason = doc["rollout"]["reason"].as_str().unwrap();
    assert!(reason.contains("migrate for release 2 failed"), "{reason}");
    // a moved, b is back on 1 with its data, c was not touched.
    assert_eq!(version(&sandbox, "a"), "2");
    assert_eq!(version(&sandbox, "b"), "1");
    assert_eq!(version(&sandbox, "c"), "1");
    // b's data is the copy taken before its migrate: the failed migrate's line is gone, and
    // what it left is kept aside.
    assert_eq!(
        std::fs::read_to_string(b_data.join("notes.txt")).unwrap(),
        "b's data"
    );
    assert_eq!(migrations(&sandbox, "b"), "1\n");
    let failed = sandbox.data_dir.join("notes/.b.failed/migrations");
    assert_eq!(std::fs::read_to_string(failed).unwrap(), "1\n2\n");
    let log = tenctl_ok(&sandbox, &["logs", "notes:b"]);
    assert!(
        log.contains("data directory restored from the copy taken before release 2's migrate"),
        "{log}"
    );
    let t = targets(&sandbox);
    assert_eq!((t["a"], t["b"], t["c"]), (2, 1, 1));
    let text = tenctl_ok(&sandbox, &["rollout", "status", "notes"]);
    assert!(text.contains("failed: notes:b: "), "{text}");
    // The metrics say so too.
    let scraped = get(metrics, "metrics", "/metrics").text();
    for series in [
        "tenement_rollout_paused{service=\"notes\"} 1",
        "tenement_rollout_release{service=\"notes\"} 2",
        "tenement_release_current{service=\"notes\"} 2",
        "tenement_rollout_tenants{service=\"notes\",status=\"failed\"} 1",
        "tenement_rollout_tenants{service=\"notes\",status=\"moved\"} 2",
        "tenement_restarts_total{service=\"notes\",reason=\"rollout\"} 2",
    ] {
        assert!(scraped.contains(series), "{series} not in\n{scraped}");
    }

    // Bad input while paused: one line, nothing changed.
    for (args, says) in [
        (&["deploy", "notes"][..], "rolling out release 2 (paused)"),
        (&["rollback", "notes", "--to", "9"][..], "has no release 9"),
        (&["pin", "notes:a", "7"][..], "has no release 7"),
    ] {
        let out = tenctl(&sandbox, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
    assert_eq!(targets(&sandbox), t);

    // Fixed: resume tries b again and finishes; a's migrate never ran twice.
    std::fs::remove_file(b_data.join("fail-migrate")).unwrap();
    tenctl_ok(&sandbox, &["rollout", "resume", "notes"]);
    wait_rollout(&sandbox, "done", Duration::from_secs(60));
    for tenant in &ids {
        assert_eq!(version(&sandbox, tenant), "2", "{tenant}");
    }
    assert_eq!(migrations(&sandbox, "a"), "1\n2\n");
    assert_eq!(
        migrations(&sandbox, "b"),
        "1\n2\n",
        "the failed run was undone"
    );
    assert_eq!(migrations(&sandbox, "c"), "1\n2\n");
}

#[test]
fn canaries_pins_rollback_and_a_supervisor_killed_mid_rollout() {
    let ids: Vec<String> = (0..10).map(|n| format!("t{n}")).collect();
    let sandbox = Sandbox::new(&with_instances(&ids));
    release_dir(&sandbox, 1);
    let supervisor = sandbox.start_supervisor();
    let _proxy = sandbox.start_proxy();
    tenctl_ok(&sandbox, &["pin", "notes:t9", "1"]);

    // A canary by list: those two move, then a pause.
    release_dir(&sandbox, 2);
    tenctl_ok(&sandbox, &["deploy", "notes", "--canary", "t1,t2"]);
    wait_rollout(&sandbox, "paused", Duration::from_secs(30));
    let moved: BTreeSet<String> = targets(&sandbox)
        .into_iter()
        .filter(|(_, r)| *r == 2)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        moved,
        ["t1", "t2"].iter().map(|s| (*s).to_owned()).collect()
    );
    assert_eq!(version(&sandbox, "t1"), "2");
    assert_eq!(version(&sandbox, "t3"), "1");

    // The supervisor killed outright mid-rollout comes back with it paused where it was.
    supervisor.signal(nix::sys::signal::Signal::SIGKILL);
    supervisor.wait_exit(Duration::from_secs(10));
    let _supervisor = sandbox.start_supervisor();
    assert_eq!(rollout_state(&sandbox), "paused");
    tenctl_ok(&sandbox, &["rollout", "resume", "notes"]);
    wait_rollout(&sandbox, "done", Duration::from_secs(30));
    let t = targets(&sandbox);
    assert!(ids[..9].iter().all(|id| t[id] == 2), "{t:?}");
    assert_eq!(t["t9"], 1, "pinned");
    assert_eq!(version(&sandbox, "t9"), "1");
    let status = tenctl_ok(&sandbox, &["status", "notes:t9"]);
    assert!(status.contains("(pinned to 1)"), "{status}");

    // Rollback by a share: the same tenants are the canary twice in a row.
    let canary = |sandbox: &Sandbox| -> BTreeSet<String> {
        tenctl_ok(sandbox, &["rollback", "notes", "--canary", "40%"]);
        wait_rollout(sandbox, "paused", Duration::from_secs(30));
        targets(sandbox)
            .into_iter()
            .filter(|(id, r)| *r == 1 && id != "t9")
            .map(|(id, _)| id)
            .collect()
    };
    let first = canary(&sandbox);
    assert!(!first.is_empty() && first.len() < 9, "{first:?}");
    tenctl_ok(&sandbox, &["rollout", "abort", "notes"]);
    let t = targets(&sandbox);
    assert!(
        ids[..9].iter().all(|id| t[id] == 2),
        "abort moved them back: {t:?}"
    );
    let second = canary(&sandbox);
    assert_eq!(first, second);
    tenctl_ok(&sandbox, &["rollout", "resume", "notes"]);
    let doc = wait_rollout(&sandbox, "done", Duration::from_secs(30));
    assert_eq!(doc["current"], 1);
    assert!(targets(&sandbox).values().all(|r| *r == 1));
    assert_eq!(version(&sandbox, "t4"), "1");
    // Migrations run forward only: t1 ran release 2's; back on 1, nothing runs, and its data
    // (kept: a rollback is not a failure) is not restored from the snapshot.
    assert_eq!(migrations(&sandbox, "t1"), "2\n");
    assert_eq!(version(&sandbox, "t1"), "1");
    assert_eq!(migrations(&sandbox, "t1"), "2\n");

    // A reload that changes the definition is a release of its own, rolled out.
    let config = std::fs::read_to_string(&sandbox.config_path).unwrap();
    let changed = config.replace(
        "[instances]",
        "[service.notes.env]\nFIXTURE_MARK = \"3\"\n\n[instances]",
    );
    std::fs::write(&sandbox.config_path, changed).unwrap();
    tenctl_ok(&sandbox, &["reload"]);
    let doc = wait_rollout(&sandbox, "done", Duration::from_secs(30));
    assert_eq!(doc["current"], 3);
    assert_eq!(doc["releases"][2]["origin"], "reload");
    assert_eq!(doc["releases"][2]["changes"], serde_json::json!(["env"]));
    // Nothing changed since: deploy refuses; unpin follows the current release.
    let out = tenctl(&sandbox, &["deploy", "notes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to deploy"));
    tenctl_ok(&sandbox, &["unpin", "notes:t9"]);
    assert_eq!(targets(&sandbox)["t9"], 3);
    // Usage errors: exit 2.
    for args in [
        &["deploy", "notes", "--weight", "5"][..],
        &["deploy", "notes:x", "--canary", "a"][..],
        &["deploy", "notes", "--canary", "0%"][..],
        &["deploy", "notes", "--steps", "50%,25%"][..],
    ] {
        let out = tenctl(&sandbox, args);
        let code = out.status.code();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            code == Some(2) || code == Some(1),
            "{args:?}: {code:?} {stderr}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
    assert!(Path::new(&sandbox.root.join("current")).exists());
}

#[test]
fn a_definition_changed_while_the_supervisor_was_away_is_a_release_at_its_start() {
    let sandbox = Sandbox::new(&with_instances(&["a".to_owned()]));
    release_dir(&sandbox, 1);
    let supervisor = sandbox.start_supervisor();
    let _proxy = sandbox.start_proxy();
    assert_eq!(version(&sandbox, "a"), "1");
    supervisor.terminate(Duration::from_secs(20));
    // `current` moved while it was stopped: the definition it resolves to is new.
    release_dir(&sandbox, 2);
    let _supervisor = sandbox.start_supervisor();
    let doc = wait_rollout(&sandbox, "done", Duration::from_secs(30));
    assert_eq!(doc["current"], 2);
    assert_eq!(doc["releases"][1]["origin"], "config");
    assert_eq!(version(&sandbox, "a"), "2");
    assert_eq!(migrations(&sandbox, "a"), "1\n2\n");
}
