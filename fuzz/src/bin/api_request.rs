//! AFL++ entry point of the `api_request` target; the checks are
//! [`tenement_fuzz::api_request::check`].
#![forbid(unsafe_code)]

fn main() {
    afl::fuzz!(|data: &[u8]| tenement_fuzz::api_request::check(data));
}
