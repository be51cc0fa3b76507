//! Connections to the node's joblet-core and joblet-persist.

use std::time::Duration;

use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::joblet::monitoring_service_client::MonitoringServiceClient;
use joblet_proto::persist::persist_service_client::PersistServiceClient;
use tonic::transport::Channel;

use crate::Failure;
use crate::config::Node;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

async fn channel(node: &Node, address: &str, what: &str) -> Result<Channel, Failure> {
    let tls = match (&node.cert, &node.key, &node.ca) {
        (Some(cert), Some(key), Some(ca)) => Some(joblet_daemon::client::tls_config(ca, cert, key)),
        _ => None,
    };
    if tls.is_none() {
        joblet_daemon::lock(&PLAINTEXT_ADDRESSES).push(address.to_owned());
    }
    let endpoint = joblet_daemon::client::endpoint(address, tls, CONNECT_TIMEOUT)
        .map_err(|e| Failure::Usage(format!("{what}: {e}")))?
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    endpoint.connect().await.map_err(|e| {
        Failure::Unavailable(format!("cannot reach {what} at {address}: {}", chain(&e)))
    })
}

/// Addresses this run talks to in plaintext (the node has no cert, key and ca).
static PLAINTEXT_ADDRESSES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Whether a server this run talks to in plaintext speaks TLS only: sent an HTTP/2 preface, a
/// TLS server answers with a TLS alert record (first byte 0x15). Blocking, at most about a
/// second per address; only asked when an RPC failed the way such a server makes it fail.
pub fn plaintext_server_speaks_tls() -> bool {
    use std::io::{Read, Write};
    let addresses = joblet_daemon::lock(&PLAINTEXT_ADDRESSES).clone();
    addresses.iter().any(|address| {
        let Ok(mut resolved) = std::net::ToSocketAddrs::to_socket_addrs(address.as_str()) else {
            return false;
        };
        let Some(target) = resolved.next() else {
            return false;
        };
        let Ok(mut stream) = std::net::TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut first = [0u8; 1];
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .is_ok()
            && matches!(stream.read(&mut first), Ok(1) if first[0] == 0x15)
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
