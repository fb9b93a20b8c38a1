//! Drains proven by counters, through a real front-end to real sample
//! backends: a released member's long requests all finish, and the
//! release completes after the last of them, on the front-end's word that
//! nothing is open; a member whose requests never end is released on its
//! deadline, logged as forced with what was cut.

use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_shared::records::ClusterPolicy;
use headroom_shared::time::now_ms;
use headroom_shared::wire::{AuditEvent, EventKind, ReconfigAction, ReconfigRequest};
use headroom_shared::ServerId;
use headroom_tests::eventually;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};

use crate::common::{audit_log, cid, wait_outcome, Snapshot, WAIT};
use crate::frontend::Site;

fn policy(drain_timeout_ms: u64) -> ClusterPolicy {
    ClusterPolicy {
        min_size: 1,
        max_size: 2,
        routes: Vec::new(),
        drain_timeout_ms,
        ..ClusterPolicy::default()
    }
}

/// A site with both backends as members.
async fn two_members(drain_timeout_ms: u64) -> Site {
    let site = Site::start(&[("b1", &[]), ("b2", &[])], policy(drain_timeout_ms)).await;
    grow(&site, None).await;
    site
}

/// One more member (of `request_type`), and the front-end routing to it.
async fn grow(site: &Site, request_type: Option<String>) {
    let grow = ReconfigRequest::new(
        cid("web"),
        ReconfigAction::Allocate {
            count: 1,
            request_type,
        },
        "test",
    );
    headroom_shared::bus::request_reconfig(&site.stack.js, &grow)
        .await
        .expect("grow");
    wait_outcome(&site.stack.js, &grow.id).await;
    site.wait_in_step().await;
}

/// Sends `n` requests of `cost_ms` each at once; each task gives its
/// status, the member that answered, and when the answer was complete.
fn send(
    site: &Site,
    n: usize,
    cost_ms: u64,
) -> Vec<tokio::task::JoinHandle<(StatusCode, String, u64)>> {
    (0..n)
        .map(|i| {
            let (http, addr) = (site.http.clone(), site.addr);
            tokio::spawn(async move {
                let request = Request::get(format!("http://{addr}/long/{i}?cost_ms={cost_ms}"))
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let response = http.request(request).await.expect("an answer");
                let (parts, body) = response.into_parts();
                let _ = body.collect().await.expect("the body");
                let by = parts
                    .headers
                    .get("x-backend")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                (parts.status, by, now_ms())
            })
        })
        .collect()
}

/// A member with requests in flight at the front-end, once some are.
async fn busy_member(site: &Site) -> ServerId {
    eventually(WAIT, || async {
        let table = site.proxy.table.load_full()?;
        table
            .backends
            .iter()
            .find(|b| b.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0)
            .map(|b| b.server.clone())
    })
    .await
    .expect("a member with requests in flight")
}

async fn release(site: &Site, server: &ServerId) -> u64 {
    let request = ReconfigRequest::new(
        cid("web"),
        ReconfigAction::Release {
            server: server.clone(),
        },
        "test",
    );
    let asked = now_ms();
    headroom_shared::bus::request_reconfig(&site.stack.js, &request)
        .await
        .expect("release asked");
    asked
}

/// The `released` event of `server`, once it is back in the pool.
async fn released(site: &Site, server: &ServerId) -> AuditEvent {
    eventually(Duration::from_secs(40), || async {
        let gone = !Snapshot::read(&site.stack.js)
            .await
            .cluster("web")
            .members
            .iter()
            .any(|m| &m.server == server);
        if !gone {
            return None;
        }
        audit_log(&site.stack.js)
            .await
            .into_iter()
            .find(|e| e.kind == EventKind::Released && e.server.as_ref() == Some(server))
    })
    .await
    .expect("released to the pool")
}

#[tokio::test]
async fn a_release_completes_after_its_last_long_request_not_before() {
    // The timer is far: only the evidence can end the drain early.
    let site = two_members(30_000).await;
    let requests = send(&site, 8, 2_000);
    let victim = busy_member(&site).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = release(&site, &victim).await;
    let mut last_on_victim = 0;
    let mut on_victim = 0;
    for request in requests {
        let (status, by, done_ms) = request.await.expect("client");
        assert_eq!(status, StatusCode::OK, "a request in flight was cut");
        if by == victim.as_str() {
            on_victim += 1;
            last_on_victim = last_on_victim.max(done_ms);
        }
    }
    assert!(on_victim > 0, "some requests were in flight on {victim}");
    let event = released(&site, &victim).await;
    assert!(
        event.at_ms >= last_on_victim,
        "released at {} before its last request ended at {last_on_victim}",
        event.at_ms
    );
    assert!(
        event.detail.contains("drained: fe-1 0 in flight"),
        "ended on evidence: {event:?}"
    );
    assert!(
        event.at_ms < asked + 10_000,
        "ended by the evidence, long before the 30 s deadline: {} ms",
        event.at_ms - asked
    );
    site.shutdown.cancel();
}

#[tokio::test]
async fn a_member_whose_requests_never_end_is_released_on_its_deadline_as_forced() {
    let site = two_members(3_000).await;
    // Far longer than the test: these never end while it runs.
    let requests = send(&site, 4, 60_000);
    let victim = busy_member(&site).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open = {
        let table = site.proxy.table.load_full().expect("table");
        let backend = table
            .backends
            .iter()
            .find(|b| b.server == victim)
            .expect("the victim")
            .clone();
        backend.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    };
    let started = Instant::now();
    release(&site, &victim).await;
    let event = released(&site, &victim).await;
    assert!(
        started.elapsed() >= Duration::from_millis(2_500),
        "not before its deadline: {:?}",
        started.elapsed()
    );
    assert!(
        event.detail.contains("forced at its drain deadline"),
        "{event:?}"
    );
    assert!(
        event.detail.contains(&format!("fe-1 {open} in flight")),
        "names what it cut ({open} in flight): {event:?}"
    );
    for request in requests {
        request.abort();
    }
    site.shutdown.cancel();
}

/// A member that answers every request with a switch to WebSocket and then
/// echoes: each connection to it is a tunnel for as long as it is open.
async fn tunnel_member() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
                if stream.write_all(switch).await.is_err() {
                    return;
                }
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_drain_forced_on_its_deadline_names_the_tunnels_it_cut() {
    use headroom_shared::records::Balance;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let routes = vec![
        crate::frontend::route("ws", "/ws", Balance::LeastRequests),
        crate::frontend::route("page", "/", Balance::LeastRequests),
    ];
    let site = Site::start(
        &[("b1", &["page"])],
        ClusterPolicy {
            routes,
            ..policy(2_000)
        },
    )
    .await;
    // The tunnel member joins for requests of type ws.
    let member = tunnel_member().await;
    let _: headroom_shared::records::ServerRecord = crate::common::admin(
        &site.stack.client,
        headroom_shared::subjects::admin::POOL_REGISTER,
        &headroom_shared::wire::RegisterServer {
            v: headroom_shared::SCHEMA_VERSION,
            id: crate::common::sid("ws1"),
            address: member.ip().to_string(),
            port: member.port(),
            request_types: vec!["ws".to_owned()],
        },
        headroom_shared::codec::Codec::MsgPack,
    )
    .await
    .expect("registered");
    grow(&site, Some("ws".to_owned())).await;

    // A WebSocket through the front-end, open across the drain.
    let mut client = tokio::net::TcpStream::connect(site.addr)
        .await
        .expect("connect");
    client
        .write_all(b"GET /ws/chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .expect("upgrade asked");
    let mut answer = vec![0u8; 256];
    let n = client.read(&mut answer).await.expect("the switch");
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    client.write_all(b"ping").await.expect("through the tunnel");
    let mut echo = [0u8; 4];
    client.read_exact(&mut echo).await.expect("echoed");
    assert_eq!(&echo, b"ping");

    let victim = crate::common::sid("ws1");
    release(&site, &victim).await;
    let event = released(&site, &victim).await;
    assert!(
        event.detail.contains("forced at its drain deadline")
            && event
                .detail
                .contains("fe-1 1 in flight (1 WebSocket tunnel)"),
        "{event:?}"
    );
    site.shutdown.cancel();
}
