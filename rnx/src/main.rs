//! rnx: not built yet (see the rnx issue). This binary only reports that.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("rnx {}: not implemented yet", env!("CARGO_PKG_VERSION"));
    ExitCode::FAILURE
}
