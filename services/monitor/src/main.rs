//! The monitor binary: `run` (the service, the default), `record` (write
//! the live report stream to a file) and `replay` (judge a recording by a
//! policy and print the decisions).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use headroom_monitor::replay;
use headroom_shared::service;

#[derive(Parser)]
#[command(name = "headroom-monitor", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the monitor (the default).
    Run,
    /// Write the live reports and cluster records to a recording.
    Record {
        /// The file to write (JSON lines); `-` for standard output.
        #[arg(long, short)]
        out: PathBuf,
        /// Stop after this long (for example `10m`); until SIGTERM without.
        #[arg(long, value_parser = humantime_duration)]
        duration: Option<Duration>,
    },
    /// Judge a recording by a policy and print every decision, one JSON
    /// line each; the same input always gives the same bytes.
    Replay(replay::ReplayArgs),
}

fn humantime_duration(text: &str) -> Result<Duration, String> {
    let value: toml::Value = toml::Value::String(text.to_owned());
    humantime_serde::deserialize(value).map_err(|e: toml::de::Error| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Replay(args)) = &cli.command {
        // Replay is offline: no configuration, no NATS.
        return match args.run_to_stdout() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("headroom-monitor replay: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match service::configure("headroom-monitor") {
        Ok(config) => config,
        Err(code) => return code,
    };
    service::run(
        "headroom-monitor",
        config,
        |config, client, ops, stop| async move {
            match cli.command {
                Some(Command::Record { out, duration }) => {
                    let sink: Box<dyn Write + Send> = if out.as_os_str() == "-" {
                        Box::new(std::io::stdout())
                    } else {
                        Box::new(std::io::BufWriter::new(
                            std::fs::File::create(&out)
                                .with_context(|| format!("creating {}", out.display()))?,
                        ))
                    };
                    if let Some(duration) = duration {
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(duration).await;
                            stop.cancel();
                        });
                    }
                    ops.set_ready();
                    let written = replay::record(&client, config.nats.replicas, sink, stop).await?;
                    tracing::info!(written, "recording finished");
                    Ok(())
                }
                _ => headroom_monitor::run(config, client, ops, stop)
                    .await
                    .context("monitor"),
            }
        },
    )
}
