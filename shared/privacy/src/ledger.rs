//! The per-participant record of DP-SGD steps taken against a privacy budget.

use serde::{Deserialize, Serialize};

use crate::error::{PrivacyError, Result};
use crate::rdp::check_delta;
use crate::{epsilon_spent, AccountantKind, TrainingSegment};

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
        segment.validate()?;
        if segment.steps == 0 {
            return Ok(());
        }
        match self.segments.last_mut() {
            Some(last)
                if last.sample_rate == segment.sample_rate
                    && last.noise_multiplier == segment.noise_multiplier =>
            {
                last.steps = last.steps.saturating_add(segment.steps);
            }
            _ => self.segments.push(segment),
        }
        Ok(())
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
    pub fn max_additional_steps(
        &self,
        sample_rate: f64,
        noise_multiplier: f64,
        limit: u64,
    ) -> Result<u64> {
        let at = |steps: u64| TrainingSegment {
            sample_rate,
            noise_multiplier,
            steps,
        };
        at(1).validate()?;
        if limit == 0 || !self.can_take(&at(1))? {
            return Ok(0);
        }
        // Exponential search for an upper end, then bisection. ε grows with
        // the number of steps.
        let mut good = 1u64;
        let mut bad = None;
        while bad.is_none() {
            let next = good.saturating_mul(2).min(limit);
            if next == good {
                return Ok(good);
            }
            if self.can_take(&at(next))? {
                good = next;
            } else {
                bad = Some(next);
            }
        }
        let mut bad = bad.unwrap_or(limit);
        while bad - good > 1 {
            let mid = good + (bad - good) / 2;
            if self.can_take(&at(mid))? {
                good = mid;
            } else {
                bad = mid;
            }
        }
        Ok(good)
    }
}
