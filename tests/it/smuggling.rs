//! Request smuggling, differentially: every ambiguous request of the
//! corpus (`headroom_tests::smuggling`) sent through the real front-end to
//! a recording member, held to its verdict; and, with HAProxy present
//! (`HEADROOM_HAPROXY`, which the test command sets after installing
//! Debian's), sent through HAProxy to the same member, every difference
//! held to its justification.

use std::net::SocketAddr;
use std::time::Duration;

use headroom_frontend::{membership, Frontend};
use headroom_shared::config::Config;
use headroom_shared::records::ClusterRecord;
use headroom_tests::smuggling::{exchange, Outcome, Recorder, CORPUS};
use tokio_util::sync::CancellationToken;

/// A front-end with no NATS (it is never asked), routing to `member`.
async fn frontend(member: SocketAddr, shutdown: &CancellationToken) -> SocketAddr {
    let mut config = Config::default();
    config.nats.url = "nats://127.0.0.1:1".to_owned();
    config.frontend.cluster = "web".to_owned();
    config.frontend.listen = "127.0.0.1:0".to_owned();
    config.frontend.workers = 1;
    let frontend = Frontend::bind(config).await.expect("bind");
    let record: ClusterRecord = serde_json::from_value(serde_json::json!({
        "v": 1, "id": "web", "generation": 1, "updated_ms": 0, "recent": [],
        "policy": {"min_size": 1, "max_size": 1},
        "members": [{"server": "m", "address": member.ip().to_string(), "port": member.port(),
            "request_types": [], "state": "active", "weight": 1.0, "request": "r", "since_ms": 0}]
    }))
    .expect("record");
    membership::install(&frontend.proxy(), &record);
    let addr = frontend.local_addr().expect("addr");
    tokio::spawn(frontend.serve(shutdown.clone()));
    addr
}

/// HAProxy in front of `member`, as Debian ships it, with defaults but
/// for the timeouts; `None` without `HEADROOM_HAPROXY`.
fn haproxy(member: SocketAddr, dir: &std::path::Path) -> Option<(SocketAddr, std::process::Child)> {
    let binary = std::env::var("HEADROOM_HAPROXY").ok()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 2s\n  \
             timeout client 5s\n  timeout server 5s\nfrontend f\n  bind 127.0.0.1:{port}\n  \
             default_backend b\nbackend b\n  server m {member}\n"
        ),
    )
    .expect("config");
    let child = std::process::Command::new(binary)
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("haproxy starts");
    Some((SocketAddr::from(([127, 0, 0, 1], port)), child))
}

async fn listening(addr: SocketAddr) {
    let up = headroom_tests::eventually(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(addr).await.ok()
    })
    .await;
    assert!(up.is_some(), "{addr} listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_requests_reach_the_member_as_haproxy_would_pass_them_or_are_refused() {
    let shutdown = CancellationToken::new();
    let recorder = Recorder::start().await.expect("recorder");
    let ours = frontend(recorder.addr(), &shutdown).await;
    let dir = tempfile::tempdir().expect("dir");
    let peer = haproxy(recorder.addr(), dir.path());
    if let Some((addr, _)) = &peer {
        listening(*addr).await;
    } else {
        eprintln!("HEADROOM_HAPROXY not set: the front-end's verdicts only, no differential");
    }
    let mut wrong = Vec::new();
    let mut table = vec![
        "| case | headroom | haproxy | |".to_owned(),
        "| --- | --- | --- | --- |".to_owned(),
    ];
    for case in CORPUS {
        let got = exchange(ours, case.raw, &recorder).await;
        if !case.verdict.holds_for(&got) {
            wrong.push(format!(
                "{}: expected {:?}, got {got}",
                case.name, case.verdict
            ));
        }
        let Some((addr, _)) = &peer else { continue };
        let theirs: Outcome = exchange(*addr, case.raw, &recorder).await;
        let agree = got.agrees_with(&theirs);
        match (agree, case.differs) {
            (true, None) | (false, Some(_)) => {}
            (true, Some(_)) => {
                wrong.push(format!("{}: said to differ, but both: {got}", case.name))
            }
            (false, None) => wrong.push(format!(
                "{}: headroom {got}; haproxy {theirs}, with no justification",
                case.name
            )),
        }
        table.push(format!(
            "| {} | {got} | {theirs} | {} |",
            case.name,
            if agree { "same" } else { "differs" }
        ));
    }
    if peer.is_some() {
        println!("{}", table.join("\n"));
    }
    if let Some((_, mut child)) = peer {
        let _ = child.kill();
        let _ = child.wait();
    }
    shutdown.cancel();
    assert!(
        wrong.is_empty(),
        "{} cases:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
