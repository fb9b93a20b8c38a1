//! `headroom`: the operator's command line. NATS comes from the usual
//! configuration (`HEADROOM_NATS__URL`, or `--server`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use headroom_cli as cli;
use headroom_shared::config::Config;

#[derive(Parser)]
#[command(
    name = "headroom",
    version,
    about = "Operate and inspect a Headroom system"
)]
struct Args {
    /// NATS server URL (overrides HEADROOM_NATS__URL).
    #[arg(long, short)]
    server: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Clusters, members (with the CPU their agents report), the pool, the monitor.
    Status {
        /// How long to listen for reports.
        #[arg(long, default_value_t = 1500)]
        sample_ms: u64,
    },
    /// The free pool.
    Pool {
        #[command(subcommand)]
        action: Pool,
    },
    /// Clusters: create one or change its policy, list them, show one.
    Cluster {
        #[command(subcommand)]
        action: ClusterCommand,
    },
    /// Release a member: drain it and return it to the pool.
    Drain { cluster: String, server: String },
    /// Headroom's KV buckets, decoded.
    Kv {
        #[command(subcommand)]
        action: Kv,
    },
    /// Live messages of a subject pattern, decoded (e.g. 'headroom.metrics.>').
    Watch {
        pattern: String,
        #[arg(long)]
        count: Option<usize>,
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// The audit log, oldest first.
    Events {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long, default_value_t = 50)]
        last: u64,
    },
    /// Running Headroom services (NATS services API): ping, info or stats.
    Services {
        #[arg(value_enum, default_value_t = Ask::Stats)]
        ask: Ask,
        #[arg(long, default_value_t = 500)]
        window_ms: u64,
    },
    /// Judge a recording by a policy and print every decision (offline; see
    /// headroom-monitor replay).
    Replay(headroom_monitor::replay::ReplayArgs),
    /// Record the live reports and cluster records (see headroom-monitor record).
    Record {
        #[arg(long, short)]
        out: PathBuf,
        #[arg(long)]
        seconds: Option<u64>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Ask {
    Ping,
    Info,
    Stats,
}

impl From<Ask> for cli::Discover {
    fn from(ask: Ask) -> Self {
        match ask {
            Ask::Ping => cli::Discover::Ping,
            Ask::Info => cli::Discover::Info,
            Ask::Stats => cli::Discover::Stats,
        }
    }
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Create a cluster, or change its policy, from a TOML or JSON file.
    Put {
        id: String,
        #[arg(long)]
        policy: PathBuf,
    },
    List,
    Get {
        id: String,
    },
}

#[derive(Subcommand)]
enum Pool {
    List,
    Add {
        id: String,
        #[arg(long)]
        address: String,
        #[arg(long)]
        port: u16,
        #[arg(long = "type")]
        request_types: Vec<String>,
    },
    Remove {
        id: String,
    },
}

#[derive(Subcommand)]
enum Kv {
    List {
        bucket: String,
    },
    Get {
        bucket: String,
        key: String,
    },
    History {
        bucket: String,
        key: String,
    },
    /// Current values, then every change as it happens.
    Watch {
        bucket: String,
        /// Keys to follow (`>` for all).
        #[arg(default_value = ">")]
        pattern: String,
        #[arg(long)]
        count: Option<usize>,
        #[arg(long)]
        seconds: Option<u64>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::Replay(replay) = &args.command {
        return match replay.run_to_stdout() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("headroom replay: {:#}", anyhow::Error::from(err));
                ExitCode::FAILURE
            }
        };
    }
    let mut config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("headroom: {err}");
            return ExitCode::from(headroom_shared::config::EXIT_CONFIG as u8);
        }
    };
    if let Some(url) = args.server {
        config.nats.url = url;
    }
    // A command line should fail fast when NATS is not there.
    config.nats.startup_deadline = Duration::from_secs(3);
    let runtime = match headroom_shared::service::runtime("headroom") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        let (client, _) = headroom_shared::nats::connect(&config.nats, "headroom-cli")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut out = std::io::stdout().lock();
        match args.command {
            Command::Status { sample_ms } => {
                cli::status(&client, Duration::from_millis(sample_ms), &mut out).await?;
            }
            Command::Pool { action: Pool::List } => cli::pool_list(&client, &mut out).await?,
            Command::Cluster { action } => match action {
                ClusterCommand::Put { id, policy } => {
                    cli::cluster_put(&client, &id, &policy, &mut out).await?;
                }
                ClusterCommand::List => cli::cluster_show(&client, None, &mut out).await?,
                ClusterCommand::Get { id } => {
                    cli::cluster_show(&client, Some(&id), &mut out).await?;
                }
            },
            Command::Pool {
                action:
                    Pool::Add {
                        id,
                        address,
                        port,
                        request_types,
                    },
            } => cli::pool_add(&client, &id, &address, port, request_types, &mut out).await?,
            Command::Pool {
                action: Pool::Remove { id },
            } => cli::pool_remove(&client, &id, &mut out).await?,
            Command::Drain { cluster, server } => {
                cli::drain(&client, &cluster, &server, &mut out).await?
            }
            Command::Kv {
                action: Kv::List { bucket },
            } => cli::kv_list(&client, &bucket, &mut out).await?,
            Command::Kv {
                action: Kv::Get { bucket, key },
            } => {
                cli::kv_get(&client, &bucket, &key, false, &mut out).await?;
            }
            Command::Kv {
                action: Kv::History { bucket, key },
            } => {
                cli::kv_get(&client, &bucket, &key, true, &mut out).await?;
            }
            Command::Kv {
                action:
                    Kv::Watch {
                        bucket,
                        pattern,
                        count,
                        seconds,
                    },
            } => {
                cli::kv_watch(
                    &client,
                    &bucket,
                    &pattern,
                    count,
                    seconds.map(Duration::from_secs),
                    &mut out,
                )
                .await?;
            }
            Command::Watch {
                pattern,
                count,
                seconds,
            } => {
                cli::watch(
                    &client,
                    &pattern,
                    count,
                    seconds.map(Duration::from_secs),
                    &mut out,
                )
                .await?;
            }
            Command::Events { cluster, last } => {
                cli::events(&client, cluster.as_deref(), last, &mut out).await?
            }
            Command::Services { ask, window_ms } => {
                cli::services(
                    &client,
                    ask.into(),
                    Duration::from_millis(window_ms),
                    &mut out,
                )
                .await?;
            }
            // Offline: answered before connecting.
            Command::Replay(_) => {}
            Command::Record { out: path, seconds } => {
                let file = std::fs::File::create(&path)?;
                let stop = headroom_shared::shutdown::on_signal();
                if let Some(s) = seconds {
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(s)).await;
                        stop.cancel();
                    });
                }
                let written = headroom_monitor::replay::record(
                    &client,
                    config.nats.replicas,
                    std::io::BufWriter::new(file),
                    stop,
                )
                .await?;
                eprintln!("{written} inputs recorded in {}", path.display());
            }
        }
        client.flush().await?;
        Ok::<(), anyhow::Error>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("headroom: {err:#}");
            ExitCode::FAILURE
        }
    }
}
