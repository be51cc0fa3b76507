//! joblet-persist failing for a long time (its disk full): replication waits with backoff
//! instead of reconnecting and resending at once, and neither daemon floods its log or burns CPU.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{self, Daemon, run, shell};

/// A tmpfs of `size` mounted at `dir` until dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs (the tests run as root)");
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn cpu_seconds(daemon: &Daemon) -> f64 {
    let pid = daemon.child.id().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

async fn counter(daemon: &Daemon, name: &str) -> f64 {
    daemon
        .scrape()
        .await
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn a_full_persist_disk_makes_replication_back_off_instead_of_storming() {
    let _alone = harness::CPU_BOUND.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _disk = Tmpfs::mount(&dir.path().join("persist-data"), "24m");
    let persist = harness::start_persist(dir.path()).await;
    let config = format!(
        "persist:\n  socket: {}\n  query_address: null\n  reconnect_delay: 2s\njobs:\n  work_root: {}\n",
        dir.path().join("persist.sock").display(),
        dir.path().join("work").display()
    );
    let core = harness::start_core(dir.path(), &config).await;
    let mut client = core.client().await;
    // ~60 MB of output that compresses little, for a 24 MB disk (repeated lines would fit
    // it compressed, now that persist keeps no write-ahead log).
    let id = run(
        &mut client,
        shell("head -c 45000000 /dev/urandom | base64 -w 148"),
    )
    .await;
    harness::finished(&mut client, &id).await;
    // Let the disk fill and the failures settle into their rhythm.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let attempts = counter(&core, "joblet_ipc_connect_attempts_total").await;
    let (core_cpu, persist_cpu) = (cpu_seconds(&core), cpu_seconds(&persist));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let attempts = counter(&core, "joblet_ipc_connect_attempts_total").await - attempts;
    let core_cpu = cpu_seconds(&core) - core_cpu;
    let persist_cpu = cpu_seconds(&persist) - persist_cpu;
    assert!(
        attempts <= 10.0,
        "{attempts} connection attempts in 10 s: replication storms persist"
    );
    assert!(
        core_cpu < 0.5 && persist_cpu < 0.5,
        "CPU over 10 s of outage: core {core_cpu} s, persist {persist_cpu} s (aim < 5 %)"
    );
    let core_log = std::fs::read_to_string(&core.log).unwrap();
    let persist_log = std::fs::read_to_string(&persist.log).unwrap();
    // persist says why in-band, and core says it once (then once a minute); nothing else
    // is logged per attempt.
    let refusals: Vec<&str> = core_log
        .lines()
        .filter(|line| line.contains("joblet_ipc"))
        .skip_while(|line| !line.contains("refuses to store"))
        .collect();
    assert!(
        refusals.len() == 1 && refusals[0].contains("No space left on device"),
        "core says once that persist refuses, and why: {core_log}"
    );
    let failures = persist_log
        .matches("storing replicated data failed")
        .count();
    assert!(
        (1..=2).contains(&failures),
        "persist's disk filled, and it logs its store failure once, then once a minute: {persist_log}"
    );
    core.terminate().await;
    persist.kill_hard().await;
}
