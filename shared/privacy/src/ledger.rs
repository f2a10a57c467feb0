//! The per-participant record of DP-SGD steps taken against a privacy budget.

use serde::{Deserialize, Serialize};

use crate::error::{PrivacyError, Result};
use crate::rdp::{check_delta, epsilon_from_rdp, poisson_subsampled_gaussian_rdp};
use crate::{
    append_segment, epsilon_spent, AccountantKind, PldAccountant, RdpAccountant,
    SubsampledGaussianStep, TrainingSegment, DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
};

/// A target (ε, δ) that a participant must not exceed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacyBudget {
    /// Largest ε allowed (> 0).
    pub epsilon: f64,
    /// The δ the ε is measured at, in (0, 1).
    pub delta: f64,
}

impl PrivacyBudget {
    /// A checked budget.
    pub fn new(epsilon: f64, delta: f64) -> Result<Self> {
        let budget = Self { epsilon, delta };
        budget.validate()?;
        Ok(budget)
    }

    /// Checks ε > 0 (finite) and δ ∈ (0, 1).
    pub fn validate(&self) -> Result<()> {
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(PrivacyError::TargetEpsilon(self.epsilon));
        }
        check_delta(self.delta)
    }
}

/// The answer to "may I take these steps?".
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BudgetCheck {
    /// ε spent so far (at the budget's δ).
    pub epsilon_spent: f64,
    /// ε that would be spent after the proposed steps.
    pub epsilon_after: f64,
    /// The budget's ε.
    pub epsilon_budget: f64,
    /// Whether `epsilon_after <= epsilon_budget`.
    pub within_budget: bool,
}

/// What a participant has spent: every [`TrainingSegment`] it has trained, in
/// order, with the budget and the accountant used to judge them.
///
/// A client records each round's steps after taking them and asks
/// [`PrivacyLedger::check`] (or [`PrivacyLedger::max_additional_steps`]) before
/// the next round, refusing to train once the budget would be exceeded.
///
/// ```
/// use fedsb_privacy::{AccountantKind, PrivacyBudget, PrivacyLedger, TrainingSegment};
/// let budget = PrivacyBudget::new(3.0, 1e-5).unwrap();
/// let mut ledger = PrivacyLedger::new(budget, AccountantKind::Rdp).unwrap();
/// let round = TrainingSegment::new(0.01, 1.1, 100).unwrap();
/// assert!(ledger.check(&round).unwrap().within_budget);
/// ledger.record(round).unwrap();
/// assert!(ledger.epsilon_spent().unwrap() > 0.0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyLedger {
    budget: PrivacyBudget,
    accountant: AccountantKind,
    segments: Vec<TrainingSegment>,
}

impl PrivacyLedger {
    /// An empty ledger.
    pub fn new(budget: PrivacyBudget, accountant: AccountantKind) -> Result<Self> {
        budget.validate()?;
        Ok(Self {
            budget,
            accountant,
            segments: Vec::new(),
        })
    }

    /// The budget this ledger judges against.
    pub fn budget(&self) -> PrivacyBudget {
        self.budget
    }

    /// The accountant this ledger uses.
    pub fn accountant(&self) -> AccountantKind {
        self.accountant
    }

    /// The segments recorded so far (consecutive ones with equal q and σ are
    /// merged).
    pub fn segments(&self) -> &[TrainingSegment] {
        &self.segments
    }

    /// Total steps recorded.
    pub fn total_steps(&self) -> u64 {
        self.segments.iter().map(|s| s.steps).sum()
    }

    /// Records steps that were taken. Recording is unconditional: steps that
    /// happened have been spent, whether or not they fit the budget.
    pub fn record(&mut self, segment: TrainingSegment) -> Result<()> {
        append_segment(&mut self.segments, segment)
    }

    /// ε spent so far at the budget's δ.
    pub fn epsilon_spent(&self) -> Result<f64> {
        epsilon_spent(self.accountant, &self.segments, self.budget.delta)
    }

    /// ε spent so far at another δ.
    pub fn epsilon_spent_at(&self, delta: f64) -> Result<f64> {
        epsilon_spent(self.accountant, &self.segments, delta)
    }

    /// Would taking `next` keep the participant within budget?
    pub fn check(&self, next: &TrainingSegment) -> Result<BudgetCheck> {
        next.validate()?;
        let spent = self.epsilon_spent()?;
        let after = self.epsilon_after(next)?;
        Ok(BudgetCheck {
            epsilon_spent: spent,
            epsilon_after: after,
            epsilon_budget: self.budget.epsilon,
            within_budget: after <= self.budget.epsilon,
        })
    }

    /// Shorthand for `check(next)?.within_budget`.
    pub fn can_take(&self, next: &TrainingSegment) -> Result<bool> {
        Ok(self.epsilon_after(next)? <= self.budget.epsilon)
    }

    fn epsilon_after(&self, next: &TrainingSegment) -> Result<f64> {
        let mut all = self.segments.clone();
        all.push(*next);
        epsilon_spent(self.accountant, &all, self.budget.delta)
    }

    /// The largest number of further steps at (q, σ) that stays within
    /// budget (0 if none does), searched up to `limit` steps.
    ///
    /// The recorded segments and the one-step PLD are accounted once; the
    /// search then needs a few compositions (PLD) or a few additions (RDP).
    /// For PLD it starts from the RDP answer, which is nearly always a lower
    /// bound on it.
    pub fn max_additional_steps(
        &self,
        sample_rate: f64,
        noise_multiplier: f64,
        limit: u64,
    ) -> Result<u64> {
        TrainingSegment::new(sample_rate, noise_multiplier, 1)?;
        if limit == 0 {
            return Ok(0);
        }
        let budget = self.budget.epsilon;
        let delta = self.budget.delta;

        let mut rdp_base = RdpAccountant::new();
        for s in &self.segments {
            rdp_base.compose(s)?;
        }
        let rdp_step =
            poisson_subsampled_gaussian_rdp(sample_rate, noise_multiplier, rdp_base.orders())?;
        let rdp_after = |steps: u64| -> Result<f64> {
            let total: Vec<f64> = rdp_base
                .rdp()
                .iter()
                .zip(&rdp_step)
                .map(|(base, step)| base + steps as f64 * step)
                .collect();
            Ok(epsilon_from_rdp(rdp_base.orders(), &total, delta)?.0)
        };
        let rdp_answer = search_max_steps(rdp_after, budget, 1, limit)?;
        if self.accountant == AccountantKind::Rdp {
            return Ok(rdp_answer);
        }

        let mut pld_base = PldAccountant::new();
        for s in &self.segments {
            pld_base.compose(s)?;
        }
        let step = SubsampledGaussianStep::new(
            sample_rate,
            noise_multiplier,
            DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
        )?;
        let pld_after = |steps: u64| -> Result<f64> {
            let next = step.repeated(steps)?;
            if pld_base.is_identity() {
                next.epsilon(delta)
            } else {
                pld_base.distribution().compose(&next)?.epsilon(delta)
            }
        };
        search_max_steps(pld_after, budget, rdp_answer.max(1), limit)
    }
}

/// The largest k in [0, limit] with `epsilon_after(k) <= budget`, for
/// `epsilon_after` non-decreasing in k, starting the search at `start`:
/// exponential search for a bracket, then alternating interpolation and
/// bisection steps.
fn search_max_steps(
    mut epsilon_after: impl FnMut(u64) -> Result<f64>,
    budget: f64,
    start: u64,
    limit: u64,
) -> Result<u64> {
    let start = start.clamp(1, limit);
    let e = epsilon_after(start)?;
    let (mut good, mut e_good, mut bad, mut e_bad);
    if e <= budget {
        good = start;
        e_good = e;
        loop {
            if good == limit {
                return Ok(limit);
            }
            let next = good.saturating_mul(2).min(limit);
            let e = epsilon_after(next)?;
            if e <= budget {
                good = next;
                e_good = e;
            } else {
                bad = next;
                e_bad = e;
                break;
            }
        }
    } else {
        bad = start;
        e_bad = e;
        loop {
            if bad == 1 {
                return Ok(0);
            }
            let next = bad / 2;
            let e = epsilon_after(next)?;
            if e <= budget {
                good = next;
                e_good = e;
                break;
            }
            bad = next;
            e_bad = e;
        }
    }
    // Invariant: good fits, bad does not, good < bad.
    let mut interpolate = true;
    while bad - good > 1 {
        let mid = if interpolate && e_bad.is_finite() && e_bad > e_good {
            let frac = (budget - e_good) / (e_bad - e_good);
            let k = good as f64 + frac * (bad - good) as f64;
            (k.round() as u64).clamp(good + 1, bad - 1)
        } else {
            good + (bad - good) / 2
        };
        interpolate = !interpolate;
        let e = epsilon_after(mid)?;
        if e <= budget {
            good = mid;
            e_good = e;
        } else {
            bad = mid;
            e_bad = e;
        }
    }
    Ok(good)
}
