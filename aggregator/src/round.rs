//! One federated round: which updates were accepted and their exact weighted
//! mean. Pure logic, no I/O, so every rule is unit-tested here.
//!
//! Fed-SB averages R exactly: because A and B are frozen and shared,
//! mean(B·Rᵢ·A) = B·mean(Rᵢ)·A. The sum Σ wᵢ·Rᵢ is accumulated in f64 as
//! updates arrive, so memory does not grow with the number of participants
//! and rounding does not grow with it either. Only the current round's
//! updates are averaged (the Fed-SB authors' code averaged all past rounds
//! by mistake).

use std::collections::BTreeMap;

use fedsb_protocol::{
    AdapterShape, AdapterState, ClientUpdate, ErrorCode, ParticipantId, PrivacyReport, RoundId,
    MAX_UPDATE_ABS,
};

use crate::config::Weighting;

/// An update was refused; nothing of it reached the round.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What is kept of an accepted update after it is added to the sum: metadata
/// only, never the participant's R.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub participant: ParticipantId,
    pub client: String,
    pub num_samples: u64,
    pub weight: f64,
    pub frame_bytes: u64,
    pub received_unix_ms: u64,
    pub train_loss: Option<f32>,
    pub privacy: Option<PrivacyReport>,
    /// The ε the aggregator accounts for the participant with this update
    /// (the coordinator sets it before the round is stored); `None` without
    /// a report or a bound.
    pub epsilon_accounted: Option<f64>,
}

/// How the server moves the global model with a round's mean update:
/// x_t = x_{t−1} + η·(mean_t − x_{t−1}) + β·(x_{t−1} − x_{t−2}), where
/// mean_t is the weighted mean of the round's updates, η the server's
/// learning rate and β its momentum. This is FedAvgM (Hsu et al., 2019,
/// "Measuring the effects of non-identical data distribution for federated
/// visual classification"): with the pseudo-gradient Δ_t = x_{t−1} − mean_t
/// and velocity v_t = β·v_{t−1} + Δ_t, x_t = x_{t−1} − η·v_t, written with
/// the two previous global models in place of the velocity
/// (η·v_{t−1} = x_{t−2} − x_{t−1}), so the server keeps no state beyond the
/// committed models it stores anyway and a restart resumes it exactly.
/// η = 1, β = 0 ([`Self::MEAN`], the default) is Fed-SB's plain mean. The
/// step is linear in R, so it commutes with B·R·A as the mean does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerStep {
    pub learning_rate: f64,
    pub momentum: f64,
}

impl ServerStep {
    /// The plain weighted mean (FedAvg).
    pub const MEAN: Self = Self {
        learning_rate: 1.0,
        momentum: 0.0,
    };

    pub fn is_mean(&self) -> bool {
        *self == Self::MEAN
    }

    /// Refuses η outside (0, 2] and β outside [0, 1), naming which.
    pub fn check(&self) -> Result<(), String> {
        if !(self.learning_rate > 0.0 && self.learning_rate <= 2.0) {
            return Err(format!(
                "the server learning rate {} must be in (0, 2] (1 takes the mean)",
                self.learning_rate
            ));
        }
        if !(self.momentum >= 0.0 && self.momentum < 1.0) {
            return Err(format!(
                "the server momentum {} must be in [0, 1) (0 keeps none)",
                self.momentum
            ));
        }
        Ok(())
    }
}

/// The round that is collecting updates.
#[derive(Debug)]
pub struct Round {
    pub id: RoundId,
    pub opened_unix_ms: u64,
    shape: AdapterShape,
    weighting: Weighting,
    max_participants: u32,
    max_samples: u64,
    sum: Vec<f64>,
    total_weight: f64,
    contributions: BTreeMap<ParticipantId, Contribution>,
}

impl Round {
    /// `max_samples` is the most examples one participant can train on in a
    /// round (the task's `local_steps × batch_size`): an update claiming more
    /// is refused, so no participant can outweigh the others in the
    /// sample-weighted mean by overstating its count.
    pub fn new(
        id: RoundId,
        shape: AdapterShape,
        weighting: Weighting,
        max_participants: u32,
        max_samples: u64,
        opened_unix_ms: u64,
    ) -> Self {
        Self {
            id,
            opened_unix_ms,
            shape,
            weighting,
            max_participants,
            max_samples,
            sum: vec![0.0; shape.num_floats()],
            total_weight: 0.0,
            contributions: BTreeMap::new(),
        }
    }

    /// Number of accepted updates.
    pub fn len(&self) -> usize {
        self.contributions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.contributions.is_empty()
    }

    /// Whether `p` has an accepted update in this round.
    pub fn has(&self, p: ParticipantId) -> bool {
        self.contributions.contains_key(&p)
    }

    /// Whether the round holds `max_participants` updates.
    pub fn is_full(&self) -> bool {
        self.contributions.len() >= self.max_participants as usize
    }

    /// Checks an update against every rule and, if it passes all of them,
    /// adds it to the weighted sum. A rejected update leaves the round as it
    /// was.
    pub fn accept(
        &mut self,
        participant: ParticipantId,
        client: &str,
        update: ClientUpdate,
        frame_bytes: u64,
        now_unix_ms: u64,
    ) -> Result<(), Rejection> {
        self.check(participant, &update)?;
        self.add(participant, client, update, frame_bytes, now_unix_ms);
        Ok(())
    }

    /// Adds an update that [`Round::check`] accepted, with nothing changed
    /// in the round since (the coordinator stores the update in between, on
    /// its own task, so no other command runs meanwhile).
    pub fn add(
        &mut self,
        participant: ParticipantId,
        client: &str,
        update: ClientUpdate,
        frame_bytes: u64,
        now_unix_ms: u64,
    ) {
        let weight = match self.weighting {
            Weighting::Samples => update.num_samples as f64,
            Weighting::Uniform => 1.0,
        };
        let values = update
            .adapter
            .named_tensors()
            .flat_map(|(_, t)| t.data.iter());
        for (acc, &x) in self.sum.iter_mut().zip(values) {
            *acc += weight * f64::from(x);
        }
        self.total_weight += weight;
        self.contributions.insert(
            participant,
            Contribution {
                participant,
                client: client.to_owned(),
                num_samples: update.num_samples,
                weight,
                frame_bytes,
                received_unix_ms: now_unix_ms,
                train_loss: update.train_loss,
                privacy: update.privacy,
                epsilon_accounted: None,
            },
        );
    }

    /// Whether [`Round::accept`] would take this update from `participant`
    /// now: its checks, changing nothing. The coordinator checks, stores the
    /// update, then [adds](Round::add) it.
    pub fn check(
        &self,
        participant: ParticipantId,
        update: &ClientUpdate,
    ) -> Result<(), Rejection> {
        if update.round < self.id {
            return Err(Rejection::new(
                ErrorCode::StaleRound,
                format!(
                    "update is for round {}, which is closed; round {} is collecting",
                    update.round, self.id
                ),
            ));
        }
        if update.round > self.id {
            return Err(Rejection::new(
                ErrorCode::FutureRound,
                format!(
                    "update is for round {}, which is not open; round {} is collecting",
                    update.round, self.id
                ),
            ));
        }
        if self.has(participant) {
            return Err(Rejection::new(
                ErrorCode::DuplicateUpdate,
                format!(
                    "participant {participant} already sent an update for round {}",
                    self.id
                ),
            ));
        }
        if self.is_full() {
            return Err(Rejection::new(
                ErrorCode::RoundFull,
                format!(
                    "round {} already has its maximum of {} updates",
                    self.id, self.max_participants
                ),
            ));
        }
        if update.num_samples == 0 {
            return Err(Rejection::new(
                ErrorCode::InvalidSampleCount,
                "num_samples must be positive, got 0",
            ));
        }
        if update.num_samples > self.max_samples {
            return Err(Rejection::new(
                ErrorCode::InvalidSampleCount,
                format!(
                    "num_samples {} is more than one participant can train on in a round \
                     (local_steps × batch_size = {})",
                    update.num_samples, self.max_samples
                ),
            ));
        }
        if let Some(p) = &update.privacy {
            check_privacy(p)?;
        }
        if let Some(l) = update.train_loss {
            if !l.is_finite() {
                return Err(Rejection::new(
                    ErrorCode::NonFinite,
                    format!("train_loss is not finite ({l})"),
                ));
            }
        }
        update.adapter.validate(&self.shape).map_err(|e| {
            let code = match e {
                fedsb_protocol::ContentError::NonFinite { .. } => ErrorCode::NonFinite,
                _ => ErrorCode::ShapeMismatch,
            };
            Rejection::new(code, e.to_string())
        })?;
        for (name, t) in update.adapter.named_tensors() {
            if let Some((index, value)) = t
                .data
                .iter()
                .enumerate()
                .find(|(_, v)| v.abs() > MAX_UPDATE_ABS)
            {
                return Err(Rejection::new(
                    ErrorCode::NonFinite,
                    format!(
                        "tensor {name} holds {value:e} at index {index}, beyond the ±{MAX_UPDATE_ABS:e} \
                         any update value may have"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The next global model from the accepted updates and the server's
    /// step (see [`ServerStep`]), rounded once to f32, and the
    /// contributions. `previous` is the global model the round's updates
    /// started from (x_{t−1}), `before` the one before it (x_{t−2}; `None`
    /// in round 1, where the momentum has nothing to carry). With
    /// [`ServerStep::MEAN`] it is [`Self::aggregate`], bit for bit, and the
    /// two models are not read. `None` when no update was accepted.
    pub fn aggregate_step(
        &self,
        step: ServerStep,
        previous: &AdapterState,
        before: Option<&AdapterState>,
    ) -> Option<(AdapterState, Vec<Contribution>)> {
        if step.is_mean() {
            return self.aggregate();
        }
        if self.contributions.is_empty() {
            return None;
        }
        let (eta, beta) = (step.learning_rate, step.momentum);
        let flat = |s: &AdapterState| -> Vec<f32> {
            s.named_tensors()
                .flat_map(|(_, t)| t.data.iter().copied())
                .collect()
        };
        let prev = flat(previous);
        let before = before.map_or_else(|| prev.clone(), flat);
        assert_eq!(
            prev.len(),
            self.sum.len(),
            "the previous global model's shape"
        );
        assert_eq!(
            before.len(),
            self.sum.len(),
            "the global model's shape before it"
        );
        let mut state = AdapterState::zeros(&self.shape);
        let mut i = 0;
        for t in state.tensors_mut() {
            for x in t.data.iter_mut() {
                let mean = self.sum[i] / self.total_weight;
                let (p, b) = (f64::from(prev[i]), f64::from(before[i]));
                *x = (p + eta * (mean - p) + beta * (p - b)) as f32;
                i += 1;
            }
        }
        Some((state, self.contributions.values().cloned().collect()))
    }

    /// The weighted mean of the accepted updates, rounded once to f32, and
    /// the contributions. `None` when no update was accepted.
    pub fn aggregate(&self) -> Option<(AdapterState, Vec<Contribution>)> {
        if self.contributions.is_empty() {
            return None;
        }
        let mut state = AdapterState::zeros(&self.shape);
        let mut sums = self.sum.iter();
        for t in state.tensors_mut() {
            for (x, s) in t.data.iter_mut().zip(&mut sums) {
                *x = (s / self.total_weight) as f32;
            }
        }
        Some((state, self.contributions.values().cloned().collect()))
    }
}

pub(crate) fn check_privacy(p: &PrivacyReport) -> Result<(), Rejection> {
    let ok = p.noise_multiplier.is_finite()
        && p.noise_multiplier >= 0.0
        && p.sample_rate > 0.0
        && p.sample_rate <= 1.0
        && p.clip_norm.is_finite()
        && p.clip_norm > 0.0
        && p.delta > 0.0
        && p.delta < 1.0
        && p.epsilon_spent >= 0.0
        && !p.epsilon_spent.is_nan();
    if ok {
        Ok(())
    } else {
        Err(Rejection::new(
            ErrorCode::InvalidPrivacyReport,
            format!("privacy report out of range: {p:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedsb_protocol::Tensor;

    const SHAPE: AdapterShape = AdapterShape {
        rank: 2,
        modules: 3,
        head_classes: 2,
        head_hidden: 3,
    };

    fn state(f: impl Fn(usize) -> f32) -> AdapterState {
        let mut s = AdapterState::zeros(&SHAPE);
        let mut i = 0;
        for t in s.tensors_mut() {
            for x in &mut t.data {
                *x = f(i);
                i += 1;
            }
        }
        s
    }

    fn update(round: u64, n: u64, s: AdapterState) -> ClientUpdate {
        ClientUpdate {
            round: RoundId(round),
            num_samples: n,
            train_loss: Some(0.5),
            privacy: None,
            adapter: s,
        }
    }

    fn round(w: Weighting, max: u32) -> Round {
        Round::new(RoundId(2), SHAPE, w, max, 100, 0)
    }

    #[test]
    fn mean_is_sample_weighted() {
        let mut r = round(Weighting::Samples, 10);
        r.accept(
            ParticipantId(1),
            "a",
            update(2, 1, state(|i| i as f32)),
            10,
            0,
        )
        .unwrap();
        r.accept(ParticipantId(2), "b", update(2, 3, state(|_| 4.0)), 10, 0)
            .unwrap();
        let (s, c) = r.aggregate().unwrap();
        assert_eq!(c.len(), 2);
        let flat: Vec<f32> = s
            .named_tensors()
            .flat_map(|(_, t)| t.data.clone())
            .collect();
        for (i, x) in flat.iter().enumerate() {
            let want = (i as f64 * 1.0 + 4.0 * 3.0) / 4.0;
            assert!((f64::from(*x) - want).abs() < 1e-6, "{i}: {x} vs {want}");
        }
    }

    #[test]
    fn uniform_weighting_ignores_sample_counts() {
        let mut r = round(Weighting::Uniform, 10);
        r.accept(ParticipantId(1), "a", update(2, 1, state(|_| 1.0)), 10, 0)
            .unwrap();
        r.accept(ParticipantId(2), "b", update(2, 99, state(|_| 3.0)), 10, 0)
            .unwrap();
        let (s, _) = r.aggregate().unwrap();
        assert!(s
            .named_tensors()
            .all(|(_, t)| t.data.iter().all(|&x| x == 2.0)));
    }

    #[test]
    fn every_bad_update_is_rejected_and_leaves_the_sum_unchanged() {
        let mut r = round(Weighting::Samples, 2);
        r.accept(ParticipantId(1), "a", update(2, 2, state(|_| 1.0)), 10, 0)
            .unwrap();
        let mut nan = state(|_| 1.0);
        nan.r[1].data[0] = f32::NAN;
        // Finite but huge: it would overflow the mean or the server's step.
        let mut huge = state(|_| 1.0);
        huge.r[0].data[1] = 3e38;
        let mut huge_head = state(|_| 1.0);
        huge_head.head_bias.data[0] = -MAX_UPDATE_ABS * 1.0001;
        let mut wrong_count = state(|_| 1.0);
        wrong_count.r.pop();
        let mut wrong_shape = state(|_| 1.0);
        wrong_shape.head_weight = Tensor::zeros(&[3, 2]);
        let mut bad_privacy = update(2, 1, state(|_| 9.0));
        bad_privacy.privacy = Some(PrivacyReport {
            noise_multiplier: 1.0,
            sample_rate: 2.0,
            steps: 1,
            clip_norm: 0.1,
            delta: 1e-5,
            epsilon_spent: 1.0,
        });
        let cases = [
            (
                ParticipantId(2),
                update(1, 1, state(|_| 9.0)),
                ErrorCode::StaleRound,
            ),
            (
                ParticipantId(2),
                update(3, 1, state(|_| 9.0)),
                ErrorCode::FutureRound,
            ),
            (
                ParticipantId(1),
                update(2, 1, state(|_| 9.0)),
                ErrorCode::DuplicateUpdate,
            ),
            (
                ParticipantId(2),
                update(2, 0, state(|_| 9.0)),
                ErrorCode::InvalidSampleCount,
            ),
            (
                ParticipantId(2),
                update(2, 101, state(|_| 9.0)),
                ErrorCode::InvalidSampleCount,
            ),
            (ParticipantId(2), update(2, 1, nan), ErrorCode::NonFinite),
            (ParticipantId(2), update(2, 1, huge), ErrorCode::NonFinite),
            (
                ParticipantId(2),
                update(2, 1, huge_head),
                ErrorCode::NonFinite,
            ),
            (
                ParticipantId(2),
                update(2, 1, wrong_count),
                ErrorCode::ShapeMismatch,
            ),
            (
                ParticipantId(2),
                update(2, 1, wrong_shape),
                ErrorCode::ShapeMismatch,
            ),
            (
                ParticipantId(2),
                bad_privacy,
                ErrorCode::InvalidPrivacyReport,
            ),
        ];
        for (p, u, code) in cases {
            let e = r.accept(p, "x", u, 10, 0).unwrap_err();
            assert_eq!(e.code, code, "{}", e.message);
        }
        // At the limit: accepted by the check.
        let mut limit = update(2, 1, state(|_| 1.0));
        limit.adapter.r[0].data[0] = -MAX_UPDATE_ABS;
        r.check(ParticipantId(2), &limit).unwrap();
        r.accept(ParticipantId(2), "b", update(2, 2, state(|_| 3.0)), 10, 0)
            .unwrap();
        let e = r
            .accept(ParticipantId(3), "c", update(2, 1, state(|_| 9.0)), 10, 0)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::RoundFull);
        let (s, c) = r.aggregate().unwrap();
        assert_eq!(c.len(), 2);
        assert!(s
            .named_tensors()
            .all(|(_, t)| t.data.iter().all(|&x| x == 2.0)));
    }

    /// The server step against its formula, worked in f64 here: the mean
    /// of 1 (weight 1) and 4 (weight 2) is 3 in every coordinate.
    #[test]
    fn the_server_step_moves_from_the_previous_model_with_momentum() {
        let mut r = round(Weighting::Samples, 3);
        r.accept(ParticipantId(1), "a", update(2, 1, state(|_| 1.0)), 10, 0)
            .unwrap();
        r.accept(ParticipantId(2), "b", update(2, 2, state(|_| 4.0)), 10, 0)
            .unwrap();
        let prev = state(|i| i as f32 * 0.5);
        let before = state(|i| 1.0 - i as f32 * 0.25);
        let all = |s: &AdapterState| -> Vec<f32> {
            s.named_tensors()
                .flat_map(|(_, t)| t.data.iter().copied())
                .collect()
        };
        // The plain mean ignores both models.
        let (mean, _) = r
            .aggregate_step(ServerStep::MEAN, &prev, Some(&before))
            .unwrap();
        assert_eq!(mean, r.aggregate().unwrap().0);
        assert!(all(&mean).iter().all(|&x| x == 3.0));
        // x_t = x_{t−1} + η (mean − x_{t−1}) + β (x_{t−1} − x_{t−2}).
        let step = ServerStep {
            learning_rate: 0.5,
            momentum: 0.75,
        };
        let (got, c) = r.aggregate_step(step, &prev, Some(&before)).unwrap();
        assert_eq!(c.len(), 2);
        for (i, x) in all(&got).into_iter().enumerate() {
            let (p, b) = (i as f64 * 0.5, 1.0 - i as f64 * 0.25);
            let want = p + 0.5 * (3.0 - p) + 0.75 * (p - b);
            assert_eq!(x, want as f32, "coordinate {i}");
        }
        // Round 1 has no model before the previous one: no momentum yet.
        let (first, _) = r.aggregate_step(step, &prev, None).unwrap();
        for (i, x) in all(&first).into_iter().enumerate() {
            let p = i as f64 * 0.5;
            assert_eq!(x, (p + 0.5 * (3.0 - p)) as f32, "coordinate {i}");
        }
        // η = 1 with momentum: the mean plus β times the last move.
        let heavy = ServerStep {
            learning_rate: 1.0,
            momentum: 0.5,
        };
        let (h, _) = r.aggregate_step(heavy, &prev, Some(&before)).unwrap();
        for (i, x) in all(&h).into_iter().enumerate() {
            let (p, b) = (i as f64 * 0.5, 1.0 - i as f64 * 0.25);
            assert_eq!(x, (3.0 + 0.5 * (p - b)) as f32, "coordinate {i}");
        }
        assert!(round(Weighting::Samples, 2)
            .aggregate_step(step, &prev, None)
            .is_none());
    }

    #[test]
    fn server_steps_out_of_range_are_refused_by_name() {
        assert!(ServerStep::MEAN.check().is_ok());
        let ok = ServerStep {
            learning_rate: 2.0,
            momentum: 0.9,
        };
        assert!(ok.check().is_ok());
        for eta in [0.0, -1.0, 2.5, f64::NAN, f64::INFINITY] {
            let e = ServerStep {
                learning_rate: eta,
                momentum: 0.0,
            }
            .check()
            .unwrap_err();
            assert!(e.contains("server learning rate"), "{eta}: {e}");
        }
        for beta in [-0.1, 1.0, 1.5, f64::NAN] {
            let e = ServerStep {
                learning_rate: 1.0,
                momentum: beta,
            }
            .check()
            .unwrap_err();
            assert!(e.contains("server momentum"), "{beta}: {e}");
        }
    }

    #[test]
    fn a_sample_count_above_local_steps_times_batch_is_refused() {
        // `round` allows 100 samples per participant. An update claiming
        // more would outweigh every honest one in the sample-weighted mean.
        for w in [Weighting::Samples, Weighting::Uniform] {
            let mut r = round(w, 3);
            let e = r
                .accept(
                    ParticipantId(1),
                    "a",
                    update(2, 1_000_000, state(|_| 9.0)),
                    10,
                    0,
                )
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidSampleCount);
            assert!(
                e.message.contains("1000000") && e.message.contains("= 100)"),
                "{}",
                e.message
            );
            assert!(r.is_empty());
            r.accept(ParticipantId(1), "a", update(2, 100, state(|_| 1.0)), 10, 0)
                .unwrap();
            r.accept(ParticipantId(2), "b", update(2, 100, state(|_| 3.0)), 10, 0)
                .unwrap();
            let (s, _) = r.aggregate().unwrap();
            assert!(s
                .named_tensors()
                .all(|(_, t)| t.data.iter().all(|&x| x == 2.0)));
        }
    }

    #[test]
    fn an_empty_round_has_no_aggregate() {
        assert!(round(Weighting::Samples, 2).aggregate().is_none());
    }
}
