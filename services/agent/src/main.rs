//! The agent binary: configuration, tracing, NATS, then [`run`].

use std::process::ExitCode;

use headroom_agent::{own_inbox, run};
use headroom_shared::service;

fn main() -> ExitCode {
    let name = "headroom-agent";
    match service::configure(name) {
        Ok(mut config) => {
            own_inbox(&mut config);
            service::run(name, config, run)
        }
        Err(code) => code,
    }
}
