//! What a hostile app tries against the root supervisor through what the two share: the app's
//! own runtime directory, where the app controls every name and the supervisor (root) later
//! touches paths by name.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::harness::*;

/// With `listen = "unix"` the supervisor moves the app's socket out of the app's directory and
/// opens it to the proxy (chmod, and chown with `proxy_user`) once the app is ready. The app
/// owns the directory the socket is in, so it can put a symlink there instead: the supervisor
/// must neither follow it nor serve it, and the instance is failed for it. `ready = "notify"`
/// makes the timing deterministic (no connect through the path first).
#[test]
fn a_symlink_at_the_apps_socket_path_never_makes_the_supervisor_chmod_its_target() {
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
listen = "unix"
ready = "notify"
idle_timeout = "never"

[service.notes.env]
PROBE_SOCKET_LINK = "@ROOT@/victim"
"#,
    );
    let victim = sb.root.join("victim");
    fs::write(&victim, "root's only\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let _sup = sb.start();
    match sb.admin().spawn("notes:a") {
        tenement_proto::rpc::Response::Error { code, message } => assert!(
            code == tenement_proto::rpc::ErrorCode::InstanceFailed && message.contains("security"),
            "{code:?}: {message}"
        ),
        other => panic!("a symlink was served as the app's socket: {other:?}"),
    }
    assert!(
        !sb.runtime_dir.join("sockets/notes.a.sock").exists(),
        "something was published for the proxy"
    );
    let link = sb.runtime_dir.join("instances/notes.a/http.sock");
    assert!(
        link.symlink_metadata().unwrap().file_type().is_symlink(),
        "the probe did not plant its symlink at {}",
        link.display()
    );
    let (owner, mode) = owner_and_mode(&victim);
    assert_eq!(
        (owner, format!("{mode:o}")),
        (0, "600".to_owned()),
        "the supervisor changed {} through the app's symlink {}",
        victim.display(),
        link.display()
    );
}
