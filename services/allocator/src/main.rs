//! The allocator binary: configuration, tracing, NATS, then [`run`].

use std::process::ExitCode;

use headroom_allocator::run;

fn main() -> ExitCode {
    headroom_shared::service::main("headroom-allocator", run)
}
