//! AFL++ entry point of the `config` target; the checks are [`tenement_fuzz::config::check`].
#![forbid(unsafe_code)]

fn main() {
    afl::fuzz!(|data: &[u8]| tenement_fuzz::config::check(data));
}
