//! Headless Chromium driven over the Chrome DevTools Protocol (CDP), for the
//! browser tests: WebGPU on SwiftShader (the CPU), a fresh profile per run.
//!
//! Chromium is `$FEDSB_CHROMIUM` or `chromium` on the `PATH` (Debian package
//! `chromium`). It is started with the flags of [`CHROMIUM_FLAGS`] plus
//! `--remote-debugging-port=0`; the test talks to the page's DevTools
//! WebSocket with `tokio-tungstenite` (no chromedriver needed).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Headless Chromium with WebGPU on SwiftShader; `--user-data-dir` is added
/// with a fresh temporary directory.
pub const CHROMIUM_FLAGS: [&str; 9] = [
    "--headless=new",
    "--no-sandbox",
    "--enable-unsafe-webgpu",
    "--enable-features=Vulkan",
    "--use-webgpu-adapter=swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
];

/// How long Chromium may take to start and open its DevTools endpoint.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A headless Chromium process and a CDP session on its first page.
pub struct Chromium {
    child: Child,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
    /// CDP events whose method starts with one of these are kept in `events`.
    pub keep_events: Vec<&'static str>,
    /// The kept events, in arrival order (with their `sessionId`, if any).
    pub events: Vec<Value>,
}

fn chromium_bin() -> PathBuf {
    std::env::var_os("FEDSB_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("chromium"))
}

impl Chromium {
    /// Starts Chromium on `about:blank` and attaches to that page.
    pub async fn launch() -> anyhow::Result<Self> {
        let profile = tempfile::tempdir()?;
        let bin = chromium_bin();
        let mut child = Command::new(&bin)
            .args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--remote-debugging-port=0")
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (install Debian's chromium, or set FEDSB_CHROMIUM)",
                    bin.display()
                )
            })?;
        // Chromium prints "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID".
        let stderr = child.stderr.take().context("chromium stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(rest.trim().to_owned());
                    }
                } else if !is_noise(&line) {
                    eprintln!("chromium: {line}");
                }
            }
        });
        let browser_ws = match rx.recv_timeout(START_TIMEOUT) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!(
                    "chromium opened no DevTools endpoint in {START_TIMEOUT:?} (exit: {status:?})"
                );
            }
        };
        let port = browser_ws
            .strip_prefix("ws://127.0.0.1:")
            .and_then(|r| r.split('/').next())
            .ok_or_else(|| anyhow!("unexpected DevTools URL {browser_ws}"))?;
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await?
            .json()
            .await?;
        let page_ws = targets
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .ok_or_else(|| anyhow!("chromium lists no page target: {targets}"))?
            .to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(&page_ws)
            .await
            .with_context(|| format!("connecting to {page_ws}"))?;
        let mut chromium = Self {
            child,
            ws,
            next_id: 1,
            _profile: profile,
            keep_events: Vec::new(),
            events: Vec::new(),
        };
        chromium.call("Runtime.enable", json!({})).await?;
        Ok(chromium)
    }

    /// Makes the pages this browser opens from now on look like a browser
    /// without WebGPU: `navigator.gpu` is removed before any page script
    /// runs (CDP `Page.addScriptToEvaluateOnNewDocument`). Chromium 156 has
    /// no flag for this: `navigator.gpu` stays defined with
    /// `--disable-features=WebGPU`, `--disable-blink-features=WebGPU`,
    /// `--disable-gpu` and without `--enable-unsafe-webgpu`. Only the page
    /// is changed; its workers still see `navigator.gpu`.
    #[allow(dead_code)] // browser_embed.rs, which shares this module, has no use for it
    pub async fn hide_webgpu(&mut self) -> anyhow::Result<()> {
        // Without Page.enable the script is not run.
        self.call("Page.enable", json!({})).await?;
        self.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": "delete Navigator.prototype.gpu;" }),
        )
        .await?;
        Ok(())
    }

    /// Sends one CDP command and returns its `result`; events that arrive
    /// meanwhile are printed (console messages, exceptions).
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.call_in(None, method, params).await
    }

    /// [`Chromium::call`] in the CDP session `session` (a target attached
    /// with `Target.setAutoAttach {flatten: true}`, e.g. a Web Worker).
    pub async fn call_in(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            request["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(request.to_string())).await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(120), self.ws.next())
                .await
                .map_err(|_| anyhow!("no answer to {method} in 120 s"))?
                .ok_or_else(|| anyhow!("chromium closed the DevTools connection"))??;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            if let Some(m) = v["method"].as_str() {
                if self.keep_events.iter().any(|k| m.starts_with(k)) {
                    self.events.push(v.clone());
                }
            }
            print_event(&v);
        }
    }

    /// Opens `url` in the page.
    pub async fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        let r = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(e) = r.get("errorText") {
            bail!("navigating to {url}: {e}");
        }
        Ok(())
    }

    /// Evaluates a JavaScript expression in the page (promises awaited) and
    /// returns its value as JSON.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` every `every` until it is neither `null` nor
    /// `undefined` nor `false`, for at most `timeout`.
    pub async fn wait_for(
        &mut self,
        expression: &str,
        every: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let start = Instant::now();
        loop {
            let v = self.eval(expression).await?;
            if !v.is_null() && v != Value::Bool(false) {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                bail!("{expression} still unset after {timeout:?}");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Closes the browser and waits for it.
    pub async fn close(mut self) {
        let _ = self.call("Browser.close", json!({})).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn print_event(v: &Value) {
    match v["method"].as_str() {
        Some("Runtime.consoleAPICalled") => {
            let args: Vec<String> = v["params"]["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| match &a["value"] {
                    Value::String(s) => s.clone(),
                    Value::Null => a["description"].as_str().unwrap_or("").to_owned(),
                    other => other.to_string(),
                })
                .collect();
            eprintln!(
                "page console.{}: {}",
                v["params"]["type"].as_str().unwrap_or("log"),
                args.join(" ")
            );
        }
        Some("Runtime.exceptionThrown") => {
            eprintln!("page exception: {}", v["params"]["exceptionDetails"]);
        }
        _ => {}
    }
}

/// Chromium's complaints about what a headless test machine lacks (no
/// D-Bus, Debian's launcher script's memory check): dozens of lines per
/// launch that would push a failing test's own message out of a CI log's
/// excerpt.
fn is_noise(line: &str) -> bool {
    line.trim().is_empty()
        || line.contains("ERROR:dbus/")
        || (line.contains("/chromium:") && line.contains("unexpected operator"))
}
