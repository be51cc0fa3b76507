//! Connections to the node's joblet-core and joblet-persist.

use std::time::Duration;

use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::joblet::monitoring_service_client::MonitoringServiceClient;
use joblet_proto::persist::persist_service_client::PersistServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::Failure;
use crate::config::Node;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

async fn channel(node: &Node, address: &str, what: &str) -> Result<Channel, Failure> {
    let tls = match (&node.cert, &node.key, &node.ca) {
        (Some(cert), Some(key), Some(ca)) => Some(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .identity(tonic::transport::Identity::from_pem(cert, key)),
        ),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|e| Failure::Usage(format!("{what} address {address:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        // Large windows: the 64 KiB default throttles long history streams.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Failure::Usage(format!("TLS settings for {what}: {e}")))?;
    }
    endpoint.connect().await.map_err(|e| {
        Failure::Unavailable(format!("cannot reach {what} at {address}: {}", chain(&e)))
    })
}

/// An error with its causes: "transport error: tcp connect error: Connection refused".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub async fn core(node: &Node) -> Result<JobServiceClient<Channel>, Failure> {
    Ok(
        JobServiceClient::new(channel(node, &node.address, "joblet-core").await?)
            .max_decoding_message_size(64 << 20),
    )
}

pub async fn monitoring(node: &Node) -> Result<MonitoringServiceClient<Channel>, Failure> {
    Ok(MonitoringServiceClient::new(
        channel(node, &node.address, "joblet-core").await?,
    ))
}

/// persist, if the node names one and it answers.
pub async fn persist(node: &Node) -> Result<Option<PersistServiceClient<Channel>>, Failure> {
    match &node.persist_address {
        None => Ok(None),
        Some(address) => Ok(Some(
            PersistServiceClient::new(channel(node, address, "joblet-persist").await?)
                .max_decoding_message_size(64 << 20),
        )),
    }
}
