//! The catalogue of past jobs: job records replicated by core, the newest version kept,
//! listed with filters, surviving a restart, deleted with the job.

use joblet_ipc::{IpcMessage, MessageType, Stream, log_message};
use joblet_proto::ipc::JobRecord;
use joblet_proto::joblet::Job;
use joblet_proto::persist::{DeleteJobRequest, JobSummary, ListJobsRequest};
use prost::Message;

use crate::harness::{self, Replicator};

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";
const OLD: &str = "cccccccc-0000-4000-8000-000000000003";
const T0: i64 = 1_700_000_000_000_000_000;
const SECOND: i64 = 1_000_000_000;

fn record(id: &str, version: u64, status: &str, created: i64) -> IpcMessage {
    let updated = created + version as i64 * SECOND;
    IpcMessage {
        version: joblet_ipc::PROTOCOL_VERSION,
        r#type: MessageType::Job as i32,
        job_id: id.to_owned(),
        timestamp: updated,
        sequence: version,
        data: JobRecord {
            job: Some(Job {
                uuid: id.to_owned(),
                command: "/bin/sh".into(),
                status: status.into(),
                exit_code: if status == "FAILED" { 2 } else { 0 },
                ..Default::default()
            }),
            created,
            updated,
        }
        .encode_to_vec()
        .into(),
    }
}

async fn list(daemon: &harness::Daemon, request: ListJobsRequest) -> Vec<(String, String)> {
    let jobs: Vec<JobSummary> = daemon
        .client()
        .await
        .list_jobs(request)
        .await
        .unwrap()
        .into_inner()
        .jobs;
    jobs.into_iter()
        .map(|summary| {
            let status = summary
                .record
                .and_then(|r| r.job)
                .map_or("UNKNOWN".to_owned(), |job| job.status);
            (summary.job_id, status)
        })
        .collect()
}

fn named(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(id, status)| (id.to_string(), status.to_string()))
        .collect()
}

#[tokio::test]
async fn the_newest_record_of_each_job_is_listed_with_filters_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "retention:\n  logs: 0\n  metrics: 0\n").await;
    let replicator = Replicator::connect(&daemon.socket).await;
    replicator
        .send_all_acked(vec![
            // Data stored before records were replicated: no record.
            log_message(OLD, 1, T0, Stream::Stdout, "old".into()),
            record(A, 1, "RUNNING", T0 + SECOND),
            record(A, 3, "COMPLETED", T0 + SECOND),
            // A replay of an older version changes nothing.
            record(A, 2, "RUNNING", T0 + SECOND),
            record(B, 1, "FAILED", T0 + 10 * SECOND),
        ])
        .await;
    let everything = named(&[(A, "COMPLETED"), (B, "FAILED"), (OLD, "UNKNOWN")]);
    assert_eq!(list(&daemon, ListJobsRequest::default()).await, everything);
    let failed = ListJobsRequest {
        statuses: vec!["FAILED".into()],
        ..Default::default()
    };
    assert_eq!(list(&daemon, failed).await, named(&[(B, "FAILED")]));
    let unknown = ListJobsRequest {
        statuses: vec!["unknown".into()],
        ..Default::default()
    };
    assert_eq!(list(&daemon, unknown).await, named(&[(OLD, "UNKNOWN")]));
    let newest_two = ListJobsRequest {
        limit: 2,
        ..Default::default()
    };
    assert_eq!(
        list(&daemon, newest_two).await,
        named(&[(B, "FAILED"), (A, "COMPLETED")]),
        "newest first by creation"
    );
    let window = ListJobsRequest {
        since: T0 + SECOND,
        until: T0 + 10 * SECOND,
        ..Default::default()
    };
    assert_eq!(list(&daemon, window).await, named(&[(A, "COMPLETED")]));
    drop(replicator);

    daemon.terminate().await;
    let daemon = harness::start(dir.path(), "retention:\n  logs: 0\n  metrics: 0\n").await;
    assert_eq!(list(&daemon, ListJobsRequest::default()).await, everything);
    daemon
        .client()
        .await
        .delete_job(DeleteJobRequest { job_id: A.into() })
        .await
        .unwrap();
    assert_eq!(
        list(&daemon, ListJobsRequest::default()).await,
        named(&[(B, "FAILED"), (OLD, "UNKNOWN")])
    );
    let bad = daemon
        .client()
        .await
        .list_jobs(ListJobsRequest {
            since: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    daemon.terminate().await;
}
