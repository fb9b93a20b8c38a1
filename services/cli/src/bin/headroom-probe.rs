//! `headroom-probe URL`: exits 0 when `GET URL` answers 2xx within two
//! seconds, 1 otherwise. The health check of Headroom's images, which are
//! built `FROM scratch` and have no shell or curl.

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("usage: headroom-probe http://host:port/path");
        return ExitCode::from(64);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("headroom-probe: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(headroom_shared::http_client::call(
        "GET",
        &url,
        None,
        Duration::from_secs(2),
    )) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("headroom-probe: {err}");
            ExitCode::FAILURE
        }
    }
}
