//! `rnx job metrics`: samples from joblet-persist, then joblet-core from the next sequence on
//! (the same hybrid as logs), shown as a table, JSON Lines, or a chart.

use std::io::BufWriter;

use joblet_proto::joblet::{JobMetricsEvent, StreamMetricsRequest};
use joblet_proto::persist::{Metric, QueryMetricsRequest};
use serde_json::json;

use crate::cli::MetricsArgs;
use crate::config::Node;
use crate::hybrid::{Kind, Sources};
use crate::output::{flush, human_bytes, json_line, write};
use crate::{Failure, timespec};

pub async fn show(node: &Node, args: MetricsArgs, json: bool) -> Result<(), Failure> {
    let parse = |flag: &str, value: &Option<String>| -> Result<Option<i64>, Failure> {
        value
            .as_deref()
            .map(|v| timespec::parse_past(v).map_err(|e| Failure::Usage(format!("{flag}: {e}"))))
            .transpose()
    };
    let since = parse("--since", &args.since)?;
    let until = parse("--until", &args.until)?;
    let in_range = |e: &JobMetricsEvent| {
        since.is_none_or(|s| e.timestamp >= s) && until.is_none_or(|u| e.timestamp < u)
    };
    let Some((start_time, end_time)) = timespec::persist_bounds(since, until) else {
        // An empty window (--until at or before 1970, or not after --since): no sample.
        return View::new(json, args.chart, false).finish();
    };

    let mut sources = Sources::open(node, &args.id).await?;
    let core_has_job = sources.core_has_job;

    let mut view = View::new(json, args.chart, args.follow);
    let plan = sources.plan(Kind::Metrics).await;
    let job_id = sources.job_id.clone();
    if let Some(client) = sources.persist.as_mut().filter(|_| plan.history) {
        let mut stream = client
            .query_metrics(QueryMetricsRequest {
                job_id: job_id.clone(),
                start_time,
                end_time,
                ..Default::default()
            })
            .await?
            .into_inner();
        while let Some(mut metric) = stream.message().await? {
            if metric.sequence <= plan.through
                && let Some(sample) = metric.sample.take()
            {
                let rollup = (metric.resolution_seconds > 0).then_some(&metric);
                view.add(sample, rollup)?;
            }
        }
    }
    match sources.core.as_mut().filter(|_| core_has_job) {
        Some(client) => {
            let mut stream = client
                .stream_metrics(StreamMetricsRequest {
                    job_uuid: job_id.clone(),
                    after_sequence: plan.through,
                    follow: args.follow,
                })
                .await?
                .into_inner();
            while let Some(record) = stream.message().await? {
                let Some(sample) = record.sample else {
                    continue;
                };
                if until.is_some_and(|u| sample.timestamp >= u) {
                    break;
                }
                if in_range(&sample) {
                    view.add(sample, None)?;
                }
            }
        }
        None => sources.without_core(plan, &args.id)?,
    }
    view.finish()
}

struct View {
    out: BufWriter<std::io::StdoutLock<'static>>,
    json: bool,
    chart: bool,
    follow: bool,
    header_printed: bool,
    rollup_noted: bool,
    samples: Vec<JobMetricsEvent>,
}

/// A figure set as JSON (the fields of a sample's line).
fn figures(sample: &JobMetricsEvent) -> serde_json::Value {
    json!({
        "cpu_percent": sample.cpu_percent, "memory_bytes": sample.memory_bytes,
        "memory_limit": sample.memory_limit, "io_read_bytes": sample.disk_read_bytes,
        "io_write_bytes": sample.disk_write_bytes, "pids": sample.pids,
        "cpu_pressure_some": sample.cpu_pressure_some,
        "memory_pressure_some": sample.memory_pressure_some,
        "memory_pressure_full": sample.memory_pressure_full,
    })
}

impl View {
    fn new(json: bool, chart: bool, follow: bool) -> Self {
        View {
            out: BufWriter::new(std::io::stdout().lock()),
            json,
            chart,
            follow,
            header_printed: false,
            rollup_noted: false,
            samples: Vec::new(),
        }
    }

    /// Adds a sample, or (`rollup`: the record persist sent) a minute of older samples that
    /// persist downsampled, `sample` then holding their averages.
    fn add(&mut self, sample: JobMetricsEvent, rollup: Option<&Metric>) -> Result<(), Failure> {
        if rollup.is_some() && !self.rollup_noted && !self.json {
            self.rollup_noted = true;
            eprintln!(
                "note: persist keeps samples older than its retention.metrics_full_resolution as \
                 1-minute averages (rows marked \"1m avg\"); --json gives their minimum and maximum"
            );
        }
        if self.chart {
            self.samples.push(sample);
            if self.follow {
                self.draw()?;
            }
            return Ok(());
        }
        if self.json {
            let mut line = json!({
                "timestamp": timespec::format_ns_utc(sample.timestamp),
                "timestamp_ns": sample.timestamp, "sequence": sample.sequence,
            });
            let object = line.as_object_mut().expect("an object");
            if let serde_json::Value::Object(values) = figures(&sample) {
                object.extend(values);
            }
            if let Some(rollup) = rollup {
                object.insert(
                    "resolution_seconds".into(),
                    rollup.resolution_seconds.into(),
                );
                object.insert("samples".into(), rollup.samples.into());
                object.insert("min".into(), rollup.min.as_ref().map(figures).into());
                object.insert("max".into(), rollup.max.as_ref().map(figures).into());
            }
            json_line(&mut self.out, &line)?;
        } else {
            if !self.header_printed {
                write(
                    &mut self.out,
                    format!(
                        "{:<30}  {:>7}  {:>11}  {:>11}  {:>11}  {:>11}  {:>5}\n",
                        "TIME", "CPU%", "MEMORY", "LIMIT", "IO READ", "IO WRITE", "PIDS"
                    )
                    .as_bytes(),
                )?;
                self.header_printed = true;
            }
            let limit = if sample.memory_limit > 0 {
                human_bytes(sample.memory_limit)
            } else {
                "-".into()
            };
            write(
                &mut self.out,
                format!(
                    "{:<30}  {:>7.1}  {:>11}  {:>11}  {:>11}  {:>11}  {:>5}\n",
                    match rollup {
                        Some(rollup) => format!(
                            "{} {}m avg",
                            timespec::format_s(sample.timestamp),
                            rollup.resolution_seconds / 60
                        ),
                        None => timespec::format_ns(sample.timestamp),
                    },
                    sample.cpu_percent,
                    human_bytes(sample.memory_bytes),
                    limit,
                    human_bytes(sample.disk_read_bytes),
                    human_bytes(sample.disk_write_bytes),
                    sample.pids
                )
                .as_bytes(),
            )?;
        }
        if self.follow {
            flush(&mut self.out)?;
        }
        Ok(())
    }

    fn draw(&mut self) -> Result<(), Failure> {
        let text = chart(&self.samples, 60);
        if self.follow && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            // Redraw in place: clear the screen, home the cursor.
            write(&mut self.out, b"\x1b[2J\x1b[H")?;
        } else if self.follow && self.samples.len() > 1 {
            // Not a terminal: one chart after the other, no control codes.
            write(&mut self.out, b"\n")?;
        }
        write(&mut self.out, text.as_bytes())?;
        flush(&mut self.out)
    }

    fn finish(mut self) -> Result<(), Failure> {
        if self.chart && !self.follow {
            self.draw()?;
        }
        flush(&mut self.out)
    }
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// CPU and memory over time as sparklines, each point the mean of a slice of samples.
pub fn chart(samples: &[JobMetricsEvent], width: usize) -> String {
    if samples.is_empty() {
        return "no samples\n".into();
    }
    let cpu: Vec<f64> = samples.iter().map(|s| s.cpu_percent).collect();
    let memory: Vec<f64> = samples.iter().map(|s| s.memory_bytes as f64).collect();
    let first = timespec::format_ns(samples[0].timestamp);
    let last = timespec::format_ns(samples[samples.len() - 1].timestamp);
    let cpu_max = cpu.iter().cloned().fold(0.0, f64::max);
    let memory_max = memory.iter().cloned().fold(0.0, f64::max);
    let mut text = format!(
        "{} samples, {first} .. {last}\nCPU %   {} max {cpu_max:.1}%\nMemory  {} max {}\n",
        samples.len(),
        sparkline(&cpu, width),
        sparkline(&memory, width),
        human_bytes(memory_max as i64)
    );
    // Pressure stall information, where the host has it (cgroup v2).
    for (name, pressure) in [
        (
            "CPU PSI",
            samples
                .iter()
                .map(|s| s.cpu_pressure_some)
                .collect::<Vec<_>>(),
        ),
        (
            "Mem PSI",
            samples.iter().map(|s| s.memory_pressure_some).collect(),
        ),
    ] {
        if pressure.iter().any(Option::is_some) {
            let values: Vec<f64> = pressure.iter().map(|p| p.unwrap_or(0.0)).collect();
            let max = values.iter().cloned().fold(0.0, f64::max);
            text.push_str(&format!(
                "{name} {} max {max:.1}% (some, avg10)\n",
                sparkline(&values, width)
            ));
        }
    }
    text
}

fn sparkline(values: &[f64], width: usize) -> String {
    let buckets = width.min(values.len()).max(1);
    let means: Vec<f64> = (0..buckets)
        .map(|b| {
            let start = b * values.len() / buckets;
            let end = ((b + 1) * values.len() / buckets).max(start + 1);
            values[start..end].iter().sum::<f64>() / (end - start) as f64
        })
        .collect();
    let max = means.iter().cloned().fold(0.0, f64::max);
    means
        .iter()
        .map(|v| {
            if max <= 0.0 {
                BARS[0]
            } else {
                BARS[((v / max) * (BARS.len() - 1) as f64).round() as usize]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_to_the_maximum() {
        assert_eq!(sparkline(&[0.0, 50.0, 100.0], 10), "▁▅█");
        assert_eq!(sparkline(&[0.0, 0.0], 10), "▁▁");
        assert_eq!(sparkline(&[1.0; 100], 4).chars().count(), 4);
    }
}
