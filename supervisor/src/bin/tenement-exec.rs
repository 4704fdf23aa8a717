//! `tenement-exec`: the exec server the supervisor starts once, and the exec helper it clones
//! at the root of every instance's process tree; see `supervisor/src/exec_helper.rs`. A binary
//! of its own so that it stays small and single-threaded (no runtime): it is cloned on the
//! path of every cold wake.
#![forbid(unsafe_code)]

fn main() {
    tenement_supervisor::exec_helper::main()
}
