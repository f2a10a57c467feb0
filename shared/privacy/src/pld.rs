//! Privacy-loss-distribution (PLD) accountant for the Poisson-subsampled
//! Gaussian mechanism, add/remove neighbours.
//!
//! A port of the parts of Google's dp-accounting 0.6.0 `pld` module that the
//! `PLDAccountant` uses for a `PoissonSampledDpEvent(GaussianDpEvent)`:
//! * the PLD of one step is discretised on a grid of spacing
//!   `value_discretization_interval` (default 10⁻⁴) with the pessimistic
//!   *connect-the-dots* algorithm of Doroshenko, Ghazi, Kamath, Kumar &
//!   Manurangsi 2022 (`create_pmf_pessimistic_connect_dots_fixed_gap`), from
//!   the exact hockey-stick divergences δ(ε) of the mechanism at the grid
//!   points; the noise is truncated at ln-mass −50 and the truncated mass is
//!   treated as infinite loss;
//! * with subsampling the PLD is not symmetric, so there are two of them, for
//!   the *remove* and *add* adjacencies; ε is the larger of the two;
//! * `steps` self-compositions are one FFT, a pointwise power and one inverse
//!   FFT over a window chosen by a Chernoff bound so that at most 10⁻¹⁵ of the
//!   mass falls outside (that mass is counted as infinite loss); different
//!   segments compose by FFT convolution with the same tail truncation;
//! * ε for a δ and δ for an ε are read off the discrete PLD exactly as
//!   dp-accounting does.
//!
//! Because the discretisation is pessimistic, the ε reported is an upper bound
//! on the true ε of the mechanism (up to the 10⁻¹⁵ tail and floating point).

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use crate::error::{PrivacyError, Result};
use crate::rdp::{check_delta, check_epsilon};
use crate::special::{log_a_times_exp_b_plus_c, log_add, log_ndtr, ndtr, ndtri};
use crate::TrainingSegment;

/// dp-accounting's default grid spacing of the privacy loss.
pub const DEFAULT_VALUE_DISCRETIZATION_INTERVAL: f64 = 1e-4;

/// ln of the noise mass dropped at each tail when discretising one step
/// (dp-accounting's `log_mass_truncation_bound`).
const LOG_MASS_TRUNCATION_BOUND: f64 = -50.0;

/// Upper bound on the probability mass dropped by each composition
/// (dp-accounting's `tail_mass_truncation`); counted as infinite loss.
const TAIL_MASS_TRUNCATION: f64 = 1e-15;

/// The most grid points (or FFT length) this module allocates: 2²³ complex
/// doubles are 128 MiB, already a lot for a browser tab. Realistic DP-SGD
/// settings (σ ≳ 0.3) stay far below it.
const MAX_GRID_POINTS: usize = 1 << 23;

/// Which of the two neighbouring directions a PLD describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adjacency {
    /// μ_upper = (1 − q)·N(0, σ²) + q·N(−1, σ²), μ_lower = N(0, σ²).
    Remove,
    /// μ_upper = N(0, σ²), μ_lower = (1 − q)·N(0, σ²) + q·N(1, σ²).
    Add,
}

/// The privacy loss of one step of the subsampled Gaussian mechanism
/// (dp-accounting's `GaussianPrivacyLoss` with sensitivity 1).
struct SubsampledGaussianLoss {
    sigma: f64,
    q: f64,
    adjacency: Adjacency,
}

impl SubsampledGaussianLoss {
    /// Privacy loss at x without subsampling, remove direction.
    fn loss_without_subsampling_remove(&self, x: f64) -> f64 {
        (-0.5 - x) / (self.sigma * self.sigma)
    }

    fn loss_remove(&self, x: f64) -> f64 {
        let l = self.loss_without_subsampling_remove(x);
        if self.q == 1.0 {
            l
        } else {
            log_a_times_exp_b_plus_c(self.q, l, 1.0 - self.q)
        }
    }

    /// ln(μ_upper(x)/μ_lower(x)); non-increasing in x.
    fn privacy_loss(&self, x: f64) -> f64 {
        match self.adjacency {
            Adjacency::Remove => self.loss_remove(x),
            Adjacency::Add => -self.loss_remove(-x),
        }
    }

    fn inverse_without_subsampling_remove(&self, loss: f64) -> f64 {
        -0.5 - loss * self.sigma * self.sigma
    }

    /// The largest x whose privacy loss is at least `loss`.
    fn inverse_privacy_loss(&self, loss: f64) -> f64 {
        let q = self.q;
        match self.adjacency {
            Adjacency::Remove => {
                if q == 1.0 {
                    return self.inverse_without_subsampling_remove(loss);
                }
                let floor = (-q).ln_1p();
                if is_close(loss, floor) {
                    return self.inverse_without_subsampling_remove(f64::NEG_INFINITY);
                }
                let l = log_a_times_exp_b_plus_c(1.0 / q, loss, 1.0 - 1.0 / q);
                self.inverse_without_subsampling_remove(l)
            }
            Adjacency::Add => {
                if q == 1.0 {
                    return 1.0 + self.inverse_without_subsampling_remove(loss);
                }
                let ceiling = -(-q).ln_1p();
                if is_close(loss, ceiling) {
                    return 1.0 + self.inverse_without_subsampling_remove(f64::INFINITY);
                }
                let l = -log_a_times_exp_b_plus_c(1.0 / q, -loss, 1.0 - 1.0 / q);
                1.0 + self.inverse_without_subsampling_remove(l)
            }
        }
    }

    fn noise_cdf(&self, x: f64) -> f64 {
        ndtr(x / self.sigma)
    }

    fn noise_log_cdf(&self, x: f64) -> f64 {
        log_ndtr(x / self.sigma)
    }

    fn mu_upper_cdf(&self, x: f64) -> f64 {
        match self.adjacency {
            Adjacency::Add => self.noise_cdf(x),
            Adjacency::Remove => {
                if self.q == 1.0 {
                    self.noise_cdf(x + 1.0)
                } else {
                    (1.0 - self.q) * self.noise_cdf(x) + self.q * self.noise_cdf(x + 1.0)
                }
            }
        }
    }

    fn mu_lower_log_cdf(&self, x: f64) -> f64 {
        match self.adjacency {
            Adjacency::Remove => self.noise_log_cdf(x),
            Adjacency::Add => {
                if self.q == 1.0 {
                    self.noise_log_cdf(x - 1.0)
                } else {
                    log_add(
                        (-self.q).ln_1p() + self.noise_log_cdf(x),
                        self.q.ln() + self.noise_log_cdf(x - 1.0),
                    )
                }
            }
        }
    }

    /// The ε-hockey-stick divergence of the mechanism: its δ at ε.
    fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let q = self.q;
        if q < 1.0 {
            match self.adjacency {
                Adjacency::Add if epsilon >= -(-q).ln_1p() => return 0.0,
                Adjacency::Remove if epsilon <= (-q).ln_1p() => {
                    return (-epsilon.exp_m1()).clamp(0.0, 1.0)
                }
                _ => {}
            }
        }
        let x = self.inverse_privacy_loss(epsilon);
        let delta = self.mu_upper_cdf(x) - (epsilon + self.mu_lower_log_cdf(x)).exp();
        if delta.is_nan() {
            0.0
        } else {
            delta.clamp(0.0, 1.0)
        }
    }

    /// (lower_x, upper_x): outside them the noise carries at most e^−50 mass.
    fn truncation_points(&self) -> (f64, f64) {
        let lower = self.sigma * ndtri(0.5 * LOG_MASS_TRUNCATION_BOUND.exp());
        let upper = -lower;
        match self.adjacency {
            Adjacency::Add => (lower, upper + 1.0),
            Adjacency::Remove => (lower - 1.0, upper),
        }
    }

    /// The discretised PLD of one step (pessimistic connect-the-dots).
    fn discretise(&self, interval: f64) -> Result<DensePmf> {
        let (lower_x, upper_x) = self.truncation_points();
        let eps_upper = self.privacy_loss(lower_x);
        let eps_lower = self.privacy_loss(upper_x);
        let hi = (eps_upper / interval).ceil();
        let lo = (eps_lower / interval).floor();
        let points = hi - lo + 1.0;
        if !points.is_finite() || points > MAX_GRID_POINTS as f64 {
            return Err(PrivacyError::PldTooLarge {
                points: if points.is_finite() {
                    points as u128
                } else {
                    u128::MAX
                },
                limit: MAX_GRID_POINTS,
            });
        }
        let lo = lo as i64;
        let n = points as usize;
        let mut deltas: Vec<f64> = (0..n)
            .map(|k| self.delta_for_epsilon((lo + k as i64) as f64 * interval))
            .collect();
        Ok(connect_dots_fixed_gap(interval, lo, &mut deltas))
    }
}

/// `math.isclose` with its default relative tolerance.
fn is_close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// dp-accounting's `create_pmf_pessimistic_connect_dots_fixed_gap`: the PLD
/// supported on the grid `lower..lower+len` (times `interval`) and +∞ whose
/// hockey-stick curve passes through the given δ's and is pessimistic in
/// between.
fn connect_dots_fixed_gap(interval: f64, lower: i64, deltas: &mut [f64]) -> DensePmf {
    // Enforce the monotonicity the formulas rely on.
    for i in 1..deltas.len() {
        if deltas[i] > deltas[i - 1] {
            deltas[i] = deltas[i - 1];
        }
    }
    let n = deltas.len();
    if n == 1 {
        return DensePmf {
            lower_loss: lower,
            probs: vec![1.0 - deltas[0]],
            infinity_mass: deltas[0],
        };
    }
    let em1 = interval.exp_m1();
    let e = interval.exp();
    let diff = |i: usize| deltas[i + 1] - deltas[i];
    let mut probs = vec![0.0; n];
    probs[0] = 1.0 - deltas[0] + diff(0) / em1;
    for (i, w) in deltas.windows(3).enumerate() {
        probs[i + 1] = ((w[2] - w[1]) - (w[1] - w[0]) * e) / em1;
    }
    probs[n - 1] = diff(n - 2) / (-interval).exp_m1();
    for p in &mut probs {
        *p = p.max(0.0);
    }
    DensePmf {
        lower_loss: lower,
        probs,
        infinity_mass: deltas[n - 1],
    }
}

/// A discrete privacy loss distribution: mass `probs[k]` at loss
/// `(lower_loss + k) · interval`, plus `infinity_mass` at +∞.
#[derive(Debug, Clone, PartialEq)]
struct DensePmf {
    lower_loss: i64,
    probs: Vec<f64>,
    infinity_mass: f64,
}

impl DensePmf {
    fn identity() -> Self {
        Self {
            lower_loss: 0,
            probs: vec![1.0],
            infinity_mass: 0.0,
        }
    }

    /// `num_times`-fold composition with itself (`DensePLDPmf.self_compose`).
    fn self_compose(&self, num_times: u64, fft: &mut FftCache) -> Result<Self> {
        if num_times == 1 {
            return Ok(self.clone());
        }
        let (offset, probs) = self_convolve(&self.probs, num_times, TAIL_MASS_TRUNCATION, fft)?;
        let lower_loss = i64::try_from(
            i128::from(self.lower_loss) * i128::from(num_times) + offset,
        )
        .map_err(|_| PrivacyError::PldTooLarge {
            points: u128::MAX,
            limit: MAX_GRID_POINTS,
        })?;
        // 1 − (1 − m)^n, computed stably, plus the truncated tails.
        let infinity_mass =
            TAIL_MASS_TRUNCATION - ((num_times as f64) * (-self.infinity_mass).ln_1p()).exp_m1();
        Ok(Self {
            lower_loss,
            probs,
            infinity_mass: infinity_mass.min(1.0),
        })
    }

    /// Composition of two PLDs (`DensePLDPmf.compose`).
    fn compose(&self, other: &Self, fft: &mut FftCache) -> Result<Self> {
        let lower_loss = self.lower_loss + other.lower_loss;
        let probs = fft.convolve(&self.probs, &other.probs)?;
        let infinity_mass =
            self.infinity_mass + other.infinity_mass - self.infinity_mass * other.infinity_mass;
        let (offset, probs, right_tail) = truncate_tails(probs, TAIL_MASS_TRUNCATION);
        Ok(Self {
            lower_loss: lower_loss + offset as i64,
            probs,
            infinity_mass: (infinity_mass + right_tail).min(1.0),
        })
    }

    fn loss(&self, k: usize, interval: f64) -> f64 {
        (self.lower_loss + k as i64) as f64 * interval
    }

    /// δ(ε) = m_∞ + Σ_{loss > ε} (1 − e^{ε − loss})·p.
    fn delta_for_epsilon(&self, epsilon: f64, interval: f64) -> f64 {
        let mut delta = self.infinity_mass;
        for (k, &p) in self.probs.iter().enumerate() {
            let loss = self.loss(k, interval);
            if loss > epsilon {
                delta += -(epsilon - loss).exp_m1() * p;
            }
        }
        delta.clamp(0.0, 1.0)
    }

    /// The smallest ε ≥ 0 with δ(ε) ≤ `delta` (`_get_epsilon_for_delta`).
    fn epsilon_for_delta(&self, delta: f64, interval: f64) -> f64 {
        if self.infinity_mass > delta {
            return f64::INFINITY;
        }
        let mut mass_upper = self.infinity_mass;
        let mut mass_lower = 0.0;
        for k in (0..self.probs.len()).rev() {
            let loss = self.loss(k, interval);
            let p = self.probs[k];
            if mass_upper > delta
                && mass_lower > 0.0
                && ((mass_upper - delta) / mass_lower).ln() >= loss
            {
                break;
            }
            mass_upper += p;
            mass_lower += (-loss).exp() * p;
            if mass_upper >= delta && mass_lower == 0.0 {
                return loss.max(0.0);
            }
        }
        if mass_upper <= mass_lower + delta {
            return 0.0;
        }
        ((mass_upper - delta) / mass_lower).ln()
    }
}

/// dp-accounting's `_truncate_tails` (pessimistic): drops the longest prefix
/// and suffix each holding at most `tail_mass / 2`; the prefix mass moves onto
/// the first kept point, the suffix mass is returned to be counted as +∞.
fn truncate_tails(mut probs: Vec<f64>, tail_mass: f64) -> (usize, Vec<f64>, f64) {
    let prefix_len = |iter: &mut dyn Iterator<Item = f64>, len: usize| {
        let mut s = 0.0;
        for (i, v) in iter.enumerate() {
            s += v;
            if s > tail_mass / 2.0 {
                return i;
            }
        }
        len
    };
    let len = probs.len();
    let left = prefix_len(&mut probs.iter().copied(), len);
    let right = len - prefix_len(&mut probs.iter().rev().copied(), len);
    let right = right.max(left + 1).min(len);
    let left = left.min(right - 1);
    let left_mass: f64 = probs[..left].iter().sum();
    let right_mass: f64 = probs[right..].iter().sum();
    probs.truncate(right);
    probs.drain(..left);
    probs[0] += left_mass;
    (left, probs, right_mass)
}

/// `common.compute_self_convolve_bounds`: a window [lower, upper] of indices
/// of the `num_times`-fold self-convolution outside which the mass is at most
/// `tail_mass`, from Chernoff bounds at 40 orders.
fn self_convolve_bounds(probs: &[f64], num_times: u64, tail_mass: f64) -> (i128, i128) {
    let len = probs.len();
    let mut upper = (len as i128 - 1) * i128::from(num_times);
    let mut lower = 0i128;
    let n = num_times as f64;
    let orders = (-20..0).chain(1..21).map(|o| f64::from(o) / len as f64);
    for order in orders {
        // ln Σ_k p_k e^{k·order} by Horner's rule in r = e^order: with
        // |order|·len ≤ 20 nothing overflows, and no exp per term is needed.
        let r = order.exp();
        let sum = probs.iter().rev().fold(0.0, |acc, &p| acc * r + p.max(0.0));
        let log_mgf = sum.ln();
        let bound = (n * log_mgf + (2.0 / tail_mass).ln()) / order;
        if !bound.is_finite() {
            continue;
        }
        if order > 0.0 {
            upper = upper.min(bound.ceil() as i128);
        } else {
            lower = lower.max(bound.floor() as i128);
        }
    }
    let lower = lower.max(0);
    (lower, upper.max(lower))
}

/// `common.self_convolve`: the `num_times`-fold self-convolution of `probs`
/// restricted to the Chernoff window, by one FFT, a pointwise power and one
/// inverse FFT. Returns (index of the first kept entry, entries).
fn self_convolve(
    probs: &[f64],
    num_times: u64,
    tail_mass: f64,
    fft: &mut FftCache,
) -> Result<(i128, Vec<f64>)> {
    let (lower, upper) = self_convolve_bounds(probs, num_times, tail_mass);
    let out_len = upper - lower + 1;
    let needed = out_len.max(probs.len() as i128);
    if needed > MAX_GRID_POINTS as i128 {
        return Err(PrivacyError::PldTooLarge {
            points: needed as u128,
            limit: MAX_GRID_POINTS,
        });
    }
    let out_len = out_len as usize;
    let size = next_fast_len(needed as usize);
    let mut buf: Vec<Complex<f64>> = probs.iter().map(|&p| Complex::new(p, 0.0)).collect();
    buf.resize(size, Complex::new(0.0, 0.0));
    fft.forward(size).process(&mut buf);
    for z in &mut buf {
        *z = complex_powu(*z, num_times);
    }
    fft.inverse(size).process(&mut buf);
    let scale = 1.0 / size as f64;
    let start = (lower % size as i128) as usize;
    let out = (0..out_len)
        .map(|k| buf[(start + k) % size].re * scale)
        .collect();
    Ok((lower, out))
}

fn complex_powu(mut base: Complex<f64>, mut exp: u64) -> Complex<f64> {
    let mut acc = Complex::new(1.0, 0.0);
    while exp > 0 {
        if exp & 1 == 1 {
            acc *= base;
        }
        base = base * base;
        exp >>= 1;
    }
    acc
}

/// The smallest 7-smooth number (2^a 3^b 5^c 7^d) ≥ n: sizes rustfft handles
/// with its fast butterflies.
fn next_fast_len(n: usize) -> usize {
    let n = n.max(1);
    let mut best = n.next_power_of_two();
    let mut p7 = 1usize;
    while p7 < best {
        let mut p5 = p7;
        while p5 < best {
            let mut p3 = p5;
            while p3 < best {
                let mut p2 = p3;
                while p2 < n {
                    p2 *= 2;
                }
                best = best.min(p2);
                p3 *= 3;
            }
            p5 *= 5;
        }
        p7 *= 7;
    }
    best
}

/// Plans FFTs once per size.
struct FftCache {
    planner: FftPlanner<f64>,
}

impl FftCache {
    fn new() -> Self {
        Self {
            planner: FftPlanner::new(),
        }
    }

    fn forward(&mut self, len: usize) -> Arc<dyn Fft<f64>> {
        self.planner.plan_fft_forward(len)
    }

    fn inverse(&mut self, len: usize) -> Arc<dyn Fft<f64>> {
        self.planner.plan_fft_inverse(len)
    }

    /// Full linear convolution of two real sequences.
    fn convolve(&mut self, a: &[f64], b: &[f64]) -> Result<Vec<f64>> {
        let out_len = a.len() + b.len() - 1;
        if a.len().min(b.len()) <= 64 {
            let mut out = vec![0.0; out_len];
            for (i, &x) in a.iter().enumerate() {
                for (j, &y) in b.iter().enumerate() {
                    out[i + j] += x * y;
                }
            }
            return Ok(out);
        }
        if out_len > MAX_GRID_POINTS {
            return Err(PrivacyError::PldTooLarge {
                points: out_len as u128,
                limit: MAX_GRID_POINTS,
            });
        }
        let size = next_fast_len(out_len);
        let mut fa: Vec<Complex<f64>> = a.iter().map(|&x| Complex::new(x, 0.0)).collect();
        fa.resize(size, Complex::new(0.0, 0.0));
        let mut fb: Vec<Complex<f64>> = b.iter().map(|&x| Complex::new(x, 0.0)).collect();
        fb.resize(size, Complex::new(0.0, 0.0));
        let forward = self.forward(size);
        forward.process(&mut fa);
        forward.process(&mut fb);
        for (x, y) in fa.iter_mut().zip(&fb) {
            *x *= y;
        }
        self.inverse(size).process(&mut fa);
        let scale = 1.0 / size as f64;
        Ok(fa[..out_len].iter().map(|z| z.re * scale).collect())
    }
}

/// The discretised privacy loss distribution of a composition of
/// Poisson-subsampled Gaussian steps, for both adjacency directions.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyLossDistribution {
    interval: f64,
    remove: DensePmf,
    /// `None` when the add direction equals the remove direction (q = 1 for
    /// every step, or nothing composed yet).
    add: Option<DensePmf>,
}

impl PrivacyLossDistribution {
    /// The PLD of a mechanism that leaks nothing (loss 0 with probability 1).
    pub fn identity(value_discretization_interval: f64) -> Result<Self> {
        check_interval(value_discretization_interval)?;
        Ok(Self {
            interval: value_discretization_interval,
            remove: DensePmf::identity(),
            add: None,
        })
    }

    /// The PLD of `segment.steps` steps of the Poisson-subsampled Gaussian
    /// mechanism with rate q and noise multiplier σ.
    pub fn from_segment(
        segment: &TrainingSegment,
        value_discretization_interval: f64,
    ) -> Result<Self> {
        segment.validate()?;
        check_interval(value_discretization_interval)?;
        if segment.steps == 0 {
            return Self::identity(value_discretization_interval);
        }
        SubsampledGaussianStep::new(
            segment.sample_rate,
            segment.noise_multiplier,
            value_discretization_interval,
        )?
        .repeated(segment.steps)
    }

    /// The PLD of running the mechanisms of `self` and then of `other`.
    /// Both must use the same discretization interval.
    pub fn compose(&self, other: &Self) -> Result<Self> {
        if self.interval != other.interval {
            return Err(PrivacyError::Discretization(other.interval));
        }
        let mut fft = FftCache::new();
        let remove = self.remove.compose(&other.remove, &mut fft)?;
        let add = match (&self.add, &other.add) {
            (None, None) => None,
            (a, b) => {
                let a = a.as_ref().unwrap_or(&self.remove);
                let b = b.as_ref().unwrap_or(&other.remove);
                Some(a.compose(b, &mut fft)?)
            }
        };
        Ok(Self {
            interval: self.interval,
            remove,
            add,
        })
    }

    /// The smallest ε ≥ 0 such that the composition is (ε, δ)-DP according to
    /// this (pessimistic) PLD; +∞ if the mass at infinite loss exceeds δ.
    pub fn epsilon(&self, delta: f64) -> Result<f64> {
        check_delta(delta)?;
        let remove = self.remove.epsilon_for_delta(delta, self.interval);
        Ok(match &self.add {
            None => remove,
            Some(add) => remove.max(add.epsilon_for_delta(delta, self.interval)),
        })
    }

    /// The δ of the composition at a given ε.
    pub fn delta(&self, epsilon: f64) -> Result<f64> {
        check_epsilon(epsilon)?;
        let remove = self.remove.delta_for_epsilon(epsilon, self.interval);
        Ok(match &self.add {
            None => remove,
            Some(add) => remove.max(add.delta_for_epsilon(epsilon, self.interval)),
        })
    }

    /// The grid spacing of the privacy loss.
    pub fn value_discretization_interval(&self) -> f64 {
        self.interval
    }
}

/// One step of the Poisson-subsampled Gaussian mechanism, discretised once,
/// so that PLDs of any number of such steps can be built without redoing the
/// discretisation (used when searching over step counts).
#[derive(Debug, Clone, PartialEq)]
pub struct SubsampledGaussianStep {
    interval: f64,
    remove: DensePmf,
    add: Option<DensePmf>,
}

impl SubsampledGaussianStep {
    /// Discretises one step at rate q and noise multiplier σ.
    pub fn new(
        sample_rate: f64,
        noise_multiplier: f64,
        value_discretization_interval: f64,
    ) -> Result<Self> {
        TrainingSegment {
            sample_rate,
            noise_multiplier,
            steps: 1,
        }
        .validate()?;
        check_interval(value_discretization_interval)?;
        let single = |adjacency| {
            SubsampledGaussianLoss {
                sigma: noise_multiplier,
                q: sample_rate,
                adjacency,
            }
            .discretise(value_discretization_interval)
        };
        Ok(Self {
            interval: value_discretization_interval,
            remove: single(Adjacency::Remove)?,
            add: if sample_rate == 1.0 {
                None
            } else {
                Some(single(Adjacency::Add)?)
            },
        })
    }

    /// The PLD of `steps` such steps (identity for 0).
    pub fn repeated(&self, steps: u64) -> Result<PrivacyLossDistribution> {
        if steps == 0 {
            return PrivacyLossDistribution::identity(self.interval);
        }
        let mut fft = FftCache::new();
        Ok(PrivacyLossDistribution {
            interval: self.interval,
            remove: self.remove.self_compose(steps, &mut fft)?,
            add: match &self.add {
                None => None,
                Some(add) => Some(add.self_compose(steps, &mut fft)?),
            },
        })
    }
}

/// The exact δ at `epsilon` of **one** step of the Poisson-subsampled
/// Gaussian mechanism at rate q and noise multiplier σ (the larger of the
/// remove and add directions, as [`PldAccountant`] takes them), from the
/// mechanism's hockey-stick divergence in closed form: a few special
/// functions, no grid.
///
/// More steps only add privacy loss, so this is a lower bound on the δ at
/// `epsilon` of any number of steps at (q, σ): when it exceeds δ, the steps
/// spend more than `epsilon` at δ by any accountant's count, which an
/// aggregator can tell without building a PLD (that of a tiny σ can take a
/// second and hundreds of MB).
///
/// ```
/// use fedsb_privacy::pld::single_step_delta;
/// // σ = 0.2 at q = 0.5: one step alone spends far more than ε = 3 at δ = 1e-5.
/// assert!(single_step_delta(0.5, 0.2, 3.0).unwrap() > 1e-5);
/// assert!(single_step_delta(0.01, 1.0, 3.0).unwrap() < 1e-5);
/// ```
pub fn single_step_delta(sample_rate: f64, noise_multiplier: f64, epsilon: f64) -> Result<f64> {
    TrainingSegment {
        sample_rate,
        noise_multiplier,
        steps: 1,
    }
    .validate()?;
    crate::rdp::check_epsilon(epsilon)?;
    let delta = |adjacency| {
        SubsampledGaussianLoss {
            sigma: noise_multiplier,
            q: sample_rate,
            adjacency,
        }
        .delta_for_epsilon(epsilon)
    };
    Ok(delta(Adjacency::Remove).max(delta(Adjacency::Add)))
}

fn check_interval(interval: f64) -> Result<()> {
    if interval.is_finite() && interval > 0.0 {
        Ok(())
    } else {
        Err(PrivacyError::Discretization(interval))
    }
}

/// Composes Poisson-subsampled Gaussian steps as a PLD and converts to
/// (ε, δ). Tighter than [`crate::RdpAccountant`], at the cost of FFTs.
#[derive(Debug, Clone, PartialEq)]
pub struct PldAccountant {
    pld: PrivacyLossDistribution,
}

impl Default for PldAccountant {
    fn default() -> Self {
        Self {
            pld: PrivacyLossDistribution {
                interval: DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
                remove: DensePmf::identity(),
                add: None,
            },
        }
    }
}

impl PldAccountant {
    /// An accountant with the default grid spacing (10⁻⁴).
    pub fn new() -> Self {
        Self::default()
    }

    /// An accountant with a custom grid spacing of the privacy loss.
    pub fn with_discretization(value_discretization_interval: f64) -> Result<Self> {
        Ok(Self {
            pld: PrivacyLossDistribution::identity(value_discretization_interval)?,
        })
    }

    /// Adds `segment.steps` steps at (q, σ).
    pub fn compose(&mut self, segment: &TrainingSegment) -> Result<()> {
        segment.validate()?;
        if segment.steps == 0 {
            return Ok(());
        }
        let next = PrivacyLossDistribution::from_segment(segment, self.pld.interval)?;
        self.pld = if self.is_identity() {
            next
        } else {
            self.pld.compose(&next)?
        };
        Ok(())
    }

    /// Whether nothing has been composed yet.
    pub fn is_identity(&self) -> bool {
        self.pld.add.is_none() && self.pld.remove == DensePmf::identity()
    }

    /// ε spent for `delta` (+∞ if δ is below the mass at infinite loss).
    pub fn epsilon(&self, delta: f64) -> Result<f64> {
        self.pld.epsilon(delta)
    }

    /// δ for a given ε.
    pub fn delta(&self, epsilon: f64) -> Result<f64> {
        self.pld.delta(epsilon)
    }

    /// The accumulated privacy loss distribution.
    pub fn distribution(&self) -> &PrivacyLossDistribution {
        &self.pld
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step's exact δ is what the (pessimistic) PLD of one step gives,
    /// up to its discretisation, and never more than the δ of more steps.
    #[test]
    fn single_step_delta_matches_the_pld_and_bounds_more_steps() {
        for (q, sigma, eps) in [
            (0.01, 1.0, 0.5),
            (0.1, 0.8, 1.0),
            (0.25, 1.2, 0.8),
            (0.5, 0.6, 3.0),
            (1.0, 1.0, 2.0),
            (1.0, 0.5, 5.0),
        ] {
            let exact = single_step_delta(q, sigma, eps).unwrap();
            let step = SubsampledGaussianStep::new(q, sigma, 1e-4).unwrap();
            let one = step.repeated(1).unwrap().delta(eps).unwrap();
            assert!(exact > 0.0, "q {q} σ {sigma} ε {eps}");
            assert!(
                one >= exact * (1.0 - 1e-9) && one <= exact * 1.02 + 1e-12,
                "q {q} σ {sigma} ε {eps}: exact {exact}, PLD {one}"
            );
            let twenty = step.repeated(20).unwrap().delta(eps).unwrap();
            assert!(
                twenty >= exact,
                "q {q} σ {sigma} ε {eps}: {twenty} < {exact}"
            );
        }
        assert!(single_step_delta(0.5, 0.0, 1.0).is_err());
        assert!(single_step_delta(0.5, 1.0, f64::NAN).is_err());
        assert!(single_step_delta(1.5, 1.0, 1.0).is_err());
    }

    #[test]
    fn next_fast_len_is_smooth_and_minimal() {
        assert_eq!(next_fast_len(1), 1);
        assert_eq!(next_fast_len(11), 12);
        assert_eq!(next_fast_len(97), 98);
        assert_eq!(next_fast_len(1025), 1029);
        for n in 1..2000 {
            let m = next_fast_len(n);
            assert!(m >= n);
            let mut r = m;
            for p in [2, 3, 5, 7] {
                while (r / p) * p == r {
                    r /= p;
                }
            }
            assert_eq!(r, 1, "{m} is not 7-smooth");
        }
    }

    #[test]
    fn self_convolve_matches_direct_convolution() {
        let probs = [0.1, 0.2, 0.3, 0.4];
        let mut fft = FftCache::new();
        let (offset, got) = self_convolve(&probs, 5, 0.0, &mut fft).unwrap();
        assert_eq!(offset, 0);
        let mut want = vec![1.0];
        for _ in 0..5 {
            want = fft.convolve(&want, &probs).unwrap();
        }
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-15);
        }
    }

    #[test]
    fn truncate_tails_moves_mass_pessimistically() {
        let (offset, probs, right) =
            truncate_tails(vec![1e-17, 1e-17, 0.5, 0.5 - 4e-17, 1e-17, 1e-17], 1e-16);
        assert_eq!(offset, 2);
        assert_eq!(probs.len(), 2);
        assert!((probs[0] - (0.5 + 2e-17)).abs() < 1e-18);
        assert!((right - 2e-17).abs() < 1e-30);
    }

    #[test]
    fn one_step_pmf_has_unit_mass_and_matches_mechanism_delta() {
        for (q, sigma) in [(0.01, 1.1), (0.3, 2.0), (1.0, 1.0)] {
            for adjacency in [Adjacency::Remove, Adjacency::Add] {
                let loss = SubsampledGaussianLoss {
                    sigma,
                    q,
                    adjacency,
                };
                let pmf = loss.discretise(1e-3).unwrap();
                let total: f64 = pmf.probs.iter().sum::<f64>() + pmf.infinity_mass;
                assert!((total - 1.0).abs() < 1e-9, "mass {total}");
                // Connect-the-dots reproduces δ exactly at grid points.
                for eps in [0.0, 0.01, 0.2] {
                    let exact = loss.delta_for_epsilon(eps);
                    let discrete = pmf.delta_for_epsilon(eps, 1e-3);
                    assert!((exact - discrete).abs() < 1e-9, "{exact} vs {discrete}");
                }
            }
        }
    }
}
