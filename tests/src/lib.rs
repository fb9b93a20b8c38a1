//! Test fixtures: a real nats-server with JetStream per test (the shared
//! crate's local server, so the demo and the tests start it the same way),
//! and helpers that keep every wait bounded.

pub use headroom_shared::local::{
    eventually, nats_server_binary, LocalNatsError as FixtureError, NatsServer, PINNED_VERSION,
};
