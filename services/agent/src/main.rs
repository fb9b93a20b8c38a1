//! The agent binary: configuration, tracing, NATS, then [`run`].

use std::process::ExitCode;

use anyhow::Context;
use headroom_agent::run;
use headroom_shared::config::{Config, EXIT_CONFIG};
use headroom_shared::{nats, shutdown, telemetry};

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("headroom-agent: {err}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if let Err(err) = telemetry::init(&config.telemetry) {
        eprintln!("headroom-agent: {err}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("headroom-agent: cannot start the runtime: {err}");
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
    let (client, _events) = nats::connect(&config.nats, "headroom-agent")
        .await
        .context("connecting to NATS")?;
    run(config, client, shutdown::on_signal())
        .await
        .context("agent")
}
