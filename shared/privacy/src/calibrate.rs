//! Noise calibration: the smallest noise multiplier σ that keeps a run of
//! DP-SGD within a target (ε, δ).
//!
//! ε is decreasing in σ, so the search brackets the target and then bisects
//! (in log σ, with false-position steps to save accountant evaluations). The
//! returned σ always lies on the safe side: ε(σ) ≤ target.

use serde::{Deserialize, Serialize};

use crate::error::{PrivacyError, Result};
use crate::rdp::{check_delta, check_sample_rate};
use crate::{epsilon_spent, AccountantKind, TrainingSegment};

/// What to calibrate σ for: a run of `steps` Poisson-sampled steps at rate
/// `sample_rate` that must stay (ε, δ)-DP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CalibrationTarget {
    /// Target ε (> 0).
    pub epsilon: f64,
    /// Target δ, in (0, 1).
    pub delta: f64,
    /// Poisson sampling rate q, in (0, 1].
    pub sample_rate: f64,
    /// Number of steps the run takes.
    pub steps: u64,
}

/// The interval σ is searched in, and how finely.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SigmaSearch {
    /// Smallest σ considered.
    pub min: f64,
    /// Largest σ considered; if even this misses the target, calibration
    /// fails with [`PrivacyError::Unreachable`].
    pub max: f64,
    /// Stop once the bracket [σ_lo, σ_hi] satisfies σ_hi/σ_lo − 1 ≤ this.
    pub relative_tolerance: f64,
}

impl Default for SigmaSearch {
    fn default() -> Self {
        Self {
            min: 0.1,
            max: 1000.0,
            relative_tolerance: 1e-4,
        }
    }
}

/// The smallest σ (to within [`SigmaSearch::default`]'s tolerance) with
/// ε(σ) ≤ `target.epsilon` under the given accountant.
pub fn calibrate_noise_multiplier(
    target: &CalibrationTarget,
    accountant: AccountantKind,
) -> Result<f64> {
    calibrate_noise_multiplier_within(target, accountant, &SigmaSearch::default())
}

/// [`calibrate_noise_multiplier`] with an explicit search interval and
/// tolerance. If even `search.min` meets the target, `search.min` is returned.
pub fn calibrate_noise_multiplier_within(
    target: &CalibrationTarget,
    accountant: AccountantKind,
    search: &SigmaSearch,
) -> Result<f64> {
    if !(target.epsilon.is_finite() && target.epsilon > 0.0) {
        return Err(PrivacyError::TargetEpsilon(target.epsilon));
    }
    check_delta(target.delta)?;
    check_sample_rate(target.sample_rate)?;
    if !(search.min.is_finite()
        && search.max.is_finite()
        && search.min > 0.0
        && search.min < search.max)
    {
        return Err(PrivacyError::SigmaBounds {
            min: search.min,
            max: search.max,
        });
    }
    let tolerance = if search.relative_tolerance.is_finite() && search.relative_tolerance > 0.0 {
        search.relative_tolerance
    } else {
        SigmaSearch::default().relative_tolerance
    };
    if target.steps == 0 {
        return Ok(search.min);
    }

    let eps_at = |sigma: f64| -> Result<f64> {
        let segment = TrainingSegment {
            sample_rate: target.sample_rate,
            noise_multiplier: sigma,
            steps: target.steps,
        };
        epsilon_spent(accountant, &[segment], target.delta)
    };
    // f(σ) = ε(σ) − target, decreasing; we want the root, from above.
    // A σ so small that the PLD grid would be too large counts as "too much
    // ε": the grid only explodes for tiny σ, far below any useful answer.
    let excess = |sigma: f64| -> Result<f64> {
        match eps_at(sigma) {
            Ok(eps) => Ok(eps - target.epsilon),
            Err(PrivacyError::PldTooLarge { .. }) => Ok(f64::INFINITY),
            Err(e) => Err(e),
        }
    };

    // Bracket. For PLD, start from the cheap RDP answer, which is an upper
    // bound on the PLD one in practice.
    let start = match accountant {
        AccountantKind::Rdp => search.max.min(search.min.max(1.0)),
        AccountantKind::Pld => {
            calibrate_noise_multiplier_within(target, AccountantKind::Rdp, search)
                .unwrap_or(search.max)
        }
    };
    let mut hi = start;
    let mut f_hi = excess(hi)?;
    while f_hi > 0.0 {
        if hi >= search.max {
            if f_hi.is_infinite() {
                // Say why: usually the PLD's grid limit, not an infinite ε.
                eps_at(hi)?;
            }
            return Err(PrivacyError::Unreachable {
                target: target.epsilon,
                sigma_max: search.max,
                epsilon_at_max: f_hi + target.epsilon,
            });
        }
        hi = (hi * 2.0).min(search.max);
        f_hi = excess(hi)?;
    }
    let mut lo = hi;
    let mut f_lo = f_hi;
    while f_lo <= 0.0 {
        if lo <= search.min {
            return Ok(search.min);
        }
        hi = lo;
        f_hi = f_lo;
        lo = (lo / 1.25).max(search.min);
        f_lo = excess(lo)?;
    }

    // Now f(lo) > 0 ≥ f(hi). Illinois false position on ln σ, falling back to
    // bisection when it stalls.
    let mut side = 0i8;
    while hi / lo - 1.0 > tolerance {
        let (llo, lhi) = (lo.ln(), hi.ln());
        let mut x = if f_hi.is_finite() && f_lo.is_finite() {
            lhi - f_hi * (lhi - llo) / (f_hi - f_lo)
        } else {
            0.5 * (llo + lhi)
        };
        let width = lhi - llo;
        if !(x > llo + 0.01 * width && x < lhi - 0.01 * width) {
            x = 0.5 * (llo + lhi);
        }
        let sigma = x.exp();
        let f = excess(sigma)?;
        if f <= 0.0 && f > -1e-7 * target.epsilon {
            // ε(σ) is the target to seven digits: no need to narrow further.
            return Ok(sigma);
        }
        if f > 0.0 {
            lo = sigma;
            f_lo = f;
            if side == -1 {
                f_hi *= 0.5;
            }
            side = -1;
        } else {
            hi = sigma;
            f_hi = f;
            if side == 1 {
                f_lo *= 0.5;
            }
            side = 1;
        }
    }
    Ok(hi)
}
