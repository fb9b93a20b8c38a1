//! `headroom-probe [--print] URL`: exits 0 when `GET URL` answers 2xx within
//! two seconds, 1 otherwise; `--print` also writes the body to stdout. The
//! health check of Headroom's images, which are built `FROM scratch` and
//! have no shell or curl, and the way to read a service's `/metrics` from
//! inside its container (`docker exec … /probe --print URL`) when its ops
//! port is not published.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    let print = args.next_if(|a| a == "--print").is_some();
    let (Some(url), None) = (args.next(), args.next()) else {
        eprintln!("usage: headroom-probe [--print] http://host:port/path");
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
        Ok(body) if print => match std::io::stdout().write_all(&body) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("headroom-probe: cannot write the body: {err}");
                ExitCode::FAILURE
            }
        },
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("headroom-probe: {err}");
            ExitCode::FAILURE
        }
    }
}
