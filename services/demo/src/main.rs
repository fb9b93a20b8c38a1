//! `headroom-demo`: Headroom end to end on this machine, in one command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use headroom_demo::{run, Settings};
use headroom_loadgen::Profile;
use headroom_local_nats::NatsServer;
use headroom_shared::config::{LogFormat, TelemetryConfig};

#[derive(Parser)]
#[command(name = "headroom-demo", version, about)]
struct Args {
    /// Where the timeline plot goes (SVG; the CSV goes beside it).
    #[arg(long, default_value = "target/demo/timeline.svg")]
    plot: PathBuf,
    /// The 35-second version (the one the tests run).
    #[arg(long)]
    short: bool,
    /// Another load profile: ramp:A-B:Ns, hold:R:Ns, spike:R:Ns, comma
    /// separated.
    #[arg(long)]
    profile: Option<String>,
    /// Sample backends (each with an agent; one starts as a member).
    #[arg(long)]
    backends: Option<usize>,
    /// The front-end's address.
    #[arg(long)]
    listen: Option<String>,
    /// Log level of the services (their logs go to stderr).
    #[arg(long, default_value = "warn")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(err) = headroom_shared::telemetry::init(&TelemetryConfig {
        format: LogFormat::Human,
        filter: args.log.clone(),
    }) {
        eprintln!("headroom-demo: {err}");
        return ExitCode::from(64);
    }
    let mut settings = if args.short {
        Settings::short(args.plot.clone())
    } else {
        Settings::standard(args.plot.clone())
    };
    if let Some(spec) = &args.profile {
        match Profile::parse(spec) {
            Ok(profile) => settings.profile = profile,
            Err(err) => {
                eprintln!("headroom-demo: {err}");
                return ExitCode::from(64);
            }
        }
    }
    if let Some(n) = args.backends.filter(|n| *n > 0) {
        settings.backends = n;
        settings.policy.max_size = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(listen) = args.listen {
        settings.listen = listen;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("headroom-demo: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let nats = NatsServer::start().await?;
        let mut stdout = std::io::stdout();
        let stop = headroom_shared::shutdown::on_signal();
        let report = tokio::select! {
            report = run(&settings, &nats, &mut stdout) => report?,
            () = stop.cancelled() => anyhow::bail!("interrupted"),
        };
        report.write_summary(&mut stdout)?;
        Ok::<_, anyhow::Error>(report)
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("headroom-demo: {err:#}");
            ExitCode::FAILURE
        }
    }
}
