//! Storage benchmark: bytes on disk per stored line, per data set and compression setting,
//! against the raw size of the lines (the baseline).
//!
//! Each data set (`benches/src/datasets.rs`, seeded: every run stores the same lines) is
//! ingested into the real store (`Store::ingest`, batches as the IPC receiver hands them over),
//! once per setting, into a new data directory. Measured: SST bytes per line after the
//! memtables are flushed (what recent data costs), and after a full compaction (what older
//! data costs: everything in the bottom level), with RocksDB's own account of the latter —
//! raw key and value bytes, data, index and filter blocks — so that the cost of the keys shows;
//! and the time of the ingest and of the full compaction, which is what compressing costs.

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use clap::Parser;
use joblet_benches::Table;
use joblet_benches::datasets::Dataset;
use joblet_ipc::{Batch, Stream, log_message};
use joblet_persist::config::{Compression, Config, Retention};
use joblet_persist::store::Store;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Lines per data set.
    #[arg(long, default_value_t = 1_000_000)]
    lines: u64,
    /// Data sets to store (all by default).
    #[arg(long, value_enum, num_args = 1..)]
    datasets: Vec<Dataset>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

const JOB: &str = "b3c1e0f2-5a6b-4c7d-8e9f-0a1b2c3d4e5f";
/// The receiver's batch size.
const BATCH: usize = 8192;

/// A compression setting: its name and what it changes in the default configuration.
struct Setting {
    name: &'static str,
    apply: fn(&mut Config),
}

const SETTINGS: &[Setting] = &[
    Setting {
        name: "default (LZ4)",
        apply: |_| {},
    },
    Setting {
        name: "zstd 6, dictionary, at the bottom",
        apply: |config| {
            config.rocksdb.bottommost_compression = Compression::Zstd;
        },
    },
    Setting {
        name: "zstd 9, 64 KiB blocks",
        apply: |config| {
            config.rocksdb.bottommost_compression = Compression::Zstd;
            config.rocksdb.zstd_level = 9;
            config.rocksdb.block_size = bytesize::ByteSize::kib(64);
        },
    },
];

struct Measured {
    flushed: u64,
    compacted: u64,
    ingest_secs: f64,
    compact_secs: f64,
    properties: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let datasets = if args.datasets.is_empty() {
        vec![Dataset::Bench, Dataset::Access, Dataset::Json]
    } else {
        args.datasets.clone()
    };
    let defaults = Config::default().rocksdb;
    println!(
        "storage: {} lines per data set; default: {:?} for recent levels, {:?} at the bottom, \
         {} blocks; zstd with a {} dictionary",
        args.lines,
        defaults.compression,
        defaults.bottommost_compression,
        defaults.block_size,
        defaults.zstd_dictionary_size,
    );
    for dataset in datasets {
        let raw: u64 = dataset
            .lines(args.seed)
            .take(args.lines as usize)
            .map(|(_, line)| line.len() as u64)
            .sum();
        let per_line = |bytes: u64| bytes as f64 / args.lines as f64;
        let mut table = Table::default();
        for setting in SETTINGS {
            let measured = store(dataset, &args, setting)?;
            table.add(
                format!("{}: after flush", setting.name),
                per_line(measured.flushed),
                Some(per_line(raw)),
                "B/line",
                "",
            );
            table.add(
                format!("{}: compacted", setting.name),
                per_line(measured.compacted),
                Some(per_line(raw)),
                "B/line",
                aim(dataset),
            );
            table.add(
                format!("{}: ingest", setting.name),
                args.lines as f64 / measured.ingest_secs,
                None,
                "lines/s",
                "",
            );
            // One thread rewrites every file into the bottom level: the CPU its compression
            // costs, per million lines.
            table.add(
                format!("{}: full compaction", setting.name),
                measured.compact_secs * 1e6 / args.lines as f64,
                None,
                "s/M lines",
                "",
            );
            println!(
                "  {} / {}: {}",
                dataset.name(),
                setting.name,
                measured.properties
            );
        }
        print!(
            "{}",
            table.render(&format!("{} (baseline: the raw line)", dataset.name()))
        );
    }
    Ok(())
}

fn aim(dataset: Dataset) -> &'static str {
    match dataset {
        Dataset::Access => "<= 25",
        Dataset::Bench => "<= 35",
        Dataset::Json => "",
    }
}

fn store(dataset: Dataset, args: &Args, setting: &Setting) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    // The data sets carry fixed timestamps: keep them whatever today's date.
    config.retention.logs = Retention(None);
    (setting.apply)(&mut config);
    let store = Store::open(&config)?;
    let started = Instant::now();
    let mut lines = dataset.lines(args.seed).take(args.lines as usize);
    let mut sequence = 0;
    loop {
        let messages: Vec<_> = lines
            .by_ref()
            .take(BATCH)
            .map(|(timestamp, line)| {
                sequence += 1;
                log_message(JOB, sequence, timestamp, Stream::Stdout, Bytes::from(line))
            })
            .collect();
        if messages.is_empty() {
            break;
        }
        store.ingest(&Batch::from_messages(&messages))?;
    }
    store.flush()?;
    let ingest_secs = started.elapsed().as_secs_f64();
    let flushed = sst_bytes(&config.data_dir);
    let started = Instant::now();
    store.compact()?;
    let compact_secs = started.elapsed().as_secs_f64();
    let compacted = sst_bytes(&config.data_dir);
    let properties = store
        .raw_db()
        .property_value_cf(
            store
                .raw_db()
                .cf_handle("logs")
                .expect("logs column family"),
            "rocksdb.aggregated-table-properties",
        )?
        .map(|text| summarise(&text, args.lines))
        .unwrap_or_default();
    Ok(Measured {
        flushed,
        compacted,
        ingest_secs,
        compact_secs,
        properties,
    })
}

/// Bytes of the SST files in `dir` (the WAL and RocksDB's own logs left out).
fn sst_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "sst"))
        .filter_map(|entry| entry.metadata().ok())
        .map(|meta| meta.len())
        .sum()
}

/// RocksDB's table properties, per line: where the bytes of the compacted files go.
fn summarise(properties: &str, lines: u64) -> String {
    let field = |name: &str| -> f64 {
        properties
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| key.trim().starts_with(name))
            .and_then(|(_, value)| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / lines as f64
    };
    format!(
        "per line: raw key {:.1} B, raw value {:.1} B -> data blocks {:.1} B, index {:.2} B, filter {:.2} B",
        field("raw key size"),
        field("raw value size"),
        field("data block size"),
        field("index block size"),
        field("filter block size"),
    )
}
