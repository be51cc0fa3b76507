//! A job's output: captured lines, the spool file and live readers.
//!
//! The job's supervisor ([`crate::supervisor`], a process of its own that outlives core) owns
//! the job's pipes. Two pump threads there (stdout, stderr) read them, split lines (a line longer
//! than the configured maximum becomes several records; a last line without newline is kept)
//! and hand each read's lines to one [`Append`] on the [`SpoolWriter`], which under one lock
//! gives every line the job's next sequence number and the read's nanosecond timestamp (never
//! decreasing), encodes them into one buffer and appends it to the spool file with one write.
//! No allocation happens per line.
//!
//! After each write the supervisor also updates the spool's progress file (`<id>.progress`:
//! a checked header with the end of the whole frames and the last sequence, then a seek index
//! entry per [`INDEX_EVERY`] records). In core, the job's [`Output`] follows the job through
//! that small file, never re-reading the spool: [`SpoolWatch`] (one thread, inotify on the
//! spool directory) wakes it when the progress file changes, and it publishes the new end. Only
//! when a supervisor died between a spool write and its progress update is the spool's tail
//! read frame by frame. Readers ([`SpoolReader`]) — live subscribers and the
//! replication to joblet-persist alike — read the spool file at their own pace and wait on that
//! progress signal when they reach the end: a slow reader (or persist being slow or down, or
//! core being restarted) never slows the job, and memory does not grow with the number of
//! readers.
//!
//! Spool format: frames of `joblet.LogRecord` (4-byte big-endian length + protobuf), the same
//! framing as the IPC stream.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use joblet_proto::joblet::{LogRecord, LogStream};
use joblet_proto::wire::log_record;
use tokio::sync::watch;
use tokio_util::codec::Decoder;

/// Every this many records the spool index remembers an offset, so a reader starting after a
/// sequence seeks close to it instead of scanning from the start.
const INDEX_EVERY: u64 = 1024;
/// Bytes a reader takes from the spool per read.
const READ_CHUNK: u64 = 1024 * 1024;
/// The progress file's header: end offset, last sequence, and a check of both (so a read that
/// raced a write is recognised), each a little-endian u64; index entries (sequence, offset of
/// its frame) follow.
const PROGRESS_HEADER: u64 = 24;
const PROGRESS_ENTRY: u64 = 16;
const PROGRESS_CHECK: u64 = 0x6a6f_626c_6574_7370; // "jobletsp"

fn progress_check(end_offset: u64, last_sequence: u64) -> u64 {
    end_offset ^ last_sequence.rotate_left(17) ^ PROGRESS_CHECK
}

/// The progress file of the spool at `spool`.
pub fn progress_path(spool: &Path) -> PathBuf {
    spool.with_extension("progress")
}

/// A frame longer than this in a spool means the spool is damaged (lines are at most
/// `jobs.max_line_length`, far less).
const MAX_FRAME: usize = 1 << 30;
/// Largest pipe read. A pump starts with [`FIRST_PIPE_READ`] and doubles its buffer each time
/// a read fills it, so a chatty job reads in big chunks while the many jobs that print a few
/// lines never allocate big buffers.
const PIPE_READ: usize = 256 * 1024;
const FIRST_PIPE_READ: usize = 16 * 1024;
/// After a read of at least [`COALESCE_ABOVE`] bytes that emptied the pipe, the pump waits
/// [`COALESCE_FOR`] before it reads again. A job printing a line now and then is read at once.
const COALESCE_ABOVE: usize = 4096;
const COALESCE_FOR: Duration = Duration::from_millis(1);
/// A pump whose buffer grew lets it go once its pipe was quiet this long.
const BURST_OVER: Duration = Duration::from_secs(1);
/// How often every followed spool is read even without a notification (inotify's queue can
/// overflow).
const FOLLOW_SWEEP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub last_sequence: u64,
    /// Bytes of whole frames in the spool file.
    pub end_offset: u64,
    /// The job ended and both pipes reached end of file: no more lines will come.
    pub finished: bool,
}

/// Writes a job's spool: used by its supervisor, the only writer.
pub struct SpoolWriter {
    path: PathBuf,
    state: Mutex<WriterState>,
}

struct WriterState {
    file: File,
    /// The progress file (see the module docs).
    progress: File,
    next_sequence: u64,
    last_timestamp: i64,
    buffer: BytesMut,
    write_failed: bool,
    /// End of the whole frames written.
    end_offset: u64,
    /// Records written, and index entries written to the progress file.
    records: u64,
    index_entries: u64,
    /// Index entries of the records in `buffer`, written with it.
    new_index: Vec<(u64, u64)>,
}

impl SpoolWriter {
    /// Opens the job's spool (created by core) for appending after what it holds.
    pub fn open(path: &Path) -> io::Result<SpoolWriter> {
        let (last_sequence, end_offset) = scan_spool::<LogRecord>(path, |r| r.sequence)?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        // A frame torn by an earlier writer's crash would hide every later one.
        file.set_len(end_offset)?;
        let progress = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(progress_path(path))?;
        let mut state = WriterState {
            file,
            progress,
            next_sequence: last_sequence + 1,
            last_timestamp: 0,
            // Grows with the first reads; most jobs print little.
            buffer: BytesMut::new(),
            write_failed: false,
            end_offset,
            // Whatever an earlier writer wrote is read by scanning; the index starts here.
            records: 0,
            index_entries: 0,
            new_index: Vec::new(),
        };
        state.publish()?;
        Ok(SpoolWriter {
            path: path.to_owned(),
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, WriterState> {
        joblet_daemon::lock(&self.state)
    }

    /// Starts recording lines of `stream` read now; they are written when the returned
    /// [`Append`] is dropped.
    pub fn append(&self, stream: LogStream) -> Append<'_> {
        let mut state = self.lock();
        let timestamp = joblet_ipc::now_ns().max(state.last_timestamp);
        state.last_timestamp = timestamp;
        Append {
            writer: self,
            state,
            stream,
            timestamp,
        }
    }

    /// Frees the encoding buffer a burst of output grew.
    pub fn release_buffer(&self) {
        self.lock().buffer = BytesMut::new();
    }

    /// Makes what was written durable.
    pub fn sync(&self) -> io::Result<()> {
        self.lock().file.sync_data()
    }
}

/// A job's output as core sees it: the spool its supervisor writes, followed (see the module
/// docs), and readers of it.
pub struct Output {
    job_id: String,
    path: PathBuf,
    state: Mutex<Followed>,
    progress: watch::Sender<Progress>,
}

struct Followed {
    /// Open while the job runs, to read what its supervisor appends; a finished job holds no
    /// file descriptor (readers open the spool themselves).
    file: Option<File>,
    /// The spool's progress file, once the supervisor has made it.
    progress: Option<File>,
    /// Index entries taken from the progress file.
    index_entries: u64,
    /// End of the whole frames read so far.
    end_offset: u64,
    last_sequence: u64,
    records: u64,
    /// (sequence, offset of its frame), every INDEX_EVERY records.
    index: Vec<(u64, u64)>,
}

impl Output {
    /// A new job's empty spool, for its supervisor to write.
    pub fn create(job_id: &str, path: &Path) -> io::Result<Arc<Output>> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            .mode(0o600)
            .open(path)?;
        Ok(Output::with(job_id, path, Some(file), Progress::default()))
    }

    /// The spool of a job that still runs (re-attached after a restart of core): read to its
    /// current end, then followed.
    pub fn follow(job_id: &str, path: &Path) -> io::Result<Arc<Output>> {
        let output = Output::with(job_id, path, Some(File::open(path)?), Progress::default());
        output.read_to_end()?;
        Ok(output)
    }

    /// The spool of a finished job recorded by an earlier run of core. `spooled` is what the
    /// journal says it holds (written when the job ended); without it the spool is read to find
    /// its last whole record. Either way no more lines will come.
    pub fn restore(
        job_id: &str,
        path: &Path,
        spooled: Option<(u64, u64)>,
    ) -> io::Result<Arc<Output>> {
        let (last_sequence, end_offset) = match spooled {
            Some(known) => known,
            None => scan_spool::<LogRecord>(path, |record| record.sequence)?,
        };
        let progress = Progress {
            last_sequence,
            end_offset,
            finished: true,
        };
        Ok(Output::with(job_id, path, None, progress))
    }

    fn with(job_id: &str, path: &Path, file: Option<File>, progress: Progress) -> Arc<Output> {
        Arc::new(Output {
            job_id: job_id.to_owned(),
            path: path.to_owned(),
            state: Mutex::new(Followed {
                file,
                progress: None,
                index_entries: 0,
                end_offset: progress.end_offset,
                last_sequence: progress.last_sequence,
                records: 0,
                index: Vec::new(),
            }),
            progress: watch::Sender::new(progress),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Followed> {
        joblet_daemon::lock(&self.state)
    }

    /// Takes the progress the supervisor published (see the module docs) and publishes it.
    /// Blocking; cheap (a 24-byte read, and the new index entries).
    pub fn refresh(&self) -> io::Result<()> {
        let mut state = self.lock();
        let state = &mut *state;
        if state.file.is_none() {
            return Ok(());
        }
        if state.progress.is_none() {
            match File::open(progress_path(&self.path)) {
                Ok(file) => state.progress = Some(file),
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(error) => return Err(error),
            }
        }
        let Some(progress) = state.progress.as_ref() else {
            return Ok(());
        };
        let mut header = [0u8; PROGRESS_HEADER as usize];
        if progress.read_at(&mut header, 0)? < header.len() {
            return Ok(());
        }
        let field =
            |i: usize| u64::from_le_bytes(header[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        let (end_offset, last_sequence) = (field(0), field(1));
        if field(2) != progress_check(end_offset, last_sequence) || end_offset <= state.end_offset {
            return Ok(()); // a read that raced a write, or nothing new
        }
        let entries_len =
            progress.metadata()?.len().saturating_sub(PROGRESS_HEADER) / PROGRESS_ENTRY;
        if entries_len > state.index_entries {
            let count = (entries_len - state.index_entries) as usize;
            let mut entries = vec![0u8; count * PROGRESS_ENTRY as usize];
            let at = PROGRESS_HEADER + state.index_entries * PROGRESS_ENTRY;
            let read = progress.read_at(&mut entries, at)? / PROGRESS_ENTRY as usize;
            for entry in entries.chunks_exact(PROGRESS_ENTRY as usize).take(read) {
                let sequence = u64::from_le_bytes(entry[..8].try_into().unwrap_or_default());
                let offset = u64::from_le_bytes(entry[8..].try_into().unwrap_or_default());
                if offset >= end_offset {
                    break; // written for frames this header does not count yet
                }
                state.index.push((sequence, offset));
                state.index_entries += 1;
            }
        }
        state.end_offset = end_offset;
        state.last_sequence = state.last_sequence.max(last_sequence);
        self.progress.send_replace(Progress {
            last_sequence: state.last_sequence,
            end_offset: state.end_offset,
            finished: false,
        });
        Ok(())
    }

    /// Reads the whole frames after the known end of the spool, one by one (into `buffer`),
    /// and publishes the new end: for a spool without (current) progress file. Blocking.
    pub fn scan_frames(&self, buffer: &mut Vec<u8>) -> io::Result<()> {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(file) = state.file.as_ref() else {
            return Ok(());
        };
        let before = state.end_offset;
        if buffer.is_empty() {
            buffer.resize(READ_CHUNK as usize, 0);
        }
        loop {
            let n = file.read_at(buffer, state.end_offset)?;
            let mut position = 0;
            let mut needed = 0;
            while position + 4 <= n {
                let header: [u8; 4] = buffer[position..position + 4].try_into().unwrap_or([0; 4]);
                let len = u32::from_be_bytes(header) as usize;
                if len > MAX_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "a frame of {len} bytes at offset {}",
                            state.end_offset + position as u64
                        ),
                    ));
                }
                if position + 4 + len > n {
                    needed = 4 + len;
                    break;
                }
                let body = &buffer[position + 4..position + 4 + len];
                let sequence = log_record::sequence(body)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                if state.records.is_multiple_of(INDEX_EVERY) {
                    state
                        .index
                        .push((sequence, state.end_offset + position as u64));
                }
                state.records += 1;
                state.last_sequence = state.last_sequence.max(sequence);
                position += 4 + len;
            }
            state.end_offset += position as u64;
            if position == 0 && needed > buffer.len() {
                buffer.resize(needed, 0); // one frame larger than the buffer
                continue;
            }
            if n < buffer.len() || position == 0 {
                break;
            }
        }
        if state.end_offset != before {
            self.progress.send_replace(Progress {
                last_sequence: state.last_sequence,
                end_offset: state.end_offset,
                finished: false,
            });
        }
        Ok(())
    }

    /// Everything the spool holds: the progress file's end, then any whole frame after it (a
    /// supervisor killed between a write and its progress update). Blocking.
    pub fn read_to_end(&self) -> io::Result<()> {
        self.refresh()?;
        self.scan_frames(&mut Vec::new())
    }

    /// No more lines will come (the supervisor exited): reads what is left, closes the spool
    /// and publishes the end.
    pub fn finish(&self) {
        if let Err(error) = self.read_to_end() {
            tracing::error!(job_id = %self.job_id, %error, "cannot read the end of the job's spool");
        }
        {
            let mut state = self.lock();
            state.file = None;
            state.progress = None;
            state.index.shrink_to_fit();
        }
        self.progress.send_modify(|p| p.finished = true);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    fn is_followed(&self) -> bool {
        self.lock().file.is_some()
    }

    /// A reader of the records after `after_sequence`.
    pub fn reader(self: &Arc<Self>, after_sequence: u64) -> io::Result<SpoolReader> {
        let start = {
            let state = self.lock();
            let position = state
                .index
                .partition_point(|(sequence, _)| *sequence <= after_sequence + 1);
            position.checked_sub(1).map_or(0, |i| state.index[i].1)
        };
        Ok(SpoolReader {
            file: Arc::new(File::open(&self.path)?),
            position: start,
            after_sequence,
            buffer: BytesMut::new(),
            codec: joblet_ipc::FrameCodec::new(usize::MAX >> 1),
            progress: self.progress.subscribe(),
        })
    }
}

/// Wakes the [`Output`] of each running job when its supervisor appends to its spool: one
/// thread for all jobs, blocked on inotify (`IN_MODIFY` on the spool directory), which also
/// reads every followed spool each [`FOLLOW_SWEEP`] in case a notification was lost.
pub struct SpoolWatch {
    followed: Mutex<HashMap<OsString, Weak<Output>>>,
}

impl SpoolWatch {
    /// Watches `dir` (the spool directory) on a thread of its own.
    pub fn start(dir: &Path) -> io::Result<Arc<SpoolWatch>> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
        inotify.add_watch(dir, AddWatchFlags::IN_MODIFY)?;
        let watch = Arc::new(SpoolWatch {
            followed: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&watch);
        std::thread::Builder::new()
            .name("joblet-spools".into())
            .spawn(move || follow_spools(&inotify, &weak))?;
        Ok(watch)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<OsString, Weak<Output>>> {
        joblet_daemon::lock(&self.followed)
    }

    /// Follows `output` until it is finished.
    pub fn follow(&self, output: &Arc<Output>) {
        if let Some(name) = progress_path(&output.path).file_name() {
            self.lock().insert(name.to_owned(), Arc::downgrade(output));
        }
    }

    /// The outputs to read: those named by `names`, or all (`None`). Forgets finished ones.
    fn outputs(&self, names: Option<&[OsString]>) -> Vec<Arc<Output>> {
        let mut followed = self.lock();
        followed.retain(|_, output| output.upgrade().is_some_and(|o| o.is_followed()));
        match names {
            Some(names) => names
                .iter()
                .filter_map(|name| followed.get(name)?.upgrade())
                .collect(),
            None => followed.values().filter_map(Weak::upgrade).collect(),
        }
    }
}

fn follow_spools(inotify: &nix::sys::inotify::Inotify, watch: &Weak<SpoolWatch>) {
    use std::os::fd::AsFd;
    let mut last_sweep = std::time::Instant::now();
    loop {
        let mut fds = [nix::poll::PollFd::new(
            inotify.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(
            &mut fds,
            nix::poll::PollTimeout::from(FOLLOW_SWEEP.as_millis() as u16),
        );
        let mut names: Vec<OsString> = match inotify.read_events() {
            Ok(events) => events.into_iter().filter_map(|e| e.name).collect(),
            Err(_) => Vec::new(),
        };
        names.sort_unstable();
        names.dedup();
        let Some(watch) = watch.upgrade() else { return };
        let sweep = last_sweep.elapsed() >= FOLLOW_SWEEP;
        if sweep {
            last_sweep = std::time::Instant::now();
        }
        for output in watch.outputs((!sweep).then_some(&names[..])) {
            if let Err(error) = output.refresh() {
                tracing::error!(job_id = %output.job_id, %error, "cannot follow the job's spool");
            }
        }
    }
}

/// Lines of one stream read at one instant, being recorded; holds the job's output lock.
pub struct Append<'a> {
    writer: &'a SpoolWriter,
    state: MutexGuard<'a, WriterState>,
    stream: LogStream,
    timestamp: i64,
}

impl Append<'_> {
    /// Appends a record; `partial` when no newline followed it.
    pub fn line(&mut self, content: &[u8], partial: bool) {
        let state = &mut *self.state;
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        if state.records.is_multiple_of(INDEX_EVERY) {
            let offset = state.end_offset + state.buffer.len() as u64;
            state.new_index.push((sequence, offset));
        }
        state.records += 1;
        encode_record(
            &mut state.buffer,
            self.stream,
            self.timestamp,
            sequence,
            content,
            partial,
        );
    }
}

impl Drop for Append<'_> {
    fn drop(&mut self) {
        let state = &mut *self.state;
        if state.buffer.is_empty() {
            return;
        }
        let written = state.file.write_all(&state.buffer).and_then(|()| {
            state.end_offset += state.buffer.len() as u64;
            state.publish()
        });
        if let Err(error) = written
            && !state.write_failed
        {
            eprintln!(
                "joblet-supervisor: cannot write the job's spool {}: {error}; lines from here are lost",
                self.writer.path.display()
            );
            state.write_failed = true;
        }
        state.buffer.clear();
        state.new_index.clear();
    }
}

impl WriterState {
    /// Writes the new index entries, then the header, to the progress file: whoever reads the
    /// header finds every entry before its end already there.
    fn publish(&mut self) -> io::Result<()> {
        let mut entries = Vec::with_capacity(self.new_index.len() * PROGRESS_ENTRY as usize);
        for (sequence, offset) in &self.new_index {
            entries.extend_from_slice(&sequence.to_le_bytes());
            entries.extend_from_slice(&offset.to_le_bytes());
        }
        if !entries.is_empty() {
            let at = PROGRESS_HEADER + self.index_entries * PROGRESS_ENTRY;
            self.progress.write_all_at(&entries, at)?;
            self.index_entries += self.new_index.len() as u64;
        }
        let last_sequence = self.next_sequence - 1;
        let mut header = [0u8; PROGRESS_HEADER as usize];
        header[..8].copy_from_slice(&self.end_offset.to_le_bytes());
        header[8..16].copy_from_slice(&last_sequence.to_le_bytes());
        header[16..].copy_from_slice(&progress_check(self.end_offset, last_sequence).to_le_bytes());
        self.progress.write_all_at(&header, 0)
    }
}

/// Appends one `joblet.LogRecord` frame, encoded as prost would encode the message (proto3:
/// fields at their default value are left out), without building the message.
fn encode_record(
    buf: &mut BytesMut,
    stream: LogStream,
    timestamp: i64,
    sequence: u64,
    content: &[u8],
    partial: bool,
) {
    let record = log_record::Record {
        stream: stream as i32,
        timestamp,
        sequence,
        content,
        partial,
    };
    let len = record.encoded_len();
    buf.reserve(4 + len);
    buf.put_u32(len as u32);
    record.encode(buf);
}

pub struct SpoolReader {
    file: Arc<File>,
    position: u64,
    after_sequence: u64,
    buffer: BytesMut,
    codec: joblet_ipc::FrameCodec<LogRecord>,
    progress: watch::Receiver<Progress>,
}

impl SpoolReader {
    /// The next records, or `None` at the end (immediately if `follow` is false, else once
    /// the job has finished and everything was read).
    pub async fn next_batch(&mut self, follow: bool) -> io::Result<Option<Vec<LogRecord>>> {
        loop {
            let progress = *self.progress.borrow_and_update();
            if self.position < progress.end_offset {
                let length = (progress.end_offset - self.position).min(READ_CHUNK) as usize;
                let file = self.file.clone();
                let position = self.position;
                let chunk = tokio::task::spawn_blocking(move || {
                    let mut chunk = vec![0u8; length];
                    file.read_exact_at(&mut chunk, position).map(|()| chunk)
                })
                .await
                .map_err(io::Error::other)??;
                self.position += length as u64;
                self.buffer.extend_from_slice(&chunk);
                let mut records = Vec::new();
                while let Some(record) = self
                    .codec
                    .decode(&mut self.buffer)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
                {
                    if record.sequence > self.after_sequence {
                        self.after_sequence = record.sequence;
                        records.push(record);
                    }
                }
                if !records.is_empty() {
                    return Ok(Some(records));
                }
                continue;
            }
            if progress.finished || !follow {
                return Ok(None);
            }
            if self.progress.changed().await.is_err() {
                return Ok(None);
            }
        }
    }
}

/// The last sequence and the end of the last whole frame of a spool of `M` frames (the log
/// spool, and the metrics spool of [`crate::metrics_log`]); a frame torn by a crash is not
/// counted. A missing spool holds nothing.
pub(crate) fn scan_spool<M: prost::Message + Default>(
    path: &Path,
    sequence_of: impl Fn(&M) -> u64,
) -> io::Result<(u64, u64)> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(error) => return Err(error),
    };
    let mut codec = joblet_ipc::FrameCodec::<M>::new(usize::MAX >> 1);
    let mut buffer = BytesMut::new();
    let mut chunk = vec![0u8; READ_CHUNK as usize];
    let (mut last_sequence, mut end_offset, mut fed) = (0, 0, 0u64);
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok((last_sequence, end_offset));
        }
        buffer.extend_from_slice(&chunk[..n]);
        fed += n as u64;
        loop {
            match codec.decode(&mut buffer) {
                // After a whole frame the codec has consumed exactly up to its end.
                Ok(Some(record)) => {
                    last_sequence = last_sequence.max(sequence_of(&record));
                    end_offset = fed - buffer.len() as u64;
                }
                Ok(None) => break,
                // A frame that does not decode ends what can be trusted.
                Err(_) => return Ok((last_sequence, end_offset)),
            }
        }
    }
}

/// Reads a job's pipe until end of file, handing complete lines to `writer`. Runs on its own
/// thread: the pipe and the spool are blocking I/O.
pub fn pump(writer: &SpoolWriter, stream: LogStream, mut pipe: File, max_line: usize) {
    let mut splitter = LineSplitter::new(max_line);
    let mut buffer = vec![0u8; FIRST_PIPE_READ];
    loop {
        if buffer.len() > FIRST_PIPE_READ && !readable_within(&pipe, BURST_OVER) {
            // The burst is over: a job that runs on quietly keeps no big buffer, and the pages
            // go back to the system rather than stay with the allocator.
            buffer = vec![0u8; FIRST_PIPE_READ];
            writer.release_buffer();
            joblet_daemon::release_free_memory();
        }
        match pipe.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                let mut append = writer.append(stream);
                splitter.push(&buffer[..n], &mut |line, partial| {
                    append.line(line, partial)
                });
                drop(append);
                if n == buffer.len() && n < PIPE_READ {
                    buffer.resize(n * 2, 0);
                } else if n >= COALESCE_ABOVE && n < buffer.len() {
                    // A chatty job writing in small pieces: let them gather in the pipe, so
                    // that the next read, spool write and wake-up of core carry many, not few.
                    std::thread::sleep(COALESCE_FOR);
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                eprintln!("joblet-supervisor: reading the job's output failed: {error}");
                break;
            }
        }
    }
    let mut append = writer.append(stream);
    splitter.finish(&mut |line, partial| append.line(line, partial));
}

/// Whether `pipe` has something to read (or reached its end) within `wait`.
fn readable_within(pipe: &File, wait: Duration) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        pipe.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let timeout = nix::poll::PollTimeout::try_from(wait).unwrap_or(nix::poll::PollTimeout::MAX);
    // An error (EINTR) reads at once, as before.
    !matches!(nix::poll::poll(&mut fds, timeout), Ok(0))
}

/// Splits a byte stream into lines without their newline; lines longer than `max` are cut
/// into pieces of `max` bytes. Lines are lent to a callback with whether they are partial (no
/// newline followed: a piece of a longer line, or the end of a stream without a final newline),
/// so that the bytes can be put back together exactly. Only a line that spans two pushes is
/// copied.
pub struct LineSplitter {
    partial: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        LineSplitter {
            partial: Vec::new(),
            max: max.max(1),
        }
    }

    pub fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
        while !data.is_empty() {
            let room = self.max - self.partial.len();
            let window = &data[..data.len().min(room + 1)];
            match memchr::memchr(b'\n', window) {
                Some(end) => {
                    if self.partial.is_empty() {
                        emit(&data[..end], false);
                    } else {
                        self.partial.extend_from_slice(&data[..end]);
                        emit(&self.partial, false);
                        self.partial.clear();
                    }
                    data = &data[end + 1..];
                }
                // A full piece is cut only once the next byte is known not to be its
                // newline, so where the input was split between reads does not matter.
                None if room == 0 => {
                    emit(&self.partial, true);
                    self.partial.clear();
                }
                None => {
                    let take = data.len().min(room);
                    self.partial.extend_from_slice(&data[..take]);
                    data = &data[take..];
                }
            }
        }
    }

    /// The last line if the stream did not end with a newline (partial: none follows).
    pub fn finish(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        if !self.partial.is_empty() {
            emit(&self.partial, true);
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        split_marked(max, chunks)
            .into_iter()
            .map(|(line, _)| line)
            .collect()
    }

    /// The records and whether each is partial.
    fn split_marked(max: usize, chunks: &[&[u8]]) -> Vec<(Vec<u8>, bool)> {
        let mut splitter = LineSplitter::new(max);
        let mut lines = Vec::new();
        let mut emit = |line: &[u8], partial| lines.push((line.to_vec(), partial));
        for chunk in chunks {
            splitter.push(chunk, &mut emit);
        }
        splitter.finish(&mut emit);
        lines
    }

    #[test]
    fn records_say_whether_a_newline_followed() {
        let t = |s: &str, partial| (s.as_bytes().to_vec(), partial);
        assert_eq!(
            split_marked(
                4,
                &[
                    b"abcdefghij
xy
",
                    b"tail"
                ]
            ),
            vec![
                t("abcd", true),
                t("efgh", true),
                t("ij", false),
                t("xy", false),
                t("tail", true)
            ]
        );
        assert_eq!(
            split_marked(
                4,
                &[b"abcd
"]
            ),
            vec![t("abcd", false)]
        );
        assert_eq!(
            split_marked(4, &[b"abcd", b"e"]),
            vec![t("abcd", true), t("e", true)]
        );
    }

    proptest::proptest! {
        /// The records, each followed by a newline unless partial, are the input byte for
        /// byte, however it was cut into reads.
        #[test]
        fn records_put_back_together_are_the_input(
            input in proptest::collection::vec(
                proptest::prop_oneof![proptest::num::u8::ANY, proptest::strategy::Just(b'\n')],
                0..400,
            ),
            max in 1usize..40,
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.push(input.len());
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for cut in cuts {
                chunks.push(&input[from..cut]);
                from = cut;
            }
            let mut joined = Vec::new();
            for (line, partial) in split_marked(max, &chunks) {
                proptest::prop_assert!(line.len() <= max);
                joined.extend_from_slice(&line);
                if !partial {
                    joined.push(b'\n');
                }
            }
            proptest::prop_assert_eq!(joined, input);
        }
    }

    #[test]
    fn lines_across_chunks_and_a_last_partial_line() {
        assert_eq!(
            split(100, &[b"ab", b"c\nde\n", b"\nf"]),
            vec![b"abc".to_vec(), b"de".to_vec(), b"".to_vec(), b"f".to_vec()]
        );
    }

    #[test]
    fn long_lines_are_split_not_dropped() {
        assert_eq!(
            split(4, &[b"abcdefghij\nxy", b"z\n"]),
            vec![
                b"abcd".to_vec(),
                b"efgh".to_vec(),
                b"ij".to_vec(),
                b"xyz".to_vec()
            ]
        );
        // Exactly max bytes then a newline is one line, not a line and an empty one, wherever
        // the reads split the input.
        for chunks in [
            &[&b"abcd\n"[..]][..],
            &[b"abcd", b"\n"],
            &[b"ab", b"cd", b"\nef"],
        ] {
            let mut expected = vec![b"abcd".to_vec()];
            if chunks.len() == 3 {
                expected.push(b"ef".to_vec());
            }
            assert_eq!(split(4, chunks), expected, "{chunks:?}");
        }
        assert_eq!(
            split(4, &[b"abcdefgh", b"\n"]),
            vec![b"abcd".to_vec(), b"efgh".to_vec()]
        );
    }

    #[test]
    fn hand_encoded_records_decode_as_log_records() {
        for (stream, timestamp, sequence, content) in [
            (
                LogStream::Stdout,
                1_760_000_000_123_456_789i64,
                1u64,
                &b"hello"[..],
            ),
            (LogStream::Stderr, 0, u64::MAX, &b""[..]),
            (LogStream::Stdout, -5, 300, &[0xff, 0, b'\n'][..]),
            (LogStream::Unspecified, i64::MAX, 0, &[b'x'; 70_000][..]),
        ] {
            for partial in [false, true] {
                let mut buf = BytesMut::new();
                encode_record(&mut buf, stream, timestamp, sequence, content, partial);
                let expected = LogRecord {
                    stream: stream as i32,
                    timestamp,
                    sequence,
                    content: bytes::Bytes::copy_from_slice(content),
                    partial,
                };
                let mut prost_buf = BytesMut::new();
                joblet_ipc::codec::encode_frame(&expected, usize::MAX, &mut prost_buf).unwrap();
                assert_eq!(buf, prost_buf, "same bytes as prost for {sequence}");
            }
        }
    }

    /// Every reader cursor sees every line once, with the index from the progress file
    /// (`follow_progress`) or from scanning the frames (a spool without one).
    async fn readers_see_every_line_once(follow_progress: bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.log");
        let output = Output::create("job", &path).unwrap();
        let writer = SpoolWriter::open(&path).unwrap();
        if !follow_progress {
            std::fs::remove_file(progress_path(&path)).unwrap();
        }
        let mut buffer = vec![0; 100]; // smaller than a read: frames span reads
        for batch in 0..10u64 {
            let mut append = writer.append(LogStream::Stdout);
            for i in 0..500 {
                append.line(format!("{}", batch * 500 + i + 1).as_bytes(), false);
            }
            drop(append);
            if follow_progress {
                output.refresh().unwrap();
            } else {
                output.scan_frames(&mut buffer).unwrap();
            }
            assert_eq!(output.progress().last_sequence, (batch + 1) * 500);
        }
        assert_eq!(
            output.lock().index.len(),
            5,
            "an index entry per 1,024 records"
        );
        output.finish();
        assert_eq!(
            output.progress().end_offset,
            std::fs::metadata(&path).unwrap().len()
        );
        for after in [0u64, 1, 1023, 1024, 1025, 2500, 4999, 5000] {
            let mut reader = output.reader(after).unwrap();
            let mut seen = Vec::new();
            while let Some(batch) = reader.next_batch(true).await.unwrap() {
                seen.extend(batch.into_iter().map(|r| r.sequence));
            }
            assert_eq!(
                seen,
                ((after + 1)..=5000).collect::<Vec<_>>(),
                "after {after}"
            );
        }
    }

    #[tokio::test]
    async fn readers_see_every_line_once_from_any_cursor() {
        readers_see_every_line_once(true).await;
        readers_see_every_line_once(false).await;
    }

    #[test]
    fn lines_written_after_the_last_progress_update_are_found_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.log");
        let output = Output::create("job", &path).unwrap();
        let writer = SpoolWriter::open(&path).unwrap();
        let mut append = writer.append(LogStream::Stdout);
        for i in 1..=10 {
            append.line(format!("{i}").as_bytes(), false);
        }
        drop(append);
        output.refresh().unwrap();
        let progress = std::fs::read(progress_path(&path)).unwrap();
        // A supervisor killed after its next write, before its progress update.
        let mut append = writer.append(LogStream::Stdout);
        append.line(b"11", false);
        drop(append);
        std::fs::write(progress_path(&path), &progress).unwrap();
        output.refresh().unwrap();
        assert_eq!(
            output.progress().last_sequence,
            10,
            "the progress file says 10"
        );
        output.finish();
        assert_eq!(output.progress().last_sequence, 11, "the spool holds 11");
        assert_eq!(
            output.progress().end_offset,
            std::fs::metadata(&path).unwrap().len()
        );
    }
}
