//! Shared by the benchmark programs: a result table that puts each figure beside its baseline,
//! and starting the daemons built beside them.

pub mod datasets;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use tokio::io::AsyncBufReadExt;

/// A program built beside the running benchmark.
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} missing: cargo build --release --workspace --bins",
        path.display()
    );
    Ok(path)
}

/// A daemon started by [`start`], killed when dropped.
pub struct Daemon {
    pub child: tokio::process::Child,
    /// Its gRPC address, from its ready line.
    pub grpc: String,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// SIGTERM, then waits for it to exit.
    pub async fn terminate(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        self.child.wait().await?;
        Ok(())
    }
}

/// Writes `dir/persist.yml`: data in `dir/persist-data`, IPC on `socket`, gRPC on a free port,
/// no metrics endpoint, and `extra` YAML appended. Returns its path.
pub fn persist_config(dir: &Path, socket: &Path, extra: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("persist.yml");
    std::fs::write(
        &path,
        format!(
            "data_dir: {}\nipc:\n  socket: {}\ngrpc:\n  listen: 127.0.0.1:0\n  insecure: true\nmetrics:\n  listen: null\n{extra}",
            dir.join("persist-data").display(),
            socket.display()
        ),
    )?;
    Ok(path)
}

/// Writes `dir/core.yml`: state in `dir/state`, jobs in `dir/work`, gRPC on a free port
/// (plaintext, loopback), no metrics endpoint, job cgroups under `cgroup_parent`, then the
/// `persist:` block and any other YAML in `persist_and_more` (its `jobs:` keys go after
/// `work_root`). Returns its path.
pub fn core_config(
    dir: &Path,
    cgroup_parent: &str,
    persist_and_more: &str,
) -> anyhow::Result<PathBuf> {
    let path = dir.join("core.yml");
    std::fs::write(
        &path,
        format!(
            "grpc:\n  listen: 127.0.0.1:0\n  insecure: true\nmetrics:\n  listen: null\nstate_dir: {}\ncgroup:\n  parent: {cgroup_parent}\njobs:\n  work_root: {}\n{persist_and_more}",
            dir.join("state").display(),
            dir.join("work").display()
        ),
    )?;
    Ok(path)
}

/// Starts `binary --config config` and waits for its ready line.
pub async fn start(binary: &Path, config: &Path) -> anyhow::Result<Daemon> {
    let mut child = tokio::process::Command::new(binary)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let ready = lines
        .next_line()
        .await?
        .context("daemon exited before ready")?;
    let grpc = ready
        .split_whitespace()
        .find_map(|p| p.strip_prefix("grpc="))
        .context("no grpc= in ready line")?
        .to_owned();
    Ok(Daemon { child, grpc })
}

/// A field of `/proc/<pid>/status` or `/proc/<pid>/smaps_rollup` (`name:` followed by kB), in
/// MiB.
pub fn proc_mib(pid: u32, file: &str, name: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .with_context(|| format!("{name} in /proc/{pid}/{file}"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

/// A process's resident set (VmRSS), in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    proc_mib(pid, "status", "VmRSS")
}

/// Processes whose `comm` is `name` and whose command line (arguments joined by spaces)
/// contains `marker`.
pub fn processes(name: &str, marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            (comm.trim() == name
                && String::from_utf8_lossy(&cmdline)
                    .replace('\0', " ")
                    .contains(marker))
            .then_some(pid)
        })
        .collect()
}

/// One measured figure, with the baseline it is compared against (if any) and the aim.
pub struct Row {
    pub name: String,
    pub value: f64,
    pub baseline: Option<f64>,
    pub unit: &'static str,
    pub aim: String,
}

#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    pub fn add(
        &mut self,
        name: impl Into<String>,
        value: f64,
        baseline: Option<f64>,
        unit: &'static str,
        aim: impl Into<String>,
    ) {
        self.rows.push(Row {
            name: name.into(),
            value,
            baseline,
            unit,
            aim: aim.into(),
        });
    }

    pub fn render(&self, title: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n{title}");
        let _ = writeln!(
            out,
            "{:<40} {:>14} {:>14} {:>8}  {:<10} aim",
            "figure", "value", "baseline", "ratio", "unit"
        );
        for row in &self.rows {
            let baseline = row.baseline.map_or("-".to_owned(), format_number);
            let ratio = row
                .baseline
                .filter(|b| *b != 0.0)
                .map_or("-".to_owned(), |b| format!("{:.2}", row.value / b));
            let _ = writeln!(
                out,
                "{:<40} {:>14} {:>14} {:>8}  {:<10} {}",
                row.name,
                format_number(row.value),
                baseline,
                ratio,
                row.unit,
                row.aim
            );
        }
        out
    }
}

fn format_number(value: f64) -> String {
    if value.abs() >= 1000.0 {
        let mut digits = format!("{:.0}", value);
        let mut i = digits.len() as isize - 3;
        let start = if value < 0.0 { 1 } else { 0 };
        while i > start {
            digits.insert(i as usize, ',');
            i -= 3;
        }
        digits
    } else {
        format!("{value:.3}")
    }
}
