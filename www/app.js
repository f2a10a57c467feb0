// Live view of the aggregator: follows /api/events (Server-Sent Events) and
// renders the task, the status, charts of the committed rounds (uPlot,
// vendored) and their table. No data leaves the page; it only reads.

const $ = (id) => document.getElementById(id);
// A slow safety poll in case the event stream is cut by a proxy.
const POLL_MS = 15000;

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(2)} MiB`;
}

function setText(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

let task = null;

// The larger of what a participant reports and what the aggregator
// accounts for its accepted updates (a reset ledger reports less).
function spentOf(p) {
  return p.epsilon_accounted == null ? Infinity : Math.max(p.epsilon_spent, p.epsilon_accounted);
}

function renderPrivacy(list) {
  const section = $("privacy");
  if (!task || !task.privacy) {
    section.hidden = true;
    return;
  }
  section.hidden = false;
  const budget = task.privacy.epsilon;
  // This tab's own row, once it has joined (participant.js keeps its id).
  const mine = window.fedsbParticipant?.status?.participant ?? null;
  const rows = (list || []).map((p) => {
    const tr = document.createElement("tr");
    const own = mine !== null && String(p.participant) === mine;
    if (own) tr.className = "own";
    const cells = [
      (p.client || String(p.participant)) + (own ? " (this tab)" : ""),
      String(p.participant),
      p.epsilon_spent.toFixed(3),
      p.epsilon_accounted == null ? "unbounded" : p.epsilon_accounted.toFixed(3),
      `${Math.min(100, (100 * spentOf(p)) / budget).toFixed(0)} % of ε = ${budget}`,
      p.delta.toExponential(0),
      p.noise_multiplier.toFixed(3),
      p.sample_rate.toPrecision(3),
      String(p.steps),
      String(p.updates),
      String(p.last_round),
      p.connected ? "yes" : "no",
    ];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      tr.appendChild(td);
    }
    return tr;
  });
  $("privacy-rows").replaceChildren(...rows);
}

function renderTask(t) {
  task = t;
  // A federated initialization sends more than r×r matrices: say so where
  // volunteers read what leaves their tab.
  $("join-init-note").hidden = hasAdapterFile(t);
  if (lastRounds) renderRounds(lastRounds);
  setText("task-id", `${t.task_id} — ${t.total_rounds} rounds, ${t.local_steps} local steps of batch ${t.batch_size}`);
  setText("task-model", `${t.model_id}${t.model_sha256 ? ` (sha256 ${t.model_sha256.slice(0, 12)}…)` : ""}`);
  const s = t.shape;
  const floats = s.modules * s.rank * s.rank + s.head_classes * (s.head_hidden + 1);
  setText("task-adapter", `LoRA-SB rank ${s.rank} on ${s.modules} modules + head ${s.head_classes}×${s.head_hidden}: ${floats.toLocaleString()} floats (${bytes(floats * 4)}) per update`);
  setText("task-privacy", t.privacy ? `DP-SGD, ε = ${t.privacy.epsilon}, δ = ${t.privacy.delta}, clip ${t.privacy.clip_norm}` : "off");
}

function renderStatus(s) {
  setText("state", s.state);
  let round;
  if (s.state === "initializing") round = "federated LoRA-SB initialization (before round 1): participants send their gradients";
  else if (s.state === "centring") round = "centring the initial head (before round 1): participants send their mean logits";
  else if (s.round == null) round = `finished after ${s.last_committed_round}`;
  else round = `${s.round} of ${s.total_rounds}`;
  setText("round", round);
  setText("connected", String(s.participants_connected));
  setText("updates", `${s.updates_in_round} (quorum ${s.min_participants}, at most ${s.max_participants})`);
  setText("deadline", s.deadline_unix_ms ? new Date(s.deadline_unix_ms).toLocaleTimeString() : "—");
}

function fmt(x, digits) {
  return x == null ? "—" : x.toFixed(digits);
}

// The recall of each class from an evaluation's confusion matrix
// (confusion[label][predicted]): the share of the eval rows of that class
// the model gets right, e.g. "negative 84 % · positive 79 %". A model that
// leans towards one class shows it here when its accuracy looks fine.
function recallText(confusion) {
  if (!confusion) return "—";
  return confusion
    .map((row, k) => {
      const name = task && task.labels[k] != null ? task.labels[k] : String(k);
      const n = row.reduce((a, b) => a + b, 0);
      return n > 0 ? `${name} ${Math.round((100 * row[k]) / n)} %` : `${name} —`;
    })
    .join(" · ");
}

// Whether the task serves A and B, so that its rounds' models can be
// downloaded (/api/rounds/{n}/adapter); a federated initialization adds the
// file after the page loaded the task, so it is looked up again once.
function hasAdapterFile(t) {
  return t.files.some((f) => f.name === "adapter.safetensors");
}
let taskLookedUpAgain = false;
let lastRounds = null; // the rounds rendered last, rendered again with the task
let evalEnabled = null; // whether the aggregator evaluates rounds (/api/eval)
// An error that stays shown until it is mended (the task could not be
// loaded): a status that arrives does not clear it.
let standingError = "";

function renderRounds(rounds) {
  const body = $("rounds");
  if (task && !hasAdapterFile(task) && rounds.length > 0 && !taskLookedUpAgain) {
    taskLookedUpAgain = true;
    getJson("/api/task").then(renderTask).catch(() => {});
  }
  lastRounds = rounds;
  const downloads = task && hasAdapterFile(task);
  const rows = rounds.slice().reverse().map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.round = String(r.round);
    // Not evaluated yet ("…"), or never: the task has no eval set ("—").
    const none = evalEnabled === false ? "—" : "…";
    const cells = [
      r.round === 0 ? "0 (initial)" : String(r.round),
      r.eval ? `${(100 * r.eval.accuracy).toFixed(1)} %` : none,
      r.eval ? fmt(r.eval.loss, 4) : none,
      r.eval ? recallText(r.eval.confusion) : none,
      String(r.participants),
      String(r.total_samples),
      fmt(r.mean_train_loss, 4),
      r.learning_rate != null ? Number(r.learning_rate).toPrecision(3) : "—",
      bytes(r.bytes_in),
      bytes(r.bytes_out),
      `${(r.duration_ms / 1000).toFixed(1)} s`,
      new Date(r.committed_unix_ms).toLocaleTimeString(),
    ];
    for (const [i, c] of cells.entries()) {
      const td = document.createElement("td");
      td.textContent = c;
      if (i === 3) td.className = "recall";
      tr.appendChild(td);
    }
    // The round's model: A, B, this round's R's and head (fedsb export's file).
    const model = document.createElement("td");
    if (downloads) {
      const a = document.createElement("a");
      a.href = `/api/rounds/${r.round}/adapter`;
      a.download = `${task.task_id}-round-${r.round}.safetensors`;
      a.textContent = "safetensors";
      a.setAttribute("aria-describedby", "model-note");
      model.appendChild(a);
    } else {
      model.textContent = "—";
    }
    tr.appendChild(model);
    return tr;
  });
  body.replaceChildren(...rows);
  renderCharts(rounds);
}

// ---- charts (uPlot) ----
const charts = {};

function chartWidth(el) {
  return Math.max(280, Math.floor(el.getBoundingClientRect().width || 320));
}

function makeChart(id, series, yRange) {
  const el = $(id);
  const opts = {
    width: chartWidth(el),
    height: 180,
    scales: { x: { time: false }, y: yRange ? { range: yRange } : {} },
    axes: [{ label: "round" }, {}],
    series: [{ label: "round" }, ...series],
  };
  const empty = [[], ...series.map(() => [])];
  return new uPlot(opts, empty, el);
}

function renderCharts(rounds) {
  if (typeof uPlot === "undefined") {
    $("charts-missing").hidden = false;
    return;
  }
  if (!charts.accuracy) {
    charts.accuracy = makeChart("chart-accuracy", [{ label: "accuracy %", stroke: "#1f6feb", points: { show: true } }], [0, 100]);
    charts.loss = makeChart("chart-loss", [
      { label: "eval loss", stroke: "#d1242f", points: { show: true } },
      { label: "mean train loss", stroke: "#8c959f", dash: [4, 4] },
    ]);
    charts.participants = makeChart("chart-participants", [{ label: "participants", stroke: "#1a7f37", points: { show: true } }]);
    charts.bytes = makeChart("chart-bytes", [{ label: "KiB received", stroke: "#8250df", points: { show: true } }]);
    charts.duration = makeChart("chart-duration", [{ label: "seconds", stroke: "#bf8700", points: { show: true } }]);
  }
  const x = rounds.map((r) => r.round);
  const committed = rounds.filter((r) => r.round > 0);
  const cx = committed.map((r) => r.round);
  charts.accuracy.setData([x, rounds.map((r) => (r.eval ? 100 * r.eval.accuracy : null))]);
  charts.loss.setData([x, rounds.map((r) => (r.eval ? r.eval.loss : null)), rounds.map((r) => r.mean_train_loss)]);
  charts.participants.setData([cx, committed.map((r) => r.participants)]);
  charts.bytes.setData([cx, committed.map((r) => r.bytes_in / 1024)]);
  charts.duration.setData([cx, committed.map((r) => r.duration_ms / 1000)]);
}

window.addEventListener("resize", () => {
  for (const [name, chart] of Object.entries(charts)) {
    chart.setSize({ width: chartWidth($(`chart-${name}`)), height: 180 });
  }
});

// Written only when it changes: the line is an alert, which a screen
// reader would announce again on every status event.
function showError(message) {
  if ($("error").textContent !== (message || "")) $("error").textContent = message || "";
  $("error").hidden = !message;
}

let lastCommitted = -1;
let roundsInFlight = null;

async function refreshRounds() {
  if (roundsInFlight) return roundsInFlight;
  roundsInFlight = getJson("/api/rounds")
    .then(renderRounds)
    .catch((e) => showError(`Cannot load the rounds: ${e.message}`))
    .finally(() => { roundsInFlight = null; });
  return roundsInFlight;
}

function onStatus(s) {
  renderStatus(s);
  renderPrivacy(s.privacy);
  showError(standingError);
  if (s.last_committed_round !== lastCommitted) {
    lastCommitted = s.last_committed_round;
    refreshRounds();
  }
}

function follow() {
  const events = new EventSource("/api/events");
  events.addEventListener("status", (e) => onStatus(JSON.parse(e.data)));
  events.addEventListener("eval", () => refreshRounds());
  events.onerror = () => showError("Lost the live connection to the aggregator; reconnecting…");
}

async function poll() {
  try {
    onStatus(await getJson("/api/status"));
    await refreshRounds();
  } catch (e) {
    showError(`Cannot reach the aggregator: ${e.message}`);
  }
  setTimeout(poll, POLL_MS);
}

// The task, tried again (2 s, doubling up to 30 s) until it loads: the
// page names its model, classes and downloads from it.
function loadTask(pause = 2000) {
  getJson("/api/task")
    .then((t) => {
      standingError = "";
      showError("");
      renderTask(t);
    })
    .catch((e) => {
      standingError = `Cannot load the task: ${e.message}; trying again`;
      showError(standingError);
      setTimeout(() => loadTask(Math.min(2 * pause, 30000)), pause);
    });
}
loadTask();
getJson("/api/eval")
  .then((e) => {
    evalEnabled = Boolean(e.enabled);
    if (lastRounds) renderRounds(lastRounds);
    $("eval-info").textContent = e.enabled
      ? `Each committed global model is evaluated by the aggregator on ${e.samples} held-out examples (${e.adapter}).`
      : "The aggregator has no evaluation set ([eval] file in the task config), so only training figures are shown.";
  })
  .catch(() => {});
follow();
poll();
