//! End-to-end tests of `tenement-proxy`: the real proxy and supervisor binaries on a sandbox
//! config, real apps (`tiny-http`, the notes example, `tests/fixtures/py/mirror.py`), and
//! requests sent as raw HTTP to the proxy's port with an explicit Host header.
//!
//! One test binary, so the tests share cargo's parallel test threads; each builds its own
//! sandbox (directories, ports, daemons) and tears it down (see `support`).

mod support;

mod acme;
mod api;
mod dashboard;
mod early;
mod hardening;
mod hostile_requests;
mod metrics;
mod releases;
mod routing;
mod streaming;
mod tls;
mod wake;
mod weights;
