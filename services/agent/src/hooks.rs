//! The hooks the agent runs when its server is allocated or released: a
//! program (no shell; it learns the event from its environment) or an HTTP
//! POST to the local application. Either must finish within the timeout.

use std::process::Stdio;
use std::time::Duration;

use headroom_shared::config::Hook;
use headroom_shared::{ClusterId, ServerId};

/// Which hook is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookEvent {
    Allocate,
    Release,
}

impl HookEvent {
    pub fn name(self) -> &'static str {
        match self {
            HookEvent::Allocate => "allocate",
            HookEvent::Release => "release",
        }
    }
}

/// Runs `hook` for `event` (no hook: nothing to do, success); `Err` carries
/// why it failed, for the status the allocator reads.
///
/// # Errors
/// The program could not start, exited non-zero, or took too long; the
/// HTTP call failed or answered outside 2xx.
pub async fn run(
    hook: Option<&Hook>,
    event: HookEvent,
    server: &ServerId,
    cluster: &ClusterId,
    timeout: Duration,
) -> Result<(), String> {
    let Some(hook) = hook else {
        return Ok(());
    };
    match hook {
        Hook::Command(argv) => {
            let Some((program, args)) = argv.split_first() else {
                return Err("empty command".to_owned());
            };
            let mut child = tokio::process::Command::new(program)
                .args(args)
                .env("HEADROOM_EVENT", event.name())
                .env("HEADROOM_SERVER", server.as_str())
                .env("HEADROOM_CLUSTER", cluster.as_str())
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("{program}: {e}"))?;
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) if status.success() => Ok(()),
                Ok(Ok(status)) => Err(format!("{program} {} hook: {status}", event.name())),
                Ok(Err(e)) => Err(format!("{program}: {e}")),
                Err(_) => {
                    // Dropping the child kills it.
                    Err(format!(
                        "{program} {} hook: no exit within {timeout:?}",
                        event.name()
                    ))
                }
            }
        }
        Hook::Http(url) => {
            let body = serde_json::json!({
                "event": event.name(),
                "server": server.as_str(),
                "cluster": cluster.as_str(),
            });
            let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
            headroom_shared::http_client::call("POST", url, Some(&body), timeout)
                .await
                .map(|_| ())
                .map_err(|e| format!("{} hook: {e}", event.name()))
        }
    }
}
