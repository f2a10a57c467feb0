// Test page of the engine in the browser: the model files come from the
// aggregator serving this page, the work runs in ../engine-worker.js.
//
// window.fedsbEmbed([{text, text_pair}], maxLength, repeat = 1) starts a run
// and returns at once; window.__fedsbResult then becomes
//   {ok: true, adapter, hiddenSize, embeddings: [n × hiddenSize], fetchMs,
//    createMs, embedMs: [ms of each of the `repeat` calls]}
// (embeddings of the first call; the first call also compiles the pipelines)
// or {ok: false, error}. Progress goes to the console and the page.

const logEl = document.getElementById("log");
function log(line) {
  console.log(line);
  logEl.textContent += line + "\n";
}

const worker = new Worker(new URL("../engine-worker.js", import.meta.url), { type: "module" });
let nextId = 1;
const pending = new Map();
worker.onmessage = (event) => {
  const msg = event.data;
  if (msg.type === "log") {
    log(`worker: ${msg.message}`);
    return;
  }
  const p = pending.get(msg.id);
  pending.delete(msg.id);
  if (msg.ok) p.resolve(msg);
  else p.reject(new Error(msg.error));
};
worker.onerror = (event) => {
  const error = new Error(`worker failed: ${event.message || "could not start (module import?)"}`);
  for (const p of pending.values()) p.reject(error);
  pending.clear();
  window.__fedsbResult = { ok: false, error: error.message };
};

function call(type, body) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, type, ...body });
  });
}

async function modelFiles() {
  const r = await fetch("/api/task", { cache: "no-store" });
  if (!r.ok) throw new Error(`/api/task: HTTP ${r.status}`);
  const task = await r.json();
  const url = (name) => {
    const f = task.files.find((f) => f.name === name);
    if (!f) throw new Error(`the task serves no ${name}`);
    return f.url;
  };
  return { config: url("config.json"), model: url("model.safetensors"), tokenizer: url("tokenizer.json") };
}

async function run(inputs, maxLength, repeat) {
  const loaded = await call("load", { files: await modelFiles(), maxLength });
  log(`adapter: ${loaded.adapter}`);
  const texts = inputs.map((i) => i.text);
  const pairs = inputs.map((i) => i.text_pair ?? null);
  const first = await call("embed", { texts, pairs });
  const embedMs = [first.embedMs];
  while (embedMs.length < repeat) embedMs.push((await call("embed", { texts, pairs })).embedMs);
  log(`${inputs.length} inputs embedded in ${embedMs.map((t) => t.toFixed(0)).join(", ")} ms`);
  return {
    ok: true,
    adapter: loaded.adapter,
    hiddenSize: loaded.hiddenSize,
    fetchMs: loaded.fetchMs,
    createMs: loaded.createMs,
    embedMs,
    embeddings: Array.from(first.embeddings),
  };
}

window.__fedsbResult = null;
window.fedsbEmbed = (inputs, maxLength, repeat = 1) => {
  window.__fedsbResult = null;
  run(inputs, maxLength, repeat).then(
    (result) => { window.__fedsbResult = result; },
    (e) => {
      log(`error: ${e.message}`);
      window.__fedsbResult = { ok: false, error: e.message };
    },
  );
  return true;
};
window.__fedsbReady = true;
