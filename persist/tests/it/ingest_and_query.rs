//! Ingest over the real socket, then every query feature over real gRPC.

use joblet_ipc::{MetricData, Stream, log_message, metric_message};
use joblet_proto::persist::{
    DeleteJobRequest, ListJobsRequest, PingRequest, QueryLogsRequest, QueryMetricsRequest,
    StreamType,
};

use crate::harness::{self, Replicator, query_logs};

const JOB: &str = "0a1b2c3d-0000-4000-8000-000000000001";
const OTHER: &str = "0a1b9999-0000-4000-8000-000000000002";
const T0: i64 = 1_700_000_000_000_000_000;

/// 100 lines, 1 ms apart: odd sequences on stdout, even on stderr; line 50 is invalid UTF-8.
fn job_lines() -> Vec<joblet_ipc::IpcMessage> {
    (1..=100u64)
        .map(|sequence| {
            let stream = if sequence % 2 == 1 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            let content: bytes::Bytes = if sequence == 50 {
                bytes::Bytes::from_static(&[0xff, 0xfe, b'x', 0x00])
            } else {
                format!("line {sequence}").into()
            };
            log_message(
                JOB,
                sequence,
                T0 + sequence as i64 * 1_000_000,
                stream,
                content,
            )
        })
        .collect()
}

fn time_of(sequence: u64) -> i64 {
    T0 + sequence as i64 * 1_000_000
}

fn sequences(lines: &[joblet_proto::persist::LogLine]) -> Vec<u64> {
    lines.iter().map(|l| l.sequence).collect()
}

fn request(job: &str) -> QueryLogsRequest {
    QueryLogsRequest {
        job_id: job.to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn replicated_lines_and_metrics_are_queryable_with_every_filter() {
    let dir = tempfile::tempdir().unwrap();
    // The data is from 2023: kept forever, and its samples at full resolution (by default a
    // retention pass, the first at start, rolls samples older than a day into minutes).
    let daemon = harness::start(
        dir.path(),
        "retention:\n  logs: 0\n  metrics: 0\n  metrics_full_resolution: 0\n",
    )
    .await;
    let replicator = Replicator::connect(&daemon.socket).await;
    let mut messages = job_lines();
    messages.push(log_message(
        OTHER,
        1,
        T0,
        Stream::Stdout,
        "other job".into(),
    ));
    for sequence in 1..=10u64 {
        messages.push(metric_message(
            JOB,
            sequence,
            time_of(sequence * 10),
            &MetricData {
                cpu_percent: sequence as f64,
                memory_bytes: sequence as i64 * 1024,
                pids: 3,
                ..Default::default()
            },
        ));
    }
    replicator.send_all_acked(messages).await;
    let mut client = daemon.client().await;

    // Everything, interleaved in (timestamp, sequence) order, bytes unchanged.
    let all = query_logs(&mut client, request(JOB)).await.unwrap();
    assert_eq!(sequences(&all), (1..=100).collect::<Vec<_>>());
    assert_eq!(all[0].content, "line 1");
    assert_eq!(all[0].stream, StreamType::Stdout as i32);
    assert_eq!(all[1].stream, StreamType::Stderr as i32);
    assert_eq!(all[1].timestamp, time_of(2));
    assert_eq!(all[49].content.as_ref(), &[0xff, 0xfe, b'x', 0x00]);
    assert!(all.iter().all(|l| l.job_id == JOB));

    // A unique prefix names the job; stream selection.
    let stderr = query_logs(
        &mut client,
        QueryLogsRequest {
            job_id: JOB[..12].to_owned(),
            stream: StreamType::Stderr as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(sequences(&stderr), (2..=100).step_by(2).collect::<Vec<_>>());

    // Time range: start inclusive, end exclusive.
    let window = query_logs(
        &mut client,
        QueryLogsRequest {
            start_time: time_of(10),
            end_time: time_of(20),
            ..request(JOB)
        },
    )
    .await
    .unwrap();
    assert_eq!(sequences(&window), (10..20).collect::<Vec<_>>());

    // Cursor, offset and limit.
    let page = query_logs(
        &mut client,
        QueryLogsRequest {
            after_sequence: 90,
            offset: 2,
            limit: 3,
            ..request(JOB)
        },
    )
    .await
    .unwrap();
    assert_eq!(sequences(&page), [93, 94, 95]);

    // Newest-first tail, returned in chronological order, after the other filters.
    let tail = query_logs(
        &mut client,
        QueryLogsRequest {
            tail: 3,
            stream: StreamType::Stdout as i32,
            ..request(JOB)
        },
    )
    .await
    .unwrap();
    assert_eq!(sequences(&tail), [95, 97, 99]);

    // Substring filter.
    let grep = query_logs(
        &mut client,
        QueryLogsRequest {
            contains: "line 7".to_owned(),
            ..request(JOB)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        sequences(&grep),
        [7, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79]
    );
    // The first line is looked for on the answering worker among the first 64 records; past
    // them the scan goes on in the blocking pool from where that search stopped.
    for (contains, limit, expected) in [
        ("line 66", 0, vec![66]),
        ("line 9", 2, vec![9, 90]),
        ("line 1", 1, vec![1]),
        ("no such line", 0, vec![]),
    ] {
        let found = query_logs(
            &mut client,
            QueryLogsRequest {
                contains: contains.to_owned(),
                limit,
                ..request(JOB)
            },
        )
        .await
        .unwrap();
        assert_eq!(sequences(&found), expected, "{contains:?} limit {limit}");
    }

    // Metrics with a time range and limit.
    let mut metrics = client
        .query_metrics(QueryMetricsRequest {
            job_id: JOB.to_owned(),
            start_time: time_of(30),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut samples = Vec::new();
    while let Some(metric) = metrics.message().await.unwrap() {
        samples.push(metric);
    }
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].sequence, 3);
    let sample = samples[0].sample.clone().unwrap();
    assert_eq!(sample.cpu_percent, 3.0);
    assert_eq!(sample.memory_bytes, 3 * 1024);
    assert_eq!(sample.pids, 3);

    // Job listing with summaries.
    let jobs = client
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 2);
    let summary = jobs.iter().find(|j| j.job_id == JOB).unwrap();
    assert_eq!(summary.log_lines, 100);
    assert_eq!(summary.metric_samples, 10);
    assert_eq!(summary.last_log_sequence, 100);
    assert_eq!(summary.last_metric_sequence, 10);
    assert_eq!(summary.first_timestamp, time_of(1));
    assert_eq!(summary.last_timestamp, time_of(100));

    // Ping.
    let ping = client.ping(PingRequest {}).await.unwrap().into_inner();
    assert_eq!(ping.version, env!("CARGO_PKG_VERSION"));

    // Delete removes everything of that job and nothing else.
    let deleted = client
        .delete_job(DeleteJobRequest {
            job_id: JOB.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    let gone = query_logs(&mut client, request(JOB)).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let other = query_logs(&mut client, request(OTHER)).await.unwrap();
    assert_eq!(other.len(), 1);
    drop(replicator);
    daemon.terminate().await;
}

#[tokio::test]
async fn bad_queries_get_clear_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "").await;
    let replicator = Replicator::connect(&daemon.socket).await;
    replicator
        .send_all_acked(vec![
            log_message(
                JOB,
                1,
                super::ingest_and_query::now(),
                Stream::Stdout,
                "a".into(),
            ),
            log_message(
                OTHER,
                1,
                super::ingest_and_query::now(),
                Stream::Stdout,
                "b".into(),
            ),
        ])
        .await;
    let mut client = daemon.client().await;

    let cases: Vec<(QueryLogsRequest, tonic::Code, &str)> = vec![
        (request("ffffffff"), tonic::Code::NotFound, "ffffffff"),
        (request(""), tonic::Code::InvalidArgument, "job_id"),
        (
            request("0a1b"),
            tonic::Code::InvalidArgument,
            "matches 2 jobs",
        ),
        (
            QueryLogsRequest {
                start_time: -1,
                ..request(JOB)
            },
            tonic::Code::InvalidArgument,
            "start_time",
        ),
        (
            QueryLogsRequest {
                start_time: 10,
                end_time: 5,
                ..request(JOB)
            },
            tonic::Code::InvalidArgument,
            "end_time",
        ),
        (
            QueryLogsRequest {
                limit: -3,
                ..request(JOB)
            },
            tonic::Code::InvalidArgument,
            "limit",
        ),
        (
            QueryLogsRequest {
                stream: 7,
                ..request(JOB)
            },
            tonic::Code::InvalidArgument,
            "stream",
        ),
        (
            QueryLogsRequest {
                tail: 5_000_000,
                ..request(JOB)
            },
            tonic::Code::InvalidArgument,
            "tail",
        ),
    ];
    for (request, code, needle) in cases {
        let status = query_logs(&mut client, request.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{request:?}: {:?} should mention {needle}",
            status.message()
        );
    }
    // A 100 KB id is echoed cut short: the answer is a clear NOT_FOUND, not a dropped reply.
    let huge = "f".repeat(100_000);
    let status = query_logs(&mut client, request(&huge)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(
        status.message().len() < 200 && status.message().contains(&"f".repeat(64)),
        "{:?}",
        status.message()
    );
    drop(replicator);
    daemon.terminate().await;
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// The sum of a histogram's observations for `rpc`, from a scrape.
fn histogram_sum(scrape: &str, name: &str, rpc: &str) -> f64 {
    let prefix = format!("{name}_sum{{rpc=\"{rpc}\"}}");
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn query_latency_is_the_servers_time_not_the_time_a_slow_client_takes() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "").await;
    let replicator = Replicator::connect(&daemon.socket).await;
    let base = now();
    let lines: Vec<_> = (1..=300_000u64)
        .map(|sequence| {
            let content = format!("{sequence:0100}");
            log_message(
                JOB,
                sequence,
                base + sequence as i64,
                Stream::Stdout,
                content.into(),
            )
        })
        .collect();
    replicator.send_all_acked(lines).await;

    // A client that reads one line, then looks at it for 3 s (a pager), then reads the rest.
    let mut client = daemon.client().await;
    let request = QueryLogsRequest {
        job_id: JOB.into(),
        ..Default::default()
    };
    let mut stream = client.query_logs(request).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    // Meanwhile the query is in flight, waiting for its client: old, but not stalled.
    let during = daemon.scrape().await;
    let gauge = |name: &str| -> f64 {
        during
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap()
    };
    assert!(
        gauge("joblet_persist_query_oldest_inflight_seconds ") >= 1.0,
        "{during}"
    );
    assert!(
        gauge("joblet_persist_query_stall_seconds ") < 1.0,
        "{during}"
    );
    let mut count = 1;
    while stream.message().await.unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count, 300_000);

    let mut scrape = String::new();
    for _ in 0..50 {
        scrape = daemon.scrape().await;
        if scrape.contains("joblet_persist_query_duration_seconds_count{rpc=\"QueryLogs\"} 1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let busy = histogram_sum(
        &scrape,
        "joblet_persist_query_duration_seconds",
        "QueryLogs",
    );
    let first = histogram_sum(
        &scrape,
        "joblet_persist_query_first_record_seconds",
        "QueryLogs",
    );
    assert!(
        busy < 2.5,
        "the query's server time is {busy} s: it counts the client's 3 s"
    );
    assert!(first < 0.5, "first line after {first} s");
    assert!(
        scrape.contains("joblet_persist_query_stall_seconds 0"),
        "{scrape}"
    );
    drop(replicator);
    daemon.terminate().await;
}
