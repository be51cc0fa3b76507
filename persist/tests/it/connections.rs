//! IPC connections: idle ones hold no read buffer, and beyond ipc.max_connections they are
//! refused and counted.

use std::time::Duration;

use joblet_ipc::{Stream, log_message};
use tokio::io::AsyncReadExt;

use crate::harness::{self, Replicator};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn idle_connections_cost_little_and_those_beyond_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = harness::write_config(dir.path(), "127.0.0.1:0", "");
    let config = std::fs::read_to_string(&path)
        .unwrap()
        .replace("ipc:\n", "ipc:\n  max_connections: 300\n");
    std::fs::write(&path, config).unwrap();
    let daemon = harness::start_with_config(dir.path(), &path).await;
    let pid = daemon.child.id().unwrap();

    // One connection that sends, then goes idle like a quiet joblet-core.
    let replicator = Replicator::connect(&daemon.socket).await;
    replicator
        .send_all_acked(vec![log_message(
            "0a1b2c3d-0000-4000-8000-00000000000c",
            1,
            1,
            Stream::Stdout,
            "hello".into(),
        )])
        .await;
    let before = rss_kib(pid);
    let mut idle = Vec::new();
    for _ in 0..299 {
        idle.push(
            tokio::net::UnixStream::connect(&daemon.socket)
                .await
                .unwrap(),
        );
    }
    assert!(
        connections_become(&daemon, 300).await,
        "persist holds the 299 idle connections and the replicator's"
    );
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 299 * 64,
        "299 idle connections took {grown} KiB (aim: under 64 KiB each)"
    );

    // The limit is reached: the next connections are closed at once.
    for _ in 0..5 {
        let mut refused = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut byte))
            .await
            .expect("a refused connection is closed at once");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    let exported = daemon.scrape().await;
    assert!(
        exported
            .lines()
            .any(|l| l
                == "joblet_persist_ipc_connections_refused_total{reason=\"max_connections\"} 5"),
        "refusals are counted"
    );
    let said = std::fs::read_to_string(&daemon.log).unwrap();
    assert_eq!(
        said.matches("IPC connection refused").count(),
        1,
        "logged once, not per connection"
    );
    // Room again once connections close.
    drop(idle);
    drop(replicator);
    assert!(
        connections_become(&daemon, 0).await,
        "closed connections are let go"
    );
    let again = Replicator::connect(&daemon.socket).await;
    again
        .send_all_acked(vec![log_message(
            "0a1b2c3d-0000-4000-8000-00000000000c",
            2,
            2,
            Stream::Stdout,
            "again".into(),
        )])
        .await;
    daemon.terminate().await;
}

#[tokio::test]
async fn a_flood_of_bad_messages_is_counted_each_but_logged_once_a_minute() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "").await;
    let mut stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    // Messages of a protocol version persist does not speak: each is rejected, the connection
    // stays open.
    let bad = 20_000u64;
    let mut frames = bytes::BytesMut::new();
    for sequence in 1..=bad {
        let mut message = joblet_ipc::log_message(
            "b0000000-0000-4000-8000-000000000001",
            sequence,
            1,
            joblet_ipc::Stream::Stdout,
            "x".into(),
        );
        message.version = 99;
        joblet_ipc::codec::encode_frame(&message, usize::MAX, &mut frames).unwrap();
    }
    stream.write_all(&frames).await.unwrap();
    let rejected = |scrape: &str| -> u64 {
        scrape
            .lines()
            .filter(|l| l.starts_with("joblet_persist_ipc_frames_rejected_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let deadline = std::time::Instant::now() + harness::WAIT;
    while rejected(&daemon.scrape().await) < bad {
        assert!(std::time::Instant::now() < deadline, "not all counted");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains("rejected IPC message") || l.contains("bad IPC frame"))
        .count();
    assert!(lines <= 2, "{lines} log lines for {bad} bad messages");
    drop(stream);
    daemon.terminate().await;
}

/// Whether persist's connection gauge comes to `count` within a few seconds.
async fn connections_become(daemon: &harness::Daemon, count: usize) -> bool {
    let line = format!("joblet_persist_ipc_connections {count}");
    joblet_test_support::eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || daemon.scrape().await.lines().any(|l| l == line),
    )
    .await
}
