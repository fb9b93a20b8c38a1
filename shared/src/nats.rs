//! Connecting to NATS: credentials, TLS, bounded start-up retry, and
//! reconnects with capped exponential backoff. Client events are logged and
//! counted, because a slow consumer silently drops messages and its event is
//! the only sign of it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use rand::Rng;

use crate::config::NatsConfig;

/// Counts of what the client has seen happen to its connection.
#[derive(Debug)]
pub struct ConnectionEvents {
    pub disconnects: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub server_errors: AtomicU64,
    /// Connections made, for those who must catch up on what core NATS
    /// did not deliver while there was none.
    connections: tokio::sync::watch::Sender<u64>,
}

impl Default for ConnectionEvents {
    fn default() -> Self {
        Self {
            disconnects: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            connections: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl ConnectionEvents {
    /// Changes each time the client connects from now on (after a
    /// disconnection, to the same node or another).
    pub fn connected(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connections.subscribe()
    }

    fn record(&self, event: &Event) {
        match event {
            Event::Disconnected => {
                self.disconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("disconnected from NATS; reconnecting");
            }
            Event::Connected => {
                self.connections.send_modify(|n| *n += 1);
                tracing::info!("connected to NATS");
            }
            Event::SlowConsumer(sid) => {
                self.slow_consumers.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sid, "slow consumer: messages were dropped");
            }
            Event::ServerError(err) => {
                self.server_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%err, "NATS server error");
            }
            other => tracing::debug!(event = %other, "NATS client event"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not connect to NATS at {urls} within {deadline:?}: {source}")]
    Unreachable {
        urls: String,
        deadline: Duration,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Reconnect backoff: 100 ms doubling, capped, with up to 20 % jitter so a
/// fleet does not reconnect in lockstep.
pub fn reconnect_delay(attempts: usize, cap: Duration) -> Duration {
    let exp = u32::try_from(attempts.min(16)).unwrap_or(16);
    let base = Duration::from_millis(100).saturating_mul(2u32.saturating_pow(exp));
    let base = base.min(cap);
    let jitter_ms = u64::try_from(base.as_millis() / 5).unwrap_or(0);
    base + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
}

async fn options(
    config: &NatsConfig,
    name: &str,
    events: Arc<ConnectionEvents>,
) -> Result<ConnectOptions, ConnectError> {
    let mut options = match &config.credentials_file {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| ConnectError::Credentials {
                path: path.display().to_string(),
                source,
            })?,
        None => ConnectOptions::new(),
    };
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if let Some(prefix) = &config.inbox_prefix {
        options = options.custom_inbox_prefix(prefix.clone());
    }
    let cap = config.max_reconnect_delay;
    Ok(options
        .name(name)
        .require_tls(config.tls_required)
        .connection_timeout(config.connect_timeout)
        .ping_interval(config.ping_interval)
        .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, cap))
        .event_callback(move |event| {
            let events = events.clone();
            async move { events.record(&event) }
        }))
}

/// Connects, retrying with backoff until `startup_deadline`: services in a
/// compose stack may start before NATS does.
///
/// # Errors
/// When the credentials file cannot be read, or no server answered in time.
pub async fn connect(
    config: &NatsConfig,
    name: &str,
) -> Result<(Client, Arc<ConnectionEvents>), ConnectError> {
    let events = Arc::new(ConnectionEvents::default());
    // Each URL on its own: a comma-joined string is parsed as one address.
    let servers = config.urls();
    let urls = servers.join(",");
    let started = tokio::time::Instant::now();
    let mut attempt = 0usize;
    loop {
        let options = options(config, name, events.clone()).await?;
        match options.connect(servers.as_slice()).await {
            Ok(client) => return Ok((client, events)),
            Err(source) => {
                let delay = reconnect_delay(attempt, config.max_reconnect_delay);
                if started.elapsed() + delay > config.startup_deadline {
                    return Err(ConnectError::Unreachable {
                        urls,
                        deadline: config.startup_deadline,
                        source,
                    });
                }
                tracing::warn!(%source, attempt, ?delay, "NATS not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let cap = Duration::from_secs(5);
        assert!(reconnect_delay(0, cap) < Duration::from_millis(150));
        assert!(reconnect_delay(3, cap) >= Duration::from_millis(800));
        for attempts in [10, 100, usize::MAX] {
            let d = reconnect_delay(attempts, cap);
            assert!(d >= cap && d <= cap + cap / 5, "{d:?}");
        }
    }
}
