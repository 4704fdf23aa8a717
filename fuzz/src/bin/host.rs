//! AFL++ entry point of the `host` target; the checks are [`tenement_fuzz::host::check`].
#![forbid(unsafe_code)]

fn main() {
    afl::fuzz!(|data: &[u8]| tenement_fuzz::host::check(data));
}
