//! A local nats-server with JetStream, for the one-command demo and the
//! integration tests: the pinned binary (`NATS_SERVER_BIN`, then what
//! `scripts/fetch-nats-server.sh` placed in `target/tools/`, then `PATH`),
//! started with Headroom's `nats/nats.conf` on an ephemeral port with its
//! own temporary store, and killed on drop, so several run side by side
//! and leave nothing behind.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use headroom_shared::{nats_users, ServerId};
use tokio::process::{Child, Command};

/// The nats-server version the fixture expects (per-message TTL and the KV
/// behaviour Headroom relies on need 2.11 or later).
pub const PINNED_VERSION: &str = "2.15.1";

#[derive(Debug, thiserror::Error)]
pub enum LocalNatsError {
    #[error(
        "no nats-server binary found (looked at $NATS_SERVER_BIN, {pinned} and $PATH); \
         run scripts/fetch-nats-server.sh or scripts/test.sh, which fetch the pinned {PINNED_VERSION}"
    )]
    Missing { pinned: String },
    #[error(
        "{path} is nats-server {found}; Headroom needs 2.11 or later (pinned {PINNED_VERSION})"
    )]
    TooOld { path: String, found: String },
    #[error("nats-server did not start within {0:?}; its log:\n{1}")]
    NoStart(Duration, String),
    #[error("local nats-server: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agents' users: {0}")]
    Users(#[from] headroom_shared::nats_users::UsersError),
}

/// Headroom's nats-server configuration, the one the compose stack mounts.
const NATS_CONF: &str = include_str!("../../nats/nats.conf");
/// One user per service (`nats/users.conf`) and the configuration that adds
/// them (`nats/secure.conf`).
const USERS_CONF: &str = include_str!("../../nats/users.conf");
const SECURE_CONF: &str = include_str!("../../nats/secure.conf");

/// The services' users `nats/users.conf` defines; each password comes from
/// `HEADROOM_<USER>_PASSWORD` in the server's environment. Agents have a
/// user each (`headroom_shared::nats_users`).
pub const USERS: [&str; 4] = ["allocator", "monitor", "frontend", "operator"];

/// A user the server knows, with the variable its password is read from.
struct Login {
    user: String,
    password: String,
    variable: String,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the nats-server binary is.
///
/// # Errors
/// [`LocalNatsError::Missing`] when none is found, [`LocalNatsError::TooOld`]
/// when it predates 2.11.
pub fn nats_server_binary() -> Result<PathBuf, LocalNatsError> {
    let pinned = workspace_root()
        .join("target/tools")
        .join(format!("nats-server-{PINNED_VERSION}"))
        .join("nats-server");
    let candidates = std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain([pinned.clone()])
        .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .collect::<Vec<_>>()
        }));
    for path in candidates {
        if path.is_file() {
            check_version(&path)?;
            return Ok(path);
        }
    }
    Err(LocalNatsError::Missing {
        pinned: pinned.display().to_string(),
    })
}

fn check_version(path: &Path) -> Result<(), LocalNatsError> {
    let out = std::process::Command::new(path).arg("--version").output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let found = text
        .trim()
        .rsplit('v')
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut parts = found.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (2, 11) {
        return Err(LocalNatsError::TooOld {
            path: path.display().to_string(),
            found,
        });
    }
    Ok(())
}

/// A running nats-server with JetStream, private to its owner.
pub struct NatsServer {
    child: Child,
    url: String,
    /// The users, when started with [`NatsServer::start_secure`].
    users: Vec<Login>,
    /// The configuration file it runs with, inside `dir`.
    conf: PathBuf,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server and waits until it accepts clients.
    ///
    /// # Errors
    /// When the binary is missing or too old, or the server does not come up.
    pub async fn start() -> Result<Self, LocalNatsError> {
        Self::launch(None).await
    }

    /// Starts a server with one user per service (`nats/secure.conf`), each
    /// with a fresh random password; [`NatsServer::config_as`] logs in as
    /// one of them.
    ///
    /// # Errors
    /// As [`NatsServer::start`].
    pub async fn start_secure() -> Result<Self, LocalNatsError> {
        Self::launch(Some(&[])).await
    }

    /// [`NatsServer::start_secure`], with a user for the agent of each of
    /// `servers`, bound to its server as the stack's are;
    /// [`NatsServer::config_as_agent`] logs in as one of them.
    ///
    /// # Errors
    /// As [`NatsServer::start`].
    pub async fn start_secure_with_agents(servers: &[ServerId]) -> Result<Self, LocalNatsError> {
        Self::launch(Some(servers)).await
    }

    async fn launch(agents: Option<&[ServerId]>) -> Result<Self, LocalNatsError> {
        let binary = nats_server_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("headroom-nats-")
            .tempdir()?;
        let login = |user: String, variable: String| Login {
            user,
            password: nuid::next().to_string(),
            variable,
        };
        let mut users: Vec<Login> = Vec::new();
        let mut conf = dir.path().join("nats.conf");
        std::fs::write(&conf, NATS_CONF)?;
        if let Some(agents) = agents {
            users.extend(USERS.iter().map(|user| {
                login(
                    (*user).to_owned(),
                    format!("HEADROOM_{}_PASSWORD", user.to_uppercase()),
                )
            }));
            users.extend(agents.iter().map(|server| {
                login(
                    nats_users::user(server),
                    nats_users::password_variable(server),
                )
            }));
            let users_conf = nats_users::rewrite(USERS_CONF, agents)?;
            std::fs::write(dir.path().join("users.conf"), users_conf)?;
            conf = dir.path().join("secure.conf");
            std::fs::write(&conf, SECURE_CONF)?;
        }
        let (child, url) = spawn(&binary, &conf, dir.path(), &users, "-1").await?;
        Ok(Self {
            child,
            url,
            users,
            conf,
            dir,
        })
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it to
    /// be gone. Its store stays for [`NatsServer::restart`].
    ///
    /// # Errors
    /// When the process cannot be signalled.
    pub async fn kill(&mut self) -> Result<(), LocalNatsError> {
        self.child.kill().await?;
        Ok(())
    }

    /// Starts the server again on the same port and store (after
    /// [`NatsServer::kill`]), and waits until it accepts clients. Clients
    /// reconnect to the same URL.
    ///
    /// # Errors
    /// As [`NatsServer::start`]; also when the port was taken meanwhile.
    pub async fn restart(&mut self) -> Result<(), LocalNatsError> {
        let port = self.url.rsplit(':').next().unwrap_or("-1").to_owned();
        let binary = nats_server_binary()?;
        let (child, url) = spawn(&binary, &self.conf, self.dir.path(), &self.users, &port).await?;
        self.child = child;
        self.url = url;
        Ok(())
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server process's id, while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The server's log so far (for a failure's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// The password of `user`, on a server started with
    /// [`NatsServer::start_secure`].
    pub fn password(&self, user: &str) -> Option<&str> {
        self.users
            .iter()
            .find(|login| login.user == user)
            .map(|login| login.password.as_str())
    }

    /// [`NatsServer::config`], logged in as `user`.
    pub fn config_as(&self, user: &str) -> headroom_shared::config::Config {
        let mut config = self.config();
        config.nats.user = Some(user.to_owned());
        config.nats.password = self.password(user).map(str::to_owned);
        config
    }

    /// [`NatsServer::config`] for the agent of `server`, logged in as its
    /// own user, with its own inbox prefix.
    pub fn config_as_agent(&self, server: &ServerId) -> headroom_shared::config::Config {
        let mut config = self.config_as(&nats_users::user(server));
        config.agent.server = server.to_string();
        config.nats.inbox_prefix = Some(nats_users::inbox_prefix(server));
        config
    }

    /// A client logged in as the agent of `server`, with its inbox prefix.
    ///
    /// # Errors
    /// When the server refuses the connection.
    pub async fn client_as_agent(
        &self,
        server: &ServerId,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        let user = nats_users::user(server);
        async_nats::ConnectOptions::with_user_and_password(
            user.clone(),
            self.password(&user).unwrap_or_default().to_owned(),
        )
        .custom_inbox_prefix(nats_users::inbox_prefix(server))
        .connect(&self.url)
        .await
    }

    /// A client logged in as `user`.
    ///
    /// # Errors
    /// When the server refuses the connection.
    pub async fn client_as(
        &self,
        user: &str,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        async_nats::ConnectOptions::with_user_and_password(
            user.to_owned(),
            self.password(user).unwrap_or_default().to_owned(),
        )
        .connect(&self.url)
        .await
    }

    /// A plain client (the operator's, on a secure server).
    ///
    /// # Errors
    /// When the server does not accept the connection.
    pub async fn client(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        if self.users.is_empty() {
            async_nats::connect(&self.url).await
        } else {
            self.client_as("operator").await
        }
    }

    /// Headroom's configuration pointed at this server, with allocator
    /// timings short enough for tests and demonstrations.
    pub fn config(&self) -> headroom_shared::config::Config {
        let mut config = headroom_shared::config::Config::default();
        config.nats.url = self.url.clone();
        config.nats.startup_deadline = Duration::from_secs(10);
        config.allocator.ack_wait = Duration::from_secs(2);
        config.allocator.reconcile_interval = Duration::from_millis(200);
        config.allocator.repair_after = Duration::from_secs(1);
        config.allocator.shutdown_grace = Duration::from_secs(2);
        config
    }
}

/// Starts nats-server on `port` ("-1": any free one) with its store and
/// log in `dir`, and waits for the ports file it writes once it listens.
async fn spawn(
    binary: &Path,
    conf: &Path,
    dir: &Path,
    users: &[Login],
    port: &str,
) -> Result<(Child, String), LocalNatsError> {
    let log = dir.join("nats.log");
    let mut command = Command::new(binary);
    for login in users {
        command.env(&login.variable, &login.password);
    }
    let child = command
        .arg("-c")
        .arg(conf)
        .args(["-a", "127.0.0.1", "-p", port, "-m", "-1"])
        .arg("-sd")
        .arg(dir.join("store"))
        .arg("--ports_file_dir")
        .arg(dir)
        .arg("-l")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    let ports_file = dir.join(format!("nats-server_{pid}.ports"));
    let deadline = Duration::from_secs(15);
    let url = eventually(deadline, || async {
        let text = tokio::fs::read_to_string(&ports_file).await.ok()?;
        let start = text.find("nats://")?;
        let end = text[start..].find('"')? + start;
        Some(text[start..end].to_owned())
    })
    .await;
    match url {
        Some(url) => Ok((child, url)),
        None => {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            Err(LocalNatsError::NoStart(deadline, log))
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Polls `probe` until it yields `Some`, for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
