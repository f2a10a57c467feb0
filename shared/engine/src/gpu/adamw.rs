//! AdamW step on a flat parameter buffer (`adamw.wgsl`), as `torch.optim.AdamW`.
//!
//! Test: `cargo test -p fedsb-engine --test gpu_kernels adamw`.

use super::context::{groups_1d, GpuBuffer, GpuContext};
use super::GpuError;

const SOURCE: &str = include_str!("adamw.wgsl");

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// The classification head trains at `lr · head_lr_scale` (1: at `lr`).
    /// A ratio rather than a second rate, so that a per-round schedule that
    /// sets `lr` moves both rates together. Which elements are the head is
    /// the caller's `split` in [`adamw_step`].
    pub head_lr_scale: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// Decoupled weight decay (fedsb default 0.01).
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            head_lr_scale: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW's state between steps: both moments, in the layout of the
/// parameters they belong to, and the number of steps taken (which sets the
/// bias corrections of the next step).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    /// First moments.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Steps taken with these moments.
    pub steps: u32,
}

impl AdamW {
    /// The head's learning rate, `lr · head_lr_scale`.
    pub fn head_lr(&self) -> f32 {
        self.lr * self.head_lr_scale
    }
}

/// One AdamW step number `step` (1-based) on `n` parameters; updates `param`,
/// `m` and `v` in place. Elements `split..n` (the head, when the parameters
/// end with it) step at [`AdamW::head_lr`], the others at `lr`; `split = n`
/// steps all at `lr`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    opt: &AdamW,
    step: u32,
    n: usize,
    split: usize,
    grad: &GpuBuffer,
    param: &GpuBuffer,
    m: &GpuBuffer,
    v: &GpuBuffer,
) -> Result<(), GpuError> {
    for (name, b) in [("grad", grad), ("param", param), ("m", m), ("v", v)] {
        if b.len < n {
            return Err(GpuError::Shape(format!(
                "adamw: {name} has {} < {n} elements",
                b.len
            )));
        }
    }
    if split > n {
        return Err(GpuError::Shape(format!(
            "adamw: the head starts at {split}, past the {n} parameters"
        )));
    }
    if step == 0 {
        return Err(GpuError::Shape("adamw: step numbers start at 1".into()));
    }
    let bc1 = 1.0 - (opt.beta1 as f64).powi(step as i32);
    let bc2 = 1.0 - (opt.beta2 as f64).powi(step as i32);
    let kernel = ctx.pipeline("adamw/step", SOURCE, "step", &[]);
    let params = ctx.uniform(&[
        n as u32,
        opt.lr.to_bits(),
        opt.beta1.to_bits(),
        opt.beta2.to_bits(),
        opt.eps.to_bits(),
        opt.weight_decay.to_bits(),
        (bc1 as f32).to_bits(),
        (bc2 as f32).to_bits(),
        split as u32,
        opt.head_lr().to_bits(),
    ]);
    ctx.dispatch(
        encoder,
        &kernel,
        &[
            params.as_entire_binding(),
            grad.binding(),
            param.binding(),
            m.binding(),
            v.binding(),
        ],
        groups_1d(n, 256),
    );
    Ok(())
}
