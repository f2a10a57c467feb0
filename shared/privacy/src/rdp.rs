//! Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism.
//!
//! A line-by-line port of Google's dp-accounting 0.6.0
//! (`dp_accounting/rdp/rdp_privacy_accountant.py`) for the add/remove
//! neighbouring relation:
//! * [`poisson_subsampled_gaussian_rdp`] is `_compute_rdp_poisson_subsampled_gaussian`
//!   with `_compute_log_a_int` (integer orders, a binomial sum) and
//!   `_compute_log_a_frac` (fractional orders, the two-sided series of
//!   Mironov, Talwar & Zhang 2019, Sec. 3.3), all in log space;
//! * [`epsilon_from_rdp`] is `compute_epsilon`: the conversion of Balle et al.
//!   2020 (Prop. 12) / Asoodeh et al. 2020 (Eq. 20),
//!   ε = rdp − (ln δ + ln α)/(α − 1) + ln((α − 1)/α), minimised over the
//!   orders, with the same edge cases (the KL bound, α ≤ 1.01 skipped);
//! * [`delta_from_rdp`] is `compute_delta`, the inverse.
//!
//! RDP composes additively per order, so heterogeneous steps (different q, σ,
//! step counts) are accounted for by summing their RDP curves
//! ([`RdpAccountant::compose`]).

use serde::{Deserialize, Serialize};

use crate::error::{PrivacyError, Result};
use crate::special::{log_add, log_comb, log_erfc, SQRT2};
use crate::TrainingSegment;

/// The default RDP orders: {1.1, 1.2, …, 10.9} ∪ {12, 13, …, 63}
/// (the order set of Opacus and of the fedsb brief; dp-accounting's default
/// adds 11, 128, 256, 512 and 1024, which changes none of the reference
/// values).
pub fn default_rdp_orders() -> Vec<f64> {
    let fractional = (1..100).map(|x| 1.0 + f64::from(x) / 10.0);
    let integer = (12..64).map(f64::from);
    fractional.chain(integer).collect()
}

/// Iteration cap of the fractional-order series (dp-accounting's
/// `_MAX_STEPS_LOG_A_FRAC`); an order that does not converge gets RDP +∞ and
/// so drops out of the ε minimisation.
const MAX_STEPS_LOG_A_FRAC: usize = 1000;

/// ln A_α for integer α, 0 < q < 1 (`_compute_log_a_int`).
fn log_a_int(q: f64, sigma: f64, alpha: u32) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log_q = q.ln();
    let log1mq = (-q).ln_1p();
    let alpha_f = f64::from(alpha);
    for i in 0..=alpha {
        let i = f64::from(i);
        let log_coef_i = log_comb(alpha_f, i) + i * log_q + (alpha_f - i) * log1mq;
        let s = log_coef_i + (i * i - i) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

/// ln A_α for fractional α, 0 < q < 1 (`_compute_log_a_frac`).
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let mut log_a0 = f64::NEG_INFINITY;
    let mut log_a1 = f64::NEG_INFINITY;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log_q = q.ln();
    let log1mq = (-q).ln_1p();
    let log_half = 0.5f64.ln();
    let two_sigma2 = 2.0 * sigma * sigma;
    let mut last_s0 = f64::NEG_INFINITY;
    let mut last_s1 = f64::NEG_INFINITY;
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = i as f64;
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;

        let log_t0 = log_coef + i * log_q + j * log1mq;
        let log_t1 = log_coef + j * log_q + i * log1mq;

        let log_e0 = log_half + log_erfc((i - z0) / (SQRT2 * sigma));
        let log_e1 = log_half + log_erfc((z0 - j) / (SQRT2 * sigma));

        let log_s0 = log_t0 + (i * i - i) / two_sigma2 + log_e0;
        let log_s1 = log_t1 + (j * j - j) / two_sigma2 + log_e1;

        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);

        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// ln A_α, dispatching on whether α is an integer (`_compute_log_a`).
fn log_a(q: f64, sigma: f64, alpha: f64) -> f64 {
    if alpha.fract() == 0.0 && alpha <= f64::from(u32::MAX) {
        log_a_int(q, sigma, alpha as u32)
    } else {
        log_a_frac(q, sigma, alpha)
    }
}

fn check_orders(orders: &[f64]) -> Result<()> {
    if orders.is_empty() {
        return Err(PrivacyError::NoRdpOrders);
    }
    match orders.iter().find(|&&a| !(a.is_finite() && a > 1.0)) {
        Some(&bad) => Err(PrivacyError::RdpOrder(bad)),
        None => Ok(()),
    }
}

pub(crate) fn check_sample_rate(q: f64) -> Result<()> {
    if q > 0.0 && q <= 1.0 {
        Ok(())
    } else {
        Err(PrivacyError::SampleRate(q))
    }
}

pub(crate) fn check_noise_multiplier(sigma: f64) -> Result<()> {
    if sigma.is_finite() && sigma > 0.0 {
        Ok(())
    } else {
        Err(PrivacyError::NoiseMultiplier(sigma))
    }
}

pub(crate) fn check_delta(delta: f64) -> Result<()> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(PrivacyError::Delta(delta))
    }
}

pub(crate) fn check_epsilon(epsilon: f64) -> Result<()> {
    if epsilon.is_finite() && epsilon >= 0.0 {
        Ok(())
    } else {
        Err(PrivacyError::Epsilon(epsilon))
    }
}

/// RDP of one step of the Poisson-subsampled Gaussian mechanism at each order
/// (add/remove neighbours). Entries may be +∞ (an order whose series did not
/// converge).
///
/// `sample_rate` is q ∈ (0, 1]; `noise_multiplier` is σ > 0. With q = 1 this is
/// the Gaussian mechanism, α/(2σ²).
pub fn poisson_subsampled_gaussian_rdp(
    sample_rate: f64,
    noise_multiplier: f64,
    orders: &[f64],
) -> Result<Vec<f64>> {
    check_sample_rate(sample_rate)?;
    check_noise_multiplier(noise_multiplier)?;
    check_orders(orders)?;
    let q = sample_rate;
    let sigma = noise_multiplier;
    Ok(orders
        .iter()
        .map(|&alpha| {
            if q == 1.0 {
                alpha / (2.0 * sigma * sigma)
            } else {
                log_a(q, sigma, alpha) / (alpha - 1.0)
            }
        })
        .collect())
}

/// The smallest ε over the orders for which the RDP curve `rdp` implies
/// (ε, δ)-DP, and the order that attains it (dp-accounting's
/// `compute_epsilon`). ε may be +∞ when no order gives a finite bound.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64)> {
    check_orders(orders)?;
    check_delta(delta)?;
    if orders.len() != rdp.len() {
        return Err(PrivacyError::RdpLengthMismatch {
            orders: orders.len(),
            values: rdp.len(),
        });
    }
    let mut best = (f64::INFINITY, orders[0]);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 {
            // Only possible from numerical trouble; dp-accounting returns 0.
            0.0
        } else if delta * delta + (-r).exp_m1() > 0.0 {
            // KL bound: δ ≤ sqrt(1 − e^{−KL}) already holds.
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        // Strictly smaller, so the first minimum wins as with numpy's argmin;
        // NaN never wins.
        if eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// The smallest δ over the orders for which the RDP curve `rdp` implies
/// (ε, δ)-DP, and the order that attains it (dp-accounting's `compute_delta`).
pub fn delta_from_rdp(orders: &[f64], rdp: &[f64], epsilon: f64) -> Result<(f64, f64)> {
    check_orders(orders)?;
    check_epsilon(epsilon)?;
    if orders.len() != rdp.len() {
        return Err(PrivacyError::RdpLengthMismatch {
            orders: orders.len(),
            values: rdp.len(),
        });
    }
    let mut best = (f64::INFINITY, orders[0]);
    for (&a, &r) in orders.iter().zip(rdp) {
        let mut log_delta = if r <= 0.0 {
            f64::NEG_INFINITY
        } else {
            0.5 * (-(-r).exp()).ln_1p()
        };
        if a > 1.01 && r >= 0.0 {
            let rdp_bound = (a - 1.0) * (r - epsilon + (-1.0 / a).ln_1p()) - a.ln();
            log_delta = log_delta.min(rdp_bound);
        }
        if log_delta < best.0 {
            best = (log_delta, a);
        }
    }
    Ok((best.0.exp().min(1.0), best.1))
}

/// Accumulates the RDP curve of a sequence of Poisson-subsampled Gaussian
/// steps and converts it to (ε, δ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        let orders = default_rdp_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }
}

impl RdpAccountant {
    /// An accountant with the [`default_rdp_orders`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An accountant with custom orders (each a finite number > 1).
    pub fn with_orders(orders: Vec<f64>) -> Result<Self> {
        check_orders(&orders)?;
        let rdp = vec![0.0; orders.len()];
        Ok(Self { orders, rdp })
    }

    /// The orders this accountant tracks.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The accumulated RDP at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// Adds `segment.steps` steps at (q, σ): RDP adds per order.
    pub fn compose(&mut self, segment: &TrainingSegment) -> Result<()> {
        segment.validate()?;
        if segment.steps == 0 {
            return Ok(());
        }
        let one = poisson_subsampled_gaussian_rdp(
            segment.sample_rate,
            segment.noise_multiplier,
            &self.orders,
        )?;
        let steps = segment.steps as f64;
        for (total, r) in self.rdp.iter_mut().zip(one) {
            *total += steps * r;
        }
        Ok(())
    }

    /// ε spent for `delta` (+∞ if no order bounds it).
    pub fn epsilon(&self, delta: f64) -> Result<f64> {
        Ok(epsilon_from_rdp(&self.orders, &self.rdp, delta)?.0)
    }

    /// ε spent for `delta` and the order that attains it.
    pub fn epsilon_and_order(&self, delta: f64) -> Result<(f64, f64)> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }

    /// δ for a given ε.
    pub fn delta(&self, epsilon: f64) -> Result<f64> {
        Ok(delta_from_rdp(&self.orders, &self.rdp, epsilon)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_orders_are_the_documented_set() {
        let orders = default_rdp_orders();
        assert_eq!(orders.len(), 99 + 52);
        assert_eq!(orders[0], 1.1);
        assert_eq!(orders[9], 2.0);
        assert_eq!(orders[98], 10.9);
        assert_eq!(orders[99], 12.0);
        assert_eq!(*orders.last().unwrap(), 63.0);
        assert!(!orders.contains(&11.0));
    }

    #[test]
    fn integer_and_fractional_series_agree_near_integers() {
        // The two formulas are different expansions of the same quantity, so
        // A_α must be continuous across an integer order.
        for (q, sigma) in [(0.01, 1.1), (0.04, 1.5), (0.2, 0.8)] {
            let at_int = log_a_int(q, sigma, 3);
            let below = log_a_frac(q, sigma, 3.0 - 1e-7);
            let above = log_a_frac(q, sigma, 3.0 + 1e-7);
            assert!((at_int - below).abs() < 1e-5, "{at_int} vs {below}");
            assert!((at_int - above).abs() < 1e-5, "{at_int} vs {above}");
        }
    }
}
