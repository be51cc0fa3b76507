//! `rnx job log`: history from joblet-persist, then live from joblet-core, with no line missing
//! and none twice (ADR-0001 "client-side hybrid fetching").
//!
//! persist's summary of the job tells the highest sequence it holds (`through`) and whether it
//! holds every line up to it (`log_lines == last_log_sequence`; sequences start at 1). If so,
//! history lines up to `through` come from persist and core continues with `through + 1` —
//! core's spool holds every line, so the switch is exact however fast the job writes. If
//! persist is unreachable, has nothing, or has a gap still being replayed, everything comes
//! from core — with one warning on stderr when persist is unreachable or misses many lines, and
//! quietly when it just has not caught up with a running job. If core no longer has the job
//! (or is down), history alone is shown.

use std::collections::VecDeque;
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::joblet::{GetJobStatusRequest, LogStream, StreamLogsRequest};
use joblet_proto::persist::{QueryLogsRequest, StreamType};
use serde_json::json;
use tonic::transport::Channel;

use crate::cli::LogArgs;
use crate::config::Node;
use crate::hybrid::{Kind, Sources};
use crate::output::{flush, json_line, write};
use crate::{Failure, connect, timespec};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Both,
    Stdout,
    Stderr,
}

struct Line {
    stderr: bool,
    timestamp: i64,
    sequence: u64,
    content: Bytes,
    /// No newline followed the content in what the job wrote.
    partial: bool,
    /// A gap marker from persist: this many lines were lost here, and why.
    lost: Option<(u64, String)>,
}

struct Filters {
    which: Which,
    since: Option<i64>,
    until: Option<i64>,
    grep: Option<Vec<u8>>,
}

impl Filters {
    fn keep(&self, line: &Line) -> bool {
        let stream_ok = match self.which {
            Which::Both => true,
            Which::Stdout => !line.stderr,
            Which::Stderr => line.stderr,
        };
        stream_ok
            && self.since.is_none_or(|s| line.timestamp >= s)
            && self.until.is_none_or(|u| line.timestamp < u)
            && self
                .grep
                .as_ref()
                .is_none_or(|g| contains(&line.content, g))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

struct Printer<W: Write> {
    out: W,
    json: bool,
    timestamps: bool,
    /// Mark each line with its stream.
    prefix: bool,
    follow: bool,
    tail: Option<VecDeque<Line>>,
    tail_size: usize,
    /// Lines the gaps printed stand for.
    lost: u64,
    /// The stream (stderr?) whose line the last record printed left open (it was partial).
    open_line: Option<bool>,
}

impl<W: Write> Printer<W> {
    fn emit(&mut self, line: Line) -> Result<(), Failure> {
        if let Some(buffer) = &mut self.tail {
            if buffer.len() == self.tail_size {
                buffer.pop_front();
            }
            buffer.push_back(line);
            return Ok(());
        }
        self.print(&line)?;
        if self.follow {
            flush(&mut self.out)?;
        }
        Ok(())
    }

    fn print(&mut self, line: &Line) -> Result<(), Failure> {
        if let Some((lines, reason)) = &line.lost {
            self.lost += lines;
            if self.json {
                return json_line(
                    &mut self.out,
                    &json!({
                        "timestamp": timespec::format_ns_utc(line.timestamp),
                        "timestamp_ns": line.timestamp,
                        "sequence": line.sequence,
                        "lost_lines": lines,
                        "lost_reason": reason,
                    }),
                );
            }
            // Said on stderr, in its place among the lines.
            flush(&mut self.out)?;
            let s = if *lines == 1 { "" } else { "s" };
            eprintln!("rnx: {lines} line{s} lost here ({reason})");
            return Ok(());
        }
        if self.json {
            let mut record = json!({
                "stream": if line.stderr { "stderr" } else { "stdout" },
                "timestamp": timespec::format_ns_utc(line.timestamp),
                "timestamp_ns": line.timestamp,
                "sequence": line.sequence,
            });
            // Content as is when it is text; anything else losslessly, in base64.
            match std::str::from_utf8(&line.content) {
                Ok(text) => record["content"] = text.into(),
                Err(_) => record["content_base64"] = BASE64.encode(&line.content).into(),
            }
            if line.partial {
                record["partial"] = true.into();
            }
            return json_line(&mut self.out, &record);
        }
        // Plain: the job's bytes exactly. Decorated (stream prefix, timestamps): a line's
        // pieces stay one line, and a line left open by the other stream is ended first.
        let decorated = self.prefix || self.timestamps;
        let continues = self.open_line == Some(line.stderr);
        if decorated && !continues {
            if self.open_line.is_some() {
                write(&mut self.out, b"\n")?;
            }
            if self.prefix {
                write(&mut self.out, if line.stderr { b"err| " } else { b"out| " })?;
            }
            if self.timestamps {
                write(
                    &mut self.out,
                    timespec::format_ns(line.timestamp).as_bytes(),
                )?;
                write(&mut self.out, b" ")?;
            }
        }
        write(&mut self.out, &line.content)?;
        if line.partial {
            self.open_line = Some(line.stderr);
            Ok(())
        } else {
            self.open_line = None;
            write(&mut self.out, b"\n")
        }
    }

    /// Prints what the tail buffer holds and switches to printing directly.
    fn release_tail(&mut self) -> Result<(), Failure> {
        if let Some(buffer) = self.tail.take() {
            for line in buffer {
                self.print(&line)?;
            }
        }
        flush(&mut self.out)
    }

    /// The end: a log with gaps is not whole, and the exit code says so.
    fn finish(mut self) -> Result<(), Failure> {
        self.release_tail()?;
        // Decorated output ends its last line; plain output ends as the job's did.
        if self.open_line.is_some() && (self.prefix || self.timestamps) {
            write(&mut self.out, b"\n")?;
            flush(&mut self.out)?;
        }
        if self.lost > 0 {
            let s = if self.lost == 1 { "" } else { "s" };
            eprintln!("rnx: this log misses {} line{s} (see above)", self.lost);
            return Err(Failure::Exit(LOG_HAS_GAPS));
        }
        Ok(())
    }
}

/// Exit code of `rnx job log` when lines were lost before persist stored them.
const LOG_HAS_GAPS: u8 = 3;

pub async fn show(node: &Node, args: LogArgs, json: bool) -> Result<(), Failure> {
    let parse = |flag: &str, value: &Option<String>| -> Result<Option<i64>, Failure> {
        value
            .as_deref()
            .map(|v| timespec::parse_past(v).map_err(|e| Failure::Usage(format!("{flag}: {e}"))))
            .transpose()
    };
    let filters = Filters {
        which: if args.stdout {
            Which::Stdout
        } else if args.stderr {
            Which::Stderr
        } else {
            Which::Both
        },
        since: parse("--since", &args.since)?,
        until: parse("--until", &args.until)?,
        grep: args.grep.clone().map(String::into_bytes),
    };
    if let (Some(since), Some(until)) = (filters.since, filters.until)
        && until <= since
    {
        return Err(Failure::Usage("--until must be after --since".into()));
    }
    let Some((start_time, end_time)) = timespec::persist_bounds(filters.since, filters.until)
    else {
        // --until at or before 1970: no line is that old.
        return Ok(());
    };

    let mut sources = Sources::open(node, &args.id).await?;
    let core_has_job = sources.core_has_job;

    let mut printer = Printer {
        out: BufWriter::with_capacity(64 * 1024, std::io::stdout().lock()),
        json,
        timestamps: args.timestamps,
        prefix: args.prefix
            || (!args.no_prefix
                && filters.which == Which::Both
                && std::io::IsTerminal::is_terminal(&std::io::stdout())),
        follow: args.follow,
        tail: args
            .tail
            .map(|n| VecDeque::with_capacity((n as usize).min(65_536))),
        tail_size: args.tail.unwrap_or(0) as usize,
        lost: 0,
        open_line: None,
    };

    // History.
    let plan = sources.plan(Kind::Logs).await;
    let job_id = sources.job_id.clone();
    if let Some(client) = sources.persist.as_mut().filter(|_| plan.history) {
        let mut stream = client
            .query_logs(QueryLogsRequest {
                job_id: job_id.clone(),
                stream: match filters.which {
                    Which::Both => StreamType::Unspecified,
                    Which::Stdout => StreamType::Stdout,
                    Which::Stderr => StreamType::Stderr,
                } as i32,
                start_time,
                end_time,
                contains: args.grep.clone().unwrap_or_default(),
                tail: args.tail.unwrap_or(0),
                ..Default::default()
            })
            .await?
            .into_inner();
        while let Some(line) = stream.message().await? {
            if line.sequence > plan.through {
                continue; // core serves what persist stored after the summary
            }
            printer.emit(Line {
                stderr: line.stream == StreamType::Stderr as i32,
                timestamp: line.timestamp,
                sequence: line.sequence,
                content: line.content,
                partial: line.partial,
                lost: (line.lost_lines > 0).then_some((line.lost_lines, line.lost_reason)),
            })?;
        }
    }

    // Live.
    match sources.core.as_mut().filter(|_| core_has_job) {
        Some(client) => {
            // With --tail, first take what exists now, print the tail, then follow.
            let passes: &[bool] = match (args.tail.is_some(), args.follow) {
                (true, true) => &[false, true],
                (_, follow) => {
                    if follow {
                        &[true]
                    } else {
                        &[false]
                    }
                }
            };
            let mut after = plan.through;
            for &follow in passes {
                loop {
                    let streamed = async {
                        let mut stream = client
                            .stream_logs(StreamLogsRequest {
                                job_uuid: job_id.clone(),
                                after_sequence: after,
                                follow,
                                ..Default::default()
                            })
                            .await?
                            .into_inner();
                        while let Some(record) = stream.message().await? {
                            after = record.sequence;
                            if filters.until.is_some_and(|u| record.timestamp >= u) {
                                break; // timestamps only grow
                            }
                            let line = Line {
                                stderr: record.stream == LogStream::Stderr as i32,
                                timestamp: record.timestamp,
                                sequence: record.sequence,
                                content: record.content,
                                partial: record.partial,
                                lost: None,
                            };
                            if filters.keep(&line) {
                                printer.emit(line).map_err(Streamed::Print)?;
                            }
                        }
                        Ok::<(), Streamed>(())
                    };
                    match streamed.await {
                        Ok(()) => break,
                        // Restarted or crashed: the job runs on; continue where it stopped.
                        Err(Streamed::Rpc(status)) if follow && went_away(&status) => {
                            printer.release_tail()?;
                            eprintln!(
                                "rnx: joblet-core went away ({}); reconnecting to continue after line {after}",
                                status.message()
                            );
                            *client = reconnect(node, &job_id).await?;
                        }
                        Err(Streamed::Rpc(status)) => return Err(status.into()),
                        Err(Streamed::Print(failure)) => return Err(failure),
                    }
                }
                printer.release_tail()?;
            }
        }
        None => sources.without_core(plan, &args.id)?,
    }
    printer.finish()
}

/// How a live stream ended early.
enum Streamed {
    Rpc(tonic::Status),
    Print(Failure),
}

impl From<tonic::Status> for Streamed {
    fn from(status: tonic::Status) -> Self {
        Streamed::Rpc(status)
    }
}

/// How long `--follow` waits for joblet-core to come back (a restart or an upgrade).
const RECONNECT_FOR: Duration = Duration::from_secs(300);
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// Whether a live stream failed because core went away (shut down, crashed, unreachable)
/// rather than answered with an error: the job may run on, so following resumes.
fn went_away(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// A new client of core once it answers for `job_id` again, trying for [`RECONNECT_FOR`].
async fn reconnect(node: &Node, job_id: &str) -> Result<JobServiceClient<Channel>, Failure> {
    let deadline = Instant::now() + RECONNECT_FOR;
    loop {
        tokio::time::sleep(RECONNECT_PAUSE).await;
        let failure = match connect::core(node).await {
            Ok(mut client) => match client
                .get_job_status(GetJobStatusRequest {
                    uuid: job_id.to_owned(),
                })
                .await
            {
                Ok(_) => return Ok(client),
                Err(status) if went_away(&status) => Failure::from(status),
                Err(status) => return Err(status.into()),
            },
            Err(failure) => failure,
        };
        if Instant::now() >= deadline {
            return Err(failure);
        }
    }
}
