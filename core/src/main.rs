//! joblet-core: not built yet (see the core issue). This binary only reports that.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "joblet-core {}: job execution is not implemented yet; joblet-persist and the IPC stream are",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::FAILURE
}
