//! The dashboard at `{domain}` over raw HTTP: the login page without a session, the session
//! cookie's attributes, CSRF on every form (a cookie of one session never fits the form of
//! another), cross-site posts, bad paths and cookies, logout, and scope. The browser tier
//! (tests/dashboard/run.py) drives the same pages in Chromium.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use crate::support::*;

const APPS: &str = r#"
[service.notes]
command = "@TINY@"
"#;

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookies: &[String],
    form: Option<&str>,
    extra: &[&str],
) -> Reply {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if !cookies.is_empty() {
        text.push_str(&format!("Cookie: {}\r\n", cookies.join("; ")));
    }
    for line in extra {
        text.push_str(line);
        text.push_str("\r\n");
    }
    let body = form.unwrap_or("");
    if method == "POST" {
        text.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    text.push_str("\r\n");
    text.push_str(body);
    exchange(addr, text.as_bytes()).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// The `name=value` of every Set-Cookie.
fn set_cookies(reply: &Reply) -> Vec<String> {
    reply
        .head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.clone())
        .collect()
}

fn hidden_csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    page[at..at + 32].to_owned()
}

/// Logs in with `token`: the session cookie (`tenement_session=...`) and the page's CSRF.
fn log_in(sandbox: &Sandbox, token: &str) -> (String, String) {
    let addr = sandbox.proxy_addr;
    let page = request(addr, "GET", "/login", &[], None, &[]);
    let login_cookie = set_cookies(&page)[0].split(';').next().unwrap().to_owned();
    let csrf = hidden_csrf(&page.text());
    let form = format!("csrf={csrf}&token={token}");
    let reply = request(addr, "POST", "/login", &[login_cookie], Some(&form), &[]);
    assert_eq!(reply.status(), 303, "{}", reply.text());
    let cookie = set_cookies(&reply)
        .into_iter()
        .find(|c| c.starts_with("tenement_session="))
        .expect("a session cookie");
    for attribute in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=",
    ] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    let session = cookie.split(';').next().unwrap().to_owned();
    let home = request(addr, "GET", "/", std::slice::from_ref(&session), None, &[]);
    assert_eq!(home.status(), 200);
    (session, hidden_csrf(&home.text()))
}

fn mint(sandbox: &Sandbox, scope: &str) -> String {
    tenctl_ok(sandbox, &["token", "create", "--scope", scope])
        .trim()
        .to_owned()
}

#[test]
fn sessions_forms_and_bad_input() {
    let sb = Sandbox::new(APPS);
    let _daemons = sb.start();
    tenctl_ok(&sb, &["add", "notes:alice", "notes:bob"]);
    let addr = sb.proxy_addr;

    // No session: the login page and nothing else, with the security headers.
    let home = request(addr, "GET", "/", &[], None, &[]);
    assert_eq!(home.status(), 200);
    assert!(home.text().contains("Log in"));
    assert!(!home.text().contains("notes:alice"));
    let csp = home.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(home.header("x-frame-options"), Some("DENY"));
    let reply = request(addr, "GET", "/tenants", &[], None, &[]);
    assert_eq!(
        (reply.status(), reply.header("location")),
        (303, Some("/login"))
    );

    // The login form's own CSRF value, and a bad token, are refused with a reason.
    let page = request(addr, "GET", "/login", &[], None, &[]);
    let login_cookie = set_cookies(&page)[0].split(';').next().unwrap().to_owned();
    let admin = mint(&sb, "admin");
    let reply = request(
        addr,
        "POST",
        "/login",
        std::slice::from_ref(&login_cookie),
        Some(&format!("csrf={}&token={admin}", "0".repeat(32))),
        &[],
    );
    assert_eq!(reply.status(), 401);
    assert!(reply.text().contains("expired"), "{}", reply.text());
    let csrf = hidden_csrf(&page.text());
    let reply = request(
        addr,
        "POST",
        "/login",
        std::slice::from_ref(&login_cookie),
        Some(&format!(
            "csrf={csrf}&token=tnm_{}_{}",
            "1".repeat(16),
            "2".repeat(64)
        )),
        &[],
    );
    assert_eq!(reply.status(), 401);
    assert!(!set_cookies(&reply)
        .iter()
        .any(|c| c.starts_with("tenement_session=tns")));

    // Two sessions: each one's forms need its own CSRF value.
    let (session_a, csrf_a) = log_in(&sb, &admin);
    let other = mint(&sb, "admin");
    let (_session_b, csrf_b) = log_in(&sb, &other);
    assert_ne!(csrf_a, csrf_b);
    let wake = "/tenants/notes:alice/wake";
    for (form, what) in [
        (String::new(), "no csrf"),
        (format!("csrf={csrf_b}"), "another session's csrf"),
        (format!("csrf={}", "f".repeat(32)), "a made-up csrf"),
    ] {
        let reply = request(
            addr,
            "POST",
            wake,
            std::slice::from_ref(&session_a),
            Some(&form),
            &[],
        );
        assert_eq!(reply.status(), 403, "{what}: {}", reply.text());
    }
    // A cross-site post is refused even with the right value.
    let reply = request(
        addr,
        "POST",
        wake,
        std::slice::from_ref(&session_a),
        Some(&format!("csrf={csrf_a}")),
        &["Origin: https://evil.example"],
    );
    assert_eq!(reply.status(), 403);
    let state = tenctl_ok(&sb, &["status", "notes:alice", "--json"]);
    assert!(state.contains("\"stopped\""), "nothing was woken: {state}");
    let reply = request(
        addr,
        "POST",
        wake,
        std::slice::from_ref(&session_a),
        Some(&format!("csrf={csrf_a}")),
        // The same origin as the Host these requests name.
        &["Origin: http://localhost"],
    );
    assert_eq!(reply.status(), 303, "{}", reply.text());
    assert_eq!(
        reply.header("location"),
        Some("/tenants/notes:alice?done=wake")
    );
    let state = tenctl_ok(&sb, &["status", "notes:alice", "--json"]);
    assert!(state.contains("\"running\""), "{state}");
    // With the script's Accept, the same call answers JSON.
    let reply = request(
        addr,
        "POST",
        "/tenants/notes:alice/restart",
        std::slice::from_ref(&session_a),
        Some(&format!("csrf={csrf_a}")),
        &["Accept: application/json"],
    );
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.text(), "{\"done\":\"restart\"}");

    // Bad paths and cookies: clean 4xx, or the login page.
    for (path, status) in [
        ("/tenants/..%2F..%2Fetc%2Fpasswd", 400),
        ("/tenants/notes:..", 400),
        ("/tenants/notes:alice/../../x", 404),
        ("/ui/status/..", 400),
        ("/ui/logs/notes:ALICE", 400),
        ("/tenants?state=asleep", 400),
        ("/tenants?page=x", 400),
        ("/nowhere", 404),
    ] {
        let reply = request(
            addr,
            "GET",
            path,
            std::slice::from_ref(&session_a),
            None,
            &[],
        );
        assert_eq!(reply.status(), status, "{path}: {}", reply.text());
    }
    let long = format!("tenement_session=tns_{}", "a".repeat(8000));
    let reply = request(addr, "GET", "/", &[long], None, &[]);
    assert_eq!(reply.status(), 200);
    assert!(reply.text().contains("Log in"));
    let forged = format!("tenement_session=tns_{}_{}", "1".repeat(16), "2".repeat(64));
    let reply = request(addr, "GET", "/", &[forged], None, &[]);
    assert!(reply.text().contains("Log in"), "{}", reply.text());

    // A tenant's session: its own page only.
    let bob = mint(&sb, "tenant:notes:bob");
    let (session_bob, csrf_bob) = log_in(&sb, &bob);
    let reply = request(
        addr,
        "GET",
        "/tenants",
        std::slice::from_ref(&session_bob),
        None,
        &[],
    );
    assert!(reply.text().contains("notes:bob") && !reply.text().contains("notes:alice"));
    let reply = request(
        addr,
        "GET",
        "/tenants/notes:alice",
        std::slice::from_ref(&session_bob),
        None,
        &[],
    );
    assert_eq!(reply.status(), 403, "{}", reply.text());
    let reply = request(
        addr,
        "POST",
        wake,
        std::slice::from_ref(&session_bob),
        Some(&format!("csrf={csrf_bob}")),
        &[],
    );
    assert_eq!(reply.status(), 403, "{}", reply.text());
    let reply = request(
        addr,
        "GET",
        "/ui/logs/notes:alice",
        std::slice::from_ref(&session_bob),
        None,
        &[],
    );
    assert_eq!(reply.status(), 403, "{}", reply.text());

    // Log out: the cookie is cleared and the session is gone for good.
    let reply = request(
        addr,
        "POST",
        "/logout",
        std::slice::from_ref(&session_a),
        Some(&format!("csrf={csrf_a}")),
        &[],
    );
    assert_eq!(reply.status(), 303);
    assert!(set_cookies(&reply)
        .iter()
        .any(|c| c.starts_with("tenement_session=;") && c.contains("Max-Age=0")));
    let reply = request(addr, "GET", "/tenants", &[session_a], None, &[]);
    assert!(reply.text().contains("Log in"), "{}", reply.text());

    // Revoking the token ends its sessions at once.
    tenctl_ok(&sb, &["token", "rm", bob.split('_').nth(1).unwrap()]);
    let reply = request(addr, "GET", "/tenants", &[session_bob], None, &[]);
    assert!(reply.text().contains("Log in"), "{}", reply.text());

    // No session secret in the logs.
    for log in [sb.supervisor_log(), sb.proxy_log()] {
        assert!(!log.contains("tns_"), "a session in a log");
    }
}
