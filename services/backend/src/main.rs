//! The sample backend binary: serves until SIGTERM.

use std::process::ExitCode;

use headroom_backend::Backend;
use headroom_shared::{service, shutdown};

fn main() -> ExitCode {
    let config = match service::configure("headroom-backend") {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match service::runtime("headroom-backend") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let stop = shutdown::on_signal();
        let ops = match service::start_ops("headroom-backend", &config, &stop).await {
            Ok(ops) => ops,
            Err(err) => {
                tracing::error!("{err}");
                return ExitCode::FAILURE;
            }
        };
        match Backend::start(config.backend, stop.clone()).await {
            Ok(backend) => {
                backend.register(&ops);
                tracing::info!(addr = %backend.addr, name = %backend.name, "sample backend serving");
                stop.cancelled().await;
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!("{err}");
                ExitCode::FAILURE
            }
        }
    })
}
