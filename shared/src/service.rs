//! The shape every service binary has, written once: load and check the
//! configuration before anything else (a bad key exits 64 at once, naming
//! it), set up tracing, start the runtime, connect to NATS, serve until
//! SIGINT or SIGTERM, and turn the outcome into an exit code.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, EXIT_CONFIG};
use crate::{nats, shutdown, telemetry};

/// Loads the configuration and sets up tracing, or says why not.
///
/// # Errors
/// The exit code to leave with, after printing the reason on stderr.
pub fn configure(name: &str) -> Result<Config, ExitCode> {
    let config = Config::from_env().map_err(|err| {
        eprintln!("{name}: {err}");
        ExitCode::from(EXIT_CONFIG as u8)
    })?;
    telemetry::init(&config.telemetry).map_err(|err| {
        eprintln!("{name}: {err}");
        ExitCode::from(EXIT_CONFIG as u8)
    })?;
    Ok(config)
}

/// A multi-threaded runtime, or the exit code after saying why not.
///
/// # Errors
/// The runtime cannot be built (no threads, say).
pub fn runtime(name: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|err| {
        eprintln!("{name}: cannot start the runtime: {err}");
        ExitCode::FAILURE
    })
}

/// Runs `serve` on a new runtime with a NATS connection named `name` and a
/// token cancelled on SIGINT or SIGTERM.
pub fn run<F, Fut, E>(name: &str, config: Config, serve: F) -> ExitCode
where
    F: FnOnce(Config, async_nats::Client, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let runtime = match runtime(name) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async {
        let (client, _events) = match nats::connect(&config.nats, name).await {
            Ok(connected) => connected,
            Err(err) => return Err(format!("connecting to NATS: {err}")),
        };
        serve(config, client, shutdown::on_signal())
            .await
            .map_err(|err| format!("{err:#}"))
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// [`configure`] then [`run`]: the whole `main` of a service.
pub fn main<F, Fut, E>(name: &str, serve: F) -> ExitCode
where
    F: FnOnce(Config, async_nats::Client, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    match configure(name) {
        Ok(config) => run(name, config, serve),
        Err(code) => code,
    }
}
