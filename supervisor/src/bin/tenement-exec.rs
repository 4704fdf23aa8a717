//! `tenement-exec`: the exec helper at the root of every instance's process tree. Started only
//! by the supervisor, with the instance's spawn spec in its environment; see
//! `supervisor/src/exec_helper.rs`. A binary of its own so that it stays small (no runtime)
//! and quick to start: it is on the path of every cold wake.
#![forbid(unsafe_code)]

fn main() {
    tenement_supervisor::exec_helper::main()
}
