//! Typed configuration for every Headroom service.
//!
//! One struct, layered: built-in defaults, then a TOML file, then
//! `HEADROOM_<SECTION>__<KEY>` environment variables (for example
//! `HEADROOM_NATS__URL=nats://nats:4222`). Unknown keys are refused, so a
//! typo is an error instead of a silently ignored setting; every error names
//! the key. `HEADROOM_CONFIG` names the file and is not itself a setting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variable naming the configuration file.
pub const CONFIG_FILE_ENV: &str = "HEADROOM_CONFIG";
/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "HEADROOM";

/// Exit code for a configuration error (EX_USAGE in sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub telemetry: TelemetryConfig,
    pub ops: OpsConfig,
    pub allocator: AllocatorConfig,
    pub monitor: MonitorConfig,
    pub agent: AgentConfig,
    pub frontend: FrontendConfig,
    pub backend: BackendConfig,
}

/// How to reach NATS.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs, comma-separated (all nodes of a cluster).
    pub url: String,
    /// A `.creds` file (JWT and NKey seed) to authenticate with.
    pub credentials_file: Option<PathBuf>,
    /// User and password, for servers configured with plain users.
    pub user: Option<String>,
    pub password: Option<String>,
    /// PEM file of CA certificates to trust.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS.
    pub tls_required: bool,
    /// How long one connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long to keep trying at start-up before giving up.
    #[serde(with = "humantime_serde")]
    pub startup_deadline: Duration,
    /// Most time between two reconnect attempts (backoff is exponential).
    #[serde(with = "humantime_serde")]
    pub max_reconnect_delay: Duration,
    /// How long the server may stay silent before the client pings it; a
    /// connection is given up after three unanswered pings. A cut path
    /// (a partition, a node whose address went away) sends no reset, so
    /// this bounds how long a service stays on a connection that leads
    /// nowhere before it moves to another node. async-nats pings every
    /// minute by default, so it would give up after three: longer than
    /// the outages Headroom has to see through. A busy connection never
    /// pings, so this costs nothing under traffic.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// The prefix of this connection's inboxes (`_INBOX` when unset). An
    /// agent sets its own ([`crate::nats_users::inbox_prefix`]), so that
    /// its user may read its own replies and no one else's.
    pub inbox_prefix: Option<String>,
    /// Replicas for the KV buckets and streams this service creates
    /// (3 on a three-node cluster).
    pub replicas: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            credentials_file: None,
            user: None,
            password: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            connect_timeout: Duration::from_secs(5),
            startup_deadline: Duration::from_secs(60),
            max_reconnect_delay: Duration::from_secs(5),
            ping_interval: Duration::from_secs(5),
            inbox_prefix: None,
            replicas: 1,
        }
    }
}

impl NatsConfig {
    /// The server URLs, trimmed.
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines, for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for containers and log shippers.
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `headroom_allocator=debug,info`;
    /// `RUST_LOG`, when set, takes precedence.
    pub filter: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            filter: "info".to_owned(),
        }
    }
}

/// The health and metrics endpoint every service can serve.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// Where `/healthz`, `/readyz` and `/metrics` are served (for example
    /// `0.0.0.0:9090`); not served when unset.
    pub listen: Option<String>,
}

/// The allocator's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllocatorConfig {
    /// This instance's name in logs and audit events; defaults to the host
    /// name.
    pub instance: String,
    /// How long a delivered request may go unacknowledged before JetStream
    /// gives it to another allocator.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How often to look for state a crash left half-written, and for
    /// drains that are due.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// A half-done allocation younger than this is left to the instance
    /// doing it; older ones are repaired.
    #[serde(with = "humantime_serde")]
    pub repair_after: Duration,
    /// Requests applied at the same time by this instance.
    pub max_in_flight: usize,
    /// Grace period for in-flight work at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A change not yet applied by every live front-end this long after
    /// it was written is logged as lagging, naming those behind. It stays
    /// unconfirmed until they apply it or fall silent for three of their
    /// report intervals.
    #[serde(with = "humantime_serde")]
    pub confirm_deadline: Duration,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        Self {
            instance: default_instance(),
            ack_wait: Duration::from_secs(30),
            reconcile_interval: Duration::from_secs(5),
            repair_after: Duration::from_secs(10),
            max_in_flight: 16,
            shutdown_grace: Duration::from_secs(10),
            confirm_deadline: Duration::from_secs(5),
        }
    }
}

/// The monitor's settings. Scaling levels and windows are per cluster, in
/// the cluster's policy; these are about the process.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// This instance's name in logs, requests and audit events.
    pub instance: String,
    /// How many shards the clusters are split into, by a stable hash of
    /// their id. Every instance of a deployment must say the same. Live
    /// instances share the shards evenly by leases in KV, so more shards
    /// than instances spread the work better (1: one instance decides
    /// everything and the others stand by).
    pub shards: u32,
    /// How long a shard's lease lasts without renewal: an instance that
    /// stops renewing stops deciding within half of it, and another takes
    /// the shard after all of it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Time for the decisions already made to be sent on SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Gone: shards are taken by lease. Kept only to say so clearly.
    #[doc(hidden)]
    pub shard: Option<u32>,
    /// How often each cluster is evaluated.
    #[serde(with = "humantime_serde")]
    pub evaluate_interval: Duration,
    /// Decide and log, but send nothing.
    pub dry_run: bool,
    /// Also write every decision, one JSON line each, to this file.
    pub decision_log: Option<PathBuf>,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            instance: default_instance(),
            shards: 1,
            lease_ttl: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            shard: None,
            evaluate_interval: Duration::from_secs(1),
            dry_run: false,
            decision_log: None,
        }
    }
}

/// What the agent runs when its server is allocated or released.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Hook {
    /// A program and its arguments, run without a shell; it learns the
    /// event from `HEADROOM_EVENT`, `HEADROOM_SERVER`, `HEADROOM_CLUSTER`.
    Command(Vec<String>),
    /// An HTTP POST to the local application; any 2xx is success.
    Http(String),
}

/// The agent's settings: which server it speaks for and how to sample it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The server's id in the pool; defaults to the host name.
    pub server: String,
    /// Where front-ends reach the server.
    pub address: String,
    pub port: u16,
    /// The request types it serves.
    pub request_types: Vec<String>,
    /// How often to sample and report.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The application's stats endpoint (`http://host:port/path`), serving
    /// JSON with any of `in_flight`, `requests_per_s`, `latency_p50_ms`,
    /// `latency_p99_ms`, `errors_per_s`.
    pub stats_url: Option<String>,
    /// Unreadable stats reads in a row after which a member's application
    /// counts as dead: the agent reports `failed`, and the allocator
    /// replaces the member (0: never).
    pub stats_failures: u32,
    /// Where the kernel's counters are read (`/proc`).
    pub proc_root: PathBuf,
    /// The network interfaces counted; empty counts all but loopback.
    pub interfaces: Vec<String>,
    /// Register the server in the pool at start when it is not known yet.
    pub register: bool,
    pub on_allocate: Option<Hook>,
    pub on_release: Option<Hook>,
    /// Longest a hook may run before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub hook_timeout: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            server: default_instance(),
            address: String::new(),
            port: 0,
            request_types: Vec::new(),
            interval: Duration::from_secs(1),
            stats_url: None,
            stats_failures: 3,
            proc_root: PathBuf::from("/proc"),
            interfaces: Vec::new(),
            register: true,
            on_allocate: None,
            on_release: None,
            hook_timeout: Duration::from_secs(30),
        }
    }
}

/// The front-end's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrontendConfig {
    /// This instance's name in reports and logs.
    pub instance: String,
    /// The cluster it serves.
    pub cluster: String,
    /// Where it listens for clients.
    pub listen: String,
    /// Worker threads, each with its own listener on the port, runtime and
    /// upstream connections; defaults to the number of cores.
    pub workers: usize,
    /// Pin each worker thread to a CPU of its own (of those the process
    /// may run on), so the scheduler does not move workers onto one core
    /// while another idles. Skipped when there are more workers than CPUs.
    pub pin_workers: bool,
    /// Every routing change is written here; at start without NATS it
    /// serves from it.
    pub last_known_good: Option<PathBuf>,
    /// Bytes of responses kept in the cache (0 turns the cache off).
    pub cache_bytes: u64,
    /// Largest response body that is cached.
    pub cache_max_object: u64,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: u64,
    /// Most client connections open at once (shared evenly by the
    /// workers). At the limit no more are accepted until one closes: new
    /// ones wait in the listen queue, rather than the process running out
    /// of file descriptors or memory. Open WebSocket tunnels count.
    pub max_connections: usize,
    /// Connecting to a member.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A whole request to a member, until its response head.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A client has this long to send a request head; it also closes a
    /// keep-alive connection idle this long (so keep it longer than
    /// clients keep idle connections).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A kept-alive connection to a member idle this long is not used
    /// again: keep it below the members' own keep-alive timeout, or a
    /// member may close one just as a request goes out on it (a GET is
    /// sent again on a new connection, a POST gets a 502).
    #[serde(with = "humantime_serde")]
    pub member_idle_timeout: Duration,
    /// A new member's share ramps up over this long.
    #[serde(with = "humantime_serde")]
    pub slow_start: Duration,
    /// Consecutive connection failures that eject a member.
    pub eject_after: u32,
    /// How long an ejected member is left alone before a probe.
    #[serde(with = "humantime_serde")]
    pub eject_for: Duration,
    /// How often to report what it observes.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    /// Requests held at most while the cluster has no member; past it, a
    /// 503 with `Retry-After`.
    pub hold_max: usize,
    /// How long a held request waits for a member before a 503 with
    /// `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub hold_timeout: Duration,
    /// How often the cluster record is read from KV and compared with the
    /// routing in use: how late, at worst, a change is applied whose
    /// membership message was lost (one KV read per front-end each time).
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            instance: default_instance(),
            cluster: String::new(),
            listen: "0.0.0.0:8080".to_owned(),
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            pin_workers: true,
            last_known_good: None,
            cache_bytes: 64 << 20,
            cache_max_object: 1 << 20,
            max_header_bytes: 16 << 10,
            max_body_bytes: 10 << 20,
            max_connections: 8_192,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(60),
            // Below the 30 s or more most servers keep an idle connection
            // (nginx 75 s, Apache 5 s being the exception to know).
            member_idle_timeout: Duration::from_secs(20),
            slow_start: Duration::from_secs(10),
            eject_after: 3,
            eject_for: Duration::from_secs(5),
            report_interval: Duration::from_secs(1),
            hold_max: 1_000,
            hold_timeout: Duration::from_secs(15),
            resync_interval: Duration::from_secs(10),
        }
    }
}

/// The sample backend's settings: a content server with a cost per
/// request, for demonstrations, tests and benchmarks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// Its name, in the `x-backend` header of every answer.
    pub name: String,
    pub listen: String,
    /// Time spent waiting on each request (a `cost_ms` query parameter
    /// overrides): latency without load.
    #[serde(with = "humantime_serde")]
    pub cost: Duration,
    /// CPU burnt on each request (a `cpu_ms` query parameter overrides):
    /// the load an agent sees.
    #[serde(with = "humantime_serde")]
    pub cpu_cost: Duration,
    /// Bytes of body per answer (a `size` query parameter overrides).
    pub size: usize,
    /// Paths under this prefix are answered as cacheable for `cache_max_age`.
    pub cacheable_prefix: String,
    #[serde(with = "humantime_serde")]
    pub cache_max_age: Duration,
    /// Requests worked on at once; the rest wait in a FIFO queue, as on a
    /// real server with a fixed pool of workers. 0 is no limit.
    pub concurrency: usize,
    /// Requests that may wait for a slot; past it the answer is 503 with
    /// `Retry-After` at once, as a server with a full backlog refuses.
    pub queue_limit: usize,
    /// How each request's waiting time is drawn around `cost`.
    pub service_time: ServiceTime,
    /// The lognormal's shape (the standard deviation of the log).
    pub service_sigma: f64,
    /// Seeds the service-time draws, so that runs repeat.
    pub seed: u64,
}

/// The distribution of a request's service time, whose mean is `cost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTime {
    /// Exactly `cost`.
    #[default]
    Fixed,
    /// Exponential with mean `cost` (an M/M/c server).
    Exponential,
    /// Lognormal with mean `cost` and shape `service_sigma` (a long tail).
    Lognormal,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            name: default_instance(),
            listen: "0.0.0.0:8080".to_owned(),
            cost: Duration::ZERO,
            cpu_cost: Duration::ZERO,
            size: 256,
            cacheable_prefix: "/static/".to_owned(),
            cache_max_age: Duration::from_secs(60),
            concurrency: 8,
            queue_limit: 256,
            service_time: ServiceTime::Fixed,
            service_sigma: 0.5,
            seed: 1,
        }
    }
}

fn default_instance() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("pid-{}", std::process::id()))
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: ::config::ConfigError,
    },
    #[error("configuration: {0}")]
    Parse(#[source] ::config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Config {
    /// Loads the configuration: defaults, then the file (when given), then
    /// `HEADROOM_*` variables from `env`.
    ///
    /// # Errors
    /// When the file cannot be read or parsed, a key is unknown or of the
    /// wrong type, or a value is out of range.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = ::config::Config::builder();
        if let Some(path) = file {
            // Read it ourselves so a missing file is reported as such.
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.to_owned(),
                source: ::config::ConfigError::Foreign(Box::new(e)),
            })?;
            builder =
                builder.add_source(::config::File::from_str(&text, ::config::FileFormat::Toml));
        }
        let overrides: ::config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("HEADROOM_") && k != CONFIG_FILE_ENV)
            .collect();
        builder = builder.add_source(
            ::config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        );
        let config: Config = builder
            .build()
            .and_then(::config::Config::try_deserialize)
            .map_err(ConfigError::Parse)?;
        config.validate()?;
        Ok(config)
    }

    /// Loads from the file named by `HEADROOM_CONFIG` (if any) and the
    /// process environment.
    ///
    /// # Errors
    /// See [`Config::load`].
    pub fn from_env() -> Result<Self, ConfigError> {
        let file = std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from);
        Self::load(file.as_deref(), std::env::vars())
    }

    /// Parses a TOML document over the defaults (tests, embedded configs).
    ///
    /// # Errors
    /// See [`Config::load`].
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = ::config::Config::builder()
            .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
            .build()
            .and_then(::config::Config::try_deserialize)
            .map_err(ConfigError::Parse)?;
        config.validate()?;
        Ok(config)
    }

    /// # Errors
    /// The first out-of-range value, by key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        self.allocator.validate()?;
        self.monitor.validate()?;
        self.agent.validate()?;
        self.frontend.validate()?;
        self.backend.validate()
    }
}

/// The error for `key`, whose value is out of range.
fn invalid(key: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key,
        reason: reason.into(),
    })
}

impl NatsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let urls = self.urls();
        if urls.is_empty() {
            return invalid("nats.url", "no server URL given");
        }
        if let Some(bad) = urls
            .iter()
            .find(|u| u.contains(char::is_whitespace) || u.ends_with(':'))
        {
            return invalid("nats.url", format!("{bad:?} is not a server URL"));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return invalid(
                "nats.tls_cert_file",
                "tls_cert_file and tls_key_file go together",
            );
        }
        if self.user.is_some() != self.password.is_some() {
            return invalid("nats.user", "user and password go together");
        }
        if self.connect_timeout.is_zero() {
            return invalid("nats.connect_timeout", "must be above zero");
        }
        if self.ping_interval < Duration::from_millis(100) {
            return invalid("nats.ping_interval", "must be at least 100ms");
        }
        if !(1..=5).contains(&self.replicas) {
            return invalid("nats.replicas", "must be between 1 and 5");
        }
        Ok(())
    }
}

impl AllocatorConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.instance.is_empty() {
            return invalid("allocator.instance", "must not be empty");
        }
        if self.ack_wait < Duration::from_secs(1) {
            return invalid("allocator.ack_wait", "must be at least 1s");
        }
        if self.reconcile_interval.is_zero() {
            return invalid("allocator.reconcile_interval", "must be above zero");
        }
        if self.max_in_flight == 0 {
            return invalid("allocator.max_in_flight", "must be at least 1");
        }
        Ok(())
    }
}

impl MonitorConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.shard.is_some() {
            return invalid(
                "monitor.shard",
                "is gone: instances now take shards by lease; remove it and keep monitor.shards",
            );
        }
        if !(1..=1024).contains(&self.shards) {
            return invalid("monitor.shards", "must be between 1 and 1024");
        }
        if self.lease_ttl < Duration::from_millis(200) {
            return invalid("monitor.lease_ttl", "must be at least 200ms");
        }
        if self.evaluate_interval < Duration::from_millis(100) {
            return invalid("monitor.evaluate_interval", "must be at least 100ms");
        }
        Ok(())
    }
}

impl AgentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.interval < Duration::from_millis(100) {
            return invalid("agent.interval", "must be at least 100ms");
        }
        if self.hook_timeout.is_zero() {
            return invalid("agent.hook_timeout", "must be above zero");
        }
        if let Some(url) = &self.stats_url {
            if !url.starts_with("http://") {
                return invalid("agent.stats_url", "must be an http:// URL");
            }
        }
        for (key, hook) in [
            ("agent.on_allocate", &self.on_allocate),
            ("agent.on_release", &self.on_release),
        ] {
            match hook {
                Some(Hook::Command(argv)) if argv.is_empty() => {
                    return invalid(key, "the command is empty");
                }
                Some(Hook::Http(url)) if !url.starts_with("http://") => {
                    return invalid(key, "must be an http:// URL");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl FrontendConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_header_bytes < 8192 {
            return invalid("frontend.max_header_bytes", "must be at least 8192");
        }
        if self.max_connections == 0 {
            return invalid("frontend.max_connections", "must be above zero");
        }
        for (key, d) in [
            ("frontend.connect_timeout", self.connect_timeout),
            ("frontend.request_timeout", self.request_timeout),
            ("frontend.header_timeout", self.header_timeout),
            ("frontend.member_idle_timeout", self.member_idle_timeout),
            ("frontend.report_interval", self.report_interval),
            ("frontend.eject_for", self.eject_for),
        ] {
            if d.is_zero() {
                return invalid(key, "must be above zero");
            }
        }
        Ok(())
    }
}

impl BackendConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.service_sigma.is_finite() && (0.0..=4.0).contains(&self.service_sigma)) {
            return invalid("backend.service_sigma", "must be between 0 and 4");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_from_a_literal() {
        let config = Config::from_toml(
            r#"
            [nats]
            url = "nats://a:4222, nats://b:4222"
            replicas = 3
            [telemetry]
            format = "json"
            [allocator]
            ack_wait = "45s"
            instance = "alloc-1"
            "#,
        )
        .expect("valid config");
        assert_eq!(config.nats.urls(), vec!["nats://a:4222", "nats://b:4222"]);
        assert_eq!(config.nats.replicas, 3);
        assert_eq!(config.telemetry.format, LogFormat::Json);
        assert_eq!(config.allocator.ack_wait, Duration::from_secs(45));
        assert_eq!(config.allocator.max_in_flight, 16, "default kept");
        assert_eq!(config.nats.ping_interval, Duration::from_secs(5));
    }

    #[test]
    fn agent_hooks_and_monitor_shards() {
        let config = Config::from_toml(
            r#"
            [monitor]
            shards = 12
            lease_ttl = "2s"
            dry_run = true
            [agent]
            server = "web-1"
            port = 8080
            on_allocate = { command = ["/bin/warm", "--fast"] }
            on_release = { http = "http://127.0.0.1:8080/drain" }
            "#,
        )
        .expect("valid config");
        assert_eq!(config.monitor.shards, 12);
        assert_eq!(config.monitor.lease_ttl, Duration::from_secs(2));
        assert!(config.monitor.dry_run);
        assert_eq!(
            config.agent.on_allocate,
            Some(Hook::Command(vec!["/bin/warm".into(), "--fast".into()]))
        );
        assert_eq!(
            config.agent.on_release,
            Some(Hook::Http("http://127.0.0.1:8080/drain".into()))
        );
        let err = Config::from_toml("[monitor]\nshard = 1\nshards = 2").expect_err("shard");
        assert!(err.to_string().contains("by lease"), "{err}");
        let err = Config::from_toml("[monitor]\nshards = 0").expect_err("no shard");
        assert!(err.to_string().contains("monitor.shards"), "{err}");
        let err = Config::from_toml("[agent]\non_allocate = { command = [] }").expect_err("empty");
        assert!(err.to_string().contains("agent.on_allocate"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = Config::from_toml("[nats]\nurll = \"x\"").expect_err("typo");
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Config::from_toml("[allocator]\nmax_in_flight = 0").expect_err("zero");
        assert!(err.to_string().contains("allocator.max_in_flight"), "{err}");
        let err = Config::from_toml("[allocator]\nack_wait = \"soon\"").expect_err("duration");
        assert!(err.to_string().contains("ack_wait"), "{err}");
        let err = Config::from_toml("[nats]\nping_interval = \"10ms\"").expect_err("too often");
        assert!(err.to_string().contains("nats.ping_interval"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("headroom.toml");
        std::fs::write(&path, "[nats]\nurl = \"nats://file:4222\"\n").expect("write");
        let env = [
            (
                "HEADROOM_NATS__URL".to_owned(),
                "nats://env:4222".to_owned(),
            ),
            (
                "HEADROOM_ALLOCATOR__MAX_IN_FLIGHT".to_owned(),
                "4".to_owned(),
            ),
            (CONFIG_FILE_ENV.to_owned(), "ignored".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ];
        let config = Config::load(Some(&path), env).expect("valid");
        assert_eq!(config.nats.url, "nats://env:4222");
        assert_eq!(config.allocator.max_in_flight, 4);
    }

    #[test]
    fn a_missing_file_is_named() {
        let err =
            Config::load(Some(Path::new("/nonexistent/headroom.toml")), []).expect_err("missing");
        assert!(
            err.to_string().contains("/nonexistent/headroom.toml"),
            "{err}"
        );
    }
}
