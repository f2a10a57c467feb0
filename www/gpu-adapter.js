// How the page names a WebGPU adapter, shared by the workers: wgpu reads
// only GPUAdapterInfo.description, which browsers usually leave empty, so
// the name is the browser's own info (vendor, architecture, device,
// description; "" when it gives none), and `fallback` says whether the
// adapter is a software fallback (such as SwiftShader): WebGPU on the CPU.
export function gpuAdapterInfo(adapter) {
  const i = adapter.info ?? {};
  return {
    name: [i.vendor, i.architecture, i.device, i.description].filter(Boolean).join(" "),
    fallback: Boolean(i.isFallbackAdapter ?? adapter.isFallbackAdapter),
  };
}
