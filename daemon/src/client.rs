//! The client half: how joblet-core (to persist's query API) and rnx reach a joblet daemon.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// HTTP/2 flow-control windows of a client: the 64 KiB default throttles long history streams.
const STREAM_WINDOW_BYTES: u32 = 4 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 8 << 20;

/// A client TLS configuration for tonic: CA, and our certificate and key (all PEM text).
pub fn tls_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem))
}

/// An endpoint for `address` (host:port): `https` with `tls`, plaintext `http` without, large
/// flow-control windows, giving up on a connection after `connect_timeout`. An error says what
/// is wrong with the address or the TLS settings.
pub fn endpoint(
    address: &str,
    tls: Option<ClientTlsConfig>,
    connect_timeout: Duration,
) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|e| format!("address {address:?}: {e}"))?
        .connect_timeout(connect_timeout)
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES));
    match tls {
        Some(tls) => endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS settings: {e}")),
        None => Ok(endpoint),
    }
}
