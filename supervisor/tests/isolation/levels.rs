//! Each isolation level, probed from inside two tenants of one service (`a` and `b`): what `a`
//! can see of itself, of `b` and of the supervisor, against what the level promises.

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tenement_proto::rpc::InstanceInfo;

use crate::harness::*;
use crate::support::{http_get_unix, parent_pid};

/// What the tests learn about the two tenants.
struct Tenants {
    a: Value,
    b: Value,
    a_status: InstanceInfo,
    b_status: InstanceInfo,
    /// The file `b` wrote into its own data directory.
    b_secret: PathBuf,
}

/// Starts `SERVICE:b`, which writes a secret into its data directory, then `SERVICE:a`, and
/// probes `a` against `b` (its port, its host pid, its secret, the supervisor's sockets), then
/// `b`. `extra_a` and `extra_b` go into the two probes.
fn probe_two_tenants(
    sb: &IsoSandbox,
    service: &str,
    extra_a: &[(&str, String)],
    extra_b: &[(&str, String)],
) -> Tenants {
    let (a_id, b_id) = (format!("{service}:a"), format!("{service}:b"));
    let b_addr = sb.spawn(&b_id);
    let wrote = probe(b_addr, &[("data_write", "secret.txt".to_owned())]);
    assert_eq!(field(&wrote, "data_write"), "ok", "b writes its own data");
    let b_secret = sb.instance_data_dir(&b_id).join("secret.txt");
    assert!(
        b_secret.is_file(),
        "b's data is on the host at {}",
        b_secret.display()
    );

    let a_addr = sb.spawn(&a_id);
    let mut admin = sb.admin();
    let a_status = admin.status(&a_id);
    let b_status = admin.status(&b_id);
    let b_pid = app_host_pid(b_status.pid.expect("b runs"));
    let text = |p: &Path| p.to_string_lossy().into_owned();
    let mut query = vec![
        ("neighbour_port", b_addr.port().to_string()),
        ("neighbour_pid", b_pid.to_string()),
        ("neighbour_data", text(&b_secret)),
        ("supervisor_socket", text(&sb.admin_socket())),
        ("supervisor_socket", text(&sb.proxy_socket())),
        (
            "write",
            text(&sb.runtime_dir.join(format!("instances/{service}.a"))),
        ),
        ("write", text(&sb.root)),
    ];
    query.extend(extra_a.iter().cloned());
    let a = probe(a_addr, &query);
    let b = probe(b_addr, extra_b);
    Tenants {
        a,
        b,
        a_status,
        b_status,
        b_secret,
    }
}

/// Traces `a` leaves in the places a namespace makes private (/tmp, /var/tmp, /dev/shm, System
/// V IPC), for `b` and the host to look for. Removed from the host when dropped, in case
/// isolation failed and they landed there.
struct Marks {
    paths: Vec<PathBuf>,
    ipc_key: u32,
}

impl Marks {
    fn new(sb: &IsoSandbox) -> Marks {
        let name = sb.root.file_name().unwrap().to_string_lossy().into_owned();
        let paths = ["/tmp", "/var/tmp", "/dev/shm"]
            .iter()
            .map(|dir| Path::new(dir).join(format!("tenement-probe-mark-{name}")))
            .collect();
        let hash = name
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        Marks {
            paths,
            ipc_key: (hash & 0x0fff_ffff) | 0x1000_0000,
        }
    }

    fn left_by_a(&self) -> Vec<(&'static str, String)> {
        let mut query: Vec<(&str, String)> = self
            .paths
            .iter()
            .map(|p| ("mark", p.to_string_lossy().into_owned()))
            .collect();
        query.push(("ipc_create", self.ipc_key.to_string()));
        query
    }

    fn looked_for_by_b(&self) -> Vec<(&'static str, String)> {
        let mut query: Vec<(&str, String)> = self
            .paths
            .iter()
            .map(|p| ("check", p.to_string_lossy().into_owned()))
            .collect();
        query.push(("ipc_check", self.ipc_key.to_string()));
        query
    }

    /// a could leave them; neither b nor the host sees them.
    fn assert_private(&self, t: &Tenants) {
        for path in &self.paths {
            assert_eq!(
                entry(&t.a, "mark", path),
                "ok",
                "a creates {}",
                path.display()
            );
            assert_eq!(
                entry(&t.b, "check", path),
                false,
                "b sees a's {}",
                path.display()
            );
            assert!(!path.exists(), "a's {} is on the host", path.display());
        }
        assert_eq!(field(&t.a, "ipc_create"), "ok", "a creates a message queue");
        assert_eq!(
            field(&t.b, "ipc_check"),
            "ENOENT",
            "b finds a's message queue (no IPC namespace)"
        );
    }
}

impl Drop for Marks {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = fs::remove_file(path);
        }
    }
}

/// Always: stdin is /dev/null, stdout and stderr the supervisor's pipes, fd 3 the handed-off
/// socket, and the environment holds only what tenement documents (no supervisor variables, no
/// spawn spec). Other inherited descriptors: see
/// `descriptors_the_supervisor_inherited_never_reach_an_app`.
fn assert_clean_start(report: &Value, handed_socket: bool) {
    let who = field(report, "instance");
    let fds = &report["inherited_fds"];
    assert_eq!(fds["0"], "/dev/null", "{who}: stdin");
    for fd in ["1", "2"] {
        assert!(
            fds[fd].as_str().is_some_and(|t| t.starts_with("pipe:")),
            "{who}: fd {fd} is {}",
            fds[fd]
        );
    }
    if handed_socket {
        assert!(
            fds["3"].as_str().is_some_and(|t| t.starts_with("socket:")),
            "{who}: fd 3 is {}",
            fds["3"]
        );
    }
    // What spawn.rs passes: PATH, LANG, LC_ALL, TZ from the supervisor, its own variables, and
    // LC_CTYPE, which Python itself sets when it coerces a C locale (PEP 538).
    let allowed: BTreeSet<&str> = [
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
        "LC_CTYPE",
        "PORT",
        "HOST",
        "SOCKET_PATH",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "TENEMENT_SERVICE",
        "TENEMENT_ID",
        "TENEMENT_INSTANCE",
        "TENEMENT_DATA_DIR",
    ]
    .into_iter()
    .collect();
    let environ: Vec<&str> = report["environ"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let extra: Vec<&&str> = environ.iter().filter(|k| !allowed.contains(**k)).collect();
    assert!(extra.is_empty(), "{who}: unexpected environment {extra:?}");
    assert!(environ.contains(&"TENEMENT_INSTANCE"), "{who}: {environ:?}");
}

/// The uids of both tenants: distinct, from the sandbox's range, the same as the gid, no
/// supplementary groups, and what `tenctl status --json` reports.
fn assert_own_uids(sb: &IsoSandbox, t: &Tenants) -> (u32, u32) {
    let (ua, ub) = (single_uid(&t.a), single_uid(&t.b));
    assert_ne!(ua, ub, "two tenants share a uid");
    for (report, uid, status) in [(&t.a, ua, &t.a_status), (&t.b, ub, &t.b_status)] {
        let who = field(report, "instance");
        assert!(
            (sb.uids.0..=sb.uids.1).contains(&uid),
            "{who} runs as {uid}, outside dynamic_users {:?}",
            sb.uids
        );
        assert_eq!(
            report["gid"],
            serde_json::json!([uid, uid, uid]),
            "{who}: gid"
        );
        assert_eq!(report["groups"], serde_json::json!([]), "{who}: groups");
        assert_eq!(status.uid, Some(uid), "{who}: status uid");
        let tenctl = sb.tenctl_status(who);
        assert_eq!(tenctl.uid, Some(uid), "{who}: tenctl status --json uid");
        assert_eq!(
            tenctl.isolation, status.isolation,
            "{who}: tenctl isolation"
        );
        let data = sb.instance_data_dir(who);
        assert_eq!(
            owner_and_mode(&data),
            (uid, 0o700),
            "{who}: owner and mode of {}",
            data.display()
        );
    }
    (ua, ub)
}

/// What `namespace` promises, and `sandbox` keeps; `writable` is the service's list.
fn assert_namespace_view(sb: &IsoSandbox, t: &Tenants, seccomp: &str, writable: &[PathBuf]) {
    let a = &t.a;
    assert_unprivileged(a, seccomp);
    assert_unprivileged(&t.b, seccomp);
    // Its own PID namespace: a tiny init as PID 1, the app as PID 2, nothing else in /proc.
    assert_eq!(a["pid"], 2, "the app is PID 2");
    assert_eq!(a["ppid"], 1, "under the namespace's init");
    assert_eq!(
        a["proc_pids"],
        serde_json::json!([1, 2]),
        "/proc shows only its own"
    );
    let forks = a["forks"]
        .as_array()
        .unwrap_or_else(|| panic!("forks failed: {}", a["forks"]));
    assert_eq!(forks.len(), 3, "three forks in a row work");
    assert!(forks.iter().all(|p| p.as_u64().unwrap() > 2), "{forks:?}");
    assert_eq!(field(a, "hostname"), "a.notes", "its own UTS namespace");

    // Read-only everywhere except its own directories, the private temporary directories, the
    // empty tmpfs that hide the data root, the state and the sockets, and the namespace's own
    // /proc (whose /proc/sys a root app must not write: users.rs).
    let data = sb.instance_data_dir("notes:a");
    let instance_run = sb.runtime_dir.join("instances/notes.a");
    let writes: Vec<(&Path, &str)> = vec![
        (Path::new("/"), "EROFS"),
        (Path::new("/usr"), "EROFS"),
        (&data, "ok"),
        (Path::new("/tmp"), "ok"),
        (&instance_run, "ok"),
        (&sb.root, "EROFS"),
    ];
    for (path, expected) in writes {
        assert_eq!(
            entry(a, "write", path),
            expected,
            "write in {}",
            path.display()
        );
    }
    let allowed_rw: BTreeSet<PathBuf> = ["/tmp", "/var/tmp", "/dev/shm", "/proc"]
        .iter()
        .map(PathBuf::from)
        .chain([
            sb.data_dir.clone(),
            sb.state_dir.clone(),
            sb.runtime_dir.clone(),
            data.clone(),
            instance_run.clone(),
        ])
        .chain(writable.iter().cloned())
        .collect();
    let mut root_ro = false;
    for mount in a["mounts"].as_array().expect("mounts") {
        let point = PathBuf::from(mount["mount_point"].as_str().unwrap());
        let ro = mount["ro"].as_bool().unwrap();
        if point == Path::new("/") {
            root_ro |= ro;
        }
        assert!(
            ro || allowed_rw.contains(&point),
            "{} is mounted read-write: {mount}",
            point.display()
        );
    }
    assert!(root_ro, "/ is read-only");

    // Only its own service and instance under the data root; the neighbour's files are not
    // there at all; the supervisor's sockets neither.
    assert_eq!(field(a, "data_root"), sb.data_dir.to_string_lossy());
    assert_eq!(a["data_root_listing"], serde_json::json!(["notes"]));
    assert_eq!(a["service_dir_listing"], serde_json::json!(["a"]));
    assert_eq!(field(a, "neighbour_data_read"), "ENOENT");
    for socket in [sb.admin_socket(), sb.proxy_socket()] {
        assert_eq!(
            entry(a, "supervisor_socket_connect", &socket),
            "ENOENT",
            "connect to {}",
            socket.display()
        );
    }
    // The neighbour's host pid does not exist in a's PID namespace.
    assert_eq!(field(a, "neighbour_signal"), "ESRCH");
    // Without CAP_SYS_ADMIN, no mount namespace and no mount.
    assert_eq!(field(a, "unshare_mount"), "EPERM");
    assert_eq!(field(a, "mount"), "EPERM");
    assert_ne!(
        field(a, "proc_sys_open"),
        "ok",
        "/proc/sys opens for writing"
    );
}

#[test]
fn process_level_gives_each_tenant_its_own_uid_and_nothing_else_of_the_neighbours() {
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
isolation = "process"
user = "dynamic"
idle_timeout = "never"
"#,
    );
    let _sup = sb.start();
    let t = probe_two_tenants(&sb, "notes", &[], &[]);
    let a = &t.a;
    assert_clean_start(a, false);
    let (ua, _) = assert_own_uids(&sb, &t);
    assert!(
        t.a_status.isolation.starts_with("process, "),
        "status isolation: {}",
        t.a_status.isolation
    );
    assert_unprivileged(a, "0");
    assert_unprivileged(&t.b, "0");
    // No PID namespace: the probe's pid is its host pid, in its own process group (led by its
    // exec helper), not the supervisor's.
    let a_pid = app_host_pid(t.a_status.pid.expect("a runs"));
    assert_eq!(a["pid"], a_pid, "the app's pid is its host pid");
    let helper = parent_pid(a_pid).expect("the app has a parent");
    assert_eq!(
        a["pgid"], helper,
        "the app is in its exec helper's process group"
    );
    // The neighbour's data: behind a 0700 directory of another uid.
    assert_eq!(field(a, "neighbour_data_read"), "EACCES");
    assert_eq!(
        a["data_root_listing"], "EACCES",
        "the data root lists nobody"
    );
    assert_eq!(
        a["service_dir_listing"], "EACCES",
        "the service dir lists nobody"
    );
    // The neighbour's processes: another uid, no CAP_KILL, no CAP_SYS_PTRACE.
    assert_eq!(field(a, "neighbour_signal"), "EPERM");
    assert_eq!(field(a, "neighbour_ptrace"), "EPERM");
    // Its own directory only.
    let data = sb.instance_data_dir("notes:a");
    assert_eq!(entry(a, "write", &data), "ok");
    assert_eq!(entry(a, "write", Path::new("/")), "EACCES");
    assert_eq!(entry(a, "write", Path::new("/usr")), "EACCES");
    assert_eq!(entry(a, "write", &sb.root), "EACCES");
    assert_eq!(
        entry(a, "write", &sb.runtime_dir.join("instances/notes.a")),
        "ok",
        "its own runtime directory"
    );
    for socket in [sb.admin_socket(), sb.proxy_socket()] {
        assert_eq!(
            entry(a, "supervisor_socket_connect", &socket),
            "EACCES",
            "connect to {}",
            socket.display()
        );
    }
    assert_eq!(field(a, "unshare_mount"), "EPERM");
    assert_eq!(field(a, "mount"), "EPERM");
    // b's secret stays b's.
    assert_eq!(owner_and_mode(&t.b_secret).0, single_uid(&t.b));
    assert_ne!(owner_and_mode(&t.b_secret).0, ua);
}

#[test]
fn namespace_level_shows_each_tenant_only_itself() {
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
idle_timeout = "never"
writable = ["@ROOT@/shared"]
nofile = 512
nproc = 200
"#,
    );
    let shared = sb.root.join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let _sup = sb.start();
    let marks = Marks::new(&sb);
    let mut extra = marks.left_by_a();
    extra.push(("write", shared.to_string_lossy().into_owned()));
    let t = probe_two_tenants(&sb, "notes", &extra, &marks.looked_for_by_b());
    let a = &t.a;
    assert_clean_start(a, false);
    marks.assert_private(&t);
    assert_own_uids(&sb, &t);
    assert!(
        t.a_status.isolation.starts_with("namespace, "),
        "the root default is namespace: {}",
        t.a_status.isolation
    );
    // Seccomp mode 2: the namespace level's one filter refuses new user namespaces.
    assert_namespace_view(&sb, &t, "2", std::slice::from_ref(&shared));
    assert_eq!(entry(a, "write", &shared), "ok", "a `writable` path");
    // Only the user-namespace filter at this level: ptrace of its own child works; the
    // neighbour is not in its PID namespace at all.
    assert_eq!(field(a, "own_child_ptrace"), "ok");
    assert_eq!(field(a, "neighbour_ptrace"), "ESRCH");
    // The host's network (network = "host" is the default below sandbox), but not the
    // neighbour's port: tenants do not connect to each other (nftables, docs/SECURITY.md).
    assert_eq!(field(a, "neighbour_port_connect"), "ECONNREFUSED");
    assert_eq!(field(a, "served_via"), "tcp");
    assert_eq!(a["rlimits"]["nofile"], serde_json::json!([512, 512]));
    assert_eq!(a["rlimits"]["nproc"], serde_json::json!([200, 200]));
}

#[test]
fn sandbox_level_adds_seccomp_and_an_empty_network() {
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
isolation = "sandbox"
listen = "activate"
idle_timeout = "never"
"#,
    );
    let _sup = sb.start();
    let marks = Marks::new(&sb);
    let mut extra = marks.left_by_a();
    // TEST-NET-1: any address off the loopback will do.
    extra.push(("outside", "192.0.2.1:80".to_owned()));
    let t = probe_two_tenants(&sb, "notes", &extra, &marks.looked_for_by_b());
    let a = &t.a;
    assert_clean_start(a, true);
    marks.assert_private(&t);
    assert_own_uids(&sb, &t);
    assert!(
        t.a_status.isolation.starts_with("sandbox, "),
        "status isolation: {}",
        t.a_status.isolation
    );
    assert_namespace_view(&sb, &t, "2", &[]);
    // Served on the socket the supervisor bound outside and handed in as fd 3.
    assert_eq!(field(a, "served_via"), "fd3");
    assert_eq!(field(&t.b, "served_via"), "fd3");
    // network = "none": loopback only; the neighbour's port, the supervisor and the world are
    // out of reach.
    assert_eq!(a["net_interfaces"], serde_json::json!(["lo"]));
    assert_eq!(field(a, "neighbour_port_connect"), "ECONNREFUSED");
    assert_eq!(field(a, "outside_connect"), "ENETUNREACH");
    // The seccomp filter: EPERM even where the kernel would allow it (its own child, a user
    // namespace, the keyring), however the call is made: a user namespace through unshare(2),
    // clone(2), clone3(2) (ENOSYS is fine there: libc falls back to clone) or the x32 syscall
    // ABI (ENOSYS where the kernel has none).
    let expected: &[(&str, &[&str])] = &[
        ("own_child_ptrace", &["EPERM"]),
        ("neighbour_ptrace", &["EPERM"]),
        ("keyctl", &["EPERM"]),
        ("unshare_user", &["EPERM"]),
        ("clone_newuser", &["EPERM"]),
        ("clone3_newuser", &["EPERM", "ENOSYS"]),
        ("x32_unshare_user", &["EPERM", "ENOSYS"]),
    ];
    let allowed: Vec<String> = expected
        .iter()
        .filter(|(key, ok)| !ok.contains(&field(a, key)))
        .map(|(key, ok)| format!("{key} = {} (expected {})", field(a, key), ok.join(" or ")))
        .collect();
    assert!(
        allowed.is_empty(),
        "the sandbox's seccomp filter lets through: {}",
        allowed.join("; ")
    );
}

#[test]
fn a_sandboxed_app_is_served_over_its_unix_socket() {
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
isolation = "sandbox"
listen = "unix"
idle_timeout = "never"
"#,
    );
    let _sup = sb.start();
    let route = crate::support::expect_woken(sb.admin().spawn("notes:a")).0;
    let socket = match &route.address {
        tenement_proto::rpc::Address::Unix(path) => PathBuf::from(path),
        other => panic!("expected a Unix socket, got {other}"),
    };
    let (status, body) = http_get_unix(&socket, "/probe");
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(field(&report, "served_via"), "unix");
    assert_clean_start(&report, false);
    assert_eq!(report["net_interfaces"], serde_json::json!(["lo"]));
    assert_unprivileged(&report, "2");
    let uid = single_uid(&report);
    assert_eq!(
        owner_and_mode(&socket).0,
        uid,
        "the app bound its own socket"
    );
}

/// `a` of a namespace service and `b` of a sandbox service: the sandboxed one cannot reach a
/// neighbour that lives on the host network either.
#[test]
fn a_sandboxed_tenant_cannot_reach_a_host_network_neighbour() {
    let sb = IsoSandbox::new(
        r#"
[service.open]
command = "@PROBE@"
idle_timeout = "never"

[service.closed]
command = "@PROBE@"
isolation = "sandbox"
listen = "activate"
idle_timeout = "never"
"#,
    );
    let _sup = sb.start();
    let open: SocketAddr = sb.spawn("open:a");
    let closed = sb.spawn("closed:a");
    let from_closed = probe(closed, &[("neighbour_port", open.port().to_string())]);
    assert_eq!(
        field(&from_closed, "neighbour_port_connect"),
        "ECONNREFUSED"
    );
    let from_open = probe(open, &[("neighbour_port", closed.port().to_string())]);
    // The sandboxed app's socket was bound outside, on the host's loopback, where the proxy
    // reaches it; a tenant does not: the supervisor's nftables rules refuse one tenant's
    // connection to another's port (docs/SECURITY.md).
    assert_eq!(field(&from_open, "neighbour_port_connect"), "ECONNREFUSED");
}

/// Whatever the supervisor's parent left open (a shell, a process manager), an app gets only
/// its standard descriptors and its socket: here a root-only file, read-write, on fd 9.
#[test]
fn descriptors_the_supervisor_inherited_never_reach_an_app() {
    let sb = IsoSandbox::new(
        r#"
[service.proc]
command = "@PROBE@"
isolation = "process"
idle_timeout = "never"

[service.ns]
command = "@PROBE@"
idle_timeout = "never"

[service.box]
command = "@PROBE@"
isolation = "sandbox"
listen = "activate"
idle_timeout = "never"
"#,
    );
    let secret = sb.root.join("root-only");
    fs::write(&secret, "root's\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let _sup = sb.start_with_open_fd(&secret);
    for (instance, handed_socket) in [("proc:a", false), ("ns:a", false), ("box:a", true)] {
        let report = probe(sb.spawn(instance), &[]);
        let fds = report["inherited_fds"].as_object().unwrap();
        let mut expected = vec!["0", "1", "2"];
        if handed_socket {
            expected.push("3");
        }
        let open: BTreeSet<&str> = fds.keys().map(String::as_str).collect();
        assert_eq!(
            open,
            expected.into_iter().collect(),
            "{instance}: descriptors open at exec: {fds:?}"
        );
    }
}

/// `sandbox` means `network = "none"`, so TCP the app binds itself could never be reached: the
/// start fails with the fix in the message instead of running an unreachable app.
#[test]
fn a_sandbox_over_tcp_fails_to_start_with_the_fix() {
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
isolation = "sandbox"
idle_timeout = "never"
"#,
    );
    let _sup = sb.start();
    let message = crate::support::expect_error(
        sb.admin().spawn("notes:a"),
        tenement_proto::rpc::ErrorCode::WakeFailed,
    );
    assert!(
        message.contains(r#"listen = "activate""#),
        "the error names the fix: {message}"
    );
    assert!(sb.leftover_processes().is_empty(), "nothing was started");
}
