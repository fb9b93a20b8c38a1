//! The allocator binary: configuration, tracing, NATS, then [`run`].

use std::process::ExitCode;

use anyhow::Context;
use headroom_allocator::run;
use headroom_shared::config::{Config, EXIT_CONFIG};
use headroom_shared::{nats, shutdown, telemetry};

fn main() -> ExitCode {
    // Configuration is checked before the runtime starts, so a bad key
    // exits at once with a message that names it.
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("headroom-allocator: {err}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if let Err(err) = telemetry::init(&config.telemetry) {
        eprintln!("headroom-allocator: {err}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("headroom-allocator: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let (client, _events) = nats::connect(&config.nats, "headroom-allocator")
        .await
        .context("connecting to NATS")?;
    run(config, client, shutdown::on_signal())
        .await
        .context("allocator")
}
