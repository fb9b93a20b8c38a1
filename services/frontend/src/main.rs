//! The front-end binary: configuration, tracing, then [`Frontend`]. It
//! connects to NATS in the background, so it serves from its last-known-good
//! file while NATS cannot be reached.

use std::process::ExitCode;

use headroom_frontend::Frontend;
use headroom_shared::{ops, service, shutdown};

fn main() -> ExitCode {
    let config = match service::configure("headroom-frontend") {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match service::runtime("headroom-frontend") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let shutdown = shutdown::on_signal();
        let listen = config.ops.listen.clone();
        match Frontend::bind(config).await {
            Ok(frontend) => {
                if let Err(err) = ops::start(&frontend.ops(), listen.as_deref(), &shutdown).await {
                    tracing::error!("cannot serve health and metrics: {err}");
                    return ExitCode::FAILURE;
                }
                frontend.serve(shutdown).await;
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!("{err}");
                ExitCode::FAILURE
            }
        }
    })
}
