//! The agent binary: configuration, tracing, NATS, then [`run`].

use std::process::ExitCode;

use headroom_agent::run;

fn main() -> ExitCode {
    headroom_shared::service::main("headroom-agent", run)
}
