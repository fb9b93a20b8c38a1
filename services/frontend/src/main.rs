//! The front-end binary: configuration, tracing, then [`Frontend`]. It
//! connects to NATS in the background, so it serves from its last-known-good
//! file while NATS cannot be reached.

use std::process::ExitCode;

use headroom_frontend::Frontend;
use headroom_shared::{ops, service, shutdown};

fn main() -> ExitCode {
    let config = match service::configure("headroom-frontend") {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match service::runtime("headroom-frontend") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    raise_open_file_limit(config.frontend.max_connections);
    runtime.block_on(async {
        let shutdown = shutdown::on_signal();
        let listen = config.ops.listen.clone();
        match Frontend::bind(config).await {
            Ok(frontend) => {
                if let Err(err) = ops::start(&frontend.ops(), listen.as_deref(), &shutdown).await {
                    tracing::error!("cannot serve health and metrics: {err}");
                    return ExitCode::FAILURE;
                }
                frontend.serve(shutdown).await;
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!("{err}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Raises the soft limit on open files towards what `max_connections`
/// needs, as far as the hard limit allows (as nginx's
/// `worker_rlimit_nofile` does): systemd starts services with a soft limit
/// of 1024, which a proxy would hit long before its own limit.
fn raise_open_file_limit(max_connections: usize) {
    // Each connection with a request in flight holds two descriptors, the
    // client's and the member's; the rest is for idle member connections,
    // NATS and files.
    let wanted = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_mul(2)
        .saturating_add(1024);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(soft) if soft < wanted => tracing::warn!(
            soft,
            wanted,
            "the open-file limit is below what frontend.max_connections needs; raise the hard limit (ulimit -n, LimitNOFILE) or lower max_connections"
        ),
        Ok(soft) => tracing::debug!(soft, "open-file limit"),
        Err(err) => tracing::warn!(%err, "cannot raise the open-file limit"),
    }
}
