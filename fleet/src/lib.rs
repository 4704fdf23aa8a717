//! The fleet agent of one tenement host: it keeps this host's membership under an etcd lease,
//! fences the host before that lease can expire when it cannot renew it, takes its turn as the
//! fleet's placement controller through etcd's election, and tells this host's supervisor
//! what is placed here and for how long.
//! See docs/FLEET.md.

pub mod agent;
pub mod control;
pub mod controller;
pub mod credentials;
pub mod drain;
pub mod fence;
pub mod hosts;
pub mod plan;
pub mod records;
pub mod status;
pub mod supervisor;
pub mod view;
