//! AFL++ entry point of the `frame` target; the checks are [`tenement_fuzz::frame::check`].
#![forbid(unsafe_code)]

fn main() {
    afl::fuzz!(|data: &[u8]| tenement_fuzz::frame::check(data));
}
