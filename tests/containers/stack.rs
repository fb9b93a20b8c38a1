//! The compose stack under test: brought up under its own project name
//! with free host ports, reached through NATS and the front-ends' ports,
//! partitioned with `docker network disconnect`, and torn down after
//! (`down -v`), also when a test fails.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use headroom_loadgen::{Profile, Summary, Target};
use headroom_shared::codec::Codec;
use headroom_shared::kv::CLUSTERS_BUCKET;
use headroom_shared::records::{ClusterRecord, MemberState, ServerState};
use headroom_shared::wire::{AuditEvent, EventKind};
use headroom_shared::{nats_users, ServerId};
use headroom_tests::eventually;

use crate::common::Snapshot;
use crate::history::record_history;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub fn enabled() -> bool {
    if std::env::var("HEADROOM_CONTAINER_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "container tests not run: set HEADROOM_CONTAINER_TESTS=1 with a Docker engine and \
         the images built (scripts/test.sh does both when Docker is present)"
    );
    false
}

/// A free TCP port on this host (the kernel's choice, released at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The passwords compose gives the stack, from the repository's `.env`.
pub fn passwords() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(format!("{ROOT}/../.env")).expect(".env");
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// One compose project: up on creation, `down -v` on drop.
pub struct Stack {
    project: String,
    files: Vec<&'static str>,
    env: Vec<(String, String)>,
    nats_port: u16,
    frontend_ports: [u16; 2],
    /// Each NATS node's monitoring port on this host, `nats` first.
    pub monitor_ports: Vec<u16>,
}

impl Stack {
    /// Brings project `name` up: the NATS nodes first, then the mirrors
    /// that record the KV history (before any service writes to KV), then
    /// the rest. `cluster` selects the 3-node NATS variant.
    pub async fn up(name: &str, cluster: bool) -> Self {
        let project = format!("headroom-it-{}-{name}", std::process::id());
        let nats_port = free_port();
        let frontend_ports = [free_port(), free_port()];
        let nodes: &[&str] = if cluster {
            &["nats", "nats-2", "nats-3"]
        } else {
            &["nats"]
        };
        let monitor_ports: Vec<u16> = nodes.iter().map(|_| free_port()).collect();
        let mut env = vec![
            ("HEADROOM_NATS_PORT".to_owned(), nats_port.to_string()),
            (
                "HEADROOM_FRONTEND_1_PORT".to_owned(),
                frontend_ports[0].to_string(),
            ),
            (
                "HEADROOM_FRONTEND_2_PORT".to_owned(),
                frontend_ports[1].to_string(),
            ),
        ];
        for (node, port) in ["", "_2", "_3"].iter().zip(&monitor_ports) {
            env.push((
                format!("HEADROOM_NATS{node}_MONITOR_PORT"),
                port.to_string(),
            ));
        }
        let mut files = vec!["docker-compose.yml"];
        if cluster {
            files.push("docker-compose.cluster.yml");
            env.push((
                "HEADROOM_NATS_URLS".to_owned(),
                "nats://nats:4222,nats://nats-2:4222,nats://nats-3:4222".to_owned(),
            ));
            env.push(("HEADROOM_NATS_REPLICAS".to_owned(), "3".to_owned()));
        }
        let stack = Self {
            project,
            files,
            env,
            nats_port,
            frontend_ports,
            monitor_ports,
        };
        let mut first = vec!["up", "-d", "--no-build"];
        first.extend(nodes);
        stack.compose(&first);
        let js = jetstream::new(stack.operator().await);
        let replicas = nodes.len();
        let recorded = eventually(Duration::from_secs(60), || async {
            record_history(&js, replicas).await.ok()
        })
        .await;
        assert!(
            recorded.is_some(),
            "the KV history mirrors made\n{}",
            stack.logs("nats")
        );
        stack.compose(&["up", "-d", "--no-build"]);
        stack
    }

    fn command(&self, args: &[&str]) -> Command {
        // Compose v2 (`docker compose`) when there is one, else v1.
        let v2 = Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        let mut command = if v2 {
            let mut c = Command::new("docker");
            c.arg("compose");
            c
        } else {
            Command::new("docker-compose")
        };
        command.current_dir(format!("{ROOT}/.."));
        command.arg("-p").arg(&self.project);
        for file in &self.files {
            command.arg("-f").arg(file);
        }
        command.args(args);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        command
    }

    /// The container of `service`.
    pub fn container(&self, service: &str) -> String {
        self.compose(&["ps", "-q", service]).trim().to_owned()
    }

    /// Cuts `service` off network `network` (`bus`: NATS; `app`:
    /// requests), as a partition would: no reset reaches either side.
    pub fn cut(&self, service: &str, network: &str) {
        let network = format!("{}_{network}", self.project);
        docker(&["network", "disconnect", &network, &self.container(service)]);
    }

    /// Connects `service` to `network` again, under its service name.
    pub fn heal(&self, service: &str, network: &str) {
        let network = format!("{}_{network}", self.project);
        let container = self.container(service);
        docker(&[
            "network", "connect", "--alias", service, &network, &container,
        ]);
    }

    /// How often docker restarted `service`'s container.
    pub fn restarts(&self, service: &str) -> u32 {
        let container = self.container(service);
        let out = docker(&["inspect", "-f", "{{.RestartCount}}", &container]);
        out.trim().parse().unwrap_or(0)
    }

    /// A gauge or counter from `service`'s own `/metrics`, read inside its
    /// container (its ops port is not published), summed over labels.
    pub fn metric(&self, service: &str, name: &str) -> Option<f64> {
        let out = docker(&[
            "exec",
            &self.container(service),
            "/probe",
            "--print",
            "http://127.0.0.1:9090/metrics",
        ]);
        let values: Vec<f64> = out
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Runs `docker-compose <args>` for this project; panics with its
    /// output when it fails.
    pub fn compose(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("docker-compose runs");
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn logs(&self, service: &str) -> String {
        let out = self
            .command(&["logs", "--no-color", "--tail", "200", service])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    pub async fn operator(&self) -> async_nats::Client {
        let password = passwords()
            .remove("HEADROOM_OPERATOR_PASSWORD")
            .expect("operator password");
        self.client_as("operator", &password).await
    }

    pub async fn client_as(&self, user: &str, password: &str) -> async_nats::Client {
        self.connect(
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into()),
            user,
        )
        .await
    }

    /// A client with the credentials and inbox prefix of `server`'s agent.
    pub async fn client_as_agent(&self, server: &ServerId) -> async_nats::Client {
        let password = passwords()
            .remove(&nats_users::password_variable(server))
            .expect("the agent's password");
        let user = nats_users::user(server);
        let options = async_nats::ConnectOptions::with_user_and_password(user.clone(), password)
            .custom_inbox_prefix(nats_users::inbox_prefix(server));
        self.connect(options, &user).await
    }

    async fn connect(&self, options: async_nats::ConnectOptions, user: &str) -> async_nats::Client {
        let url = format!("nats://127.0.0.1:{}", self.nats_port);
        // A connection attempt spends its options: each one gets a copy.
        let client = eventually(Duration::from_secs(60), || async {
            options.clone().connect(&url).await.ok()
        })
        .await;
        client.unwrap_or_else(|| panic!("NATS at {url} as {user}\n{}", self.logs("nats")))
    }

    pub fn target(&self, frontend: usize) -> Target {
        Target {
            base: format!("http://127.0.0.1:{}", self.frontend_ports[frontend]),
            paths: vec!["/api/item".to_owned()],
            timeout: Duration::from_secs(10),
            max_in_flight: 4096,
        }
    }
}

/// A stack whose cluster `web` has reached its minimum, with the
/// operator's connection to it.
pub struct Started {
    pub stack: Stack,
    pub operator: async_nats::Client,
    pub js: jetstream::Context,
    /// Cluster `web` at its minimum of one member.
    pub web: ClusterRecord,
}

/// Brings project `name` up (see [`Stack::up`]) and waits for cluster
/// `web` at its minimum; `None` when container tests are not enabled.
pub async fn started(name: &str, cluster: bool) -> Option<Started> {
    if !enabled() {
        return None;
    }
    let stack = Stack::up(name, cluster).await;
    let operator = stack.operator().await;
    let js = jetstream::new(operator.clone());
    let web = wait_members(&js, Duration::from_secs(120), |n| n == 1)
        .await
        .unwrap_or_else(|| panic!("cluster web at its minimum\n{}", stack.logs("allocator")));
    Some(Started {
        stack,
        operator,
        js,
        web,
    })
}

/// A JSON page of the NATS node whose monitoring port is `port`.
async fn monitoring(port: u16, page: &str) -> Option<serde_json::Value> {
    let url = format!("http://127.0.0.1:{port}/{page}");
    let body = headroom_shared::http_client::call("GET", &url, None, Duration::from_secs(2))
        .await
        .ok()?;
    serde_json::from_slice(&body).ok()
}

/// Routes of the NATS node whose monitoring port is `port`.
pub async fn routes(port: u16) -> Option<u64> {
    monitoring(port, "routez").await?["num_routes"].as_u64()
}

/// The names of Headroom's connections to the node whose monitoring port
/// is `port`.
pub async fn connections(port: u16) -> Option<Vec<String>> {
    let page = monitoring(port, "connz?limit=1024").await?;
    Some(
        page["connections"]
            .as_array()?
            .iter()
            .filter_map(|c| c["name"].as_str())
            .filter(|name| name.starts_with("headroom-"))
            .map(str::to_owned)
            .collect(),
    )
}

/// Runs `docker <args>`; panics with its output when it fails.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    assert!(
        out.status.success(),
        "docker {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Torn down even when the test failed.
        let _ = self
            .command(&["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
    }
}

pub async fn record(js: &jetstream::Context) -> Option<ClusterRecord> {
    let bucket = js.get_key_value(CLUSTERS_BUCKET).await.ok()?;
    let entry = bucket.get("web").await.ok()??;
    Codec::MsgPack.decode(&entry).ok()
}

pub fn active(record: &ClusterRecord) -> Vec<ServerId> {
    record
        .members
        .iter()
        .filter(|m| m.state == MemberState::Active)
        .map(|m| m.server.clone())
        .collect()
}

/// Waits until cluster `web` has `want(active members)`, for `within`.
pub async fn wait_members(
    js: &jetstream::Context,
    within: Duration,
    want: impl Fn(usize) -> bool,
) -> Option<ClusterRecord> {
    eventually(within, || async {
        let record = record(js).await?;
        want(active(&record).len()).then_some(record)
    })
    .await
}

/// Plays `spec` against front-end `frontend` in the background.
pub fn load(stack: &Stack, frontend: usize, spec: &str) -> tokio::task::JoinHandle<Summary> {
    let profile = Profile::parse(spec).expect("profile");
    let target = stack.target(frontend);
    tokio::spawn(async move { headroom_loadgen::run(&profile, &target, None).await })
}

/// `server` is out of service in `snapshot`, and in no cluster `web`.
pub fn replaced(snapshot: &Snapshot, server: &ServerId) -> bool {
    let out = snapshot
        .servers
        .get(server)
        .is_some_and(|(r, _)| matches!(r.state, ServerState::OutOfService { .. }));
    out && !active(snapshot.cluster("web")).contains(server)
}

pub fn servers() -> Vec<ServerId> {
    (1..=4)
        .map(|n| ServerId::new(format!("backend-{n}")).expect("id"))
        .collect()
}

/// Every server in exactly one place, once nothing is in flight.
pub async fn invariants_hold(js: &jetstream::Context) {
    let settled = eventually(Duration::from_secs(60), || async {
        let snapshot = Snapshot::read(js).await;
        snapshot.settled().then_some(snapshot)
    })
    .await
    .expect("the stack settles");
    settled
        .check_invariants(&servers())
        .unwrap_or_else(|err| panic!("KV invariants: {err}"));
}

/// No request was applied twice: one allocation or return to the pool per
/// (request, server), however often a request was delivered.
pub fn applied_once(events: &[AuditEvent]) {
    let mut seen = std::collections::HashSet::new();
    for event in events {
        if matches!(event.kind, EventKind::Allocated | EventKind::Released) {
            let key = (
                event.kind.token(),
                event.request.clone(),
                event.server.clone(),
            );
            assert!(seen.insert(key), "applied twice: {event:?}");
        }
    }
}
