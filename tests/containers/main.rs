//! Containerized integration tests: the compose stack itself (images built
//! FROM scratch, one NATS user per service, health checks on /readyz),
//! brought up under its own project name with free host ports, driven with
//! the load generator from outside, cut with `docker network disconnect`,
//! judged through NATS and the whole KV history, and torn down after
//! (`down -v`), also when a test fails.
//!
//! - [`stack`]: the compose project, its partitions, what to read of it.
//! - [`scaling`]: scale up and down, servers and services killed, a NATS
//!   node stopped.
//! - [`partitions`]: a front-end, an agent, the allocator and a NATS node
//!   cut off under load, and healed.
//!
//! They need a Docker engine with compose and the images built
//! (`scripts/compose.sh build`); `scripts/test.sh` does both when Docker is
//! present and sets `HEADROOM_CONTAINER_TESTS=1`. Without it they say so
//! and stop. They run one at a time: each stack takes the whole machine.

#[allow(dead_code)]
#[path = "../it/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "../it/history.rs"]
mod history;

mod partitions;
mod scaling;
mod stack;
