//! Reaching joblet-persist's query API from core: deleting a job's history with the job, and
//! reading the record and history of a job core no longer holds (evicted once replicated).

use std::time::Duration;

use joblet_proto::persist::persist_service_client::PersistServiceClient;
use joblet_proto::persist::{
    DeleteJobRequest, JobSummary, ListJobsRequest, LogLine, Metric, QueryLogsRequest,
    QueryMetricsRequest,
};
use tonic::transport::Channel;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how core reaches persist's query API.
#[derive(Clone)]
pub struct PersistAddress {
    pub address: String,
    pub tls: Option<joblet_daemon::tls::TlsFiles>,
}

/// The channel to persist's query API, made on first use and shared by every query after it
/// (tonic reconnects it when needed); made again if the configured address changes.
static CHANNEL: std::sync::Mutex<Option<(String, Channel)>> = std::sync::Mutex::new(None);

async fn client(target: &PersistAddress) -> Result<PersistServiceClient<Channel>, tonic::Status> {
    let address = &target.address;
    if let Some((cached, channel)) = joblet_daemon::lock(&CHANNEL).as_ref()
        && cached == address
    {
        return Ok(PersistServiceClient::new(channel.clone()));
    }
    let tls = match &target.tls {
        Some(files) => Some(
            files
                .client_config()
                .map_err(|e| tonic::Status::internal(format!("persist.query_tls: {e}")))?,
        ),
        None => None,
    };
    let channel = joblet_daemon::client::endpoint(address, tls, CONNECT_TIMEOUT)
        .map_err(|e| tonic::Status::internal(format!("persist.query_address: {e}")))?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("joblet-persist at {address}: {e}")))?;
    *joblet_daemon::lock(&CHANNEL) = Some((address.clone(), channel.clone()));
    Ok(PersistServiceClient::new(channel))
}

pub async fn delete(address: &PersistAddress, job_id: &str) -> Result<(), tonic::Status> {
    client(address)
        .await?
        .delete_job(DeleteJobRequest {
            job_id: job_id.to_owned(),
        })
        .await?;
    Ok(())
}

pub async fn logs(
    address: &PersistAddress,
    request: QueryLogsRequest,
) -> Result<tonic::Streaming<LogLine>, tonic::Status> {
    Ok(client(address)
        .await?
        .query_logs(request)
        .await?
        .into_inner())
}

pub async fn metrics(
    address: &PersistAddress,
    request: QueryMetricsRequest,
) -> Result<tonic::Streaming<Metric>, tonic::Status> {
    Ok(client(address)
        .await?
        .query_metrics(request)
        .await?
        .into_inner())
}

/// The catalogue entry of the one job `id_or_prefix` names in persist (NOT_FOUND when none, or
/// when persist cannot be reached: core does not know the job either way).
pub async fn find_job(
    address: &PersistAddress,
    id_or_prefix: &str,
) -> Result<JobSummary, tonic::Status> {
    let not_found = || tonic::Status::not_found(format!("job {id_or_prefix:?} not found"));
    let mut client = client(address).await.map_err(|_| not_found())?;
    let jobs = client
        .list_jobs(ListJobsRequest {
            job_id_prefix: id_or_prefix.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|_| not_found())?
        .into_inner()
        .jobs;
    if let Some(exact) = jobs.iter().find(|job| job.job_id == id_or_prefix) {
        return Ok(exact.clone());
    }
    match <[JobSummary; 1]>::try_from(jobs) {
        Ok([only]) => Ok(only),
        Err(jobs) if jobs.is_empty() => Err(not_found()),
        Err(jobs) => Err(tonic::Status::invalid_argument(format!(
            "job id prefix {id_or_prefix:?} matches {} jobs; give more characters",
            jobs.len()
        ))),
    }
}
