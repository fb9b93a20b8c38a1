//! `headroom-load`: plays a load profile against a URL and prints a
//! summary (JSON on stdout; progress on stderr).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use headroom_loadgen::{run, Profile, Progress, Target};

#[derive(Parser)]
#[command(name = "headroom-load", version, about)]
struct Args {
    /// Where to send, e.g. http://127.0.0.1:8080
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Steps: ramp:A-B:Ns, hold:R:Ns, spike:R:Ns, comma separated.
    #[arg(
        long,
        default_value = "ramp:0-200:20s,hold:200:20s,spike:600:5s,ramp:200-0:20s"
    )]
    profile: String,
    /// A file with one requests-per-second value per line, instead.
    #[arg(long)]
    profile_file: Option<std::path::PathBuf>,
    /// Lines of --profile-file per second.
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// Paths sent in turn.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "/api/item,/static/logo.png"
    )]
    paths: Vec<String>,
    #[arg(long, default_value_t = 10)]
    timeout_s: u64,
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let profile = match &args.profile_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|text| Profile::from_lines(&text, args.speedup).map_err(|e| e.to_string())),
        None => Profile::parse(&args.profile).map_err(|e| e.to_string()),
    };
    let profile = match profile {
        Ok(profile) => profile,
        Err(err) => {
            eprintln!("headroom-load: {err}");
            return ExitCode::from(64);
        }
    };
    let target = Target {
        base: args.url.trim_end_matches('/').to_owned(),
        paths: args.paths,
        timeout: Duration::from_secs(args.timeout_s),
        max_in_flight: args.max_in_flight,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("headroom-load: {err}");
            return ExitCode::FAILURE;
        }
    };
    let summary = runtime.block_on(async {
        let mut stderr = std::io::stderr();
        let redraw = std::io::IsTerminal::is_terminal(&stderr);
        let progress = Progress {
            out: &mut stderr,
            redraw,
        };
        run(&profile, &target, Some(progress)).await
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).unwrap_or_default()
    );
    if summary.errors() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
