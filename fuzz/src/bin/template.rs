//! AFL++ entry point of the `template` target; the checks are [`tenement_fuzz::template::check`].
#![forbid(unsafe_code)]

fn main() {
    afl::fuzz!(|data: &[u8]| tenement_fuzz::template::check(data));
}
