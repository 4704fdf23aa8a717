//! The supervisor as the only judge of management API tokens, over its real sockets: tokens
//! minted on the admin socket, calls made through the proxy role with a credential, scopes
//! enforced on every call and stream, revocation at once, hashes only on disk, and failed
//! checks limited per address.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tenement_proto::auth::{Secret, TokenInfo};
use tenement_proto::frame;
use tenement_proto::rpc::{ErrorCode, ListQuery, Request, Response};

const CONFIG: &str = r#"
[service.notes]
command = "@TINY@"
[service.wiki]
command = "@TINY@"
"#;

fn mint(admin: &mut Client, scope: &str, read_only: bool) -> (Secret, TokenInfo) {
    match admin.call(Request::TokenCreate {
        scope: scope.parse().unwrap(),
        read_only,
        lifetime_s: None,
        name: Some(format!("test {scope}")),
    }) {
        Response::TokenCreated { token, info } => (token, info),
        other => panic!("token_create answered {other:?}"),
    }
}

fn authed(credential: &Secret, call: Request) -> Request {
    Request::Authed {
        credential: credential.clone(),
        peer: Some("192.0.2.1".parse().unwrap()),
        call: Box::new(call),
    }
}

fn status(instance: &str) -> Request {
    Request::Status {
        instance: iid(instance),
    }
}

fn listed(proxy: &mut Client, credential: &Secret, query: ListQuery) -> (Vec<String>, Response) {
    let mut names = Vec::new();
    let mut reply = proxy.call(authed(credential, Request::List { query }));
    loop {
        match &reply {
            Response::Instances {
                instances, more, ..
            } => {
                names.extend(instances.iter().map(|i| i.instance.to_string()));
                if !more {
                    return (names, reply);
                }
            }
            other => panic!("list answered {other:?}"),
        }
        reply = proxy.read().unwrap();
    }
}

#[test]
fn scopes_are_enforced_on_every_call_and_revocation_is_immediate() {
    let sb = Sandbox::new(CONFIG);
    let _sup = sb.start();
    let mut admin = Client::admin(&sb);
    admin.add(&["notes:alice", "notes:bob", "wiki:alice"]);
    let (root, _) = mint(&mut admin, "admin", false);
    let (notes, _) = mint(&mut admin, "service:notes", false);
    let (alice, alice_info) = mint(&mut admin, "tenant:notes:alice", false);
    let (viewer, _) = mint(&mut admin, "tenant:notes:alice", true);
    let mut proxy = Client::proxy(&sb);

    // Without a credential the proxy role can do none of it.
    expect_error(proxy.call(status("notes:alice")), ErrorCode::WrongRole);

    // A tenant token: its own instance only, and only status, logs, wake, restart, stop.
    assert!(matches!(
        proxy.call(authed(&alice, status("notes:alice"))),
        Response::Status { .. }
    ));
    for call in [
        status("notes:bob"),
        Request::Logs {
            instance: iid("notes:bob"),
            lines: None,
            follow: true,
        },
        Request::Restart {
            instance: iid("notes:bob"),
        },
        Request::Remove {
            instance: iid("notes:alice"),
            purge: true,
        },
        Request::TokenCreate {
            scope: "admin".parse().unwrap(),
            read_only: false,
            lifetime_s: None,
            name: None,
        },
        Request::TokenList,
        Request::Reload,
    ] {
        let name = call.name();
        let message = expect_error(proxy.call(authed(&alice, call)), ErrorCode::Forbidden);
        assert!(
            message.contains(alice_info.id.as_str()),
            "{name}: {message}"
        );
    }
    // An instance out of scope is refused the same whether or not it exists.
    expect_error(
        proxy.call(authed(&alice, status("notes:nobody"))),
        ErrorCode::Forbidden,
    );
    let (names, _) = listed(&mut proxy, &alice, ListQuery::default());
    assert_eq!(names, ["notes:alice"]);
    let (names, _) = listed(&mut proxy, &notes, ListQuery::default());
    assert_eq!(names, ["notes:alice", "notes:bob"]);
    let (names, _) = listed(&mut proxy, &root, ListQuery::default());
    assert_eq!(names, ["notes:alice", "notes:bob", "wiki:alice"]);
    expect_error(
        proxy.call(authed(&notes, status("wiki:alice"))),
        ErrorCode::Forbidden,
    );

    // Read-only: reads, never changes.
    assert!(matches!(
        proxy.call(authed(&viewer, status("notes:alice"))),
        Response::Status { .. }
    ));
    expect_error(
        proxy.call(authed(
            &viewer,
            Request::Wake {
                instance: iid("notes:alice"),
                timeout_ms: None,
            },
        )),
        ErrorCode::Forbidden,
    );

    // The tenant wakes its own instance.
    let woken = proxy.call(authed(
        &alice,
        Request::Wake {
            instance: iid("notes:alice"),
            timeout_ms: Some(20_000),
        },
    ));
    assert!(matches!(woken, Response::Woken { .. }), "{woken:?}");

    // A log stream opened with the token ends soon after the token is revoked.
    let mut follower = Client::proxy(&sb).with_timeout(Duration::from_secs(20));
    let backlog = follower.call(authed(
        &alice,
        Request::Logs {
            instance: iid("notes:alice"),
            lines: Some(5),
            follow: true,
        },
    ));
    assert!(matches!(backlog, Response::Logs { .. }), "{backlog:?}");
    match admin.call(Request::TokenRemove {
        id: alice_info.id.clone(),
    }) {
        Response::Tokens { tokens } => assert_eq!(tokens[0].id, alice_info.id),
        other => panic!("token_remove answered {other:?}"),
    }
    expect_error(
        proxy.call(authed(&alice, status("notes:alice"))),
        ErrorCode::Unauthenticated,
    );
    let revoked_at = Instant::now();
    let ended = loop {
        match follower.read() {
            Ok(Response::Logs { .. }) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(
            ended,
            Ok(Response::Error {
                code: ErrorCode::Unauthenticated,
                ..
            })
        ),
        "{ended:?} after {:?}",
        revoked_at.elapsed()
    );

    // Only hashes reach the disk; the tokens survive a restart.
    let file = std::fs::read_to_string(sb.registry_file()).unwrap();
    for secret in [&root, &notes, &alice, &viewer] {
        let secret_part = secret.0.rsplit('_').next().unwrap();
        assert!(!file.contains(secret_part), "a secret reached {file}");
    }
    assert!(!sb.supervisor_log().contains(root.0.as_str()));
}

#[test]
fn tokens_survive_a_restart_and_lists_come_in_pages() {
    let sb = Sandbox::new(CONFIG);
    let sup = sb.start();
    let mut admin = Client::admin(&sb);
    let names: Vec<String> = (0..25).map(|n| format!("notes:t{n:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    admin.add(&refs);
    admin.add(&["wiki:x"]);
    let (root, info) = mint(&mut admin, "admin", false);
    drop(admin);
    sup.terminate();
    let _sup = sb.start();
    let mut proxy = Client::proxy(&sb);
    match proxy.call(authed(&root, Request::Whoami)) {
        Response::Identity { token, .. } => assert_eq!(token.id, info.id),
        other => panic!("whoami answered {other:?}"),
    }
    // Pages of 10 of the notes instances, with the total.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let query = ListQuery {
            service: Some("notes".parse().unwrap()),
            after: after.clone(),
            limit: Some(10),
            ..ListQuery::default()
        };
        let (page, last) = listed(&mut proxy, &root, query);
        let Response::Instances { next, total, .. } = last else {
            unreachable!()
        };
        assert_eq!(total, Some(25));
        seen.extend(page);
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, names);
    let query = ListQuery {
        search: Some("t1".to_owned()),
        ..ListQuery::default()
    };
    let (found, _) = listed(&mut proxy, &root, query);
    assert_eq!(found.len(), 10, "{found:?}");
}

#[test]
fn bad_credentials_are_limited_per_address_and_sessions_end() {
    let sb = Sandbox::new(CONFIG);
    let _sup = sb.start();
    let mut admin = Client::admin(&sb);
    let (good, _) = mint(&mut admin, "admin", false);
    let mut proxy = Client::proxy(&sb);
    let from = |credential: &Secret, peer: &str, call: Request| Request::Authed {
        credential: credential.clone(),
        peer: Some(peer.parse().unwrap()),
        call: Box::new(call),
    };
    let junk = Secret(format!("tnm_0000000000000000_{}", "0".repeat(64)));
    let overlong = Secret("tnm_".repeat(100_000 / 4));
    let mut limited = 0;
    for n in 0..1000 {
        let credential = if n % 2 == 0 { &junk } else { &overlong };
        match proxy.call(from(credential, "203.0.113.66", Request::Whoami)) {
            Response::Error {
                code: ErrorCode::RateLimited,
                ..
            } => limited += 1,
            Response::Error {
                code: ErrorCode::Unauthenticated,
                ..
            } => {}
            other => panic!("a bad credential was answered {other:?}"),
        }
    }
    assert!(limited >= 980, "{limited} of 1000 limited");
    expect_error(
        proxy.call(from(&good, "203.0.113.66", Request::Whoami)),
        ErrorCode::RateLimited,
    );
    assert!(matches!(
        proxy.call(from(&good, "198.51.100.20", Request::Whoami)),
        Response::Identity { .. }
    ));

    // A session: opened with a token, works like it, ends at logout.
    let session = match proxy.call(from(&good, "198.51.100.20", Request::Login)) {
        Response::Identity {
            session: Some(session),
            session_expires_ms: Some(_),
            ..
        } => session,
        other => panic!("login answered {other:?}"),
    };
    assert!(session.0.starts_with("tns_"));
    assert!(matches!(
        proxy.call(from(&session, "198.51.100.20", Request::TokenList)),
        Response::Tokens { .. }
    ));
    assert!(matches!(
        proxy.call(from(&session, "198.51.100.20", Request::Logout)),
        Response::Ok
    ));
    expect_error(
        proxy.call(from(&session, "198.51.100.20", Request::TokenList)),
        ErrorCode::Unauthenticated,
    );
    // Plumbing of the proxy role is not an API call, and calls do not nest.
    expect_error(
        proxy.call(from(&good, "198.51.100.20", Request::Subscribe)),
        ErrorCode::BadRequest,
    );
    let nested = from(
        &good,
        "198.51.100.20",
        from(&good, "198.51.100.20", Request::Whoami),
    );
    expect_error(proxy.call(nested), ErrorCode::BadRequest);
    // Whoami outside authed is refused by role.
    frame::write_message(proxy.stream(), &Request::Whoami).unwrap();
    assert!(matches!(
        proxy.read().unwrap(),
        Response::Error {
            code: ErrorCode::WrongRole,
            ..
        }
    ));
}
