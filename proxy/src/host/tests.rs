use super::*;

fn domains() -> Vec<String> {
    vec![
        "localhost".to_owned(),
        "example.com".to_owned(),
        "eu.example.com".to_owned(),
    ]
}

fn inst(service: &str, id: &str) -> Target {
    Target::Instance(InstanceId::parse(&format!("{service}:{id}")).expect("valid"))
}

fn svc(service: &str) -> Target {
    Target::Service(ServiceName::new(service).expect("valid"))
}

#[derive(Debug)]
enum Want {
    T(Target),
    /// 400 of any kind.
    Bad,
}

#[test]
fn host_table() {
    use Want::{Bad, T};
    let cases: Vec<(Option<&str>, Want)> = vec![
        // plain routing
        (Some("alice.notes.localhost"), T(inst("notes", "alice"))),
        (Some("notes.localhost"), T(svc("notes"))),
        (Some("localhost"), T(Target::Home)),
        (Some("alice.notes.example.com"), T(inst("notes", "alice"))),
        (Some("notes.example.com"), T(svc("notes"))),
        (Some("example.com"), T(Target::Home)),
        // the longest domain wins
        (Some("eu.example.com"), T(Target::Home)),
        (Some("notes.eu.example.com"), T(svc("notes"))),
        (Some("bob.notes.eu.example.com"), T(inst("notes", "bob"))),
        // ports
        (
            Some("alice.notes.localhost:8080"),
            T(inst("notes", "alice")),
        ),
        (Some("localhost:80"), T(Target::Home)),
        (Some("alice.notes.localhost:"), Bad),
        (Some("alice.notes.localhost:99999"), Bad),
        (Some("alice.notes.localhost:8o"), Bad),
        (Some("alice.notes.localhost:80:80"), Bad),
        // case
        (Some("ALICE.Notes.LocalHost"), T(inst("notes", "alice"))),
        (Some("EXAMPLE.COM:443"), T(Target::Home)),
        // trailing dots
        (Some("alice.notes.localhost."), T(inst("notes", "alice"))),
        (
            Some("alice.notes.localhost.:8080"),
            T(inst("notes", "alice")),
        ),
        (Some("alice.notes.localhost.."), Bad),
        (Some("."), Bad),
        // IPv6 and IPv4 literals are not ours
        (Some("[::1]"), T(Target::NoMatch)),
        (Some("[::1]:8080"), T(Target::NoMatch)),
        (Some("[2001:DB8::1]:80"), T(Target::NoMatch)),
        (Some("::1"), Bad),
        (Some("[::1"), Bad),
        (Some("[::1]x"), Bad),
        (Some("[]"), Bad),
        (Some("[::1]:"), Bad),
        (Some("127.0.0.1"), T(Target::NoMatch)),
        (Some("127.0.0.1:8080"), T(Target::NoMatch)),
        // unicode and control characters
        (Some("alicé.notes.localhost"), Bad),
        (
            Some("xn--alic-dqa.notes.localhost"),
            T(inst("notes", "xn--alic-dqa")),
        ),
        (Some("alice\u{0}.notes.localhost"), Bad),
        (Some("alice .notes.localhost"), Bad),
        (Some("alice\t.notes.localhost"), Bad),
        // empty and overlong labels
        (Some(".notes.localhost"), Bad),
        (Some("alice..notes.localhost"), Bad),
        (Some("..localhost"), Bad),
        (
            Some(&*Box::leak(
                format!("{}.notes.localhost", "a".repeat(63)).into_boxed_str(),
            )),
            T(inst("notes", &"a".repeat(63))),
        ),
        (
            Some(&*Box::leak(
                format!("{}.notes.localhost", "a".repeat(64)).into_boxed_str(),
            )),
            Bad,
        ),
        (Some("-alice.notes.localhost"), Bad),
        (Some("alice-.notes.localhost"), Bad),
        (Some("a_b.notes.localhost"), Bad),
        // traversal and injection attempts never become ids
        (Some("..notes.localhost"), Bad),
        (Some("/tmp/victim.web.localhost"), Bad),
        (Some("../x.notes.localhost"), Bad),
        (Some("%2e%2e.notes.localhost"), Bad),
        (Some("alice%2fbob.notes.localhost"), Bad),
        (Some("{port}.notes.localhost"), Bad),
        (Some("alice/../bob.notes.localhost"), Bad),
        (Some("alice@notes.localhost"), Bad),
        // too deep or foreign
        (Some("x.alice.notes.localhost"), T(Target::NoMatch)),
        (Some("evil.com"), T(Target::NoMatch)),
        (Some("notlocalhost"), T(Target::NoMatch)),
        (Some("alice.notes.localhost.evil.com"), T(Target::NoMatch)),
        // missing
        (None, Bad),
        (Some(""), Bad),
        (Some("   "), Bad),
    ];
    assert!(cases.len() >= 40);
    for (raw, want) in cases {
        let got = target_of(raw, &domains());
        match (&want, &got) {
            (Want::T(t), Ok(g)) if t == g => {}
            (Want::Bad, Err(_)) => {}
            _ => panic!("host {raw:?}: wanted {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn missing_host_is_its_own_error() {
    assert_eq!(target_of(None, &domains()), Err(HostError::Missing));
}

#[test]
fn the_authority_is_the_target_or_the_one_host_and_they_must_agree() {
    let hosts = |list: &'static [&'static str]| list.iter().map(|h| h.as_bytes());
    type Case = (
        Option<&'static str>,
        &'static [&'static str],
        Result<Option<&'static str>, HostError>,
    );
    let cases: Vec<Case> = vec![
        (None, &[], Ok(None)),
        (None, &["a.notes.localhost"], Ok(Some("a.notes.localhost"))),
        (
            Some("a.notes.localhost"),
            &[],
            Ok(Some("a.notes.localhost")),
        ),
        // Same host, other spelling: the target's authority wins.
        (
            Some("a.notes.localhost:8080"),
            &["A.Notes.Localhost."],
            Ok(Some("a.notes.localhost:8080")),
        ),
        // Absolute-form (or :authority) routing one way, Host saying another.
        (
            Some("bob.notes.localhost"),
            &["evil.example<script>"],
            Err(HostError::Malformed),
        ),
        (
            Some("bob.notes.localhost"),
            &["alice.notes.localhost"],
            Err(HostError::Mismatch),
        ),
        (
            None,
            &["a.notes.localhost", "b.notes.localhost"],
            Err(HostError::Duplicate),
        ),
        (
            None,
            &["a.notes.localhost", "a.notes.localhost"],
            Err(HostError::Duplicate),
        ),
    ];
    for (target, list, want) in cases {
        assert_eq!(
            authority_of(target, hosts(list)),
            want,
            "target {target:?}, hosts {list:?}"
        );
    }
    let not_utf8: [&[u8]; 1] = [b"a.\xffnotes.localhost"];
    assert_eq!(
        authority_of(None, not_utf8.into_iter()),
        Err(HostError::Malformed)
    );
}
