//! The shape every service binary has, written once: load and check the
//! configuration before anything else (a bad key exits 64 at once, naming
//! it), set up tracing, start the runtime, open the health and metrics
//! endpoint, connect to NATS, serve until SIGINT or SIGTERM, and turn the
//! outcome into an exit code.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, EXIT_CONFIG};
use crate::ops::{self, Ops};
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

/// Starts the health and metrics endpoint when the configuration asks for
/// one.
///
/// # Errors
/// Its address cannot be bound, said in words.
pub async fn start_ops(
    name: &str,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Arc<Ops>, String> {
    let handle = Ops::new(name);
    ops::start(&handle, config.ops.listen.as_deref(), shutdown)
        .await
        .map_err(|err| {
            format!(
                "cannot serve health and metrics on {}: {err}",
                config.ops.listen.as_deref().unwrap_or_default()
            )
        })?;
    Ok(handle)
}

/// Runs `serve` on a new runtime with a NATS connection named `name`, the
/// service's health and metrics, and a token cancelled on SIGINT or
/// SIGTERM. The service says when it is ready; while NATS is disconnected
/// it is not.
pub fn run<F, Fut, E>(name: &str, config: Config, serve: F) -> ExitCode
where
    F: FnOnce(Config, async_nats::Client, Arc<Ops>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let runtime = match runtime(name) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async {
        let shutdown = shutdown::on_signal();
        let ops = start_ops(name, &config, &shutdown).await?;
        ops.set_not_ready("connecting to NATS");
        let (client, events) = match nats::connect(&config.nats, name).await {
            Ok(connected) => connected,
            Err(err) => return Err(format!("connecting to NATS: {err}")),
        };
        ops.watch_nats(client.clone(), events, true);
        ops.set_not_ready("starting");
        serve(config, client, ops, shutdown)
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
    F: FnOnce(Config, async_nats::Client, Arc<Ops>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    match configure(name) {
        Ok(config) => run(name, config, serve),
        Err(code) => code,
    }
}

/// Runs a service's long-lived tasks until `shutdown`, or until one ends:
/// a task that ends before shutdown was asked for is a failure, and stops
/// the others. Either way the service is marked not ready, `stop` (the
/// tasks' token) is cancelled, and the tasks get `grace` to finish their
/// work before what is left is aborted. `unexpected` makes the error for
/// a task that ended without one (its name) or panicked.
///
/// # Errors
/// The first task's failure.
pub async fn supervise<E: Send + 'static>(
    mut tasks: JoinSet<Result<&'static str, E>>,
    ops: &Ops,
    shutdown: &CancellationToken,
    stop: &CancellationToken,
    grace: Duration,
    unexpected: impl FnOnce(&'static str, async_nats::Error) -> E,
) -> Result<(), E> {
    let mut failure = None;
    tokio::select! {
        biased;
        () = shutdown.cancelled() => info!("stopping"),
        Some(ended) = tasks.join_next() => {
            if !shutdown.is_cancelled() {
                failure = Some(match ended {
                    Ok(Ok(name)) => unexpected(name, "task ended unexpectedly".into()),
                    Ok(Err(err)) => err,
                    Err(join) => unexpected("task", join.into()),
                });
            }
        }
    }
    ops.set_not_ready("stopping");
    stop.cancel();
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            ?grace,
            "tasks still running after the grace period; abandoning them"
        );
        tasks.abort_all();
    }
    failure.map_or(Ok(()), Err)
}
