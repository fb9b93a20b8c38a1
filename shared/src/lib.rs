//! Headroom's shared crate: what every service agrees on.
//!
//! # Layout
//! - [`bus`]: publishing durable messages (requests, audit events).
//! - [`hash`]: FNV-1a, the stable hash shards and routing agree on.
//! - [`ids`]: validated server, cluster and request ids (safe as subject
//!   tokens and KV keys).
//! - [`codec`]: MessagePack / JSON / XML bodies chosen by `content-type`,
//!   with a schema version check.
//! - [`wire`]: the messages on the bus.
//! - [`xml`]: the XML form of any message, following its JSON form.
//! - [`subjects`]: the subject tree and the JetStream streams.
//! - [`kv`]: the KV buckets, their records and compare-and-set helpers.
//! - [`config`]: the one configuration struct, file plus `HEADROOM_*` env.
//! - [`telemetry`]: tracing set-up.
//! - [`http_client`]: the small HTTP/1.0 client for an application on
//!   its own server (the agent's stats and hooks, the health probe).
//! - [`nats`]: connecting, with credentials, TLS and backoff.
//! - [`nats_users`]: the nats-server user of each agent, bound to its server.
//! - [`ops`]: `/healthz`, `/readyz` and Prometheus `/metrics`.
//! - [`shutdown`]: SIGINT / SIGTERM as a cancellation token.
//! - [`service`]: the common `main` of a service binary.

pub mod bus;
pub mod codec;
pub mod config;
pub mod errors;
pub mod hash;
pub mod http_client;
pub mod ids;
pub mod kv;
pub mod ledger;
pub mod nats;
pub mod nats_users;
pub mod ops;
pub mod records;
pub mod service;
pub mod shutdown;
pub mod subjects;
pub mod telemetry;
pub mod time;
pub mod wire;
pub mod xml;

pub use codec::{Codec, Message, WireError, SCHEMA_VERSION};
pub use ids::{ClusterId, IdError, RequestId, ServerId};
