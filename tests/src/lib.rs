//! Helpers for fedsb end-to-end tests: start the real `fedsb` binary on a free
//! port with a throw-away state directory, and talk to it as participants do.
//!
//! The binary is `$FEDSB_BIN`, or `fedsb` next to the test executable's
//! `deps/` folder (`cargo xtask test` builds it first; by hand:
//! `cargo build -p fedsb-aggregator`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use fedsb_protocol::{
    AdapterShape, AdapterState, ClientMessage, ClientUpdate, ErrorCode, RoundId, ServerMessage,
    PROTOCOL_VERSION,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod process;
pub mod tiny_model;

/// How long any single expected event may take before a test fails.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The SHA-256 of a file as coreutils' `sha256sum` prints it (lowercase
/// hex): independent of the server's own hashing.
pub fn sha256sum(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    process::check_success("sha256sum", &out)?;
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_owned())
}

/// The SHA-256 of `bytes` by [`sha256sum`] (through a temporary file).
pub fn sha256_hex(bytes: &[u8]) -> anyhow::Result<String> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), bytes)?;
    sha256sum(file.path())
}

/// The `fedsb` binary under test.
pub fn fedsb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FEDSB_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = dir.join(format!("fedsb{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} does not exist: run `cargo build -p fedsb-aggregator` first (cargo xtask test does), or set FEDSB_BIN",
        bin.display()
    );
    bin
}

/// all-MiniLM-L6-v2 in Hugging Face layout: `FEDSB_MODEL_DIR`, or
/// `models/all-MiniLM-L6-v2` in the workspace (`cargo xtask fetch-model`;
/// `cargo xtask test` fetches it), canonicalized. An error names the missing
/// file.
pub fn minilm_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("FEDSB_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/all-MiniLM-L6-v2"));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        anyhow::ensure!(
            dir.join(f).is_file(),
            "{} not found: run `cargo xtask fetch-model` (or set FEDSB_MODEL_DIR)",
            dir.join(f).display()
        );
    }
    Ok(dir.canonicalize()?)
}

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

/// Writes the demo task's adapter file to `out` as `cargo xtask demo` makes
/// it (xtask's `demo`): `fedsb init --centre-head` on the first 64 sentences
/// of SST-2 train (`data/sst2`, `cargo xtask fetch-data`) with `model`.
pub fn make_demo_adapter(model: &Path, out: &Path) -> anyhow::Result<()> {
    let train = repo().join("data/sst2/train.tsv");
    anyhow::ensure!(
        train.is_file(),
        "{} not found: run `cargo xtask fetch-data`",
        train.display()
    );
    let done = Command::new(fedsb_bin())
        .arg("init")
        .arg("--model")
        .arg(model)
        .arg("--train")
        .arg(&train)
        .args(["--labels", "negative,positive", "--rank", "32"])
        .args(["--init-samples", "64", "--lr", "1e-3", "--centre-head"])
        .arg("--out")
        .arg(out)
        .output()
        .context("running fedsb init")?;
    anyhow::ensure!(
        done.status.success(),
        "fedsb init: {}\n{}",
        done.status,
        String::from_utf8_lossy(&done.stderr)
    );
    Ok(())
}

/// `configs/sst2-demo.toml` as `cargo xtask demo` runs it, for a task in
/// `dir`: the model at `model`, the adapter file at `adapter`, the state in
/// `dir/state`, its other paths (data, page) made absolute, and each
/// `(from, to)` of `overrides` replaced (each must occur once). Returns
/// the text, which [`Aggregator::start_in`] reads as `dir/task.toml`.
pub fn demo_config(
    dir: &Path,
    model: &Path,
    adapter: &Path,
    overrides: &[(&str, String)],
) -> anyhow::Result<String> {
    let root = repo();
    let mut config = std::fs::read_to_string(root.join("configs/sst2-demo.toml"))?;
    let paths = [
        (
            "file = \"../state/sst2-demo-adapter.safetensors\"",
            format!("file = {:?}", adapter.display().to_string()),
        ),
        (
            "dir = \"../models/all-MiniLM-L6-v2\"",
            format!("dir = {:?}", model.display().to_string()),
        ),
        (
            "state_dir = \"../state\"",
            format!("state_dir = {:?}", dir.join("state").display().to_string()),
        ),
    ];
    for (from, to) in paths
        .iter()
        .map(|(f, t)| (*f, t))
        .chain(overrides.iter().map(|(f, t)| (*f, t)))
    {
        anyhow::ensure!(
            config.matches(from).count() == 1,
            "configs/sst2-demo.toml: {from:?} not found once"
        );
        config = config.replace(from, to);
    }
    Ok(config.replace("\"../", &format!("\"{}/", root.display())))
}

/// A task config for tests: `layers` × 6 modules of rank `rank`, a 2-class
/// head on a hidden size of 8, plus `extra` lines appended to `[task]`.
pub fn test_config(rounds: u64, min: u32, max: u32, deadline_secs: u64, extra: &str) -> String {
    format!(
        r#"[task]
id = "e2e"
rounds = {rounds}
min_participants = {min}
max_participants = {max}
round_deadline_secs = {deadline_secs}
labels = ["negative", "positive"]
{extra}
[model]
id = "tiny-test-model"
hidden_size = 8
num_layers = 2
[adapter]
rank = 4
[server]
ping_interval_secs = 1
idle_timeout_secs = 5
"#
    )
}

/// The adapter shape of [`test_config`].
pub const TEST_SHAPE: AdapterShape = AdapterShape {
    rank: 4,
    modules: 12,
    head_classes: 2,
    head_hidden: 8,
};

/// A running `fedsb serve` process; killed when dropped.
pub struct Aggregator {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _keep: Option<tempfile::TempDir>,
}

impl Aggregator {
    /// Starts the aggregator with this config in a fresh temporary directory.
    pub fn start(config_toml: &str) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_owned();
        std::fs::write(dir.join("task.toml"), config_toml)?;
        let mut a = Self::start_in(&dir)?;
        a._keep = Some(tmp);
        Ok(a)
    }

    /// Starts (or restarts) the aggregator on `dir/task.toml` with its state
    /// in `dir/state`, on a free port.
    pub fn start_in(dir: &Path) -> anyhow::Result<Self> {
        Self::start_in_on(dir, 0)
    }

    /// Like [`Aggregator::start_in`], on `port` (0: a free one), e.g. the
    /// port of a killed aggregator, so that its participants can reconnect.
    pub fn start_in_on(dir: &Path, port: u16) -> anyhow::Result<Self> {
        Self::spawn(Command::new(fedsb_bin()), dir, port)
    }

    /// Like [`Aggregator::start`], with the soft limit on open files set to
    /// `soft` (as `ulimit -Sn` in a shell would) before `fedsb serve` runs.
    pub fn start_with_open_files(config_toml: &str, soft: u64) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_owned();
        std::fs::write(dir.join("task.toml"), config_toml)?;
        let mut shell = Command::new("sh");
        shell
            .arg("-c")
            .arg(format!("ulimit -Sn {soft} && exec \"$0\" \"$@\""))
            .arg(fedsb_bin());
        let mut a = Self::spawn(shell, &dir, 0)?;
        a._keep = Some(tmp);
        Ok(a)
    }

    /// Runs `command` (`fedsb`, or what execs it) with the arguments of
    /// `serve` on `dir`, and reads the address it listens on.
    fn spawn(mut command: Command, dir: &Path, port: u16) -> anyhow::Result<Self> {
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(dir.join("task.toml"))
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--state-dir",
            ])
            .arg(dir.join("state"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning fedsb serve")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // Keep draining stdout so the server never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let url = line
            .trim()
            .strip_prefix("fedsb listening on http://")
            .ok_or_else(|| anyhow!("unexpected first line from fedsb serve: {line:?}"))?;
        let addr: SocketAddr = url.trim_end_matches('/').parse()?;
        Ok(Self {
            child,
            addr,
            dir: dir.to_owned(),
            _keep: None,
        })
    }

    /// Waits (up to 120 s) until a federated initialization holds `n`
    /// contributions.
    pub async fn wait_init_contributions(&self, n: u64) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        loop {
            let s = self.json("/api/status").await?;
            if s["state"] == "initializing" && s["updates_in_round"] == n {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(120) {
                anyhow::bail!("the initialization did not reach {n} contributions: {s}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET a JSON API path.
    pub async fn json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let r = reqwest::get(self.url(path)).await?;
        if !r.status().is_success() {
            bail!("GET {path}: {}", r.status());
        }
        Ok(r.json().await?)
    }

    /// The committed global model of round `n`, decoded from
    /// `/api/rounds/{n}/global`.
    pub async fn global_state(&self, n: u64) -> anyhow::Result<AdapterState> {
        let r = reqwest::get(self.url(&format!("/api/rounds/{n}/global"))).await?;
        if !r.status().is_success() {
            bail!("GET /api/rounds/{n}/global: {}", r.status());
        }
        match ServerMessage::decode(&r.bytes().await?)? {
            ServerMessage::GlobalModel { adapter, .. } => Ok(adapter),
            other => bail!("round {n}: expected GlobalModel, got {other:?}"),
        }
    }

    /// GET `/metrics` as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(self.url("/metrics")).await?.text().await?)
    }

    /// The value of one metric line (`name{labels}` exactly as exposed), 0 if absent.
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap_or(f64::NAN))
            .unwrap_or(0.0))
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One participant connection speaking the real protocol.
pub struct Participant {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Participant {
    /// Opens the WebSocket without sending anything.
    pub async fn connect_raw(addr: SocketAddr) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await?;
        Ok(Self { ws })
    }

    /// Connects and completes the handshake without a participant key (a
    /// new participant); returns the participant and `Welcome`.
    pub async fn join(addr: SocketAddr, name: &str) -> anyhow::Result<(Self, ServerMessage)> {
        Self::join_as(addr, name, None).await
    }

    /// Connects and completes the handshake presenting `participant_key`;
    /// returns the participant and `Welcome`.
    pub async fn join_as(
        addr: SocketAddr,
        name: &str,
        participant_key: Option<&str>,
    ) -> anyhow::Result<(Self, ServerMessage)> {
        let mut p = Self::connect_raw(addr).await?;
        p.send(&ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: name.to_owned(),
            participant_key: participant_key.map(str::to_owned),
        })
        .await?;
        let welcome = p.recv().await?;
        if !matches!(welcome, ServerMessage::Welcome { .. }) {
            bail!("expected Welcome, got {welcome:?}");
        }
        Ok((p, welcome))
    }

    pub async fn send(&mut self, m: &ClientMessage) -> anyhow::Result<()> {
        self.send_raw(m.encode()).await
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.ws.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// The next protocol message (pings are answered and skipped).
    pub async fn recv(&mut self) -> anyhow::Result<ServerMessage> {
        loop {
            let m = tokio::time::timeout(STEP_TIMEOUT, self.ws.next())
                .await
                .context("timed out waiting for a server message")?
                .ok_or_else(|| anyhow!("connection closed"))??;
            match m {
                Message::Binary(b) => return Ok(ServerMessage::decode(&b)?),
                Message::Close(c) => bail!("connection closed by server: {c:?}"),
                Message::Text(t) => bail!("unexpected text frame {t}"),
                _ => continue,
            }
        }
    }

    /// Whether the server closes the connection within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The close code the server ends the connection with within `wait`
    /// (`None`: a close without a code, or no close at all).
    pub async fn close_code_within(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code.into()),
                Err(_) | Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Receives until a message matches `f`, failing on `Error` frames.
    pub async fn recv_until<T>(
        &mut self,
        mut f: impl FnMut(&ServerMessage) -> Option<T>,
    ) -> anyhow::Result<T> {
        loop {
            let m = self.recv().await?;
            if let Some(t) = f(&m) {
                return Ok(t);
            }
            if let ServerMessage::Error { code, message } = &m {
                bail!("unexpected error {code:?}: {message}");
            }
        }
    }

    /// Waits for `RoundOpen` and returns its round.
    pub async fn wait_round_open(&mut self) -> anyhow::Result<RoundId> {
        self.recv_until(|m| match m {
            ServerMessage::RoundOpen { round, .. } => Some(*round),
            _ => None,
        })
        .await
    }

    /// Waits for the `GlobalModel` of `round`.
    pub async fn wait_global(&mut self, round: RoundId) -> anyhow::Result<AdapterState> {
        self.recv_until(|m| match m {
            ServerMessage::GlobalModel {
                round: r, adapter, ..
            } if *r == round => Some(adapter.clone()),
            _ => None,
        })
        .await
    }

    /// Sends an update and returns the server's answer.
    pub async fn submit(&mut self, update: ClientUpdate) -> anyhow::Result<ServerMessage> {
        self.send(&ClientMessage::Update(update)).await?;
        self.recv_until(|m| match m {
            ServerMessage::UpdateAccepted { .. } | ServerMessage::Error { .. } => Some(m.clone()),
            _ => None,
        })
        .await
    }

    /// Sends raw bytes and expects an `Error` with `code`; returns its message.
    pub async fn expect_error(&mut self, code: ErrorCode) -> anyhow::Result<String> {
        let m = self
            .recv_until(|m| match m {
                ServerMessage::Error { .. } | ServerMessage::UpdateAccepted { .. } => {
                    Some(m.clone())
                }
                _ => None,
            })
            .await?;
        match m {
            ServerMessage::Error { code: c, message } if c == code => Ok(message),
            other => bail!("expected error {code:?}, got {other:?}"),
        }
    }
}

/// A deterministic adapter state: value depends on (seed, tensor, index).
pub fn known_state(shape: &AdapterShape, seed: u64) -> AdapterState {
    let mut s = AdapterState::zeros(shape);
    for (t_i, t) in s.tensors_mut().enumerate() {
        for (i, x) in t.data.iter_mut().enumerate() {
            // A cheap hash to spread values over [-1, 1).
            let mut h = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add((t_i as u64) << 32 | i as u64);
            h ^= h >> 31;
            h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            h ^= h >> 29;
            *x = (h % 2_000_001) as f32 / 1_000_000.0 - 1.0;
        }
    }
    s
}

/// The update a test participant sends.
pub fn update(round: RoundId, samples: u64, adapter: AdapterState) -> ClientUpdate {
    ClientUpdate {
        round,
        num_samples: samples,
        train_loss: Some(0.69),
        privacy: None,
        adapter,
    }
}

/// Σ wᵢ·xᵢ / Σ wᵢ computed independently of the aggregator, in f64.
pub fn weighted_mean(states: &[(f64, &AdapterState)]) -> Vec<f64> {
    let n = states[0].1.num_floats();
    let mut sum = vec![0.0f64; n];
    let mut total = 0.0;
    for (w, s) in states {
        total += w;
        let flat = s.named_tensors().flat_map(|(_, t)| t.data.iter());
        for (acc, &x) in sum.iter_mut().zip(flat) {
            *acc += w * f64::from(x);
        }
    }
    sum.iter().map(|s| s / total).collect()
}

/// Largest |a − b| / max(|b|, 1e-3) over all values.
pub fn max_rel_error(got: &AdapterState, want: &[f64]) -> f64 {
    got.named_tensors()
        .flat_map(|(_, t)| t.data.iter())
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).abs() / w.abs().max(1e-3))
        .fold(0.0, f64::max)
}

/// The F32 tensors of a safetensors file (a model, an adapter file), by name.
pub fn tensors_of(path: &Path) -> anyhow::Result<std::collections::BTreeMap<String, Vec<f32>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(shaped_tensors(&bytes)?
        .into_iter()
        .map(|(name, (_, data))| (name, data))
        .collect())
}

/// F32 tensors by name: (shape, values).
pub type ShapedTensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Every F32 tensor of safetensors bytes, by name: (shape, values).
pub fn shaped_tensors(bytes: &[u8]) -> anyhow::Result<ShapedTensors> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect())
}

/// B·R·A (`out × in`, in f64) of one adapted module of an adapter file's
/// tensors (`<module>.lora_A`, `.lora_B`, `.lora_R`).
pub fn adapter_product(t: &ShapedTensors, module: &str) -> anyhow::Result<Vec<f64>> {
    let get = |s: &str| {
        t.get(&format!("{module}.{s}"))
            .with_context(|| format!("no tensor {module}.{s}"))
    };
    let ((sa, a), (sb, b), (_, r)) = (get("lora_A")?, get("lora_B")?, get("lora_R")?);
    let (rank, inp, out) = (sa[0], sa[1], sb[0]);
    let mut br = vec![0f64; out * rank];
    for i in 0..out {
        for k in 0..rank {
            for j in 0..rank {
                br[i * rank + j] += f64::from(b[i * rank + k]) * f64::from(r[k * rank + j]);
            }
        }
    }
    let mut p = vec![0f64; out * inp];
    for i in 0..out {
        for k in 0..rank {
            for j in 0..inp {
                p[i * inp + j] += br[i * rank + k] * f64::from(a[k * inp + j]);
            }
        }
    }
    Ok(p)
}

/// How far `other`'s B·R·A of `module` is from `reference`'s: the largest
/// absolute difference over the largest |entry| of the reference's. It does
/// not depend on the SVD's sign conventions. A zero reference is an error.
pub fn product_difference(
    reference: &ShapedTensors,
    other: &ShapedTensors,
    module: &str,
) -> anyhow::Result<f64> {
    let (pr, po) = (
        adapter_product(reference, module)?,
        adapter_product(other, module)?,
    );
    let scale = pr.iter().fold(0f64, |m, x| m.max(x.abs()));
    anyhow::ensure!(scale > 0.0, "{module}: B·R·A is zero");
    Ok(pr
        .iter()
        .zip(&po)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale)
}
