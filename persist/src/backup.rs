//! `joblet-persist backup` and `restore`: a consistent copy of the data directory (a RocksDB
//! checkpoint: hard links where the target is on the same filesystem, copies otherwise) and
//! putting one back. Both run with the daemon stopped — RocksDB admits one process per data
//! directory — which loses nothing: core keeps every line in its spool until persist has
//! acknowledged it and sends the rest once persist is back.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::Config;
use crate::store::Store;

/// Writes a checkpoint of `config.data_dir` to `to` (which must not exist); returns its size.
pub fn backup(config: &Config, to: &Path) -> anyhow::Result<u64> {
    if to.exists() {
        bail!("backup --to {}: exists; give a new directory", to.display());
    }
    let store = open(config)?;
    store.flush()?;
    rocksdb::checkpoint::Checkpoint::new(store.raw_db())
        .and_then(|checkpoint| checkpoint.create_checkpoint(to))
        .with_context(|| format!("backup --to {}", to.display()))?;
    Ok(crate::store::directory_bytes(to))
}

/// Replaces `config.data_dir` with the backup in `from` (checked to open first); the data
/// directory it replaces is kept beside it, renamed. Returns the number of jobs restored and
/// where the replaced data went.
pub fn restore(config: &Config, from: &Path) -> anyhow::Result<(usize, Option<PathBuf>)> {
    // The daemon must be stopped: opening the current data takes RocksDB's lock.
    if config.data_dir.exists() {
        drop(open(config)?);
    }
    if !from.join("CURRENT").is_file() {
        bail!(
            "restore --from {}: not a joblet-persist backup (no RocksDB CURRENT file)",
            from.display()
        );
    }
    let data_dir = &config.data_dir;
    let owner = std::fs::metadata(data_dir)
        .or_else(|_| std::fs::metadata(data_dir.parent().unwrap_or(Path::new("/"))))
        .map(|meta| (meta.uid(), meta.gid()))?;
    // Copied first, then checked by opening the copy: the backup itself is left untouched.
    let staging = sibling(data_dir, "restoring");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("create {}", staging.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let target = staging.join(entry.file_name());
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copy {}", entry.path().display()))?;
        }
    }
    let check = Config {
        data_dir: staging.clone(),
        ..config.clone()
    };
    let jobs = match Store::open(&check) {
        Ok(store) => store.list_jobs("").len(),
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            bail!("restore --from {}: does not open: {error}", from.display());
        }
    };
    for entry in std::fs::read_dir(&staging)? {
        std::os::unix::fs::chown(entry?.path(), Some(owner.0), Some(owner.1))?;
    }
    std::os::unix::fs::chown(&staging, Some(owner.0), Some(owner.1))?;
    let replaced = if data_dir.exists() {
        let aside = sibling(
            data_dir,
            &format!("replaced-{}", joblet_ipc::now_ns() / 1_000_000_000),
        );
        std::fs::rename(data_dir, &aside)
            .with_context(|| format!("move {} aside", data_dir.display()))?;
        Some(aside)
    } else {
        None
    };
    std::fs::rename(&staging, data_dir)
        .with_context(|| format!("move the restored data to {}", data_dir.display()))?;
    Ok((jobs, replaced))
}

fn open(config: &Config) -> anyhow::Result<Store> {
    Store::open(config).map_err(|error| {
        let text = error.to_string();
        if text.contains("lock") {
            anyhow::anyhow!(
                "{} is in use by a running joblet-persist: stop it first (systemctl stop \
                 joblet-persist); core keeps every line meanwhile and sends it afterwards",
                config.data_dir.display()
            )
        } else {
            anyhow::anyhow!("open {}: {text}", config.data_dir.display())
        }
    })
}

/// `dir` with `suffix` added to its name, beside it.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}
