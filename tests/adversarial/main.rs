//! The adversarial suite: what one slow, silent, hostile or failing party
//! can do to the proxy, through the real proxy on loopback. Each module is a
//! party; each test names what must hold whatever that party does. One test
//! binary (one link per `cargo test`), a module per party.

#[path = "../support/mod.rs"]
mod support;

mod h2_floods;
mod h2_upstream;
mod one_party;
mod retries;
mod silent_clients;
mod slow_clients;
mod spool_replay;
mod upstream_stalls;
