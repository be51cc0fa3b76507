//! Job cgroups through cgroups-rs, on cgroup v2 (unified) or v1 hosts, picked at start.
//!
//! Every job cgroup lives under core's own cgroup (`<own>/<parent>/<job id>`, relative paths
//! per controller on v1, the path itself on v2, where cgroups-rs ignores relative paths), so
//! that a service unit with `Delegate=yes` keeps its jobs inside its subtree.
//!
//! cgroups-rs 0.5 (the newest release) leaves gaps on v2 that this module fills by reading the
//! v2 files itself: OOM kills come from `memory.events` (its `oom_control` is empty on v2), the
//! IO limit is read back from `io.max` and IO use from `io.stat` (its v2 `blkio()` fills
//! neither). cgroups-rs reports success for a limit a hierarchy cannot apply (a missing
//! controller), so every requested limit is read back and the job is refused if it did not
//! take. Processes enter their cgroup before they exec (see `spawn`), through the
//! `cgroup.procs` files listed by [`JobCgroup::procs_files`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cgroups_rs::fs::blkio::BlkIoController;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::cpuset::CpuSetController;
use cgroups_rs::fs::freezer::FreezerController;
use cgroups_rs::fs::hierarchies;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup, Controller, MaxValue};

/// CFS period used for CPU quotas (100 ms, the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {message}")]
    Failed { path: String, message: String },
    #[error("limit {limit} did not take effect on this host ({detail})")]
    LimitNotApplied { limit: &'static str, detail: String },
}

/// Limits of one job; `None` leaves a resource unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Percent of one core (100 = one core).
    pub cpu_percent: Option<u32>,
    pub memory_bytes: Option<i64>,
    pub io_bytes_per_second: Option<u64>,
    pub cpuset: Option<String>,
    pub pids: u32,
}

/// One sample of a job's resource use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_nanos: u64,
    pub memory_bytes: u64,
    pub memory_limit: i64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub pids: u64,
    pub oom_kills: u64,
    /// Pressure stall information (cgroup v2 only): % of the last 10 s in which some tasks
    /// waited for CPU, some for memory, all for memory.
    pub cpu_pressure_some: Option<f64>,
    pub memory_pressure_some: Option<f64>,
    pub memory_pressure_full: Option<f64>,
}

/// Where job cgroups are made.
#[derive(Clone)]
pub struct CgroupRoot {
    v2: bool,
    /// Controller name → core's own cgroup path (v1); one entry "" on v2.
    own_paths: HashMap<String, String>,
    parent: String,
}

impl CgroupRoot {
    /// Detects the hierarchy and core's own cgroup. On v2, core moves itself into a leaf
    /// `<own>/joblet-core` so that its own cgroup may delegate controllers to job cgroups.
    pub fn detect(parent: &str) -> Result<CgroupRoot, CgroupError> {
        let v2 = hierarchies::is_cgroup2_unified_mode();
        let own_paths = cgroups_rs::fs::cgroup::get_cgroups_relative_paths().map_err(|e| {
            CgroupError::Failed {
                path: "/proc/self/cgroup".into(),
                message: e.to_string(),
            }
        })?;
        let root = CgroupRoot {
            v2,
            own_paths,
            parent: parent.trim_matches('/').to_owned(),
        };
        if v2 {
            root.move_self_to_leaf()?;
        }
        tracing::info!(
            version = if v2 { "v2" } else { "v1" },
            parent = %root.parent,
            "cgroup hierarchy detected"
        );
        Ok(root)
    }

    pub fn is_v2(&self) -> bool {
        self.v2
    }

    fn move_self_to_leaf(&self) -> Result<(), CgroupError> {
        let own = self.own_paths.get("").cloned().unwrap_or_default();
        let own_dir = Path::new(hierarchies::UNIFIED_MOUNTPOINT).join(own.trim_start_matches('/'));
        let leaf = own_dir.join("joblet-core");
        let failed = |path: &Path, e: std::io::Error| CgroupError::Failed {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        if own_dir.file_name().is_some_and(|n| n == "joblet-core") {
            return Ok(()); // already moved (restart inside the same cgroup)
        }
        std::fs::create_dir_all(&leaf).map_err(|e| failed(&leaf, e))?;
        let procs = leaf.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string()).map_err(|e| failed(&procs, e))?;
        Ok(())
    }

    fn relative_paths(&self) -> HashMap<String, String> {
        let mut paths = self.own_paths.clone();
        if self.v2 {
            // Core now lives in <own>/joblet-core; jobs go beside it, under <own>.
            for path in paths.values_mut() {
                if let Some(stripped) = path.strip_suffix("/joblet-core") {
                    *path = stripped.to_owned();
                }
            }
        }
        paths
    }

    /// The cgroup of `job_id` made by an earlier run of core, if it still exists.
    pub fn open(&self, job_id: &str) -> Option<JobCgroup> {
        let cgroup = self.handle(&format!("{}/{}", self.parent, job_id));
        cgroup.exists().then_some(JobCgroup {
            cgroup,
            v2: self.v2,
        })
    }

    /// Kills whatever still runs in the cgroup of `job_id` (left behind by a run of core that
    /// crashed) and removes it, best effort.
    pub fn remove_leftover(&self, job_id: &str) {
        let Some(job) = self.open(job_id) else {
            return;
        };
        tracing::warn!(
            job_id,
            "killing what is left of a job interrupted by a crash of joblet-core"
        );
        job.kill_all();
        job.delete();
    }

    /// A handle on the cgroup `name` below core's own (which need not exist yet).
    fn handle(&self, name: &str) -> Cgroup {
        if self.v2 {
            let own = self.relative_paths().remove("").unwrap_or_default();
            let path = format!("{}/{name}", own.trim_matches('/'));
            Cgroup::load(hierarchies::auto(), path.trim_start_matches('/'))
        } else {
            Cgroup::load_with_relative_paths(hierarchies::auto(), name, self.relative_paths())
        }
    }

    /// Removes the (empty) parent of the job cgroups, best effort.
    pub fn remove_parent(&self) {
        let parent = self.handle(&self.parent);
        if parent.exists() {
            let _ = parent.delete();
        }
    }

    /// Creates the cgroup of `job_id` with `limits`, verifying each limit by reading it back.
    pub fn create(&self, job_id: &str, limits: &Limits) -> Result<JobCgroup, CgroupError> {
        let cgroup = self.handle(&format!("{}/{}", self.parent, job_id));
        cgroup.create().map_err(|e| CgroupError::Failed {
            path: cgroup.path().to_owned(),
            message: e.to_string(),
        })?;
        let job = JobCgroup {
            cgroup,
            v2: self.v2,
        };
        if let Err(error) = job.apply(limits) {
            job.delete();
            return Err(error);
        }
        Ok(job)
    }
}

pub struct JobCgroup {
    cgroup: Cgroup,
    v2: bool,
}

fn not_applied(limit: &'static str, detail: impl ToString) -> CgroupError {
    CgroupError::LimitNotApplied {
        limit,
        detail: detail.to_string(),
    }
}

impl JobCgroup {
    fn controller<T>(&self, limit: &'static str) -> Result<&T, CgroupError>
    where
        T: Controller + cgroups_rs::fs::ControllIdentifier,
        for<'a> &'a T: From<&'a cgroups_rs::fs::Subsystem>,
    {
        self.cgroup
            .controller_of::<T>()
            .ok_or_else(|| not_applied(limit, "controller not available"))
    }

    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        let pids: &PidController = self.controller("pids")?;
        pids.set_pid_max(MaxValue::Value(i64::from(limits.pids)))
            .map_err(|e| not_applied("pids", e))?;
        match pids.get_pid_max() {
            Ok(MaxValue::Value(v)) if v == i64::from(limits.pids) => {}
            other => return Err(not_applied("pids", format!("read back {other:?}"))),
        }

        if let Some(bytes) = limits.memory_bytes {
            let memory: &MemController = self.controller("max_memory")?;
            memory
                .set_limit(bytes)
                .map_err(|e| not_applied("max_memory", e))?;
            let applied = memory.memory_stat().limit_in_bytes;
            if applied != bytes {
                return Err(not_applied("max_memory", format!("read back {applied}")));
            }
        }

        if let Some(percent) = limits.cpu_percent {
            let cpu: &CpuController = self.controller("max_cpu")?;
            let quota = i64::from(percent) * CPU_PERIOD_US as i64 / 100;
            cpu.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
                .map_err(|e| not_applied("max_cpu", e))?;
            match cpu.cfs_quota() {
                Ok(applied) if applied == quota => {}
                other => return Err(not_applied("max_cpu", format!("read back {other:?}"))),
            }
        }

        if let Some(cpus) = &limits.cpuset {
            let cpuset: &CpuSetController = self.controller("cpu_cores")?;
            if !self.v2 {
                // v1 cpusets start empty; memory nodes must be set before tasks can join.
                let parent_mems = std::fs::read_to_string(cpuset.path().join("../cpuset.mems"))
                    .unwrap_or_else(|_| "0".into());
                cpuset
                    .set_mems(parent_mems.trim())
                    .map_err(|e| not_applied("cpu_cores", e))?;
            }
            cpuset
                .set_cpus(cpus)
                .map_err(|e| not_applied("cpu_cores", e))?;
            let applied: Vec<u32> = cpuset
                .cpuset()
                .cpus
                .iter()
                .flat_map(|&(low, high)| low as u32..=high as u32)
                .collect();
            if Some(applied.clone()) != parse_cpus(cpus) {
                return Err(not_applied("cpu_cores", format!("read back {applied:?}")));
            }
        } else if !self.v2
            && let Some(cpuset) = self.cgroup.controller_of::<CpuSetController>()
        {
            // An empty v1 cpuset admits no task: inherit the parent's.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let inherited = std::fs::read_to_string(cpuset.path().join("..").join(file))
                    .map_err(|e| not_applied("cpu_cores", e))?;
                std::fs::write(cpuset.path().join(file), inherited.trim())
                    .map_err(|e| not_applied("cpu_cores", e))?;
            }
        }

        if let Some(bps) = limits.io_bytes_per_second {
            let blkio: &BlkIoController = self.controller("max_io_bps")?;
            let devices = block_devices();
            if devices.is_empty() {
                return Err(not_applied("max_io_bps", "no block devices found"));
            }
            for (major, minor) in &devices {
                blkio
                    .throttle_read_bps_for_device(*major, *minor, bps)
                    .and_then(|()| blkio.throttle_write_bps_for_device(*major, *minor, bps))
                    .map_err(|e| not_applied("max_io_bps", e))?;
            }
            if self.v2 {
                let io_max = self.v2_file("io.max").unwrap_or_default();
                let wanted = format!("rbps={bps} wbps={bps}");
                if !io_max.lines().any(|line| line.contains(&wanted)) {
                    return Err(not_applied(
                        "max_io_bps",
                        format!("io.max reads {:?}", io_max.trim()),
                    ));
                }
            } else {
                let applied = blkio.blkio().throttle.read_bps_device;
                if !applied.iter().any(|d| d.data == bps) {
                    return Err(not_applied("max_io_bps", format!("read back {applied:?}")));
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` file of every controller hierarchy of this cgroup; a process writes
    /// "0" to each to enter the cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self
            .cgroup
            .subsystems()
            .iter()
            .map(|s| s.to_controller().path().join("cgroup.procs"))
            .collect();
        files.sort();
        files.dedup();
        files
    }

    /// Process ids in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        self.cgroup.procs().iter().map(|p| p.pid as i32).collect()
    }

    /// Sends `signal` to every process of the job.
    pub fn signal_all(&self, signal: nix::sys::signal::Signal) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Kills every process of the job, including ones forked meanwhile: `cgroup.kill` on v2;
    /// on v1, freeze, SIGKILL each process, thaw.
    pub fn kill_all(&self) {
        if self.v2 && self.cgroup.kill().is_ok() {
            return;
        }
        let freezer = self.cgroup.controller_of::<FreezerController>();
        if let Some(freezer) = freezer {
            let _ = freezer.freeze();
        }
        self.signal_all(nix::sys::signal::Signal::SIGKILL);
        if let Some(freezer) = freezer {
            let _ = freezer.thaw();
        }
    }

    /// A file of this cgroup's directory on v2 (`None` on v1 or when unreadable).
    fn v2_file(&self, name: &str) -> Option<String> {
        if !self.v2 {
            return None;
        }
        let path = Path::new(cgroups_rs::fs::cgroup::UNIFIED_MOUNTPOINT)
            .join(self.cgroup.path().trim_start_matches('/'))
            .join(name);
        std::fs::read_to_string(path).ok()
    }

    /// The directory of this cgroup in the pids hierarchy (the unified one on v2).
    pub fn path(&self) -> PathBuf {
        self.cgroup
            .controller_of::<PidController>()
            .map(|pids| pids.path().to_owned())
            .unwrap_or_default()
    }

    pub fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        if let Some(memory) = self.cgroup.controller_of::<MemController>() {
            let stat = memory.memory_stat();
            usage.memory_bytes = stat.usage_in_bytes;
            usage.memory_limit = stat.limit_in_bytes;
            usage.oom_kills = match self.v2_file("memory.events") {
                Some(events) => keyed_value(&events, "oom_kill").unwrap_or(0),
                None => stat.oom_control.oom_kill,
            };
        }
        if self.v2 {
            if let Some(cpu) = self.cgroup.controller_of::<CpuController>() {
                usage.cpu_nanos = cpu
                    .cpu()
                    .stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map_or(0, |us| us * 1000);
            }
        } else if let Some(cpuacct) = self.cgroup.controller_of::<CpuAcctController>() {
            usage.cpu_nanos = cpuacct.cpuacct().usage;
        }
        if let Some(pids) = self.cgroup.controller_of::<PidController>() {
            usage.pids = pids.get_pid_current().unwrap_or(0);
        }
        if let Some(pressure) = self.v2_file("cpu.pressure") {
            usage.cpu_pressure_some = pressure_avg10(&pressure, "some");
        }
        if let Some(pressure) = self.v2_file("memory.pressure") {
            usage.memory_pressure_some = pressure_avg10(&pressure, "some");
            usage.memory_pressure_full = pressure_avg10(&pressure, "full");
        }
        if let Some(stat) = self.v2_file("io.stat") {
            // One line per device: "8:0 rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N".
            for line in stat.lines() {
                usage.io_read_bytes += keyed_value(line, "rbytes").unwrap_or(0);
                usage.io_write_bytes += keyed_value(line, "wbytes").unwrap_or(0);
            }
        } else if !self.v2
            && let Some(blkio) = self.cgroup.controller_of::<BlkIoController>()
        {
            for service in blkio.blkio().throttle.io_service_bytes {
                usage.io_read_bytes += service.read;
                usage.io_write_bytes += service.write;
            }
        }
        usage
    }

    /// Removes the cgroup (its processes must be gone).
    pub fn delete(&self) {
        for attempt in 0..50 {
            match self.cgroup.delete() {
                Ok(()) => return,
                Err(error) if attempt == 49 => {
                    tracing::warn!(cgroup = self.cgroup.path(), %error, "cannot remove cgroup");
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }
}

/// The number after `key` in "key value" lines (memory.events) or "key=value" fields (io.stat).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    let mut tokens = text.split_whitespace();
    while let Some(token) = tokens.next() {
        if token == key {
            return tokens.next()?.parse().ok();
        }
        if let Some(value) = token
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return value.parse().ok();
        }
    }
    None
}

/// The `avg10` of the `kind` ("some" or "full") line of a PSI file:
/// "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345".
fn pressure_avg10(text: &str, kind: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(kind))?;
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("avg10=")?.parse().ok())
}

/// (major, minor) of every whole block device except loop, ram and zram devices.
fn block_devices() -> Vec<(u64, u64)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !(name.starts_with("loop") || name.starts_with("ram") || name.starts_with("zram"))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("dev")).ok())
        .filter_map(|dev| {
            let (major, minor) = dev.trim().split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .collect()
}

/// Expands a cpuset string into its CPU numbers; `None` if malformed.
pub fn parse_cpus(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        match part.split_once('-') {
            Some((low, high)) => {
                let (low, high): (u32, u32) = (low.trim().parse().ok()?, high.trim().parse().ok()?);
                if low > high || high - low > 4096 {
                    return None;
                }
                cpus.extend(low..=high);
            }
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_counters_are_read_from_their_files() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(keyed_value(events, "oom_kill"), Some(2));
        assert_eq!(keyed_value(events, "oom"), Some(3));
        let stat = "8:0 rbytes=4096 wbytes=20971520 rios=1 wios=5 dbytes=0 dios=0";
        assert_eq!(keyed_value(stat, "wbytes"), Some(20_971_520));
        assert_eq!(keyed_value(stat, "rbytes"), Some(4096));
        assert_eq!(keyed_value(stat, "missing"), None);
        let pressure = "some avg10=12.50 avg60=3.00 avg300=0.61 total=123\nfull avg10=2.25 avg60=0.00 avg300=0.00 total=9\n";
        assert_eq!(pressure_avg10(pressure, "some"), Some(12.5));
        assert_eq!(pressure_avg10(pressure, "full"), Some(2.25));
        assert_eq!(
            pressure_avg10("some avg10=0.00 avg60=0.00 avg300=0.00 total=0", "full"),
            None
        );
    }

    #[test]
    fn cpusets_parse_to_cpu_numbers() {
        assert_eq!(parse_cpus("0-1"), parse_cpus("1,0"));
        assert_eq!(parse_cpus("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_cpus("x"), None);
        assert_eq!(parse_cpus("3-1"), None);
    }
}
