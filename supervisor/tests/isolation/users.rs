//! Who an app runs as: a dynamic uid of its own (distinct, stable, owning its data), or root
//! without any capability when the service says `user = "root"`.

use std::path::Path;

use tenement_proto::rpc::Response;

use crate::harness::*;
use crate::support::expect_woken;

const NOTES_AND_WIKI: &str = r#"
[service.notes]
command = "@PROBE@"
idle_timeout = "never"

[service.wiki]
command = "@PROBE@"
idle_timeout = "never"
"#;

/// The uid `instance` runs as, asked of the app, checked against status and its directories.
fn uid_of(sb: &IsoSandbox, instance: &str) -> u32 {
    let report = probe(sb.spawn(instance), &[]);
    let uid = single_uid(&report);
    assert_eq!(
        sb.admin().status(instance).uid,
        Some(uid),
        "{instance}: status uid"
    );
    let data = sb.instance_data_dir(instance);
    assert_eq!(
        owner_and_mode(&data),
        (uid, 0o700),
        "{instance}: {}",
        data.display()
    );
    let id = crate::support::iid(instance);
    let run = sb
        .runtime_dir
        .join("instances")
        .join(format!("{}.{}", id.service, id.id));
    assert_eq!(owner_and_mode(&run).0, uid, "{instance}: {}", run.display());
    uid
}

#[test]
fn tenants_never_share_a_uid_and_status_shows_the_one_they_run_as() {
    let sb = IsoSandbox::new(NOTES_AND_WIKI);
    let _sup = sb.start();
    let instances = ["notes:a", "notes:b", "wiki:a"];
    let mut seen = std::collections::BTreeSet::new();
    for instance in instances {
        let uid = uid_of(&sb, instance);
        assert!((sb.uids.0..=sb.uids.1).contains(&uid), "{instance}: {uid}");
        assert!(
            seen.insert(uid),
            "{instance} got a uid already in use: {uid}"
        );
        let tenctl = sb.tenctl_status(instance);
        assert_eq!(tenctl.uid, Some(uid), "{instance}: tenctl status --json");
        assert!(
            tenctl.isolation.starts_with("namespace, "),
            "{instance}: isolation {}",
            tenctl.isolation
        );
    }
}

#[test]
fn dynamic_uids_come_from_the_default_range_without_dynamic_users() {
    let sb = IsoSandbox::with_default_uids(NOTES_AND_WIKI);
    let _sup = sb.start();
    let (a, b) = (uid_of(&sb, "notes:a"), uid_of(&sb, "notes:b"));
    assert_ne!(a, b);
    for uid in [a, b] {
        assert!(
            (61184..=65519).contains(&uid),
            "{uid} is outside 61184-65519"
        );
    }
}

#[test]
fn a_dynamic_uid_is_stable_across_restarts_of_the_instance_and_the_supervisor() {
    let sb = IsoSandbox::new(NOTES_AND_WIKI);
    let sup = sb.start();
    let a = uid_of(&sb, "notes:a");
    let b = uid_of(&sb, "notes:b");
    let first_pid = sb.admin().status("notes:a").pid;
    expect_woken(sb.admin().restart("notes:a"));
    assert_ne!(sb.admin().status("notes:a").pid, first_pid, "a new process");
    assert_eq!(uid_of(&sb, "notes:a"), a, "after a restart of the instance");
    assert!(sup.terminate().success(), "{}", sb.supervisor_log());
    let _sup = sb.start();
    assert_eq!(
        uid_of(&sb, "notes:b"),
        b,
        "b after a restart of the supervisor"
    );
    assert_eq!(
        uid_of(&sb, "notes:a"),
        a,
        "a after a restart of the supervisor"
    );
}

/// `rm` without `--purge` keeps the data directory, owned by the removed tenant's uid. Handing
/// that uid to the next tenant gives it the old tenant's files.
#[test]
fn a_removed_tenants_kept_data_is_not_readable_by_the_next_tenant() {
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
isolation = "process"
idle_timeout = "never"
"#,
    );
    let _sup = sb.start();
    let old = probe(
        sb.spawn("notes:a"),
        &[("data_write", "secret.txt".to_owned())],
    );
    assert_eq!(field(&old, "data_write"), "ok");
    let old_uid = single_uid(&old);
    let secret = sb.instance_data_dir("notes:a").join("secret.txt");
    assert_eq!(sb.admin().remove("notes:a", false), Response::Ok);
    assert!(secret.is_file(), "rm without purge keeps the data");

    let next = probe(
        sb.spawn("notes:c"),
        &[("neighbour_data", secret.to_string_lossy().into_owned())],
    );
    let next_uid = single_uid(&next);
    assert_eq!(
        field(&next, "neighbour_data_read"),
        "EACCES",
        "notes:c (uid {next_uid}) reads the data notes:a (uid {old_uid}) left behind"
    );
}

/// A tenant removed without purge and added again finds its data as it left it.
#[test]
fn a_re_added_tenant_can_still_read_its_own_kept_data() {
    let sb = IsoSandbox::new(NOTES_AND_WIKI);
    let _sup = sb.start();
    let wrote = probe(
        sb.spawn("notes:a"),
        &[("data_write", "secret.txt".to_owned())],
    );
    assert_eq!(field(&wrote, "data_write"), "ok");
    assert_eq!(sb.admin().remove("notes:a", false), Response::Ok);
    // Another tenant arrives meanwhile, then a comes back.
    sb.spawn("notes:c");
    let secret = sb.instance_data_dir("notes:a").join("secret.txt");
    let back = probe(
        sb.spawn("notes:a"),
        &[("read", secret.to_string_lossy().into_owned())],
    );
    assert_eq!(
        entry(&back, "read", &secret),
        "ok",
        "notes:a (now uid {}) cannot read its own file, owned by uid {}",
        single_uid(&back),
        owner_and_mode(&secret).0
    );
}

/// `user = "root"` keeps uid 0, but not one capability: the DAC checks, kill(2) and mount(2)
/// treat it like anyone else.
#[test]
fn user_root_keeps_uid_0_without_any_capability() {
    let sb = IsoSandbox::new(
        r#"
[service.admin]
command = "@PROBE@"
isolation = "process"
user = "root"
idle_timeout = "never"

[service.notes]
command = "@PROBE@"
isolation = "process"
idle_timeout = "never"
"#,
    );
    let _sup = sb.start();
    let tenant = sb.spawn("notes:b");
    let wrote = probe(tenant, &[("data_write", "secret.txt".to_owned())]);
    assert_eq!(field(&wrote, "data_write"), "ok");
    let tenant_pid = app_host_pid(sb.admin().status("notes:b").pid.unwrap());
    let secret = sb.instance_data_dir("notes:b").join("secret.txt");

    let report = probe(
        sb.spawn("admin:a"),
        &[
            ("neighbour_pid", tenant_pid.to_string()),
            ("neighbour_data", secret.to_string_lossy().into_owned()),
        ],
    );
    assert_eq!(report["uid"], serde_json::json!([0, 0, 0]));
    assert_eq!(report["gid"], serde_json::json!([0, 0, 0]));
    assert_unprivileged(&report, "0");
    // No CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, CAP_KILL, CAP_SYS_PTRACE, CAP_SYS_ADMIN.
    assert_eq!(field(&report, "neighbour_data_read"), "EACCES");
    assert_eq!(field(&report, "neighbour_signal"), "EPERM");
    assert_eq!(field(&report, "neighbour_ptrace"), "EPERM");
    assert_eq!(field(&report, "unshare_mount"), "EPERM");
    assert_eq!(field(&report, "mount"), "EPERM");
    // The data directory of a root app is root's.
    assert_eq!(owner_and_mode(&sb.instance_data_dir("admin:a")), (0, 0o700));
    // What it runs as is shown like any other uid.
    let status = sb.tenctl_status("admin:a");
    assert!(
        status.isolation.starts_with("process, "),
        "{}",
        status.isolation
    );
    assert_eq!(
        status.uid,
        Some(0),
        "tenctl status --json shows no uid for a root app"
    );
}

/// `user = "NAME"`: that account's uid and primary gid, no supplementary groups.
#[test]
fn a_named_user_runs_the_app_as_that_account() {
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("the nobody account exists on Debian");
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
user = "nobody"
idle_timeout = "never"
"#,
    );
    let _sup = sb.start();
    let report = probe(sb.spawn("notes:a"), &[]);
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    assert_eq!(report["uid"], serde_json::json!([uid, uid, uid]));
    assert_eq!(report["gid"], serde_json::json!([gid, gid, gid]));
    assert_eq!(report["groups"], serde_json::json!([]));
    assert_unprivileged(&report, "2"); // namespace level: no user namespaces
    assert_eq!(
        owner_and_mode(&sb.instance_data_dir("notes:a")),
        (uid, 0o700)
    );
    assert_eq!(
        sb.tenctl_status("notes:a").uid,
        Some(uid),
        "tenctl status --json shows no uid for a named user"
    );
}

/// The namespace level's read-only file system includes the kernel's settings: a root app
/// without capabilities must not be able to write /proc/sys (core_pattern, for one, names a
/// program the kernel runs as full root on the next crash).
#[test]
fn a_root_app_in_a_namespace_cannot_write_kernel_settings() {
    let sb = IsoSandbox::new(
        r#"
[service.admin]
command = "@PROBE@"
user = "root"
idle_timeout = "never"
"#,
    );
    let _sup = sb.start();
    let report = probe(sb.spawn("admin:a"), &[]);
    assert_eq!(report["uid"], serde_json::json!([0, 0, 0]));
    assert_unprivileged(&report, "2"); // namespace level: no user namespaces
    assert_eq!(entry(&report, "write", Path::new("/")), "EROFS");
    assert_eq!(entry(&report, "write", Path::new("/usr")), "EROFS");
    let proc_sys = field(&report, "proc_sys_open");
    assert!(
        proc_sys == "EROFS" || proc_sys == "EACCES",
        "/proc/sys/kernel/core_pattern opens for writing in a root app's namespace: {proc_sys}"
    );
    let sysrq = field(&report, "proc_sysrq_trigger_open");
    assert!(
        sysrq != "ok",
        "/proc/sysrq-trigger opens for writing in a root app's namespace"
    );
}
