//! joblet-core's durable state: the job catalogue, kept in an append-only journal at
//! `state_dir/jobs.journal`.
//!
//! Every state change of a job appends the job's whole record ([`StoredJob`], a few hundred
//! bytes) and syncs it (`fdatasync`) before the change is published, so `RunJob` returns only
//! once the job is recorded, and whatever a client was told survives a crash. At start the
//! journal is read once: the newest record of each job wins, and a `forget` entry (a job deleted
//! or evicted) removes it.
//!
//! Why a journal rather than RocksDB (which persist uses): records are small, written a handful
//! of times per job and read only at start; a journal needs no compaction tuning, keeps core's
//! footprint small, and bad bytes in it cost only the records they hold.
//!
//! Format: entries of `u32 length ‖ u32 CRC-32 of the payload` (both big-endian) and the
//! payload, an [`Entry`] in JSON. Unreadable bytes (a torn last write, garbage) never stop a
//! start: reading skips them byte by byte until the next entry whose length, checksum and JSON
//! are all valid, logs one warning and counts the skipped bytes
//! (`joblet_core_state_skipped_bytes_total`); what was readable is kept.
//!
//! Compaction: at open, and whenever appended entries outnumber twice the live records (plus
//! [`COMPACT_SLACK`]), the live records are written to a new file, synced and renamed over the
//! journal. Secret values are never written (see [`crate::spec::JobSpec`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::job::Status;
use crate::spec::JobSpec;

/// Largest entry accepted when reading (a spec is at most ~1 MiB of arguments and 1024
/// variables); a length above it is garbage.
const MAX_ENTRY_BYTES: usize = 16 << 20;
const HEADER_BYTES: usize = 8;
/// Appended entries allowed beyond twice the live records before the journal is rewritten.
const COMPACT_SLACK: usize = 1024;

/// One job as core records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredJob {
    pub id: String,
    /// Grows with every state change; the version replicated to persist's catalogue.
    pub version: u64,
    pub created: DateTime<Utc>,
    pub spec: JobSpec,
    pub work_dir: PathBuf,
    pub status: Status,
    pub exit_code: i32,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub reason: String,
    /// What the job's spools hold, written when it ended and its output was complete.
    #[serde(default)]
    pub spooled: Option<Spooled>,
    /// What persist had acknowledged when this record was written (a lower bound: replication
    /// resumes from here after a restart).
    #[serde(default)]
    pub replicated: Acked,
    /// The supervisor of a running job (to re-attach it after a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<crate::supervisor::SupervisorId>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spooled {
    pub log_lines: u64,
    pub log_bytes: u64,
    pub samples: u64,
    pub sample_bytes: u64,
}

/// Highest sequences persist acknowledged, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acked {
    pub logs: u64,
    pub metrics: u64,
    /// Version of the job record.
    pub record: u64,
}

/// One journal entry: written with a borrowed record (`Entry<&StoredJob>`), read back owned.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
enum Entry<J> {
    Job(J),
    Forget { id: String },
}

/// What [`Journal::open`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Live jobs, oldest first.
    pub jobs: Vec<StoredJob>,
    /// Bytes that were not a readable entry, and in how many places.
    pub skipped_bytes: u64,
    pub skipped_regions: u64,
}

pub struct Journal {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    /// The encoded entry of each live job, for compaction.
    live: HashMap<String, Vec<u8>>,
    /// Entries in the file.
    entries: usize,
}

impl Journal {
    /// Reads the journal at `path` (none yet is an empty one), rewrites it with the live
    /// records only, and opens it for appending.
    pub fn open(path: &Path) -> io::Result<(Journal, Loaded)> {
        let data = match std::fs::read(path) {
            Ok(data) => data,
            Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(error),
        };
        let (jobs, skipped_bytes, skipped_regions) = read_entries(&data);
        let mut live = HashMap::with_capacity(jobs.len());
        for job in &jobs {
            live.insert(job.id.clone(), encode(&Entry::Job(job))?);
        }
        let file = rewrite(path, live.values())?;
        let journal = Journal {
            path: path.to_owned(),
            inner: Mutex::new(Inner {
                file,
                entries: live.len(),
                live,
            }),
        };
        Ok((
            journal,
            Loaded {
                jobs,
                skipped_bytes,
                skipped_regions,
            },
        ))
    }

    /// Appends `job`'s record and syncs it. Blocking: call from a blocking thread.
    pub fn record(&self, job: &StoredJob) -> io::Result<()> {
        let entry = encode(&Entry::Job(job))?;
        let mut inner = self.lock();
        inner.append(&entry)?;
        inner.live.insert(job.id.clone(), entry);
        self.compact_if_due(&mut inner)
    }

    /// Removes `id` from the catalogue, durably. Blocking.
    pub fn forget(&self, id: &str) -> io::Result<()> {
        let entry = encode(&Entry::<&StoredJob>::Forget { id: id.to_owned() })?;
        let mut inner = self.lock();
        if inner.live.remove(id).is_none() {
            return Ok(());
        }
        inner.append(&entry)?;
        self.compact_if_due(&mut inner)
    }

    /// Size of the journal file.
    pub fn bytes(&self) -> u64 {
        self.lock().file.metadata().map_or(0, |m| m.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        joblet_daemon::lock(&self.inner)
    }

    fn compact_if_due(&self, inner: &mut Inner) -> io::Result<()> {
        if inner.entries <= 2 * inner.live.len() + COMPACT_SLACK {
            return Ok(());
        }
        inner.file = rewrite(&self.path, inner.live.values())?;
        inner.entries = inner.live.len();
        Ok(())
    }
}

impl Inner {
    fn append(&mut self, entry: &[u8]) -> io::Result<()> {
        self.file.write_all(entry)?;
        self.file.sync_data()?;
        self.entries += 1;
        Ok(())
    }
}

fn encode(entry: &Entry<&StoredJob>) -> io::Result<Vec<u8>> {
    let payload = serde_json::to_vec(entry).map_err(io::Error::other)?;
    let mut framed = Vec::with_capacity(HEADER_BYTES + payload.len());
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    framed.extend_from_slice(&payload);
    Ok(framed)
}

/// The entry at the start of `data`, and its length, if it is a whole, valid one.
fn entry_at(data: &[u8]) -> Option<(Entry<StoredJob>, usize)> {
    let header = data.get(..HEADER_BYTES)?;
    let len = u32::from_be_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(header[4..].try_into().ok()?);
    if len > MAX_ENTRY_BYTES {
        return None;
    }
    let payload = data.get(HEADER_BYTES..HEADER_BYTES + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let entry = serde_json::from_slice(payload).ok()?;
    Some((entry, HEADER_BYTES + len))
}

/// Live jobs (oldest first), bytes skipped, regions skipped.
fn read_entries(data: &[u8]) -> (Vec<StoredJob>, u64, u64) {
    let mut jobs: HashMap<String, StoredJob> = HashMap::new();
    let (mut position, mut skipped_bytes, mut skipped_regions) = (0, 0u64, 0u64);
    let mut bad_since: Option<usize> = None;
    while position < data.len() {
        match entry_at(&data[position..]) {
            Some((entry, len)) => {
                if let Some(start) = bad_since.take() {
                    skipped_bytes += (position - start) as u64;
                    skipped_regions += 1;
                }
                match entry {
                    Entry::Job(job) => {
                        jobs.insert(job.id.clone(), job);
                    }
                    Entry::Forget { id } => {
                        jobs.remove(&id);
                    }
                }
                position += len;
            }
            None => {
                bad_since.get_or_insert(position);
                position += 1;
            }
        }
    }
    if let Some(start) = bad_since {
        skipped_bytes += (data.len() - start) as u64;
        skipped_regions += 1;
    }
    let mut jobs: Vec<StoredJob> = jobs.into_values().collect();
    jobs.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
    (jobs, skipped_bytes, skipped_regions)
}

/// Writes `entries` to a new file beside `path`, syncs it, renames it over `path` and syncs
/// the directory; returns the new file open for appending.
fn rewrite<'a>(path: &Path, entries: impl Iterator<Item = &'a Vec<u8>>) -> io::Result<File> {
    let temporary = path.with_extension("journal.new");
    {
        let mut file = File::create(&temporary)?;
        let mut buffer = Vec::new();
        for entry in entries {
            buffer.extend_from_slice(entry);
        }
        file.write_all(&buffer)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    std::fs::OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn job(id: &str, status: Status) -> StoredJob {
        StoredJob {
            id: id.to_owned(),
            version: 1,
            created: Utc::now(),
            spec: JobSpec {
                command: "/bin/echo".into(),
                args: vec!["hi".into()],
                environment: BTreeMap::from([("A".into(), "1".into())]),
                secret_environment: BTreeMap::from([("TOKEN".into(), "s3cret".into())]),
                ..JobSpec::unknown()
            },
            work_dir: PathBuf::from("/tmp/w"),
            status,
            exit_code: 0,
            start_time: None,
            end_time: None,
            reason: String::new(),
            spooled: None,
            replicated: Acked::default(),
            supervisor: None,
        }
    }

    #[test]
    fn newest_record_wins_forget_removes_and_secrets_stay_off_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.journal");
        let (journal, loaded) = Journal::open(&path).unwrap();
        assert!(loaded.jobs.is_empty());
        journal.record(&job("a", Status::Running)).unwrap();
        let mut done = job("a", Status::Completed);
        done.version = 2;
        journal.record(&done).unwrap();
        journal.record(&job("b", Status::Running)).unwrap();
        journal.forget("b").unwrap();
        drop(journal);
        let text = std::fs::read(&path).unwrap();
        assert!(
            !text.windows(6).any(|w| w == b"s3cret"),
            "secret values are never written"
        );
        let (_, loaded) = Journal::open(&path).unwrap();
        assert_eq!(loaded.jobs.len(), 1);
        assert_eq!(loaded.jobs[0].status, Status::Completed);
        assert_eq!(loaded.jobs[0].version, 2);
        assert_eq!(loaded.jobs[0].spec.secret_environment["TOKEN"], "");
        assert_eq!(loaded.skipped_bytes, 0);
    }

    #[test]
    fn a_torn_tail_and_garbage_in_the_middle_cost_only_their_own_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.journal");
        let (journal, _) = Journal::open(&path).unwrap();
        for id in ["a", "b", "c"] {
            journal.record(&job(id, Status::Completed)).unwrap();
        }
        drop(journal);
        let mut data = std::fs::read(&path).unwrap();
        let first = entry_at(&data).unwrap().1;
        // Garbage between the first and second entry, and the last one torn in half.
        let garbage = b"\x00\x00\x01\x00garbage that is not an entry \xff\xfe";
        data.splice(first..first, garbage.iter().copied());
        let torn = data.len() - 40;
        data.truncate(torn);
        std::fs::write(&path, &data).unwrap();
        let (journal, loaded) = Journal::open(&path).unwrap();
        let ids: Vec<&str> = loaded.jobs.iter().map(|j| j.id.as_str()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ["a", "b"], "what was readable is kept");
        assert_eq!(loaded.skipped_regions, 2);
        assert!(loaded.skipped_bytes >= garbage.len() as u64 + 8);
        // The rewritten journal is clean and still appendable.
        journal.record(&job("d", Status::Completed)).unwrap();
        drop(journal);
        let (_, loaded) = Journal::open(&path).unwrap();
        assert_eq!(loaded.jobs.len(), 3);
        assert_eq!(loaded.skipped_bytes, 0);
    }

    #[test]
    fn the_journal_is_compacted_as_records_are_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.journal");
        let (journal, _) = Journal::open(&path).unwrap();
        let mut record = job("a", Status::Running);
        for version in 1..=1500 {
            record.version = version;
            journal.record(&record).unwrap();
        }
        let one = encode(&Entry::Job(&record)).unwrap().len() as u64;
        assert!(
            journal.bytes() <= (2 + COMPACT_SLACK as u64 + 1) * one,
            "{} bytes for one live job",
            journal.bytes()
        );
        drop(journal);
        let (_, loaded) = Journal::open(&path).unwrap();
        assert_eq!(loaded.jobs[0].version, 1500);
    }
}
