//! Black-box test of the control plane's connection caps: with
//! `--max-connections 2 --admin-max-connections 2`, a third connection to
//! either listener is accepted and closed at once, counted in
//! `weft_control_plane_connections_refused_total{listener}`, and a slot freed
//! by a closed connection serves again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::wait_for;
use weft_tests::control_plane::ControlPlane;

/// Whether the peer closes `stream` (EOF or reset) within a second.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_and_counted() -> anyhow::Result<()> {
    let cp = ControlPlane::dev()
        .arg("--max-connections")
        .arg("2")
        .arg("--admin-max-connections")
        .arg("2")
        .start()
        .await?;
    let admin = cp.admin().to_string();
    let grpc = cp.grpc().to_string();

    for (listener, addr, opening) in [
        ("grpc", &grpc, &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]),
        ("admin", &admin, &b"GET /metrics HTTP/1.1\r\n"[..]),
    ] {
        // Two connections, each in the middle of its opening, fill the cap.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr.as_str()).await?;
            stream.write_all(opening).await?;
            held.push(stream);
        }
        let mut third = TcpStream::connect(addr.as_str()).await?;
        anyhow::ensure!(
            closed(&mut third).await,
            "{listener}: the third connection was kept"
        );
        for stream in &mut held {
            anyhow::ensure!(
                !closed(stream).await,
                "{listener}: a held connection was closed"
            );
        }
    }

    // Freed admin slots serve the scrape that shows both refusals.
    let text = wait_for(
        "a scrape after the admin slots free up",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move {
                let attempt = async {
                    let mut s = TcpStream::connect(admin.as_str()).await?;
                    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: cp\r\nconnection: close\r\n\r\n")
                        .await?;
                    let mut out = String::new();
                    s.read_to_string(&mut out).await?;
                    anyhow::Ok(out)
                };
                // A refused attempt reads nothing: try again.
                Ok(attempt
                    .await
                    .ok()
                    .filter(|out| out.starts_with("HTTP/1.1 200")))
            }
        },
    )
    .await?;
    for listener in ["grpc", "admin"] {
        let series =
            format!("weft_control_plane_connections_refused_total{{listener=\"{listener}\"}} ");
        let value: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
            .trim()
            .parse()?;
        anyhow::ensure!(value >= 1.0, "{listener}: {value}");
    }
    let log = cp.logs();
    anyhow::ensure!(
        log.contains("connection refused"),
        "no refusal logged:\n{log}"
    );
    Ok(())
}
