//! Reloading the config under a running supervisor: only what changed is touched, and a bad
//! file changes nothing.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;
use tenement_proto::rpc::{InstanceState, Request, Response};

fn edit(sb: &Sandbox, from: &str, to: &str) {
    let text = std::fs::read_to_string(&sb.config_path).unwrap();
    assert!(text.contains(from), "{from:?} not in the config");
    std::fs::write(&sb.config_path, text.replace(from, to)).unwrap();
}

#[test]
fn reload_restarts_changed_services_stops_removed_ones_and_leaves_the_rest_alone() {
    let sb = Sandbox::new(
        r#"
[service.keep]
command = "@TINY@"
[service.change]
command = "@TINY@"
[service.drop]
command = "@TINY@"
[instances]
keep = ["a"]
change = ["a"]
drop = ["a"]
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    for id in ["keep:a", "change:a", "drop:a"] {
        assert!(matches!(c.wake(id), Response::Woken { .. }), "{id}");
    }
    let keep_pid = c.status("keep:a").pid;
    let change_pid = c.status("change:a").pid;

    edit(
        &sb,
        "[service.change]\n",
        "[service.change]\nstop_grace = \"3s\"\n",
    );
    edit(
        &sb,
        "[service.drop]\ncommand = \"",
        "[service.new]\ncommand = \"",
    );
    edit(&sb, "drop = [\"a\"]", "new = [\"b\"]");
    match c.call(Request::Reload) {
        Response::Reloaded {
            added,
            changed,
            removed,
        } => {
            assert_eq!(
                added.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                ["new"]
            );
            assert_eq!(
                changed.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                ["change"]
            );
            assert_eq!(
                removed.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                ["drop"]
            );
        }
        other => panic!("reload answered {other:?}"),
    }
    assert!(wait_until(EVENT_DEADLINE, || {
        let s = c.status("change:a");
        s.state == InstanceState::Running && s.pid.is_some() && s.pid != change_pid
    }));
    assert!(wait_until(EVENT_DEADLINE, || c.status("drop:a").state
        == InstanceState::Stopped));
    assert_eq!(
        c.status("keep:a").pid,
        keep_pid,
        "an unchanged service is not touched"
    );
    assert_eq!(
        c.status("new:b").state,
        InstanceState::Stopped,
        "declared, registered, asleep"
    );
    assert!(matches!(c.wake("new:b"), Response::Woken { .. }));
    // The removed service's instance cannot be woken any more.
    assert!(matches!(c.wake("drop:a"), Response::Error { .. }));
}

#[test]
fn a_bad_file_is_refused_and_the_running_config_stays() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
[instances]
web = ["a"]
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    assert!(matches!(c.wake("web:a"), Response::Woken { .. }));
    let pid = c.status("web:a").pid;
    edit(
        &sb,
        "[service.web]\n",
        "[service.web]\nidle_timeout = \"soon\"\n",
    );
    match c.call(Request::Reload) {
        Response::Error { message, .. } => {
            assert!(message.contains("config not reloaded"), "{message}");
            assert!(message.contains("idle_timeout"), "{message}");
        }
        other => panic!("reload answered {other:?}"),
    }
    edit(
        &sb,
        "[service.web]\n",
        "[service.web]\nport_range_typo = 1\n",
    );
    assert!(matches!(c.call(Request::Reload), Response::Error { .. }));
    assert_eq!(c.status("web:a").pid, pid, "nothing was touched");
    assert!(matches!(c.wake("web:a"), Response::Woken { .. }));
}
