//! Integration tests: the real `joblet-persist` binary on temp dirs and free ports, fed through
//! the real IPC sender and queried over real gRPC.

mod catalogue;
mod connections;
mod downsampling;
mod harness;
mod ingest_and_query;
mod restart_and_retention;
