//! joblet-core: the command side of ADR-0001.
//!
//! It runs jobs ([`manager`]) as processes in their own cgroups ([`cgroup`]) and namespaces
//! ([`spawn`]), captures their output into sequenced, timestamped lines kept in a spool file
//! ([`output`]) and samples their resource use ([`metrics_log`]); it streams both live over
//! gRPC ([`service`]) and replicates them to joblet-persist through `joblet-ipc`, reading the
//! spool behind the job from what persist last acknowledged ([`replicate`]). Persist being disabled, absent or down
//! never stops a job from running.

pub mod cgroup;
pub mod check;
pub mod config;
pub mod error;
pub mod history;
pub mod job;
pub mod manager;
pub mod metrics;
pub mod metrics_log;
pub mod output;
pub mod replicate;
pub mod sampler;
pub mod service;
pub mod spawn;
pub mod spec;
pub mod state;
pub mod supervisor;
pub mod uploads;

use std::sync::Arc;

use anyhow::Context;
use joblet_proto::joblet::job_service_server::JobServiceServer;
use joblet_proto::joblet::monitoring_service_server::MonitoringServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// HTTP/2 flow-control windows: the 64 KiB default caps a long history stream at a fraction
/// of what a scan produces.
const STREAM_WINDOW_BYTES: u32 = 4 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 8 << 20;

use crate::cgroup::CgroupRoot;
use crate::config::Config;
use crate::manager::JobManager;
use crate::replicate::Replication;

pub struct Core {
    manager: Arc<JobManager>,
    replication: Option<Arc<Replication>>,
}

impl Core {
    /// Everything that can fail at start: cgroups, state directories, the replication sender.
    pub async fn open(mut config: Config, shutdown: CancellationToken) -> anyhow::Result<Core> {
        if config.node_id.is_empty() {
            config.node_id = sysinfo::System::host_name().unwrap_or_else(|| "joblet".to_owned());
        }
        let parent = config.cgroup.parent.clone();
        let cgroups = tokio::task::spawn_blocking(move || CgroupRoot::detect(&parent))
            .await?
            .context("cgroup")?;
        let replication = if config.persist.enabled {
            Some(Arc::new(
                Replication::start(&config.persist, &config.node_id)
                    .context("start replication")?,
            ))
        } else {
            tracing::warn!("persist.enabled is false: job output is not replicated");
            None
        };
        let manager = JobManager::open(config, cgroups, replication.clone(), shutdown)
            .await
            .context("state_dir")?;
        Ok(Core {
            manager,
            replication,
        })
    }

    pub fn manager(&self) -> Arc<JobManager> {
        self.manager.clone()
    }

    /// Serves until `shutdown` is cancelled, then ends every job, flushes replication and
    /// returns.
    pub async fn serve(self, grpc: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Core {
            manager,
            replication,
        } = self;
        ::metrics::gauge!(metrics::UP).set(1.0);
        let grpc_config = &manager.config().grpc;
        let (tls, auth) = joblet_daemon::tls::listener_security(
            grpc_config.listen,
            grpc_config.tls.as_ref(),
            grpc_config.insecure,
            service::read_only,
        )
        .context("grpc.tls")?;
        let max_request = grpc_config.max_request_size.as_u64() as usize;
        let router = tonic::transport::Server::builder()
            // Every log line of an RPC names it.
            .trace_fn(|request| tracing::info_span!("rpc", method = %request.uri().path()))
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
            .layer(auth)
            .layer(joblet_daemon::request_limit::layer())
            .add_service(
                JobServiceServer::new(service::JobApi::new(manager.clone()))
                    .max_decoding_message_size(max_request),
            )
            .add_service(MonitoringServiceServer::new(service::MonitoringApi::new(
                manager.clone(),
            )));
        let served = joblet_daemon::tls::serve(router, grpc, tls, shutdown.clone()).await;
        shutdown.cancel();
        manager.shutdown().await;
        if let Some(replication) = replication {
            replication.stop().await;
        }
        ::metrics::gauge!(metrics::UP).set(0.0);
        served.context("gRPC server")?;
        tracing::info!("joblet-core stopped");
        Ok(())
    }
}
