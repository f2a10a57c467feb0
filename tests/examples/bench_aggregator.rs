//! `cargo xtask bench aggregator`: how many participants one aggregator
//! holds, what each connection costs in memory, and how long a round takes
//! to collect, aggregate and broadcast, with all-MiniLM-L6-v2's update size
//! (36 modules of rank 32 and a 2×384 head: 150,905-byte `Update` frames).
//!
//! For each participant count N it starts the release `fedsb serve` (quorum
//! N, no model files: the aggregator needs only the shape), samples the
//! server's resident memory (`VmRSS` in `/proc/<pid>/status`) before and after
//! N WebSocket participants have joined and received the round-0 state,
//! then runs rounds in which every participant sends one update. It reports:
//! the time for all N to join; the server's memory and its growth per
//! connection; per round, the wall time from the first update sent to the
//! last `GlobalModel` received, the aggregator's own `aggregation_ms`
//! (finalizing the f64 sum it accumulates as updates arrive, and encoding)
//! and `fedsb_aggregation_duration_seconds` (that plus the SQLite commit);
//! and the server's peak memory. Participants run in this process on the
//! same cores as the server, so the wall times include the clients' own work.
//!
//! ```sh
//! cargo build --release -p fedsb-aggregator --bin fedsb
//! cargo run --release -p fedsb-e2e --example bench_aggregator -- --participants 10,100,1000 --rounds 3
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fedsb_e2e::{known_state, update, Aggregator, Participant};
use fedsb_protocol::{AdapterShape, RoundId, ServerMessage};

/// all-MiniLM-L6-v2 with LoRA-SB r = 32 on all six linears and 2 classes.
const SHAPE: AdapterShape = AdapterShape {
    rank: 32,
    modules: 36,
    head_classes: 2,
    head_hidden: 384,
};

fn config(n: usize, rounds: u64) -> String {
    format!(
        r#"[task]
id = "bench-aggregator"
rounds = {rounds}
min_participants = {n}
max_participants = {n}
round_deadline_secs = 3600
labels = ["negative", "positive"]
[model]
id = "all-MiniLM-L6-v2 (shape only)"
hidden_size = 384
num_layers = 6
[adapter]
rank = 32
[server]
ping_interval_secs = 30
idle_timeout_secs = 3600
"#
    )
}

/// A memory field of process `pid` in KiB: `VmRSS` (resident now) or
/// `VmHWM` (the peak).
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// When one participant saw each round open, sent its update, and received
/// the round's global state.
struct Timeline {
    sent: Vec<Instant>,
    global: Vec<Instant>,
}

async fn run(n: usize, rounds: u64) -> anyhow::Result<()> {
    let agg = Aggregator::start(&config(n, rounds))?;
    let pid = agg.child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = status_kib(pid, "VmRSS")?;
    let joined = Arc::new(tokio::sync::Barrier::new(n + 1));
    let go = Arc::new(tokio::sync::Barrier::new(n + 1));
    let done = Arc::new(tokio::sync::Barrier::new(n + 1));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (addr, joined, go, done) = (agg.addr, joined.clone(), go.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let (mut p, _) = Participant::join(addr, &format!("bench-{i}")).await?;
            p.wait_global(RoundId(0)).await?;
            joined.wait().await;
            go.wait().await;
            let mut t = Timeline {
                sent: Vec::new(),
                global: Vec::new(),
            };
            for r in 1..=rounds {
                let round = p.wait_round_open().await?;
                if round != RoundId(r) {
                    bail!("participant {i}: round {round} opened, expected {r}");
                }
                let u = update(round, 10, known_state(&SHAPE, i as u64 * 1000 + r));
                t.sent.push(Instant::now());
                match p.submit(u).await? {
                    ServerMessage::UpdateAccepted { .. } => {}
                    other => bail!("participant {i}: {other:?}"),
                }
                p.wait_global(round).await?;
                t.global.push(Instant::now());
            }
            // Connected until the server's memory after the rounds is read.
            done.wait().await;
            drop(p);
            anyhow::Ok(t)
        }));
    }
    joined.wait().await;
    let join_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss1 = status_kib(pid, "VmRSS")?;
    go.wait().await;
    done.wait().await;
    let rss2 = status_kib(pid, "VmRSS")?;
    let mut timelines = Vec::with_capacity(n);
    for t in tasks {
        timelines.push(t.await??);
    }
    let list = agg.json("/api/rounds").await?;
    let sum = agg.metric("fedsb_aggregation_duration_seconds_sum").await?;
    let count = agg
        .metric("fedsb_aggregation_duration_seconds_count")
        .await?;
    let peak = status_kib(pid, "VmHWM")?;
    let per_conn = (rss1.saturating_sub(rss0)) as f64 / n as f64;
    let per_conn_after = (rss2.saturating_sub(rss0)) as f64 / n as f64;
    println!(
        "| {n} | {join_s:.2} s | {:.1} MiB | {:.1} MiB ({per_conn:.0} KiB each) | {:.1} MiB ({per_conn_after:.0} KiB each) | {:.1} MiB |",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        rss2 as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    for r in 0..rounds as usize {
        let first = timelines
            .iter()
            .map(|t| t.sent[r])
            .min()
            .context("no participant")?;
        let last = timelines
            .iter()
            .map(|t| t.global[r])
            .max()
            .context("no participant")?;
        let meta = &list[r + 1];
        println!(
            "|   round {} | {:.2} s wall | aggregation_ms {} | {} participants | {:.1} MB in |",
            r + 1,
            (last - first).as_secs_f64(),
            meta["aggregation_ms"],
            meta["participants"],
            meta["bytes_in"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
    println!(
        "|   mean fedsb_aggregation_duration_seconds (aggregate + SQLite commit) | {:.1} ms over {count} rounds |",
        1000.0 * sum / count.max(1.0)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut participants = vec![10usize, 100, 500, 1000];
    let mut rounds = 3u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--participants" => {
                participants = args
                    .next()
                    .context("--participants needs a list, e.g. 10,100")?
                    .split(',')
                    .map(|s| s.trim().parse().context("--participants: a number"))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            other => bail!("unknown argument {other:?} (--participants LIST, --rounds N)"),
        }
    }
    // This process holds every participant's connection: a shell's soft
    // limit of 1,024 open files would stop it near a thousand.
    let most = participants.iter().copied().max().unwrap_or(0) as u64;
    let files = rlimit::increase_nofile_limit(1 << 20).context("raising the open-files limit")?;
    if files < most + 64 {
        bail!(
            "{most} participants need about {} open files in this process; the hard limit \
             allows {files} (raise it: ulimit -Hn)",
            most + 64
        );
    }
    println!(
        "fedsb: {} (set FEDSB_BIN to choose)",
        fedsb_e2e::fedsb_bin().display()
    );
    println!(
        "| participants | all joined in | server RSS before | after joining | after the rounds, still connected | peak |"
    );
    println!("|---|---|---|---|---|---|");
    for n in participants {
        run(n, rounds).await?;
    }
    Ok(())
}
