//! The one error type of this crate.

/// Everything that can go wrong when accounting or calibrating.
///
/// Every public function checks its inputs and answers with one of these
/// instead of panicking; the message names the offending value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// The Poisson sampling rate q is not in (0, 1].
    #[error("sample rate {0} is outside (0, 1]")]
    SampleRate(f64),
    /// The noise multiplier σ (noise standard deviation / clipping norm) is not
    /// a positive finite number.
    #[error("noise multiplier {0} must be a finite number > 0")]
    NoiseMultiplier(f64),
    /// δ is not in the open interval (0, 1).
    #[error("delta {0} must be in (0, 1)")]
    Delta(f64),
    /// ε is negative or not finite.
    #[error("epsilon {0} must be a finite number >= 0")]
    Epsilon(f64),
    /// A target ε for calibration or a budget is not strictly positive.
    #[error("target epsilon {0} must be a finite number > 0")]
    TargetEpsilon(f64),
    /// An RDP order is not a finite number > 1.
    #[error("RDP order {0} must be a finite number > 1")]
    RdpOrder(f64),
    /// No RDP orders were given.
    #[error("at least one RDP order is needed")]
    NoRdpOrders,
    /// RDP values and orders differ in length.
    #[error("{orders} RDP orders but {values} RDP values")]
    RdpLengthMismatch {
        /// Number of orders.
        orders: usize,
        /// Number of RDP values.
        values: usize,
    },
    /// The PLD discretization interval is not a positive finite number.
    #[error("PLD value discretization interval {0} must be a finite number > 0")]
    Discretization(f64),
    /// The PLD would need more grid points than this crate is willing to
    /// allocate (a tiny σ, a tiny discretization interval or a huge number of
    /// steps). Use a coarser discretization or the RDP accountant.
    #[error(
        "the privacy loss distribution would need {points} grid points \
         (limit {limit}) for a noise multiplier this small over this many steps; \
         use the RDP accountant (`--accountant rdp` in fedsb's commands) or, \
         calling the library, a coarser discretization interval"
    )]
    PldTooLarge {
        /// Grid points that would have been needed.
        points: u128,
        /// The most this crate allocates.
        limit: usize,
    },
    /// The σ search interval is empty or not made of positive finite numbers.
    #[error("noise multiplier bounds [{min}, {max}] must satisfy 0 < min < max < infinity")]
    SigmaBounds {
        /// Lower end of the search interval.
        min: f64,
        /// Upper end of the search interval.
        max: f64,
    },
    /// Calibration cannot reach the target ε even with the largest σ allowed.
    #[error(
        "target epsilon {target} is unreachable: even noise multiplier {sigma_max} \
         gives epsilon {epsilon_at_max}"
    )]
    Unreachable {
        /// The ε asked for.
        target: f64,
        /// The largest σ tried.
        sigma_max: f64,
        /// The ε that σ gives.
        epsilon_at_max: f64,
    },
    /// An accountant name that is neither `rdp` nor `pld`.
    #[error("unknown accountant {0:?} (expected \"rdp\" or \"pld\")")]
    UnknownAccountant(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, PrivacyError>;
