//! `joblet-core --check-config`: what start (or the first job) would trip over, beyond the
//! syntax and values [`Config::load`](crate::config::Config::load) checks.

use std::path::Path;

use bytesize::ByteSize;
use joblet_daemon::check::{self, End, Report};
use serde::Deserialize;

use crate::config::Config;

/// Checks `config`, and that it agrees with joblet-persist's configuration at `persist` if
/// given.
pub fn check(config: &Config, persist: Option<&Path>) -> Report {
    let mut report = Report::default();
    if let (Some(files), false) = (&config.grpc.tls, config.grpc.insecure) {
        check::tls("grpc.tls", files, End::Server, &mut report);
    }
    if config.persist.enabled {
        if let (Some(files), Some(_)) = (&config.persist.query_tls, &config.persist.query_address) {
            check::tls("persist.query_tls", files, End::Client, &mut report);
        }
        check::socket_dir("persist.socket", &config.persist.socket, false, &mut report);
    }
    check::state_dir("state_dir", &config.state_dir, &mut report);
    cgroups(&mut report);
    if let Some(path) = persist {
        agrees_with_persist(config, path, &mut report);
    }
    report
}

/// The controllers that job limits need: without pids no job starts (every job has a pids
/// limit); without the others, jobs asking for that limit are refused.
fn cgroups(report: &mut Report) {
    let v2 = cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode();
    let available = match controllers(v2) {
        Ok(available) => available,
        Err(error) => {
            report.problem(format!("cgroup: {error}"));
            return;
        }
    };
    let version = if v2 { "v2" } else { "v1" };
    if !available.iter().any(|c| c == "pids") {
        report.problem(format!(
            "cgroup: the pids controller is not available to core's cgroup ({version}); no job \
             can start"
        ));
    }
    for (controller, v1_name, limit) in [
        ("memory", "memory", "max_memory"),
        ("cpu", "cpu", "max_cpu"),
        ("cpuset", "cpuset", "cpu_cores"),
        ("io", "blkio", "max_iobps"),
    ] {
        let name = if v2 { controller } else { v1_name };
        if !available.iter().any(|c| c == name) {
            report.note(format!(
                "cgroup: the {name} controller is not available to core's cgroup ({version}); \
                 jobs that set {limit} are refused"
            ));
        }
    }
}

/// Controllers core's own cgroup can hand to job cgroups.
fn controllers(v2: bool) -> Result<Vec<String>, String> {
    // Controller (v1) or "" (v2) → core's own cgroup, as `CgroupRoot::detect` reads them.
    let own = cgroups_rs::fs::cgroup::get_cgroups_relative_paths()
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    if v2 {
        let path = own
            .get("")
            .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
        let file = Path::new(cgroups_rs::fs::hierarchies::UNIFIED_MOUNTPOINT)
            .join(path.trim_start_matches('/'))
            .join("cgroup.controllers");
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        Ok(text.split_whitespace().map(str::to_owned).collect())
    } else {
        Ok(own.into_keys().filter(|name| !name.is_empty()).collect())
    }
}

/// What core needs to agree on with joblet-persist's configuration.
#[derive(Deserialize, Default)]
#[serde(default)]
struct PersistSide {
    ipc: PersistIpc,
}

#[derive(Deserialize)]
#[serde(default)]
struct PersistIpc {
    socket: std::path::PathBuf,
    max_frame_size: ByteSize,
}

/// joblet-persist's defaults for the keys read here.
impl Default for PersistIpc {
    fn default() -> Self {
        PersistIpc {
            socket: "/tmp/joblet-persist.sock".into(),
            max_frame_size: ByteSize::mib(8),
        }
    }
}

fn agrees_with_persist(config: &Config, path: &Path, report: &mut Report) {
    let persist: PersistSide = match joblet_daemon::config::load(path, |_| Ok(())) {
        Ok(persist) => persist,
        Err(error) => {
            report.problem(format!("--persist-config: {error:#}"));
            return;
        }
    };
    if config.persist.socket != persist.ipc.socket {
        report.problem(format!(
            "persist.socket: {} is not where joblet-persist listens (its ipc.socket: {})",
            config.persist.socket.display(),
            persist.ipc.socket.display()
        ));
    }
    if config.persist.max_frame_size > persist.ipc.max_frame_size {
        report.problem(format!(
            "persist.max_frame_size: {} is more than joblet-persist's ipc.max_frame_size ({}); \
             frames above it would be refused",
            config.persist.max_frame_size, persist.ipc.max_frame_size
        ));
    }
}
