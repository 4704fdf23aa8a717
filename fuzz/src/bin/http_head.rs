//! AFL++ entry point of the `http_head` target; the checks are [`tenement_fuzz::http_head::check`].
#![forbid(unsafe_code)]

fn main() {
    afl::fuzz!(|data: &[u8]| tenement_fuzz::http_head::check(data));
}
