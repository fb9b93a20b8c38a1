//! Integration tests: the real services against a real nats-server with
//! JetStream, one server per test. One test binary, one module per area.

mod agent;
mod allocator;
mod backend;
mod cli;
mod common;
mod confirm;
mod crash;
mod demo;
mod drain;
mod evaluate;
mod frontend;
mod health;
// Shared with the container tests, which use all of it.
#[allow(dead_code)]
mod history;
mod leases;
mod loadgen;
mod monitor;
mod ops;
mod security;
mod smuggling;
mod zero;
