//! End-to-end tests: the real joblet-persist, joblet-core and rnx binaries on temp dirs and
//! free ports.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(60);

fn sibling(name: &str) -> PathBuf {
    joblet_test_support::sibling(Path::new(env!("CARGO_BIN_EXE_rnx")), name)
}

use joblet_test_support::Daemon;

/// Starts `binary` (beside rnx's) with `config`, its log beside the config.
async fn start_daemon(binary: &str, config: &Path) -> Daemon {
    let log = config.with_extension("log");
    Daemon::start(Command::new(sibling(binary)), config, &log).await
}

struct Node {
    dir: tempfile::TempDir,
    persist: Option<Daemon>,
    core: Option<Daemon>,
}

impl Node {
    /// persist (unless `with_persist` is false) and core, and an rnx-config.yml naming both
    /// (a dead port for persist when it is not started).
    async fn start(with_persist: bool) -> Node {
        Node::start_with(with_persist, "").await
    }

    /// Like [`Node::start`], `core_jobs` added to core's `jobs:` block; core reaches persist's
    /// query API when persist runs.
    async fn start_with(with_persist: bool, core_jobs: &str) -> Node {
        Node::start_on(with_persist, core_jobs, "127.0.0.1:0").await
    }

    /// Like [`Node::start_with`], core listening on `listen`. Jobs are stopped with core unless
    /// `core_jobs` sets `on_core_shutdown`.
    async fn start_on(with_persist: bool, core_jobs: &str, listen: &str) -> Node {
        Node::start_configured(with_persist, "", core_jobs, listen).await
    }

    /// Like [`Node::start_on`], `persist_ipc` added to persist's `ipc:` block.
    async fn start_configured(
        with_persist: bool,
        persist_ipc: &str,
        core_jobs: &str,
        listen: &str,
    ) -> Node {
        let on_shutdown = if core_jobs.contains("on_core_shutdown") {
            ""
        } else {
            "  on_core_shutdown: stop\n"
        };
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("persist.sock");
        let persist = if with_persist {
            let config = dir.path().join("persist.yml");
            std::fs::write(&config, format!(
                "data_dir: {}\nipc:\n  socket: {}\n{persist_ipc}grpc:\n  listen: 127.0.0.1:0\n  insecure: true\nmetrics:\n  listen: null\nretention:\n  logs: 0\n  metrics: 0\n",
                dir.path().join("persist-data").display(), socket.display()
            )).unwrap();
            Some(start_daemon("joblet-persist", &config).await)
        } else {
            None
        };
        let config = dir.path().join("core.yml");
        let query = persist
            .as_ref()
            .map_or("null".to_owned(), |p| p.grpc.to_string());
        std::fs::write(&config, format!(
            "grpc:\n  listen: {listen}\n  insecure: true\nmetrics:\n  listen: null\ncgroup:\n  parent: joblet-rnx-test-{}\nstate_dir: {}\npersist:\n  socket: {}\n  query_address: {query}\n  query_tls: null\n  reconnect_delay: 200ms\njobs:\n  metrics_interval: 200ms\n  work_root: {}\n{on_shutdown}{core_jobs}",
            dir.path().file_name().unwrap().to_string_lossy().trim_start_matches('.'),
            dir.path().join("state").display(), socket.display(), dir.path().join("work").display()
        )).unwrap();
        let core = start_daemon("joblet-core", &config).await;
        let persist_address = persist
            .as_ref()
            .map_or("127.0.0.1:1".to_owned(), |p| p.grpc.to_string());
        std::fs::write(
            dir.path().join("rnx-config.yml"),
            format!("nodes:\n  default:\n    address: \"{}\"\n    persistAddress: \"{persist_address}\"\n", core.grpc),
        )
        .unwrap();
        Node {
            dir,
            persist,
            core: Some(core),
        }
    }

    fn rnx(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rnx"));
        command
            .arg("--config")
            .arg(self.dir.path().join("rnx-config.yml"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    async fn output(&self, args: &[&str]) -> Output {
        tokio::time::timeout(WAIT, self.rnx(args).output())
            .await
            .expect("rnx did not finish")
            .unwrap()
    }

    async fn stdout(&self, args: &[&str]) -> String {
        let output = self.output(args).await;
        assert!(
            output.status.success(),
            "rnx {args:?}: {:?}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    async fn run(&self, script: &str) -> String {
        self.stdout(&["job", "run", "--", "sh", "-c", script])
            .await
            .trim()
            .to_owned()
    }

    async fn wait_ended(&self, id: &str) {
        for _ in 0..600 {
            let status = self.stdout(&["job", "status", "--json", id]).await;
            if ["COMPLETED", "FAILED", "STOPPED"]
                .iter()
                .any(|s| status.contains(&format!("\"status\":\"{s}\"")))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job {id} did not end");
    }

    async fn stop(mut self) {
        if let Some(core) = self.core.take() {
            core.terminate().await;
        }
        if let Some(persist) = self.persist.take() {
            persist.terminate().await;
        }
    }
}

#[tokio::test]
async fn follow_switches_from_history_to_live_without_gap_or_duplicate() {
    let node = Node::start(true).await;
    let id = node
        .run("i=0; while [ $i -lt 200 ]; do seq $((i*1000+1)) $((i*1000+1000)); i=$((i+1)); sleep 0.02; done")
        .await;
    // Let persist hold a good part of the history, then follow while the job still writes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let output = node.output(&["job", "log", "-f", &id]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("warning"), "persist was up: {stderr}");
    let text = String::from_utf8(output.stdout).unwrap();
    let numbers: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(numbers.len(), 200_000, "every line exactly once");
    assert!(
        numbers.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
        "in order"
    );
    node.stop().await;
}

/// `rnx job log -f` of a running job while core restarts (SIGTERM, or kill -9 when `crash`):
/// one line on stderr, then it continues from the next line.
async fn follow_across_a_core_restart(crash: bool) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut node = Node::start_on(
        true,
        "  on_core_shutdown: keep\n",
        &format!("127.0.0.1:{port}"),
    )
    .await;
    let id = node
        .run("i=0; while [ $i -lt 6000 ]; do i=$((i+1)); echo $i; if [ $((i % 100)) -eq 0 ]; then sleep 0.05; fi; done")
        .await;
    let follower = node.rnx(&["job", "log", "-f", &id]).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let core = node.core.take().unwrap();
    if crash {
        core.kill_hard().await;
    } else {
        core.terminate().await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    node.core = Some(start_daemon("joblet-core", &node.dir.path().join("core.yml")).await);
    let output = tokio::time::timeout(WAIT, follower.wait_with_output())
        .await
        .expect("rnx job log -f did not end with the job")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("reconnecting"))
            .count(),
        1,
        "one line says it reconnects: {stderr}"
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let numbers: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(numbers.len(), 6000, "every line exactly once");
    assert!(
        numbers.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
        "in order"
    );
    node.stop().await;
}

#[tokio::test]
async fn follow_continues_across_a_core_restart_without_gap_or_duplicate() {
    follow_across_a_core_restart(false).await;
}

#[tokio::test]
async fn follow_continues_across_a_core_crash_without_gap_or_duplicate() {
    follow_across_a_core_restart(true).await;
}

#[tokio::test]
async fn time_tail_stream_and_grep_filters_apply_across_both_sources() {
    let node = Node::start(true).await;
    let id = node
        // Sleeps separate lines of different streams: stdout and stderr are read by separate
        // pumps, so lines written back to back on both may be stamped in either order.
        .run("echo one; sleep 0.2; echo err-one >&2; sleep 0.4; echo two; sleep 0.4; echo three ERROR; sleep 0.2; echo err-two >&2")
        .await;
    node.wait_ended(&id).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // replication
    let json = node.stdout(&["job", "log", "--json", &id]).await;
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let time_of = |content: &str| {
        lines.iter().find(|l| l["content"] == content).unwrap()["timestamp_ns"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(lines.len(), 5);
    assert!(lines.iter().all(|l| l["sequence"].as_u64().is_some()));

    let ns = |t: i64| {
        let s = chrono::DateTime::from_timestamp(t / 1_000_000_000, (t % 1_000_000_000) as u32)
            .unwrap();
        s.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
    };
    // --since inclusive, --until exclusive.
    let window = node
        .stdout(&[
            "job",
            "log",
            "--since",
            &ns(time_of("two")),
            "--until",
            &ns(time_of("three ERROR")),
            &id,
        ])
        .await;
    assert_eq!(window, "two\n");
    // Bounds at or before the epoch mean what they say.
    for until in ["1970-01-01T00:00:00Z", "1969-12-31T23:59:59Z"] {
        assert_eq!(
            node.stdout(&["job", "log", "--until", until, &id]).await,
            "",
            "--until {until}"
        );
        assert_eq!(
            node.stdout(&["job", "metrics", "--json", "--until", until, &id])
                .await,
            "",
            "metrics --until {until}"
        );
    }
    assert_eq!(
        node.stdout(&[
            "job",
            "log",
            "--since",
            "1969-12-31T23:59:59Z",
            "--stdout",
            &id
        ])
        .await,
        "one\ntwo\nthree ERROR\n",
        "--since before the epoch bounds nothing"
    );
    assert_eq!(
        node.stdout(&["job", "log", "--since", "2200-01-01T00:00:00Z", &id])
            .await,
        "",
        "--since in the far future"
    );
    assert_eq!(
        node.stdout(&["job", "log", "--tail", "2", &id]).await,
        "three ERROR\nerr-two\n"
    );
    assert_eq!(
        node.stdout(&["job", "log", "--stderr", &id]).await,
        "err-one\nerr-two\n"
    );
    assert_eq!(
        node.stdout(&["job", "log", "--grep", "ERROR", &id]).await,
        "three ERROR\n"
    );
    let stamped = node
        .stdout(&["job", "log", "--timestamps", "--stdout", &id])
        .await;
    assert!(
        stamped.starts_with(&format!("{} one\n", ns(time_of("one")))),
        "{stamped}"
    );
    node.stop().await;
}

#[tokio::test]
async fn without_persist_logs_come_from_core_with_one_warning() {
    let node = Node::start(false).await;
    let id = node.run("seq 1 5").await;
    node.wait_ended(&id).await;
    let output = node.output(&["job", "log", &id]).await;
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "1\n2\n3\n4\n5\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("warning").count(), 1, "{stderr}");
    assert!(stderr.contains("joblet-persist"), "{stderr}");
    node.stop().await;
}

#[tokio::test]
async fn a_fresh_job_logs_quietly_and_status_fails_while_a_daemon_is_down() {
    let node = Node::start(true).await;
    // persist has nothing of a job that just started: normal, nothing to warn about.
    let id = node.run("echo one; sleep 30").await;
    let output = node.output(&["job", "log", &id]).await;
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stderr), "", "no warning");
    let up = node.output(&["status"]).await;
    assert_eq!(up.status.code(), Some(0));
    node.stop().await;

    let node = Node::start(false).await;
    let down = node.output(&["status"]).await;
    assert_eq!(down.status.code(), Some(69), "persist is down");
    let stdout = String::from_utf8_lossy(&down.stdout);
    assert_eq!(stdout.matches("DOWN").count(), 1, "{stdout}");
    assert_eq!(
        String::from_utf8_lossy(&down.stderr),
        "",
        "said once, on stdout"
    );
    node.stop().await;
}

#[tokio::test]
async fn with_core_down_logs_and_metrics_show_history_and_say_so() {
    let mut node = Node::start(true).await;
    let id = node.run("seq 1 5; sleep 0.5").await;
    node.wait_ended(&id).await;
    // Core's shutdown waits until persist acknowledged every line of ended jobs.
    node.core.take().unwrap().terminate().await;
    for args in [
        &["job", "log", &id][..],
        &["job", "metrics", "--json", &id][..],
    ] {
        let output = node.output(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stderr}");
        assert_eq!(
            stderr.matches("showing history only").count(),
            1,
            "{args:?}: {stderr}"
        );
        if args[1] == "log" {
            assert_eq!(String::from_utf8_lossy(&output.stdout), "1\n2\n3\n4\n5\n");
        }
    }
    node.stop().await;
}

#[tokio::test]
async fn job_list_shows_short_ids_no_exit_code_for_running_jobs_and_quoted_commands() {
    let node = Node::start(false).await;
    let running = node.run("echo 'a b'; sleep 30").await;
    for _ in 0..100 {
        let status = node.stdout(&["job", "status", "--json", &running]).await;
        if status.contains("\"status\":\"RUNNING\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = node.stdout(&["job", "list"]).await;
    let row = listed.lines().nth(1).unwrap();
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns[0], &running[..8], "{listed}");
    assert_eq!(columns[1], "RUNNING");
    assert!(
        row.ends_with("sh -c 'echo '\\''a b'\\''; sleep 30'")
            || row.ends_with("sh -c \"echo 'a b'; sleep 30\""),
        "the command as a shell needs it: {row}"
    );
    assert!(
        !columns[2].chars().all(|c| c.is_ascii_digit()),
        "no exit code while it runs: {row}"
    );
    let full = node.stdout(&["job", "list", "--no-trunc"]).await;
    assert!(full.lines().nth(1).unwrap().starts_with(&running), "{full}");
    let json = node.stdout(&["job", "list", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(json["exit_code"], serde_json::Value::Null);
    assert_eq!(json["end_time"], serde_json::Value::Null, "not \"\"");
    let status = node.stdout(&["job", "status", "--json", &running]).await;
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(
        (&status["exit_code"], &status["end_time"]),
        (&serde_json::Value::Null, &serde_json::Value::Null),
        "a running job has no exit code or end yet: {status}"
    );
    // Tables show local time (TZ), --utc shows UTC; JSON stays UTC.
    let start = chrono::DateTime::parse_from_rfc3339(json["start_time"].as_str().unwrap()).unwrap();
    let tokyo = node
        .rnx(&["job", "list"])
        .env("TZ", "JST-9")
        .output()
        .await
        .unwrap();
    let tokyo = String::from_utf8_lossy(&tokyo.stdout);
    let local = (start + chrono::Duration::hours(9))
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    assert!(
        tokyo.contains(&local) && tokyo.contains(" ago)"),
        "{local} in {tokyo}"
    );
    let utc = node.stdout(&["job", "list", "--utc"]).await;
    let in_utc = format!("{}Z", start.format("%Y-%m-%d %H:%M:%S"));
    assert!(utc.contains(&in_utc), "{in_utc} in {utc}");
    let bogus = node.output(&["job", "list", "--status", "bogus"]).await;
    assert_eq!(bogus.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bogus.stderr).contains("is not a job state"),
        "{bogus:?}"
    );
    node.stop().await;
}

/// `rnx job run --follow` of a job that runs until stopped; returns rnx once the job printed.
async fn following(node: &Node, extra: &[&str], script: &str) -> tokio::process::Child {
    let mut args = vec!["job", "run", "--follow"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let mut rnx = node.rnx(&args).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(rnx.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("started"));
    rnx
}

fn interrupt(child: &tokio::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
}

#[tokio::test]
async fn ctrl_c_on_run_follow_stops_the_job_and_a_second_one_detaches() {
    let node = Node::start(false).await;
    let rnx = following(&node, &[], "echo started; exec sleep 60").await;
    interrupt(&rnx);
    let done = tokio::time::timeout(Duration::from_secs(10), rnx.wait_with_output())
        .await
        .expect("rnx ends with the job")
        .unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(
        done.status.code(),
        Some(143),
        "the job's exit (SIGTERM): {stderr}"
    );
    assert!(stderr.contains("stopping job"), "{stderr}");
    assert!(stderr.contains("STOPPED"), "{stderr}");

    // A job that ignores SIGTERM waits out its grace period: a second Ctrl-C detaches.
    let rnx = following(&node, &[], "trap '' TERM; echo started; sleep 60").await;
    interrupt(&rnx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    interrupt(&rnx);
    let detached = tokio::time::timeout(Duration::from_secs(5), rnx.wait_with_output())
        .await
        .expect("the second Ctrl-C detaches at once")
        .unwrap();
    assert_eq!(detached.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&detached.stderr).contains("keeps running"));

    // --detach-on-interrupt: the first Ctrl-C leaves the job running.
    let rnx = following(
        &node,
        &["--detach-on-interrupt"],
        "echo started; exec sleep 60",
    )
    .await;
    interrupt(&rnx);
    let detached = tokio::time::timeout(Duration::from_secs(10), rnx.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&detached.stderr);
    assert_eq!(detached.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("keeps running"), "{stderr}");
    let listed = node.stdout(&["job", "list", "--status", "running"]).await;
    assert_eq!(
        listed.lines().count(),
        3,
        "the detached jobs run on (the first still within its grace period): {listed}"
    );
    node.stop().await;
}

#[tokio::test]
async fn prefix_marks_each_lines_stream() {
    let node = Node::start(false).await;
    let id = node.run("echo to-out; sleep 0.1; echo to-err >&2").await;
    node.wait_ended(&id).await;
    let marked = node.stdout(&["job", "log", "--prefix", &id]).await;
    assert_eq!(marked, "out| to-out\nerr| to-err\n");
    let plain = node.stdout(&["job", "log", &id]).await;
    assert_eq!(plain, "to-out\nto-err\n", "no mark into a pipe by default");
    node.stop().await;
}

#[tokio::test]
async fn run_follow_exits_with_the_jobs_exit_code() {
    let node = Node::start(true).await;
    let ok = node
        .output(&["job", "run", "--follow", "--", "echo", "fine"])
        .await;
    assert_eq!(ok.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "fine\n");
    let unterminated = node
        .output(&["job", "run", "--follow", "--", "printf", "no newline"])
        .await;
    assert_eq!(String::from_utf8_lossy(&unterminated.stdout), "no newline");
    let three = node
        .output(&[
            "job",
            "run",
            "--follow",
            "--",
            "sh",
            "-c",
            "echo bye; exit 3",
        ])
        .await;
    assert_eq!(three.status.code(), Some(3));
    let killed = node
        .output(&[
            "job",
            "run",
            "--follow",
            "--max-memory",
            "32",
            "--",
            "sh",
            "-c",
            "head -c 200000000 /dev/zero | tail",
        ])
        .await;
    assert_eq!(
        killed.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    assert!(String::from_utf8_lossy(&killed.stderr).contains("out of memory"));
    node.stop().await;
}

#[tokio::test]
async fn a_line_persist_cannot_take_shows_as_a_gap_and_the_log_exits_non_zero() {
    // persist's frame limit (4 KiB) below core's (8 MiB, the default): a 10 KB line is
    // refused by persist alone. Before, it stalled the job's replication for good.
    let node = Node::start_configured(
        true,
        "  max_frame_size: 4 KiB\n",
        "  keep_finished: 1s\n",
        "127.0.0.1:0",
    )
    .await;
    let id = node
        .run("echo before; head -c 10000 /dev/zero | tr '\\0' x; echo; echo after")
        .await;
    node.wait_ended(&id).await;
    // While core has the job, it serves every line itself, the long one too.
    let whole = node.output(&["job", "log", &id]).await;
    assert!(whole.status.success());
    assert_eq!(String::from_utf8_lossy(&whole.stdout).lines().count(), 3);
    // The later line was replicated and acknowledged: core lets the job go.
    let mut listed = String::new();
    for _ in 0..300 {
        listed = node.stdout(&["job", "list"]).await;
        if !listed.contains(&id[..8]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!listed.contains(&id[..8]), "core still holds it: {listed}");

    let history = node.output(&["job", "log", &id]).await;
    let stderr = String::from_utf8_lossy(&history.stderr);
    assert_eq!(String::from_utf8_lossy(&history.stdout), "before\nafter\n");
    assert!(
        stderr.contains("rnx: 1 line lost here (frame of ")
            && stderr.contains("over joblet-persist's ipc.max_frame_size (4096 bytes))"),
        "{stderr}"
    );
    assert_eq!(history.status.code(), Some(3), "{stderr}");
    let json = node.output(&["job", "log", "--json", &id]).await;
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (rows[1]["sequence"].as_u64(), rows[1]["lost_lines"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(json.status.code(), Some(3));
    // A grep shows the gap too: the lost line might have matched.
    let grep = node.output(&["job", "log", "--grep", "after", &id]).await;
    assert_eq!(String::from_utf8_lossy(&grep.stdout), "after\n");
    assert!(String::from_utf8_lossy(&grep.stderr).contains("1 line lost here"));

    let metrics = node.stdout(&["job", "list", "--all", "--json"]).await;
    assert!(metrics.contains(&id), "{metrics}");
    node.stop().await;
}

/// What a job writes, as random byte streams: lines of random length (some over the 64 KiB
/// `max_line_length`, so split into pieces), random bytes (NUL, invalid UTF-8, CR), with and
/// without a final newline; plus the edge cases by name.
fn job_outputs() -> Vec<(String, Vec<u8>)> {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    let line = prop_oneof![
        3 => prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..200),
        1 => prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 60_000..140_000),
    ];
    let stream =
        (prop::collection::vec(line, 0..12), any::<bool>()).prop_map(|(lines, last_newline)| {
            let mut bytes = lines.join(&b'\n');
            if last_newline {
                bytes.push(b'\n');
            }
            bytes
        });
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut outputs: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("random {i}"),
                stream.new_tree(&mut runner).unwrap().current(),
            )
        })
        .collect();
    let mut binary = vec![0u8; 300_000];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for byte in &mut binary {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    outputs.push(("binary, no final newline".into(), binary));
    outputs.push(("one 10 MiB line, no newline".into(), vec![b'x'; 10 << 20]));
    outputs.push((
        "20 lines of 1 MiB".into(),
        [vec![b'y'; 1 << 20], b"\n".to_vec()].concat().repeat(20),
    ));
    outputs.push((
        "a line of exactly 64 KiB".into(),
        [vec![b'z'; 65_536], b"\n".to_vec()].concat(),
    ));
    outputs.push(("empty lines".into(), b"\n\n\nlast".to_vec()));
    outputs
}

#[tokio::test]
async fn job_log_gives_back_exactly_the_bytes_the_job_wrote_from_core_and_from_history() {
    let node = Node::start_with(true, "  keep_finished: 1s\n").await;
    let mut jobs = Vec::new();
    for (name, bytes) in job_outputs() {
        let file = node.dir.path().join(format!("out-{}", jobs.len()));
        std::fs::write(&file, &bytes).unwrap();
        let upload = file.to_str().unwrap().to_owned();
        let base = file.file_name().unwrap().to_str().unwrap().to_owned();
        let id = node
            .stdout(&["job", "run", "--upload", &upload, "--", "cat", &base])
            .await
            .trim()
            .to_owned();
        jobs.push((name, bytes, id));
    }
    // Plain output is the bytes; JSON carries them losslessly (text as is, the rest base64,
    // `partial` where no newline followed).
    let check = |source: &'static str| {
        let jobs = &jobs;
        let node = &node;
        async move {
            for (name, bytes, id) in jobs {
                let plain = node.output(&["job", "log", "--stdout", id]).await;
                assert!(plain.status.success(), "{name} ({source})");
                assert!(
                    plain.stdout == *bytes,
                    "{name} ({source}): {} bytes back for {} written",
                    plain.stdout.len(),
                    bytes.len()
                );
                let json = node.stdout(&["job", "log", "--json", "--stdout", id]).await;
                let mut rebuilt = Vec::new();
                for record in json.lines() {
                    let record: serde_json::Value = serde_json::from_str(record).unwrap();
                    match record["content"].as_str() {
                        Some(text) => rebuilt.extend_from_slice(text.as_bytes()),
                        None => {
                            use base64::Engine as _;
                            let encoded = record["content_base64"].as_str().unwrap();
                            rebuilt.extend(
                                base64::engine::general_purpose::STANDARD
                                    .decode(encoded)
                                    .unwrap(),
                            );
                        }
                    }
                    if record["partial"] != true {
                        rebuilt.push(b'\n');
                    }
                }
                assert!(
                    rebuilt == *bytes,
                    "{name} ({source}): JSON gives {} bytes",
                    rebuilt.len()
                );
            }
        }
    };
    for (_, _, id) in &jobs {
        node.wait_ended(id).await;
    }
    check("core").await;
    // Once persist holds them all and core let the jobs go, the history gives the same.
    for (name, _, id) in &jobs {
        let mut listed = String::new();
        for _ in 0..300 {
            listed = node.stdout(&["job", "list"]).await;
            if !listed.contains(&id[..8]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!listed.contains(&id[..8]), "{name}: core still holds it");
    }
    check("persist").await;
    node.stop().await;
}

#[tokio::test]
async fn list_all_adds_the_jobs_core_let_go_from_persists_history() {
    let node = Node::start_with(true, "  keep_finished: 1s\n").await;
    let done = node.run("echo first; exit 4").await;
    node.wait_ended(&done).await;
    let running = node.run("sleep 30").await;
    // Once persist acknowledged it and keep_finished passed, core lets the finished job go.
    let mut listed = String::new();
    for _ in 0..300 {
        listed = node.stdout(&["job", "list"]).await;
        if !listed.contains(&done[..8]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !listed.contains(&done[..8]) && listed.contains(&running[..8]),
        "{listed}"
    );

    let all = node.stdout(&["job", "list", "--all"]).await;
    let rows: Vec<&str> = all.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{all}");
    assert!(
        rows[0].starts_with(&running[..8]) && rows[0].contains(" core "),
        "newest first: {all}"
    );
    assert!(
        rows[1].starts_with(&done[..8])
            && rows[1].contains("FAILED")
            && rows[1].contains(" 4 ")
            && rows[1].contains(" history "),
        "{all}"
    );
    let failed = node
        .stdout(&["job", "list", "--all", "--status", "failed", "--json"])
        .await;
    let failed: serde_json::Value = serde_json::from_str(failed.trim()).unwrap();
    assert_eq!(failed["uuid"], done.as_str());
    assert_eq!(failed["history"], true);
    let newest = node.stdout(&["job", "list", "--all", "--limit", "1"]).await;
    assert_eq!(newest.lines().count(), 2, "{newest}");
    assert!(newest.contains(&running[..8]));
    let none = node
        .stdout(&["job", "list", "--all", "--until", "1h"])
        .await;
    assert_eq!(
        none.lines().count(),
        1,
        "nothing was submitted an hour ago: {none}"
    );

    assert_eq!(node.stdout(&["job", "log", &done]).await, "first\n");
    let status = node.stdout(&["job", "status", &done[..8]]).await;
    assert!(status.contains("history"), "{status}");
    assert!(status.contains("FAILED"), "{status}");
    node.stdout(&["job", "stop", &running]).await;
    node.stop().await;
}

#[tokio::test]
async fn metrics_show_as_table_json_and_chart() {
    let node = Node::start(true).await;
    let id = node
        .run("exec /usr/bin/python3 -c 'import time; a = bytearray(30_000_000); time.sleep(1)'")
        .await;
    node.wait_ended(&id).await;
    let table = node.stdout(&["job", "metrics", &id]).await;
    assert!(table.starts_with("TIME"), "{table}");
    assert!(table.lines().count() >= 4, "{table}");
    let json = node.stdout(&["job", "metrics", "--json", &id]).await;
    let samples: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        samples
            .iter()
            .any(|s| s["memory_bytes"].as_i64().unwrap() > 20_000_000),
        "{json}"
    );
    let chart = node.stdout(&["job", "metrics", "--chart", &id]).await;
    assert!(
        chart.contains("CPU %") && chart.contains("Memory") && chart.contains('█'),
        "{chart}"
    );
    node.stop().await;
}

/// What rnx prints with stdout and stderr on a pseudo-terminal `columns` wide, until it exits.
async fn on_terminal(node: &Node, args: &[&str], columns: u16) -> String {
    on_terminal_in(node, args, columns, "UTC").await
}

/// [`on_terminal`] with the time zone `tz`.
async fn on_terminal_in(node: &Node, args: &[&str], columns: u16, tz: &str) -> String {
    let size = nix::pty::Winsize {
        ws_row: 40,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let mut command = node.rnx(args);
    command
        .env("TZ", tz)
        .stdout(std::fs::File::from(pty.slave.try_clone().unwrap()))
        .stderr(std::fs::File::from(pty.slave));
    let mut child = command.spawn().unwrap();
    drop(command); // our copies of the terminal's side: the read below ends with rnx
    let mut master = std::fs::File::from(pty.master);
    let read = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once rnx, the last holder of the terminal's side, has exited.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    let out = tokio::time::timeout(WAIT, read).await.unwrap().unwrap();
    String::from_utf8_lossy(&out).replace("\r\n", "\n")
}

#[tokio::test]
async fn live_views_redraw_on_a_terminal_rows_fit_its_width_and_pipes_get_plain_text() {
    let node = Node::start(true).await;
    let long = format!("sleep 3; echo {}", "x".repeat(200));
    let id = node.run(&long).await;
    let mut status = String::new();
    for _ in 0..100 {
        status = node.stdout(&["job", "status", &id]).await;
        if status.contains("RUNNING") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The chart, followed, redraws in place on a terminal; a pipe gets no control codes.
    let chart = on_terminal(&node, &["job", "metrics", "-f", "--chart", &id], 120).await;
    assert!(
        chart.contains("\x1b[2J\x1b[H") && chart.contains("CPU %"),
        "{chart:?}"
    );
    let piped = node.stdout(&["job", "metrics", "--chart", &id]).await;
    assert!(!piped.contains('\x1b'), "{piped:?}");

    // While it ran: no exit code, how long it has run, times to the millisecond.
    assert!(
        status.contains("Running for") && !status.contains("Exit code"),
        "{status}"
    );
    let started = status.lines().find(|l| l.starts_with("Started")).unwrap();
    assert!(
        started.len() > 4 && started.as_bytes()[started.len() - 4] == b'.',
        "milliseconds: {started}"
    );
    node.wait_ended(&id).await;
    let status = node.stdout(&["job", "status", &id]).await;
    assert!(
        status.contains("Exit code    0") && status.contains("Duration"),
        "{status}"
    );

    // One row per job, cut to the terminal's width; a pipe gets the whole command.
    let table = on_terminal(&node, &["job", "list"], 60).await;
    let row = table.lines().find(|l| l.starts_with(&id[..8])).unwrap();
    assert!(row.chars().count() == 60 && row.ends_with('…'), "{row:?}");
    let piped = node.stdout(&["job", "list"]).await;
    assert!(piped.contains(&"x".repeat(200)), "{piped}");

    // An upload says what it sends, on a terminal only.
    let file = node.dir.path().join("data.bin");
    std::fs::write(&file, vec![7u8; 3 << 20]).unwrap();
    let upload = [
        "job",
        "run",
        "--upload",
        file.to_str().unwrap(),
        "--",
        "true",
    ];
    let shown = on_terminal(&node, &upload, 120).await;
    assert!(shown.contains("uploaded 1 file (3.0 MiB)"), "{shown:?}");
    let piped = node.output(&upload).await;
    assert!(
        piped.status.success() && piped.stderr.is_empty(),
        "{piped:?}"
    );
    node.stop().await;
}

#[tokio::test]
async fn tables_keep_their_layout_on_a_terminal_and_in_a_pipe() {
    let node = Node::start(true).await;
    let id = node.run("echo 'a b'; exit 3").await;
    node.wait_ended(&id).await;
    let json = node.stdout(&["job", "status", "--json", &id]).await;
    let json: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    // What changes from run to run, masked: the id, the times as Tokyo shows them, the ages.
    let time = |key: &str, format: &str| {
        let at = chrono::DateTime::parse_from_rfc3339(json[key].as_str().unwrap()).unwrap();
        (at + chrono::Duration::hours(9)).format(format).to_string()
    };
    let mask = |text: String| {
        let mut text = text
            .replace(&id, "<id>")
            .replace(&id[..8], "<id8>")
            .replace(&time("start_time", "%Y-%m-%d %H:%M:%S%.3f"), "<started>")
            .replace(&time("end_time", "%Y-%m-%d %H:%M:%S%.3f"), "<ended>")
            .replace(&time("start_time", "%Y-%m-%d %H:%M:%S"), "<started>")
            .replace(node.dir.path().to_str().unwrap(), "<dir>")
            .replace(
                &format!("Node         {}", json["node_id"].as_str().unwrap()),
                "Node         <node>",
            );
        for unit in ["s", "m"] {
            for n in (0..60).rev() {
                text = text.replace(&format!("({n}{unit} ago)"), "(<age>)");
            }
        }
        let duration = text
            .lines()
            .find(|l| l.starts_with("Duration"))
            .map(str::to_owned);
        if let Some(line) = duration {
            text = text.replace(&line, "Duration     <took>");
        }
        text
    };
    for (name, args) in [
        ("job-list", &["job", "list"][..]),
        ("job-status", &["job", "status", &id][..]),
    ] {
        let terminal = on_terminal_in(&node, args, 100, "JST-9").await;
        let piped = node.rnx(args).env("TZ", "JST-9").output().await.unwrap();
        let piped = String::from_utf8_lossy(&piped.stdout).into_owned();
        snapshot(&format!("{name}-terminal.txt"), &mask(terminal));
        snapshot(&format!("{name}-pipe.txt"), &mask(piped));
    }
    node.stop().await;
}

fn snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {} (run with UPDATE_SNAPSHOTS=1)",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "snapshot {name} differs (UPDATE_SNAPSHOTS=1 to accept)"
    );
}

fn rnx_plain(args: &[&str]) -> (String, i32) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rnx"))
        .args(args)
        .env_remove("RNX_CONFIG")
        .env("HOME", "/nonexistent")
        .current_dir("/")
        .output()
        .unwrap();
    let text = format!(
        "{}{}exit: {}\n",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        output.status.code().unwrap_or(-1)
    );
    (text, output.status.code().unwrap_or(-1))
}

#[test]
fn help_and_errors_match_their_snapshots() {
    snapshot("help.txt", &rnx_plain(&["--help"]).0);
    let (bash, code) = rnx_plain(&["completions", "bash"]);
    assert_eq!(code, 0, "completions need no config");
    assert!(
        bash.contains("_rnx()") && bash.contains("--no-trunc"),
        "{bash}"
    );
    snapshot("job-help.txt", &rnx_plain(&["job", "--help"]).0);
    snapshot("job-run-help.txt", &rnx_plain(&["job", "run", "--help"]).0);
    snapshot("job-log-help.txt", &rnx_plain(&["job", "log", "--help"]).0);
    snapshot(
        "job-list-help.txt",
        &rnx_plain(&["job", "list", "--help"]).0,
    );
    snapshot(
        "job-metrics-help.txt",
        &rnx_plain(&["job", "metrics", "--help"]).0,
    );
    let (missing, code) = rnx_plain(&["job", "list"]);
    assert_eq!(code, 2);
    snapshot("error-no-config.txt", &missing);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rnx-config.yml");
    std::fs::write(
        &config,
        "nodes:\n  default:\n    address: \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let (unreachable, code) = rnx_plain(&["--config", &config, "job", "list"]);
    assert_eq!(code, 69);
    snapshot(
        "error-unreachable.txt",
        &unreachable.replace(&config, "CONFIG"),
    );
    std::fs::write(dir.path().join("rnx-config.yml"), "nodes: [broken\n").unwrap();
    let (broken, code) = rnx_plain(&["--config", &config, "job", "list"]);
    assert_eq!(code, 2);
    snapshot(
        "error-broken-config.txt",
        &broken.replace(&config, "CONFIG"),
    );
}

/// `rnx certs init` into `dir/certs`.
fn certs_init(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    let init = std::process::Command::new(env!("CARGO_BIN_EXE_rnx"))
        .args(["certs", "init", "--out"])
        .arg(&certs)
        .args(["--host", "localhost"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    certs
}

/// Writes `dir/persist.yml` and `dir/core.yml` for mutual TLS with the certificates in
/// `dir/certs`, core querying persist at `persist_address`; returns their paths.
fn tls_configs(dir: &Path, persist_address: &str) -> (PathBuf, PathBuf) {
    let certs = dir.join("certs");
    let tls = |cert: &str| {
        format!(
            "    cert: {}\n    key: {}\n    ca: {}\n",
            certs.join(format!("{cert}.pem")).display(),
            certs.join(format!("{cert}-key.pem")).display(),
            certs.join("ca.pem").display()
        )
    };
    let socket = dir.join("persist.sock");
    let persist_config = dir.join("persist.yml");
    std::fs::write(&persist_config, format!(
        "data_dir: {}\nipc:\n  socket: {}\ngrpc:\n  listen: 127.0.0.1:0\n  tls:\n{}metrics:\n  listen: null\n",
        dir.join("persist-data").display(), socket.display(), tls("server")
    )).unwrap();
    let core_config = dir.join("core.yml");
    std::fs::write(&core_config, format!(
        "grpc:\n  listen: 127.0.0.1:0\n  tls:\n{}metrics:\n  listen: 127.0.0.1:0\ncgroup:\n  parent: joblet-rnx-tls-{}\nstate_dir: {}\npersist:\n  socket: {}\n  query_address: {}\n  query_tls:\n{}jobs:\n  work_root: {}\n",
        tls("server"),
        dir.file_name().unwrap().to_string_lossy().trim_start_matches('.'),
        dir.join("state").display(), socket.display(), persist_address, tls("core-client"), dir.join("work").display()
    )).unwrap();
    (persist_config, core_config)
}

/// Starts persist and core with mutual TLS from `rnx certs init` in `dir/certs`.
async fn start_tls_node(dir: &Path) -> (Daemon, Daemon) {
    let certs = certs_init(dir);
    let (persist_config, _) = tls_configs(dir, "127.0.0.1:50052");
    let persist = start_daemon("joblet-persist", &persist_config).await;
    let (_, core_config) = tls_configs(dir, &persist.grpc.to_string());
    let core = start_daemon("joblet-core", &core_config).await;
    let port = |address: &str| address.rsplit(':').next().unwrap().to_owned();
    for (file, name) in [
        ("rnx-config.yml", "admin"),
        ("viewer-rnx-config.yml", "viewer"),
    ] {
        // Point the generated configs at this test's ports.
        let text = std::fs::read_to_string(certs.join(file))
            .unwrap()
            .replace(
                "localhost:50051",
                &format!("localhost:{}", port(&core.grpc.to_string())),
            )
            .replace(
                "localhost:50052",
                &format!("localhost:{}", port(&persist.grpc.to_string())),
            );
        std::fs::write(dir.join(format!("{name}.yml")), text).unwrap();
    }
    (persist, core)
}

fn rnx_as(dir: &Path, role: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_rnx"))
        .arg("--config")
        .arg(dir.join(format!("{role}.yml")))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn mutual_tls_admin_runs_jobs_viewer_only_reads_strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (persist, core) = start_tls_node(dir.path()).await;

    let run = rnx_as(
        dir.path(),
        "admin",
        &["job", "run", "--follow", "--", "echo", "over tls"],
    );
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout), "over tls\n");

    let refused = rnx_as(dir.path(), "viewer", &["job", "run", "--", "echo", "no"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("permission denied") && stderr.contains("RunJob"),
        "{stderr}"
    );
    let listed = rnx_as(dir.path(), "viewer", &["job", "list", "--json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("COMPLETED"));

    // A client without certificates is told the server requires TLS (a configuration error).
    std::fs::write(
        dir.path().join("plain.yml"),
        format!(
            "nodes:\n  default:\n    address: \"{}\"\n    persistAddress: \"{}\"\n",
            core.grpc, persist.grpc
        ),
    )
    .unwrap();
    let plain = rnx_as(dir.path(), "plain", &["job", "list"]);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("requires TLS") && stderr.contains("cert, key and ca"),
        "{stderr}"
    );
    let id = String::from_utf8_lossy(&listed.stdout)
        .split("\"uuid\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = rnx_as(dir.path(), "viewer", &["job", "log", &id]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "over tls\n");
    assert!(
        !String::from_utf8_lossy(&logs.stderr).contains("warning"),
        "history came from persist over TLS"
    );
    let delete = rnx_as(dir.path(), "viewer", &["job", "delete", &id]);
    assert_eq!(delete.status.code(), Some(1));

    // Without a client certificate: UNAUTHENTICATED.
    let admin = std::fs::read_to_string(dir.path().join("admin.yml")).unwrap();
    let ca_only: String = {
        let start = admin.find("    cert: |").unwrap();
        let end = admin.find("    ca: |").unwrap();
        format!("{}{}", &admin[..start], &admin[end..])
    };
    std::fs::write(dir.path().join("nocert.yml"), &ca_only).unwrap();
    let anonymous = rnx_as(dir.path(), "nocert", &["job", "list"]);
    assert_eq!(
        anonymous.status.code(),
        Some(2),
        "a config with only ca is refused by rnx itself"
    );
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://{}",
        core.grpc.to_string().replace("127.0.0.1", "localhost")
    ))
    .unwrap()
    .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(
            std::fs::read(dir.path().join("certs/ca.pem")).unwrap(),
        ),
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let status = joblet_proto::joblet::job_service_client::JobServiceClient::new(channel)
        .list_jobs(joblet_proto::joblet::EmptyRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // A certificate from another CA fails the handshake.
    let other = dir.path().join("other");
    let init = std::process::Command::new(env!("CARGO_BIN_EXE_rnx"))
        .args(["certs", "init", "--out"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(init.status.success());
    let stranger = std::fs::read_to_string(other.join("rnx-config.yml"))
        .unwrap()
        .replace(
            "localhost:50051",
            &core.grpc.to_string().replace("127.0.0.1", "localhost"),
        );
    std::fs::write(dir.path().join("stranger.yml"), stranger).unwrap();
    let handshake = rnx_as(dir.path(), "stranger", &["job", "list"]);
    assert_ne!(handshake.status.code(), Some(0));

    // Every denial is counted.
    let mut stream = tokio::net::TcpStream::connect(core.metrics.unwrap())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut scrape = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut scrape)
        .await
        .unwrap();
    assert!(
        scrape.contains("joblet_auth_denied_total{reason=\"forbidden\"} 2"),
        "{scrape}"
    );
    assert!(
        scrape.contains("joblet_auth_denied_total{reason=\"no_certificate\"} 1"),
        "{scrape}"
    );
    assert!(
        scrape.contains("joblet_auth_denied_total{reason=\"handshake\"} 1"),
        "{scrape}"
    );
    core.terminate().await;
    persist.terminate().await;
}

/// `--check-config` of a daemon with `config` (and core's `extra` arguments): exit code and
/// what it printed on stderr.
fn check_config(daemon: &str, config: &Path, extra: &[&Path]) -> (i32, String) {
    let mut command = std::process::Command::new(sibling(daemon));
    command.arg("--config").arg(config).arg("--check-config");
    if let Some(persist) = extra.first() {
        command.arg("--persist-config").arg(persist);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_config_finds_what_start_would_trip_over_one_line_each() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let certs = certs_init(dir.path());
    let (persist, core) = tls_configs(dir.path(), "127.0.0.1:50052");
    assert_eq!(
        check_config("joblet-persist", &persist, &[]),
        (0, String::new())
    );
    assert_eq!(
        check_config("joblet-core", &core, &[&persist]),
        (0, String::new())
    );

    // A private key others can read.
    let key = certs.join("server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (daemon, config) in [("joblet-persist", &persist), ("joblet-core", &core)] {
        let (code, said) = check_config(daemon, config, &[]);
        assert_eq!(code, 1, "{said}");
        assert!(
            said.contains("grpc.tls.key") && said.contains("chmod 600"),
            "{said}"
        );
        assert_eq!(said.lines().count(), 1, "{said}");
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A CA the server certificate was not issued by.
    let other = tempfile::tempdir().unwrap();
    let other_certs = certs_init(other.path());
    std::fs::copy(other_certs.join("ca.pem"), certs.join("ca.pem")).unwrap();
    let (code, said) = check_config("joblet-persist", &persist, &[]);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("does not verify against grpc.tls.ca"),
        "{said}"
    );

    // A missing file, and core sending frames persist would refuse.
    std::fs::remove_file(certs.join("core-client.pem")).unwrap();
    let text = std::fs::read_to_string(&core).unwrap();
    std::fs::write(
        &core,
        text.replace("persist:\n", "persist:\n  max_frame_size: 16 MiB\n"),
    )
    .unwrap();
    let (code, said) = check_config("joblet-core", &core, &[&persist]);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("persist.query_tls.cert") && said.contains("core-client.pem"),
        "{said}"
    );
    assert!(
        said.contains("persist.max_frame_size: 16.0 MiB is more than"),
        "{said}"
    );
}

#[test]
fn config_show_says_which_file_why_whose_certificate_and_warns_of_a_readable_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = certs_init(dir.path()).join("rnx-config.yml");
    let show = |extra: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_rnx"))
            .args(extra)
            .args(["config", "show"])
            .env_remove("RNX_CONFIG")
            .current_dir(dir.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let path = config.to_str().unwrap();
    let shown = show(&["--config", path]);
    assert!(
        shown.contains(&format!("config: {path} (--config)")),
        "{shown}"
    );
    assert!(
        shown.contains("core localhost:50051, persist localhost:50052"),
        "{shown}"
    );
    assert!(
        shown.contains("as rnx-admin (role admin), expires"),
        "{shown}"
    );
    assert!(shown.contains("readable by its owner only"), "{shown}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(show(&["--config", path]).contains("WARNING: mode 644"));
    // Without --config or RNX_CONFIG: ./rnx-config.yml, said so.
    std::fs::copy(&config, dir.path().join("rnx-config.yml")).unwrap();
    assert!(show(&[]).contains("rnx-config.yml (in the current directory)"));
}

#[tokio::test]
async fn top_shows_running_jobs_with_their_latest_cpu_memory_and_limit_sorted() {
    let node = Node::start(false).await;
    let busy = node
        .stdout(&[
            "job",
            "run",
            "--max-memory",
            "256",
            "--",
            "sh",
            "-c",
            "while :; do :; done",
        ])
        .await
        .trim()
        .to_owned();
    let holder = node
        .run("exec /usr/bin/python3 -c 'import time; a = bytearray(60_000_000); time.sleep(60)'")
        .await;
    let ended = node.run("true").await;
    node.wait_ended(&ended).await;
    // Two samples each, so that rates and CPU are measured over an interval.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let json = node.stdout(&["top", "--once", "--json"]).await;
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "only the running jobs: {json}");
    assert_eq!(rows[0]["uuid"], busy.as_str(), "busiest first: {json}");
    // A busy loop: well above the sleeping holder, even on a loaded machine.
    assert!(rows[0]["cpu_percent"].as_f64().unwrap() > 10.0, "{json}");
    assert_eq!(rows[0]["memory_limit"], 256 * 1024 * 1024, "{json}");
    assert_eq!(rows[1]["uuid"], holder.as_str(), "{json}");
    assert!(
        rows[1]["memory_bytes"].as_i64().unwrap() > 50_000_000,
        "{json}"
    );
    assert!(rows[1]["memory_limit"].is_null(), "{json}");
    assert!(
        rows.iter().all(|r| r["pids"].as_i64().unwrap() >= 1),
        "{json}"
    );
    assert!(rows[1]["io_read_bytes_per_second"].is_number(), "{json}");

    let table = node.stdout(&["top", "--once", "--sort", "memory"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("2 running jobs on "), "{table}");
    assert!(
        lines[1].starts_with("ID") && lines[1].contains("CPU%"),
        "{table}"
    );
    assert!(
        lines[2].starts_with(&holder[..8]),
        "largest memory first: {table}"
    );
    assert!(
        lines[2].contains("python3") && lines[3].contains("256.0 MiB"),
        "{table}"
    );

    let refused = node.output(&["top", "--interval", "soon"]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--interval"));
    for id in [&busy, &holder] {
        node.stdout(&["job", "stop", id]).await;
    }
    node.stop().await;
}
