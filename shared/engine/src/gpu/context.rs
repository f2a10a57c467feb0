//! Device set-up, buffers, asynchronous read-back and the pipeline cache.
//!
//! [`GpuContext`] owns the wgpu instance, adapter, device and queue. Every kernel
//! launcher takes a `&GpuContext` and records into a caller-owned
//! [`wgpu::CommandEncoder`], so a whole forward/backward pass can be submitted at
//! once. Compute pipelines are compiled on first use and cached by kernel id
//! ([`GpuContext::pipeline`]), so repeated launches only create a bind group and a
//! small uniform buffer.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

use wgpu::util::DeviceExt;

use super::GpuError;

/// Texels of padding at the end of each row of a matmul operand texture
/// ([`GpuContext::copy_to_texture`]): 4 rgba32float texels, one 64-byte
/// cache line.
const TEXTURE_ROW_PAD: u32 = 4;

/// A storage buffer of `f32` or `u32` elements with its element count.
///
/// The wgpu buffer is at least 4 bytes long even when `len == 0`, because
/// zero-sized bindings are not allowed.
#[derive(Debug, Clone)]
pub struct GpuBuffer {
    /// The underlying storage buffer (usage STORAGE | COPY_SRC | COPY_DST).
    pub buffer: wgpu::Buffer,
    /// Number of 4-byte elements.
    pub len: usize,
}

impl GpuBuffer {
    /// The whole buffer as a bind-group resource.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        self.buffer.as_entire_binding()
    }
}

/// Options for [`GpuContext::new`].
#[derive(Debug, Clone, Default)]
pub struct GpuOptions<'a> {
    /// Pick the first adapter whose name contains this substring
    /// (case-insensitive). Natively all adapters are enumerated; in the browser
    /// the single WebGPU adapter must match. `None` takes the default adapter
    /// (high performance preference).
    pub adapter: Option<&'a str>,
}

/// One compute pipeline with its first bind-group layout.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    /// The cache id ([`GpuContext::pipeline`]): names the kernel in profiles.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub(crate) id: std::sync::Arc<str>,
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) layout: wgpu::BindGroupLayout,
}

/// How the row-wise kernels (LayerNorm, the attention softmax) spread a row
/// over invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLayout {
    /// One workgroup of 64 invocations per row, sums reduced through
    /// workgroup memory: for GPUs.
    Workgroup,
    /// One invocation per row, no workgroup memory and no barriers: for CPU
    /// adapters (lavapipe's barriers are coroutine switches and its
    /// workgroup-memory accesses per-lane loops; 8 lanes do 8 rows at once).
    Invocation,
}

impl RowLayout {
    /// `Invocation` on CPU adapters, `Workgroup` elsewhere. Natively,
    /// `FEDSB_ROW_LAYOUT=workgroup` or `=invocation` overrides it (for A/B
    /// measurements such as `bench_encoder`).
    pub fn for_device(ctx: &GpuContext) -> Self {
        static FORCED: std::sync::OnceLock<Option<RowLayout>> = std::sync::OnceLock::new();
        let forced = *FORCED.get_or_init(|| {
            match std::env::var("FEDSB_ROW_LAYOUT")
                .ok()?
                .to_lowercase()
                .as_str()
            {
                "workgroup" => Some(RowLayout::Workgroup),
                "invocation" => Some(RowLayout::Invocation),
                other => {
                    tracing::warn!(
                        "FEDSB_ROW_LAYOUT={other:?} is neither workgroup nor invocation; ignored"
                    );
                    None
                }
            }
        });
        forced.unwrap_or(if ctx.adapter_info().device_type == wgpu::DeviceType::Cpu {
            Self::Invocation
        } else {
            Self::Workgroup
        })
    }

    /// The entry point `base` of this layout (`base` or `base_rows`) and its
    /// workgroup counts for `rows` rows.
    pub(crate) fn launch(self, base: &str, rows: usize) -> (String, [u32; 3]) {
        match self {
            Self::Workgroup => (base.to_owned(), groups_1d(rows, 1)),
            Self::Invocation => (format!("{base}_rows"), groups_1d(rows, 8)),
        }
    }
}

/// Time spent in one kernel at one launch size, summed over its launches
/// while profiling was on ([`GpuContext::set_profiling`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// The kernel's id, e.g. `"matmul-subgroup/ta0/tb1"` or `"layernorm/forward"`.
    pub kernel: String,
    /// The workgroup counts of these launches (which tell the launch sizes
    /// of one kernel apart, e.g. a matmul's shapes).
    pub workgroups: [u32; 3],
    /// Number of launches.
    pub launches: u64,
    /// Wall-clock seconds from submission to completion, summed.
    pub seconds: f64,
}

/// The wgpu device and everything the kernels share.
pub struct GpuContext {
    /// The wgpu instance the adapter came from.
    pub instance: wgpu::Instance,
    /// The adapter in use.
    pub adapter: wgpu::Adapter,
    /// The logical device.
    pub device: wgpu::Device,
    /// The device's queue.
    pub queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    subgroups: bool,
    kernels: Mutex<HashMap<String, Kernel>>,
    /// Scratch textures of the texture matmul ([`Self::copy_to_texture`]),
    /// by (slot, width in texels).
    textures: Mutex<HashMap<(u8, u32), (wgpu::Texture, wgpu::TextureView)>>,
    /// Per-kernel times while profiling is on ([`Self::set_profiling`]).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    profile: Mutex<Option<Vec<KernelTime>>>,
    /// 4-byte placeholder bound where a kernel's optional input is absent.
    pub(crate) dummy: GpuBuffer,
    /// Another, for an unused binding that a kernel may write.
    pub(crate) dummy_rw: GpuBuffer,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish_non_exhaustive()
    }
}

/// Names of all adapters wgpu can see natively (for `--adapter` help texts).
#[cfg(not(target_arch = "wasm32"))]
pub async fn adapter_names() -> Vec<String> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    instance
        .enumerate_adapters(wgpu::Backends::all())
        .await
        .iter()
        .map(|a| {
            let info = a.get_info();
            format!("{} ({:?})", info.name, info.backend)
        })
        .collect()
}

impl GpuContext {
    /// Creates instance, adapter and device.
    ///
    /// Limits: starts from the WebGPU defaults (or the downlevel defaults when the
    /// adapter cannot meet them) and raises the three limits the kernels need
    /// (`max_storage_buffer_binding_size`, `max_buffer_size`,
    /// `max_compute_workgroup_storage_size`) to what the adapter supports.
    ///
    /// Features: `wgpu::Features::SUBGROUP` when the adapter offers it (lavapipe
    /// and most native drivers; [`Self::has_subgroups`]), nothing otherwise. In
    /// the browser wgpu 30 does not yet pass WebGPU's `"subgroups"` feature
    /// through (its WebGPU backend maps only the core optional features), so
    /// there the device has no subgroups and kernels needing them fall back.
    pub async fn new(options: &GpuOptions<'_>) -> Result<Self, GpuError> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = Self::pick_adapter(&instance, options.adapter).await?;
        let info = adapter.get_info();
        let supported = adapter.limits();
        let mut limits = if wgpu::Limits::default().check_limits(&supported) {
            wgpu::Limits::default()
        } else {
            wgpu::Limits::downlevel_defaults()
        };
        limits.max_storage_buffer_binding_size = supported.max_storage_buffer_binding_size;
        limits.max_buffer_size = supported.max_buffer_size;
        limits.max_compute_workgroup_storage_size = supported.max_compute_workgroup_storage_size;
        let features = adapter.features() & wgpu::Features::SUBGROUP;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("fedsb-engine"),
                required_features: features,
                required_limits: limits,
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::Device(e.to_string()))?;
        let placeholder = |label| GpuBuffer {
            buffer: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 4,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }),
            len: 1,
        };
        let dummy = placeholder("dummy");
        // A second one for bindings that may be written: a buffer bound
        // read-only and read-write in one dispatch is a usage conflict.
        let dummy_rw = placeholder("dummy (read-write)");
        let subgroups = device.features().contains(wgpu::Features::SUBGROUP);
        tracing::info!(
            adapter = %info.name,
            backend = ?info.backend,
            subgroups,
            subgroup_sizes = ?(info.subgroup_min_size, info.subgroup_max_size),
            "gpu device ready"
        );
        Ok(Self {
            instance,
            adapter,
            device,
            queue,
            info,
            subgroups,
            kernels: Mutex::new(HashMap::new()),
            textures: Mutex::new(HashMap::new()),
            profile: Mutex::new(None),
            dummy,
            dummy_rw,
        })
    }

    async fn pick_adapter(
        instance: &wgpu::Instance,
        name: Option<&str>,
    ) -> Result<wgpu::Adapter, GpuError> {
        let matches = |a: &wgpu::Adapter, n: &str| {
            a.get_info().name.to_lowercase().contains(&n.to_lowercase())
        };
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(n) = name {
            let all = instance.enumerate_adapters(wgpu::Backends::all()).await;
            let seen: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
            return all.into_iter().find(|a| matches(a, n)).ok_or_else(|| {
                GpuError::NoAdapter(format!("no adapter matches {n:?}; seen {seen:?}"))
            });
        }
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
        if let Some(n) = name {
            if !matches(&adapter, n) {
                return Err(GpuError::NoAdapter(format!(
                    "adapter {:?} does not match {n:?}",
                    adapter.get_info().name
                )));
            }
        }
        Ok(adapter)
    }

    /// The adapter's name, e.g. `"llvmpipe (LLVM 15.0.6, 256 bits)"`.
    pub fn adapter_name(&self) -> &str {
        &self.info.name
    }

    /// Full adapter information.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Whether the device has `wgpu::Features::SUBGROUP`, i.e. kernels may use
    /// subgroup built-ins (`subgroupBroadcast`, ...).
    pub fn has_subgroups(&self) -> bool {
        self.subgroups
    }

    /// The adapter's subgroup size range `[min, max]` (lanes); a kernel that
    /// relies on one subgroup size may run only where `min == max` equals it.
    /// Meaningful only with [`Self::has_subgroups`].
    pub fn subgroup_sizes(&self) -> [u32; 2] {
        [self.info.subgroup_min_size, self.info.subgroup_max_size]
    }

    /// The largest storage buffer, in bytes, that the kernels can bind whole:
    /// the smaller of the device's `max_storage_buffer_binding_size` and
    /// `max_buffer_size` (128 MiB on lavapipe and by default in browsers).
    pub fn max_buffer_bytes(&self) -> u64 {
        let limits = self.device.limits();
        limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
    }

    fn storage(&self, label: &str, bytes: &[u8], len: usize) -> GpuBuffer {
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let buffer = if bytes.is_empty() {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 4,
                usage,
                mapped_at_creation: false,
            })
        } else {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytes,
                    usage,
                })
        };
        GpuBuffer { buffer, len }
    }

    /// A storage buffer holding `data`.
    pub fn buffer_f32(&self, label: &str, data: &[f32]) -> GpuBuffer {
        self.storage(label, bytemuck::cast_slice(data), data.len())
    }

    /// A storage buffer holding `data`.
    pub fn buffer_u32(&self, label: &str, data: &[u32]) -> GpuBuffer {
        self.storage(label, bytemuck::cast_slice(data), data.len())
    }

    /// A zero-filled storage buffer of `len` 4-byte elements.
    pub fn buffer_zeros(&self, label: &str, len: usize) -> GpuBuffer {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (len.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        GpuBuffer { buffer, len }
    }

    /// Overwrites the start of `buffer` with `data` (queued; happens before the next submit).
    pub fn write_f32(&self, buffer: &GpuBuffer, data: &[f32]) -> Result<(), GpuError> {
        if data.len() > buffer.len {
            return Err(GpuError::Shape(format!(
                "write of {} elements into a buffer of {}",
                data.len(),
                buffer.len
            )));
        }
        if !data.is_empty() {
            self.queue
                .write_buffer(&buffer.buffer, 0, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    /// A uniform buffer from 4-byte words (kernel parameters).
    pub(crate) fn uniform(&self, words: &[u32]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::cast_slice(words),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    /// A new command encoder.
    pub fn encoder(&self) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("fedsb"),
            })
    }

    /// Submits the encoder's commands.
    pub fn submit(&self, encoder: wgpu::CommandEncoder) -> wgpu::SubmissionIndex {
        self.queue.submit(Some(encoder.finish()))
    }

    /// Blocks (natively) until all submitted work is done. A no-op in the browser.
    pub fn wait_idle(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| GpuError::Device(e.to_string()))
    }

    /// Copies `buffer` back to the CPU.
    ///
    /// Asynchronous because the browser cannot block: the map callback sends on a
    /// oneshot channel. Natively the device is polled to completion first, so
    /// `pollster::block_on(ctx.read_f32(&b))` works; in the browser the callback
    /// fires from the event loop.
    pub async fn read_f32(&self, buffer: &GpuBuffer) -> Result<Vec<f32>, GpuError> {
        let words = self.read_words(buffer).await?;
        Ok(words.into_iter().map(f32::from_bits).collect())
    }

    /// Like [`Self::read_f32`] for `u32` buffers.
    pub async fn read_u32(&self, buffer: &GpuBuffer) -> Result<Vec<u32>, GpuError> {
        self.read_words(buffer).await
    }

    async fn read_words(&self, buffer: &GpuBuffer) -> Result<Vec<u32>, GpuError> {
        if buffer.len == 0 {
            return Ok(Vec::new());
        }
        let size = (buffer.len * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.encoder();
        encoder.copy_buffer_to_buffer(&buffer.buffer, 0, &staging, 0, size);
        self.submit(encoder);
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            // The receiver only disappears if the future was dropped; nothing to report then.
            let _ = tx.send(result);
        });
        self.wait_idle()?;
        rx.await
            .map_err(|_| GpuError::Map("map callback dropped".into()))?
            .map_err(|e| GpuError::Map(e.to_string()))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| GpuError::Map(e.to_string()))?;
        // Copies, so it does not rely on the mapping's alignment.
        let words = bytemuck::pod_collect_to_vec::<u8, u32>(&view);
        drop(view);
        staging.unmap();
        Ok(words)
    }

    /// Records a copy of the stored matrix `rows × 4·width` floats of `buf`
    /// (starting at element `offset`, row stride `ld` elements) into an
    /// rgba32float scratch texture `width` texels wide (one texel = 4
    /// consecutive floats of a row) and returns a view of it, for kernels that
    /// read an operand with `textureLoad` from a read-only storage texture
    /// (the texture matmul, `matmul.rs`).
    ///
    /// One texture per (`slot`, `width`) is kept and reused: it grows (to the
    /// next multiple of 256 rows) when `rows` exceeds its height, so its rows
    /// past `rows` may hold older data, which the kernels never read. Its
    /// rows are [`TEXTURE_ROW_PAD`] texels wider than `width` (where the
    /// device allows), padding the kernels never read either. Reuse within
    /// one encoder is safe: WebGPU orders a copy after every earlier pass of
    /// the same encoder that reads the texture.
    ///
    /// The caller checks what the copy needs: `offset` a multiple of 4,
    /// `ld · 4` bytes a multiple of 256 (`wgpu::COPY_BYTES_PER_ROW_ALIGNMENT`),
    /// `width` and `rows` within `max_texture_dimension_2d`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy_to_texture(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        slot: u8,
        buf: &GpuBuffer,
        offset: usize,
        ld: usize,
        width: u32,
        rows: u32,
    ) -> wgpu::TextureView {
        let mut cache = self.textures.lock().unwrap_or_else(|p| p.into_inner());
        let stale = cache
            .get(&(slot, width))
            .is_none_or(|(t, _)| t.height() < rows);
        if stale {
            let max = self.device.limits().max_texture_dimension_2d;
            let height = rows.div_ceil(256).saturating_mul(256).min(max).max(rows);
            // One 64-byte cache line of padding per row, never read: llvmpipe
            // lays a texture out linearly, and with rows of 4 KiB (K = 1,024)
            // the 32 rows a tile reads at once fall into one set of an 8-way
            // L1 cache and evict each other. Padded, 1,024³ `A·Bᵀ` runs at
            // 79–82 GFLOP/s instead of 48–50 (BENCHMARKS.md, machine D).
            let texture = self.device.create_texture(&wgpu::TextureDescriptor {
                label: Some("matmul operand"),
                size: wgpu::Extent3d {
                    width: (width + TEXTURE_ROW_PAD).min(max),
                    height,
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: wgpu::TextureFormat::Rgba32Float,
                usage: wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            });
            let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
            cache.insert((slot, width), (texture, view));
        }
        let (texture, view) = &cache[&(slot, width)];
        encoder.copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer: &buf.buffer,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: (offset * 4) as u64,
                    bytes_per_row: Some((ld * 4) as u32),
                    rows_per_image: Some(rows),
                },
            },
            wgpu::TexelCopyTextureInfo {
                texture,
                mip_level: 0,
                origin: wgpu::Origin3d::ZERO,
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::Extent3d {
                width,
                height: rows,
                depth_or_array_layers: 1,
            },
        );
        view.clone()
    }

    /// The compute pipeline `entry` of `source`, specialised with the override
    /// `constants`, compiled once and cached under `id` (which must identify
    /// source, entry point and constants).
    pub(crate) fn pipeline(
        &self,
        id: &str,
        source: &'static str,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Kernel {
        let mut cache = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(id) {
            return k.clone();
        }
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(id),
                source: wgpu::ShaderSource::Wgsl(Cow::Borrowed(source)),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(id),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    // Every kernel writes its workgroup memory before reading it.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        let layout = pipeline.get_bind_group_layout(0);
        let kernel = Kernel {
            id: id.into(),
            pipeline,
            layout,
        };
        cache.insert(id.to_string(), kernel.clone());
        kernel
    }

    /// Records one dispatch of `kernel` with `resources` bound in order at
    /// bindings 0, 1, 2, ... of group 0.
    pub(crate) fn dispatch(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: &Kernel,
        resources: &[wgpu::BindingResource<'_>],
        workgroups: [u32; 3],
    ) {
        let numbered: Vec<(u32, wgpu::BindingResource<'_>)> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u32, r.clone()))
            .collect();
        self.dispatch_at(encoder, kernel, &numbered, workgroups);
    }

    /// Like [`Self::dispatch`] with explicit binding numbers, for entry points
    /// that use only some of their file's bindings.
    pub(crate) fn dispatch_at(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: &Kernel,
        resources: &[(u32, wgpu::BindingResource<'_>)],
        workgroups: [u32; 3],
    ) {
        if workgroups.contains(&0) {
            return;
        }
        let entries: Vec<wgpu::BindGroupEntry<'_>> = resources
            .iter()
            .map(|(i, r)| wgpu::BindGroupEntry {
                binding: *i,
                resource: r.clone(),
            })
            .collect();
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &kernel.layout,
            entries: &entries,
        });
        #[cfg(not(target_arch = "wasm32"))]
        let profiling = self.lock_profile().is_some();
        #[cfg(not(target_arch = "wasm32"))]
        if profiling {
            // Run everything recorded so far, so that the clock below times
            // this launch alone.
            self.flush(encoder);
        }
        #[cfg(not(target_arch = "wasm32"))]
        let started = std::time::Instant::now();
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        #[cfg(not(target_arch = "wasm32"))]
        if profiling {
            self.flush(encoder);
            let seconds = started.elapsed().as_secs_f64();
            if let Some(times) = self.lock_profile().as_mut() {
                match times
                    .iter_mut()
                    .find(|t| *t.kernel == *kernel.id && t.workgroups == workgroups)
                {
                    Some(t) => {
                        t.launches += 1;
                        t.seconds += seconds;
                    }
                    None => times.push(KernelTime {
                        kernel: kernel.id.to_string(),
                        workgroups,
                        launches: 1,
                        seconds,
                    }),
                }
            }
        }
    }

    /// Turns kernel profiling on (clearing earlier times) or off. While it is
    /// on, every launch is submitted on its own and waited for, so its
    /// wall-clock time is measured alone: the pass runs slower, and the
    /// times are for finding where a pass spends its time, not for
    /// throughput. Natively only (the browser cannot wait for the GPU).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn set_profiling(&self, on: bool) {
        *self.lock_profile() = on.then(Vec::new);
    }

    /// The kernel times gathered since profiling was turned on, most time
    /// first; empty when it is off.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn kernel_times(&self) -> Vec<KernelTime> {
        let mut times = self.lock_profile().clone().unwrap_or_default();
        times.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        times
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn lock_profile(&self) -> std::sync::MutexGuard<'_, Option<Vec<KernelTime>>> {
        self.profile.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Submits what `encoder` holds, waits for it, and leaves a fresh encoder
    /// in its place (later commands keep their order).
    #[cfg(not(target_arch = "wasm32"))]
    fn flush(&self, encoder: &mut wgpu::CommandEncoder) {
        let done = std::mem::replace(encoder, self.encoder());
        self.queue.submit(Some(done.finish()));
        // A lost device shows up again at the caller's next read-back.
        let _ = self.wait_idle();
    }
}

/// Workgroup counts covering `n` items with `per_group` items each, spread over x
/// and y when more than 65 535 groups are needed. Kernels recover the linear
/// group index as `wid.x + wid.y * nwg.x`.
pub(crate) fn groups_1d(n: usize, per_group: usize) -> [u32; 3] {
    let groups = n.div_ceil(per_group).max(1);
    if groups <= 65_535 {
        [groups as u32, 1, 1]
    } else {
        let y = groups.div_ceil(65_535);
        [65_535, y as u32, 1]
    }
}
