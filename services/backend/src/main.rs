//! The sample backend binary: serves until SIGTERM.

use std::process::ExitCode;

use headroom_backend::Backend;
use headroom_shared::{service, shutdown};

fn main() -> ExitCode {
    let config = match service::configure("headroom-backend") {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("headroom-backend: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let stop = shutdown::on_signal();
        match Backend::start(config.backend, stop.clone()).await {
            Ok(backend) => {
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
