//! `headroom`: the operator's command line. NATS comes from the usual
//! configuration (`HEADROOM_NATS__URL`, or `--server`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::Client;
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
    /// Write one NATS user per agent, bound to its own server, into the
    /// nats-server configuration (offline).
    NatsUsers {
        /// The users file, with its agent-users markers.
        #[arg(long, default_value = "nats/users.conf")]
        file: PathBuf,
        /// Print the file so changed instead of writing it.
        #[arg(long)]
        print: bool,
        /// The servers whose agents get a user.
        #[arg(required = true)]
        servers: Vec<String>,
    },
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
    if let Command::NatsUsers {
        file,
        print,
        servers,
    } = &args.command
    {
        let mut out = std::io::stdout().lock();
        return match cli::nats_users(file, servers, *print, &mut out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("headroom nats-users: {err}");
                ExitCode::FAILURE
            }
        };
    }
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
        args.command.run(&client, &config, &mut out).await?;
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

type Out<'a> = std::io::StdoutLock<'a>;

impl Command {
    async fn run(self, client: &Client, config: &Config, out: &mut Out<'_>) -> anyhow::Result<()> {
        let seconds = |s: Option<u64>| s.map(Duration::from_secs);
        match self {
            Self::Status { sample_ms } => {
                let deadline = config.allocator.confirm_deadline;
                cli::status(client, Duration::from_millis(sample_ms), deadline, out).await?;
            }
            Self::Pool { action } => action.run(client, out).await?,
            Self::Cluster { action } => action.run(client, out).await?,
            Self::Drain { cluster, server } => cli::drain(client, &cluster, &server, out).await?,
            Self::Kv { action } => action.run(client, out).await?,
            Self::Watch {
                pattern,
                count,
                seconds: s,
            } => cli::watch(client, &pattern, count, seconds(s), out).await?,
            Self::Events { cluster, last } => {
                cli::events(client, cluster.as_deref(), last, out).await?;
            }
            Self::Services { ask, window_ms } => {
                let window = Duration::from_millis(window_ms);
                cli::services(client, ask.into(), window, out).await?;
            }
            // Offline: answered before connecting.
            Self::Replay(_) | Self::NatsUsers { .. } => {}
            Self::Record { out: path, seconds } => record(client, config, &path, seconds).await?,
        }
        Ok(())
    }
}

impl Pool {
    async fn run(self, client: &Client, out: &mut Out<'_>) -> Result<(), cli::CliError> {
        match self {
            Self::List => cli::pool_list(client, out).await,
            Self::Add {
                id,
                address,
                port,
                request_types,
            } => cli::pool_add(client, &id, &address, port, request_types, out).await,
            Self::Remove { id } => cli::pool_remove(client, &id, out).await,
        }
    }
}

impl ClusterCommand {
    async fn run(self, client: &Client, out: &mut Out<'_>) -> Result<(), cli::CliError> {
        match self {
            Self::Put { id, policy } => cli::cluster_put(client, &id, &policy, out).await,
            Self::List => cli::cluster_show(client, None, out).await,
            Self::Get { id } => cli::cluster_show(client, Some(&id), out).await,
        }
    }
}

impl Kv {
    async fn run(self, client: &Client, out: &mut Out<'_>) -> Result<(), cli::CliError> {
        match self {
            Self::List { bucket } => cli::kv_list(client, &bucket, out).await,
            Self::Get { bucket, key } => cli::kv_get(client, &bucket, &key, false, out).await,
            Self::History { bucket, key } => cli::kv_get(client, &bucket, &key, true, out).await,
            Self::Watch {
                bucket,
                pattern,
                count,
                seconds,
            } => {
                let seconds = seconds.map(Duration::from_secs);
                cli::kv_watch(client, &bucket, &pattern, count, seconds, out).await
            }
        }
    }
}

/// Records the live inputs to `path` until SIGTERM or `seconds`.
async fn record(
    client: &Client,
    config: &Config,
    path: &std::path::Path,
    seconds: Option<u64>,
) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    let stop = headroom_shared::shutdown::on_signal();
    if let Some(s) = seconds {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(s)).await;
            stop.cancel();
        });
    }
    let out = std::io::BufWriter::new(file);
    let written = headroom_monitor::replay::record(client, config.nats.replicas, out, stop).await?;
    eprintln!("{written} inputs recorded in {}", path.display());
    Ok(())
}
