//! DP-SGD for LoRA-SB (sample-level differential privacy at each participant).
//!
//! One step ([`dp_sgd_step`]):
//! 1. Poisson sampling: every example joins the batch independently with
//!    probability `q` ([`NoiseSource::poisson_sample`]); the batch size varies
//!    and may be 0;
//! 2. per-sample gradients of every `R` and the head, each sample's joint L2
//!    norm clipped to `C`, summed (on the GPU, [`crate::gpu::dp`]);
//! 3. plus Gaussian noise `N(0, σ²C²)` per coordinate from a CSPRNG;
//! 4. divided by the expected batch size `q·N`;
//! 5. the AdamW step.
//!
//! The randomness comes from ChaCha20 seeded from the operating system's
//! entropy (`getrandom`; in the browser `crypto.getRandomValues`). A fixed seed
//! exists only through [`NoiseSource::seeded_for_tests`].

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::data::Example;
use crate::gpu::adamw::AdamW;
use crate::gpu::encoder::GpuEncoder;
use crate::gpu::GpuError;
use crate::model::BertTokenizer;
use crate::train::{encode_examples, TrainError};

/// Why a DP-SGD step could not run.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    /// Parameters out of range.
    #[error("DP-SGD: {0}")]
    Invalid(String),
    /// The operating system (or browser) gave no entropy.
    #[error("no secure randomness available: {0}")]
    Entropy(String),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// Cryptographically secure randomness for Poisson sampling and the Gaussian
/// noise of DP-SGD.
pub struct NoiseSource {
    rng: ChaCha20Rng,
    spare: Option<f64>,
    seeded_for_tests: bool,
}

impl std::fmt::Debug for NoiseSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the generator's state.
        f.debug_struct("NoiseSource")
            .field("seeded_for_tests", &self.seeded_for_tests)
            .finish_non_exhaustive()
    }
}

impl NoiseSource {
    /// ChaCha20 seeded with 256 bits of operating-system entropy (natively
    /// `getrandom`, in the browser `crypto.getRandomValues`).
    pub fn from_os_entropy() -> Result<Self, DpError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| DpError::Entropy(e.to_string()))?;
        Ok(Self {
            rng: ChaCha20Rng::from_seed(seed),
            spare: None,
            seeded_for_tests: false,
        })
    }

    /// A reproducible generator for tests only: its noise protects nothing.
    pub fn seeded_for_tests(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
            spare: None,
            seeded_for_tests: true,
        }
    }

    /// Whether this source came from [`Self::seeded_for_tests`].
    pub fn is_seeded_for_tests(&self) -> bool {
        self.seeded_for_tests
    }

    /// Uniform in the open interval (0, 1), 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal draw (Box–Muller in f64; pairs are used in full).
    pub fn standard_normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = self.uniform();
        let u2 = self.uniform();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }

    /// `n` draws of `N(0, std²)` as f32.
    pub fn gaussian(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (self.standard_normal() * std) as f32)
            .collect()
    }

    /// Poisson sampling: each of `0..n` independently with probability `q`,
    /// in increasing order.
    pub fn poisson_sample(&mut self, n: usize, q: f64) -> Vec<usize> {
        (0..n).filter(|_| self.uniform() < q).collect()
    }
}

/// The DP-SGD parameters of one participant's training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdConfig {
    /// σ: the noise's standard deviation is σ·C.
    pub noise_multiplier: f64,
    /// C: per-sample gradients are clipped to this joint L2 norm.
    pub clip_norm: f64,
    /// q: Poisson sampling rate.
    pub sample_rate: f64,
    /// N: examples the participant holds.
    pub dataset_size: usize,
}

impl DpSgdConfig {
    /// Checks ranges: `σ ≥ 0`, `C > 0`, `0 < q ≤ 1`, `N ≥ 1`, all finite.
    pub fn validate(&self) -> Result<(), DpError> {
        if !(self.noise_multiplier >= 0.0 && self.noise_multiplier.is_finite()) {
            return Err(DpError::Invalid(format!(
                "noise multiplier must be finite and ≥ 0, got {}",
                self.noise_multiplier
            )));
        }
        if !(self.clip_norm > 0.0 && self.clip_norm.is_finite()) {
            return Err(DpError::Invalid(format!(
                "clip norm must be finite and > 0, got {}",
                self.clip_norm
            )));
        }
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(DpError::Invalid(format!(
                "sample rate must be in (0, 1], got {}",
                self.sample_rate
            )));
        }
        if self.dataset_size == 0 {
            return Err(DpError::Invalid("no training examples".into()));
        }
        Ok(())
    }

    /// `q·N`, the divisor of the noised sum.
    pub fn expected_batch(&self) -> f64 {
        self.sample_rate * self.dataset_size as f64
    }

    /// Standard deviation of the noise per coordinate, `σ·C`.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.clip_norm
    }
}

/// What one DP-SGD step did.
#[derive(Debug, Clone, PartialEq)]
pub struct DpStepOutcome {
    /// Size of the Poisson-sampled batch (may be 0).
    pub batch_size: usize,
    /// Mean loss of the sampled batch (`None` for an empty batch).
    pub loss: Option<f32>,
}

/// One DP-SGD step on `examples` (module docs): Poisson-samples a batch,
/// computes the clipped, summed, noised gradient on the GPU divided by `q·N`,
/// and applies AdamW. `config.dataset_size` must be `examples.len()`.
pub async fn dp_sgd_step(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    examples: &[Example],
    config: &DpSgdConfig,
    noise: &mut NoiseSource,
    opt: &AdamW,
) -> Result<DpStepOutcome, DpError> {
    config.validate()?;
    if config.dataset_size != examples.len() {
        return Err(DpError::Invalid(format!(
            "configured for {} examples, given {}",
            config.dataset_size,
            examples.len()
        )));
    }
    let indices = noise.poisson_sample(examples.len(), config.sample_rate);
    let noise_values = noise.gaussian(encoder.num_trainable(), config.noise_std());
    let scale = (1.0 / config.expected_batch()) as f32;
    let clip = config.clip_norm as f32;
    let losses = if indices.is_empty() {
        encoder
            .dp_gradients(None, &noise_values, clip, scale)
            .await?
    } else {
        let refs: Vec<&Example> = indices.iter().map(|&i| &examples[i]).collect();
        let (batch, labels) = encode_examples(tokenizer, &refs)?;
        encoder
            .dp_gradients(Some((&batch, &labels)), &noise_values, clip, scale)
            .await?
    };
    encoder.apply_adamw(opt)?;
    let loss = (!losses.is_empty()).then(|| losses.iter().sum::<f32>() / losses.len() as f32);
    Ok(DpStepOutcome {
        batch_size: indices.len(),
        loss,
    })
}
