//! Properties the accountants must have regardless of reference values:
//! closed forms, monotonicity, composition, calibration round trips, the
//! ledger, and errors instead of panics on bad input.

use fedsb_privacy::rdp::{delta_from_rdp, epsilon_from_rdp, poisson_subsampled_gaussian_rdp};
use fedsb_privacy::{
    calibrate_noise_multiplier, calibrate_noise_multiplier_within, default_rdp_orders, delta_spent,
    epsilon_spent, AccountantKind, CalibrationTarget, PldAccountant, PrivacyBudget, PrivacyError,
    PrivacyLedger, RdpAccountant, SigmaSearch, TrainingSegment,
};

const BOTH: [AccountantKind; 2] = [AccountantKind::Rdp, AccountantKind::Pld];

fn seg(q: f64, sigma: f64, steps: u64) -> TrainingSegment {
    TrainingSegment::new(q, sigma, steps).unwrap()
}

fn eps(kind: AccountantKind, segments: &[TrainingSegment], delta: f64) -> f64 {
    epsilon_spent(kind, segments, delta).unwrap()
}

/// Φ(x).
fn ndtr(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// The exact ε of `steps` compositions of the Gaussian mechanism with noise
/// multiplier σ (Balle & Wang 2018): the composition is a Gaussian mechanism
/// with μ = √steps / σ, whose δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ).
fn exact_gaussian_epsilon(sigma: f64, steps: u64, delta: f64) -> f64 {
    let mu = (steps as f64).sqrt() / sigma;
    let delta_at = |e: f64| ndtr(mu / 2.0 - e / mu) - e.exp() * ndtr(-mu / 2.0 - e / mu);
    let (mut lo, mut hi) = (0.0, 1.0);
    while delta_at(hi) > delta {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if delta_at(mid) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

#[test]
fn no_subsampling_rdp_is_the_gaussian_closed_form() {
    let orders = default_rdp_orders();
    for sigma in [0.5, 1.0, 1.7, 8.0] {
        let rdp = poisson_subsampled_gaussian_rdp(1.0, sigma, &orders).unwrap();
        for (alpha, r) in orders.iter().zip(&rdp) {
            let want = alpha / (2.0 * sigma * sigma);
            assert!(
                (r - want).abs() <= 1e-15 * want,
                "alpha={alpha} sigma={sigma}: {r} vs {want}"
            );
        }
        // ε is the conversion applied to steps·α/(2σ²) at the best order.
        let steps = 50u64;
        let delta: f64 = 1e-5;
        let by_hand = orders
            .iter()
            .filter(|&&a| a > 1.01)
            .map(|&a| {
                let r = steps as f64 * a / (2.0 * sigma * sigma);
                r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln()
            })
            .fold(f64::INFINITY, f64::min)
            .max(0.0);
        let got = eps(AccountantKind::Rdp, &[seg(1.0, sigma, steps)], delta);
        assert!(
            (got - by_hand).abs() <= 1e-12 * by_hand.max(1.0),
            "{got} vs {by_hand}"
        );
    }
}

#[test]
fn no_subsampling_pld_brackets_the_exact_gaussian_epsilon() {
    for (sigma, steps, delta) in [
        (1.0, 1, 1e-5),
        (2.0, 10, 1e-5),
        (5.0, 100, 1e-6),
        (20.0, 1000, 1e-5),
    ] {
        let exact = exact_gaussian_epsilon(sigma, steps, delta);
        let pld = eps(AccountantKind::Pld, &[seg(1.0, sigma, steps)], delta);
        println!("sigma={sigma} steps={steps}: PLD {pld:.6}, exact {exact:.6}");
        // Pessimistic: never below the truth (beyond floating point), and tight.
        assert!(pld >= exact * (1.0 - 1e-6), "PLD {pld} below exact {exact}");
        assert!(
            pld <= exact * 1.01,
            "PLD {pld} more than 1 % above exact {exact}"
        );
    }
}

#[test]
fn pld_at_default_spacing_is_close_to_a_finer_grid() {
    // A finer grid is closer to the true ε; the default must be within 1 %.
    let run = [seg(0.02, 1.2, 1000)];
    let mut coarse = PldAccountant::new();
    let mut fine = PldAccountant::with_discretization(2.5e-5).unwrap();
    for s in &run {
        coarse.compose(s).unwrap();
        fine.compose(s).unwrap();
    }
    let (c, f) = (coarse.epsilon(1e-5).unwrap(), fine.epsilon(1e-5).unwrap());
    println!("spacing 1e-4: {c:.6}, spacing 2.5e-5: {f:.6}");
    assert!(c >= f * (1.0 - 1e-4) && c <= f * 1.01, "{c} vs {f}");
}

#[test]
fn epsilon_grows_with_steps_and_sample_rate_and_shrinks_with_noise() {
    let delta = 1e-5;
    for kind in BOTH {
        let by_steps: Vec<f64> = [1, 10, 100, 1000]
            .iter()
            .map(|&t| eps(kind, &[seg(0.02, 1.0, t)], delta))
            .collect();
        let by_sigma: Vec<f64> = [0.8, 1.0, 1.5, 2.5, 5.0]
            .iter()
            .map(|&s| eps(kind, &[seg(0.02, s, 300)], delta))
            .collect();
        let by_q: Vec<f64> = [0.001, 0.01, 0.05, 0.2, 1.0]
            .iter()
            .map(|&q| eps(kind, &[seg(q, 2.0, 50)], delta))
            .collect();
        assert!(
            by_steps.windows(2).all(|w| w[0] < w[1]),
            "{kind} steps: {by_steps:?}"
        );
        assert!(
            by_sigma.windows(2).all(|w| w[0] > w[1]),
            "{kind} sigma: {by_sigma:?}"
        );
        assert!(by_q.windows(2).all(|w| w[0] < w[1]), "{kind} q: {by_q:?}");
        // δ(ε) decreases in ε, and ε(δ) decreases in δ.
        let run = [seg(0.02, 1.0, 500)];
        let deltas: Vec<f64> = [0.5, 1.0, 2.0, 4.0]
            .iter()
            .map(|&e| delta_spent(kind, &run, e).unwrap())
            .collect();
        assert!(
            deltas.windows(2).all(|w| w[0] > w[1]),
            "{kind} delta(eps): {deltas:?}"
        );
        let epsilons: Vec<f64> = [1e-7, 1e-5, 1e-3]
            .iter()
            .map(|&d| eps(kind, &run, d))
            .collect();
        assert!(
            epsilons.windows(2).all(|w| w[0] > w[1]),
            "{kind} eps(delta): {epsilons:?}"
        );
    }
}

#[test]
fn pld_is_tighter_than_rdp() {
    for run in [
        [seg(0.04, 1.5, 2250)],
        [seg(0.01, 0.9, 500)],
        [seg(1.0, 3.0, 20)],
    ] {
        let (r, p) = (
            eps(AccountantKind::Rdp, &run, 1e-5),
            eps(AccountantKind::Pld, &run, 1e-5),
        );
        assert!(p < r, "{run:?}: PLD {p} not below RDP {r}");
    }
}

#[test]
fn epsilon_and_delta_are_inverse() {
    let run = [seg(0.02, 1.0, 500)];
    for kind in BOTH {
        let e = eps(kind, &run, 1e-5);
        let d = delta_spent(kind, &run, e).unwrap();
        // RDP's two conversions take their optimum at possibly different
        // orders, so only "δ(ε(δ)) ≤ δ" holds exactly; PLD is a fixed point.
        assert!(d <= 1e-5 * (1.0 + 1e-6), "{kind}: delta({e}) = {d}");
        if kind == AccountantKind::Pld {
            assert!(d >= 1e-5 * (1.0 - 1e-6), "{kind}: delta({e}) = {d}");
        }
    }
}

#[test]
fn heterogeneous_segments_compose() {
    let a = seg(0.01, 1.1, 2000);
    let b = seg(0.02, 1.5, 1000);
    // RDP adds per order.
    let mut both = RdpAccountant::new();
    both.compose(&a).unwrap();
    both.compose(&b).unwrap();
    let ra =
        poisson_subsampled_gaussian_rdp(a.sample_rate, a.noise_multiplier, both.orders()).unwrap();
    let rb =
        poisson_subsampled_gaussian_rdp(b.sample_rate, b.noise_multiplier, both.orders()).unwrap();
    for ((total, x), y) in both.rdp().iter().zip(&ra).zip(&rb) {
        let want = 2000.0 * x + 1000.0 * y;
        assert!((total - want).abs() <= 1e-12 * want);
    }
    for kind in BOTH {
        // Order does not matter.
        let ab = eps(kind, &[a, b], 1e-5);
        let ba = eps(kind, &[b, a], 1e-5);
        assert!((ab - ba).abs() <= 1e-9 * ab, "{kind}: {ab} vs {ba}");
        // Splitting a segment changes nothing (RDP exactly, PLD up to the
        // tail truncation of the extra composition).
        let whole = eps(kind, &[seg(0.04, 1.5, 2250)], 1e-5);
        let split = eps(kind, &[seg(0.04, 1.5, 1000), seg(0.04, 1.5, 1250)], 1e-5);
        assert!(
            (whole - split).abs() <= 1e-6 * whole,
            "{kind}: {whole} vs {split}"
        );
        // Adding a segment costs privacy.
        assert!(ab > eps(kind, &[a], 1e-5) && ab > eps(kind, &[b], 1e-5));
    }
}

#[test]
fn zero_steps_and_huge_noise_cost_nothing() {
    for kind in BOTH {
        assert_eq!(eps(kind, &[], 1e-5), 0.0);
        assert_eq!(eps(kind, &[seg(0.5, 1.0, 0)], 1e-5), 0.0);
        // RDP cannot go below ≈ −ln(δ)/(α_max − 1) with α_max = 63
        // (dp-accounting gives 0.10287 here too); PLD is nearly exact.
        let tiny = eps(kind, &[seg(0.01, 1000.0, 10)], 1e-5);
        let limit = if kind == AccountantKind::Rdp {
            0.11
        } else {
            1e-3
        };
        assert!((0.0..limit).contains(&tiny), "{kind}: {tiny}");
    }
}

#[test]
fn calibration_round_trips_for_both_accountants() {
    let cases = [
        (
            AccountantKind::Rdp,
            CalibrationTarget {
                epsilon: 3.0,
                delta: 1e-5,
                sample_rate: 0.01,
                steps: 10_000,
            },
        ),
        (
            AccountantKind::Rdp,
            CalibrationTarget {
                epsilon: 0.5,
                delta: 1e-6,
                sample_rate: 1.0,
                steps: 5,
            },
        ),
        (
            AccountantKind::Pld,
            CalibrationTarget {
                epsilon: 2.0,
                delta: 1e-5,
                sample_rate: 0.02,
                steps: 1000,
            },
        ),
        (
            AccountantKind::Pld,
            CalibrationTarget {
                epsilon: 8.0,
                delta: 1e-5,
                sample_rate: 0.04,
                steps: 300,
            },
        ),
    ];
    for (kind, target) in cases {
        let sigma = calibrate_noise_multiplier(&target, kind).unwrap();
        let run = [seg(target.sample_rate, sigma, target.steps)];
        let achieved = eps(kind, &run, target.delta);
        println!("{kind} {target:?}: sigma {sigma:.6}, epsilon {achieved:.6}");
        assert!(
            achieved <= target.epsilon,
            "{kind}: epsilon {achieved} above target {}",
            target.epsilon
        );
        assert!(
            achieved >= target.epsilon * 0.995,
            "{kind}: epsilon {achieved} far below target {}",
            target.epsilon
        );
        // A slightly smaller σ overshoots: σ is (nearly) the smallest.
        let less = eps(
            kind,
            &[seg(target.sample_rate, sigma * 0.995, target.steps)],
            target.delta,
        );
        assert!(
            less > target.epsilon,
            "{kind}: sigma {sigma} is not minimal"
        );
    }
    // PLD needs less noise than RDP for the same target.
    let target = CalibrationTarget {
        epsilon: 2.0,
        delta: 1e-5,
        sample_rate: 0.02,
        steps: 1000,
    };
    let rdp = calibrate_noise_multiplier(&target, AccountantKind::Rdp).unwrap();
    let pld = calibrate_noise_multiplier(&target, AccountantKind::Pld).unwrap();
    assert!(pld < rdp, "PLD sigma {pld} not below RDP sigma {rdp}");
}

#[test]
fn calibration_reports_unreachable_targets_and_bad_bounds() {
    let target = CalibrationTarget {
        epsilon: 0.01,
        delta: 1e-5,
        sample_rate: 1.0,
        steps: 1000,
    };
    let search = SigmaSearch {
        min: 0.5,
        max: 10.0,
        relative_tolerance: 1e-4,
    };
    for kind in BOTH {
        let err = calibrate_noise_multiplier_within(&target, kind, &search).unwrap_err();
        assert!(
            matches!(err, PrivacyError::Unreachable { sigma_max, .. } if sigma_max == 10.0),
            "{err}"
        );
        assert!(err.to_string().contains("unreachable"), "{err}");
    }
    // Out of reach because even the largest σ needs a PLD grid above the
    // limit: that is the error, not "epsilon inf".
    let endless = CalibrationTarget {
        epsilon: 1.0,
        delta: 1e-5,
        sample_rate: 0.01,
        steps: 1_000_000_000_000,
    };
    let err = calibrate_noise_multiplier(&endless, AccountantKind::Pld).unwrap_err();
    assert!(matches!(err, PrivacyError::PldTooLarge { .. }), "{err}");
    let bad_bounds = SigmaSearch {
        min: 2.0,
        max: 1.0,
        relative_tolerance: 1e-4,
    };
    let ok_target = CalibrationTarget {
        epsilon: 1.0,
        ..target
    };
    assert!(matches!(
        calibrate_noise_multiplier_within(&ok_target, AccountantKind::Rdp, &bad_bounds),
        Err(PrivacyError::SigmaBounds { .. })
    ));
    for bad_eps in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let t = CalibrationTarget {
            epsilon: bad_eps,
            ..ok_target
        };
        assert!(matches!(
            calibrate_noise_multiplier(&t, AccountantKind::Rdp),
            Err(PrivacyError::TargetEpsilon(_))
        ));
    }
    let t = CalibrationTarget {
        sample_rate: 1.5,
        ..ok_target
    };
    assert_eq!(
        calibrate_noise_multiplier(&t, AccountantKind::Pld),
        Err(PrivacyError::SampleRate(1.5))
    );
}

#[test]
fn bad_inputs_are_errors_with_clear_messages() {
    assert_eq!(
        TrainingSegment::new(1.5, 1.0, 10).unwrap_err().to_string(),
        "sample rate 1.5 is outside (0, 1]"
    );
    for q in [0.0, -0.1, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(
                TrainingSegment::new(q, 1.0, 10),
                Err(PrivacyError::SampleRate(_))
            ),
            "q={q}"
        );
    }
    for sigma in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(
                TrainingSegment::new(0.1, sigma, 10),
                Err(PrivacyError::NoiseMultiplier(_))
            ),
            "sigma={sigma}"
        );
    }
    let run = [seg(0.1, 1.0, 10)];
    for kind in BOTH {
        for delta in [0.0, 1.0, -1e-5, f64::NAN] {
            let err = epsilon_spent(kind, &run, delta).unwrap_err();
            assert!(
                matches!(err, PrivacyError::Delta(_)),
                "{kind} delta={delta}: {err}"
            );
        }
        assert_eq!(
            epsilon_spent(kind, &run, 0.0).unwrap_err().to_string(),
            "delta 0 must be in (0,1)".replace("(0,1)", "(0, 1)")
        );
        for e in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(
                matches!(delta_spent(kind, &run, e), Err(PrivacyError::Epsilon(_))),
                "{kind} eps={e}"
            );
        }
        // Public fields can be set to nonsense (e.g. by deserialisation): still an error.
        let forged = TrainingSegment {
            sample_rate: 2.0,
            noise_multiplier: 1.0,
            steps: 3,
        };
        assert_eq!(
            epsilon_spent(kind, &[forged], 1e-5),
            Err(PrivacyError::SampleRate(2.0))
        );
    }
    let orders = default_rdp_orders();
    assert!(matches!(
        poisson_subsampled_gaussian_rdp(0.1, 1.0, &[]),
        Err(PrivacyError::NoRdpOrders)
    ));
    assert!(matches!(
        poisson_subsampled_gaussian_rdp(0.1, 1.0, &[0.5]),
        Err(PrivacyError::RdpOrder(_))
    ));
    assert!(matches!(
        RdpAccountant::with_orders(vec![2.0, f64::NAN]),
        Err(PrivacyError::RdpOrder(_))
    ));
    assert!(matches!(
        epsilon_from_rdp(&orders, &[1.0], 1e-5),
        Err(PrivacyError::RdpLengthMismatch { .. })
    ));
    assert!(matches!(
        delta_from_rdp(&orders, &[1.0], 1.0),
        Err(PrivacyError::RdpLengthMismatch { .. })
    ));
    assert!(matches!(
        PldAccountant::with_discretization(0.0),
        Err(PrivacyError::Discretization(_))
    ));
    assert!(matches!(
        "foo".parse::<AccountantKind>(),
        Err(PrivacyError::UnknownAccountant(_))
    ));
    assert_eq!("PLD".parse::<AccountantKind>(), Ok(AccountantKind::Pld));
    assert!(matches!(
        PrivacyBudget::new(0.0, 1e-5),
        Err(PrivacyError::TargetEpsilon(_))
    ));
    assert!(matches!(
        PrivacyBudget::new(1.0, 1.0),
        Err(PrivacyError::Delta(_))
    ));
}

#[test]
fn extreme_pld_parameters_error_or_answer_but_never_panic() {
    // σ = 0.02 without subsampling needs a 3.5·10⁷-point grid per step.
    let err = epsilon_spent(AccountantKind::Pld, &[seg(1.0, 0.02, 3)], 1e-5).unwrap_err();
    assert!(matches!(err, PrivacyError::PldTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("RDP accountant"), "{err}");
    // σ = 0.2 is still fine.
    assert!(eps(AccountantKind::Pld, &[seg(1.0, 0.2, 3)], 1e-5) > 10.0);
    // Non-converging RDP orders are dropped, not fatal.
    let e = eps(AccountantKind::Rdp, &[seg(0.3, 0.6, 10)], 1e-5);
    assert!(e.is_finite() && e > 0.0);
}

#[test]
fn ledger_tracks_spending_and_refuses_past_the_budget() {
    for kind in BOTH {
        let budget = PrivacyBudget::new(1.0, 1e-5).unwrap();
        let mut ledger = PrivacyLedger::new(budget, kind).unwrap();
        assert_eq!(ledger.epsilon_spent().unwrap(), 0.0);
        let round = seg(0.02, 2.0, 100);
        ledger.record(round).unwrap();
        ledger.record(round).unwrap();
        ledger.record(seg(0.02, 2.0, 0)).unwrap();
        assert_eq!(
            ledger.segments(),
            &[seg(0.02, 2.0, 200)],
            "equal consecutive segments merge"
        );
        ledger.record(seg(0.01, 1.5, 50)).unwrap();
        assert_eq!(ledger.segments().len(), 2);
        assert_eq!(ledger.total_steps(), 250);

        let spent = ledger.epsilon_spent().unwrap();
        assert_eq!(spent, eps(kind, ledger.segments(), 1e-5));
        assert!(spent > 0.0 && spent < 1.0);

        let check = ledger.check(&round).unwrap();
        assert_eq!(check.epsilon_spent, spent);
        assert!(check.epsilon_after > spent);
        assert_eq!(check.within_budget, check.epsilon_after <= 1.0);

        let n = ledger.max_additional_steps(0.02, 2.0, 1_000_000).unwrap();
        assert!(n > 0);
        assert!(ledger.can_take(&seg(0.02, 2.0, n)).unwrap());
        assert!(!ledger.can_take(&seg(0.02, 2.0, n + 1)).unwrap());
        let capped = ledger.max_additional_steps(0.02, 2.0, 7).unwrap();
        assert_eq!(capped, n.min(7));

        // Recording past the budget is allowed (the steps happened), and
        // then nothing more fits.
        ledger.record(seg(0.02, 2.0, n + 1)).unwrap();
        assert!(ledger.epsilon_spent().unwrap() > 1.0);
        assert_eq!(ledger.max_additional_steps(0.02, 2.0, 1000).unwrap(), 0);
        assert!(!ledger.check(&seg(0.02, 2.0, 1)).unwrap().within_budget);

        assert!(matches!(
            ledger.record(TrainingSegment {
                sample_rate: 0.0,
                noise_multiplier: 1.0,
                steps: 1
            }),
            Err(PrivacyError::SampleRate(_))
        ));
        assert!(matches!(
            ledger.max_additional_steps(0.02, -1.0, 10),
            Err(PrivacyError::NoiseMultiplier(_))
        ));
    }
}

#[test]
fn public_data_types_round_trip_through_serde() {
    let mut ledger =
        PrivacyLedger::new(PrivacyBudget::new(5.0, 1e-5).unwrap(), AccountantKind::Rdp).unwrap();
    ledger.record(seg(0.01, 1.1, 300)).unwrap();
    ledger.record(seg(0.02, 1.3, 20)).unwrap();
    let json = serde_json::to_string(&ledger).unwrap();
    assert!(json.contains("\"accountant\":\"rdp\""), "{json}");
    let back: PrivacyLedger = serde_json::from_str(&json).unwrap();
    assert_eq!(back, ledger);

    let check = ledger.check(&seg(0.01, 1.1, 10)).unwrap();
    let back: fedsb_privacy::BudgetCheck =
        serde_json::from_str(&serde_json::to_string(&check).unwrap()).unwrap();
    assert_eq!(back, check);
    let target = CalibrationTarget {
        epsilon: 1.0,
        delta: 1e-5,
        sample_rate: 0.1,
        steps: 3,
    };
    let back: CalibrationTarget =
        serde_json::from_str(&serde_json::to_string(&target).unwrap()).unwrap();
    assert_eq!(back, target);
    assert_eq!(
        serde_json::from_str::<AccountantKind>("\"pld\"").unwrap(),
        AccountantKind::Pld
    );

    // A ledger deserialised with nonsense in it reports an error on use.
    let forged = r#"{"budget":{"epsilon":1.0,"delta":1e-5},"accountant":"pld",
        "segments":[{"sample_rate":7.0,"noise_multiplier":1.0,"steps":5}]}"#;
    let forged: PrivacyLedger = serde_json::from_str(forged).unwrap();
    assert_eq!(forged.epsilon_spent(), Err(PrivacyError::SampleRate(7.0)));
}
