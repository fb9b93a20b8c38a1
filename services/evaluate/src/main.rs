//! `headroom-evaluate`: plays a traffic trace through the whole system with
//! Headroom and with the baselines, one after another, and prints how each
//! kept the SLO and what it cost.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use headroom_evaluate::trace::{self, Excerpt, EXCERPTS};
use headroom_evaluate::{evaluate, report, Settings, Strategy};
use headroom_shared::config::{LogFormat, TelemetryConfig};

#[derive(Parser)]
#[command(name = "headroom-evaluate", version, about)]
struct Args {
    /// A trace file: requests per second of trace time, one a line.
    #[arg(long, conflicts_with_all = ["excerpt", "all"])]
    trace: Option<PathBuf>,
    /// A shipped excerpt, played at its own scale and speed-up:
    /// daily-cycle, spike, night-rise or step-and-spike.
    #[arg(long, conflicts_with = "all")]
    excerpt: Option<String>,
    /// Every shipped excerpt, one after another.
    #[arg(long)]
    all: bool,
    /// Where the excerpts are.
    #[arg(long, default_value = "traces")]
    traces: PathBuf,
    /// Multiplies every rate (default: the excerpt's, or 100).
    #[arg(long)]
    scale: Option<f64>,
    /// Trace seconds per wall-clock second (default: the excerpt's, or 1).
    #[arg(long)]
    speedup: Option<f64>,
    /// The first second of the trace to play.
    #[arg(long, default_value_t = 0)]
    from: usize,
    /// How many seconds of trace to play (default: to its end).
    #[arg(long)]
    seconds: Option<usize>,
    /// Who sizes the cluster: headroom, hpa, static-peak, static-mean, or
    /// all of them (comma separated).
    #[arg(long, default_value = "all")]
    strategy: String,
    /// Sample servers registered (the most the cluster may have).
    #[arg(long)]
    backends: Option<usize>,
    /// The p99 objective, in milliseconds.
    #[arg(long)]
    slo_ms: Option<f64>,
    /// Headroom's lower level (scaling.lower), instead of the default.
    #[arg(long)]
    lower: Option<f64>,
    /// Headroom's panic ratio (scaling.panic_ratio; 0 is off).
    #[arg(long)]
    panic_ratio: Option<f64>,
    /// Size Headroom's scale-ups by the window's least load, not its
    /// trend (scaling.project_rise = false).
    #[arg(long)]
    no_projection: bool,
    /// Where the JSON, the timelines and the table go.
    #[arg(long, default_value = "target/evaluate")]
    out: PathBuf,
    /// Log level of the services (their logs go to stderr).
    #[arg(long, default_value = "warn")]
    log: String,
}

fn strategies(spec: &str) -> anyhow::Result<Vec<Strategy>> {
    if spec == "all" {
        return Ok(Strategy::ALL.to_vec());
    }
    spec.split(',')
        .map(|name| {
            Strategy::parse(name.trim()).with_context(|| {
                format!("unknown strategy {name:?}: headroom, hpa, static-peak, static-mean or all")
            })
        })
        .collect()
}

/// The traces to play: (name, file, scale, speed-up).
fn traces(args: &Args) -> anyhow::Result<Vec<(String, PathBuf, f64, f64)>> {
    let of = |e: &Excerpt| {
        (
            e.name.to_owned(),
            e.path(&args.traces),
            args.scale.unwrap_or(e.scale),
            args.speedup.unwrap_or(e.speedup),
        )
    };
    if args.all {
        return Ok(EXCERPTS.iter().map(of).collect());
    }
    if let Some(name) = &args.excerpt {
        let e = Excerpt::find(name).with_context(|| format!("no excerpt called {name:?}"))?;
        return Ok(vec![of(e)]);
    }
    let path = args
        .trace
        .clone()
        .context("say what to play: --trace FILE, --excerpt NAME or --all")?;
    let name = path
        .file_stem()
        .map_or("trace".to_owned(), |s| s.to_string_lossy().into_owned());
    Ok(vec![(
        name,
        path,
        args.scale.unwrap_or(100.0),
        args.speedup.unwrap_or(1.0),
    )])
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let strategies = strategies(&args.strategy)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut tables = String::new();
    let mut all_met = true;
    for (name, path, scale, speedup) in traces(&args)? {
        anyhow::ensure!(
            scale > 0.0 && speedup > 0.0,
            "scale and speed-up must be above 0"
        );
        let rates = trace::load(&path, args.from, args.seconds)?;
        let mut settings = Settings::standard(name.clone(), rates, scale, speedup);
        if let Some(n) = args.backends.filter(|n| *n > 0) {
            settings.backends = n;
            settings.policy.max_size = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Some(slo) = args.slo_ms {
            settings.latency_slo_ms = slo;
        }
        if let Some(lower) = args.lower {
            settings.policy.scaling.lower = lower;
        }
        if let Some(ratio) = args.panic_ratio {
            settings.policy.scaling.panic_ratio = ratio;
        }
        if args.no_projection {
            settings.policy.scaling.project_rise = false;
        }
        settings
            .policy
            .validate()
            .map_err(|e| anyhow::anyhow!("the policy: {e}"))?;
        let floor = settings.slo_floor();
        println!("── {}", report::conditions(&settings, &floor));
        let mut results = Vec::new();
        for strategy in &strategies {
            println!("playing with {} ...", strategy.name());
            let result = evaluate(&settings, *strategy).await?;
            let svg = args.out.join(format!("{name}-{}.svg", strategy.name()));
            std::fs::write(&svg, report::svg(&settings, &result))
                .with_context(|| format!("writing {}", svg.display()))?;
            results.push(result);
        }
        let table = report::table(&settings, &floor, &results);
        println!("\n{table}");
        for (what, met) in report::verdict(&results) {
            println!("{} {what}", if met { "met:    " } else { "MISSED: " });
            all_met &= met;
        }
        println!();
        let json = args.out.join(format!("{name}.json"));
        std::fs::write(
            &json,
            serde_json::to_string_pretty(&report::json(&settings, &floor, &results))?,
        )
        .with_context(|| format!("writing {}", json.display()))?;
        tables.push_str(&table);
        tables.push('\n');
    }
    let summary = args.out.join("summary.md");
    std::fs::write(&summary, &tables).with_context(|| format!("writing {}", summary.display()))?;
    println!(
        "tables: {} (JSON and timelines beside it)",
        summary.display()
    );
    Ok(all_met)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(err) = headroom_shared::telemetry::init(&TelemetryConfig {
        format: LogFormat::Human,
        filter: args.log.clone(),
    }) {
        eprintln!("headroom-evaluate: {err}");
        return ExitCode::from(64);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("headroom-evaluate: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let stop = headroom_shared::shutdown::on_signal();
        tokio::select! {
            outcome = run(args) => outcome,
            () = stop.cancelled() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match outcome {
        // The figures are the product: a missed target is reported, not
        // an error of the command.
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("headroom-evaluate: {err:#}");
            ExitCode::FAILURE
        }
    }
}
