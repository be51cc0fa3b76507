//! Integration tests: the real `joblet-core` binary (and `joblet-persist` where replication is
//! tested) on temp dirs and free ports, real processes in real cgroups, over real gRPC.

mod harness;
mod jobs;
mod limits;
mod outage;
mod output;
mod restart;
mod survive;
