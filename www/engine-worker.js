// The engine's Web Worker: owns one WasmEngine (fedsb-wasm-client on WebGPU)
// so that loading the model and running GPU passes never freeze the page.
//
// Messages in (each with an `id` echoed in the answer):
//   {id, type: "load", files: {config, model, tokenizer} (URLs), maxLength}
//   {id, type: "embed", texts: [string], pairs: [string|null] | undefined}
// Answers: {id, ok: true, ...result} or {id, ok: false, error: string}.
// Progress lines: {type: "log", message}.
//
// Needs the bundle of `cargo xtask build-wasm` in /pkg/.

import init, { WasmEngine } from "./pkg/fedsb_wasm_client.js";
import { gpuAdapterInfo } from "./gpu-adapter.js";

let engine = null;

function log(message) {
  postMessage({ type: "log", message });
}

async function fetchBytes(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`GET ${url}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

async function load({ files, maxLength }) {
  const t0 = performance.now();
  await init();
  if (!("gpu" in navigator)) {
    throw new Error("this browser exposes no WebGPU (navigator.gpu) to workers");
  }
  // The adapter wgpu will get (same request); its info names it, which
  // wgpu cannot (browsers leave `description` empty).
  const gpuAdapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!gpuAdapter) throw new Error("navigator.gpu.requestAdapter() found no WebGPU adapter");
  const adapter = gpuAdapterInfo(gpuAdapter).name || "unnamed";
  const [config, model, tokenizer] = await Promise.all(
    [files.config, files.model, files.tokenizer].map(fetchBytes),
  );
  const t1 = performance.now();
  log(`fetched ${(model.length / 1048576).toFixed(1)} MiB of weights in ${(t1 - t0).toFixed(0)} ms`);
  if (engine) engine.free();
  engine = await WasmEngine.create(config, model, tokenizer, maxLength);
  const t2 = performance.now();
  log(`engine ready on ${adapter} (wgpu: ${engine.adapterName()}) in ${(t2 - t1).toFixed(0)} ms`);
  return {
    adapter: `${adapter} (wgpu: ${engine.adapterName()})`,
    hiddenSize: engine.hiddenSize,
    maxLength: engine.maxLength,
    fetchMs: t1 - t0,
    createMs: t2 - t1,
  };
}

async function embed({ texts, pairs }) {
  if (!engine) throw new Error("no engine: send a load message first");
  const t0 = performance.now();
  const embeddings = await engine.embed(texts, pairs);
  return { embeddings, embedMs: performance.now() - t0 };
}

const handlers = { load, embed };

onmessage = async (event) => {
  const { id, type } = event.data;
  try {
    const handler = handlers[type];
    if (!handler) throw new Error(`unknown message type ${JSON.stringify(type)}`);
    const result = await handler(event.data);
    const transfer = result.embeddings ? [result.embeddings.buffer] : [];
    postMessage({ id, ok: true, ...result }, transfer);
  } catch (e) {
    postMessage({ id, ok: false, error: String(e && e.message ? e.message : e) });
  }
};
