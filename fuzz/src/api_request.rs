//! Target `api_request`: the management API's request parser,
//! [`tenement_proxy::api::parse_call`] (query decoding, then `tenement_proto::api::from_http`),
//! which anyone who sends something shaped like a token reaches before the supervisor is asked.
//!
//! The input is `METHOD\nPATH[?QUERY]\nBODY` (lossily UTF-8 for the first two lines, the body
//! raw). Invariants:
//! - nothing panics;
//! - a refusal is a 4xx with a code and a one-line message;
//! - an accepted request is an API call (never the proxy's plumbing, `authed`, `login` or
//!   `logout`), every id in it is valid (they were decoded through the validating types), and
//!   its HTTP form (`to_http`, what `tenctl --remote` sends) parses back to an equal call.

use tenement_proto::api::round_trip;
use tenement_proto::rpc::Request;
use tenement_proxy::api::parse_call;

pub fn check(data: &[u8]) {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let method = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let target = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let body = parts.next().unwrap_or_default();
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target.as_str(), None),
    };
    let call = match parse_call(&method, path, query, body) {
        Ok((call, _)) => call,
        Err(e) => {
            assert!(
                (400..500).contains(&e.status),
                "{method} {target}: refused with {} ({})",
                e.status,
                e.code
            );
            assert!(!e.code.is_empty(), "{method} {target}: no error code");
            assert!(
                !e.message.contains('\n'),
                "{method} {target}: a message of several lines: {:?}",
                e.message
            );
            return;
        }
    };
    assert!(
        call.api_call()
            && !matches!(
                call,
                Request::Authed { .. } | Request::Login | Request::Logout
            ),
        "{method} {target} became {call:?}"
    );
    let again = round_trip(&call)
        .unwrap_or_else(|| panic!("{call:?} has no HTTP form"))
        .unwrap_or_else(|e| panic!("{call:?} does not parse back from its HTTP form: {e:?}"));
    assert_eq!(
        again, call,
        "{method} {target}: the HTTP form changes the call"
    );
}
