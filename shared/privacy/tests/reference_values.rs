//! Both accountants against Google's dp-accounting 0.6.0 (add/remove
//! neighbours; RDP with the default orders {1.1, …, 10.9} ∪ {12, …, 63}).
//!
//! The brief's table lives in [`BRIEF_TABLE`]; more points, δ-for-ε values
//! and per-order RDP curves are in `reference/reference.json`, written by
//! `reference/gen_reference.py`.

use fedsb_privacy::rdp::poisson_subsampled_gaussian_rdp;
use fedsb_privacy::{
    default_rdp_orders, delta_spent, epsilon_spent, AccountantKind, TrainingSegment,
};
use serde::Deserialize;

/// RDP must match dp-accounting to this relative error.
const RDP_REL_TOL: f64 = 1e-4;
/// PLD must be within this relative error of dp-accounting, on either side.
const PLD_REL_TOL: f64 = 0.01;

/// One row of the brief's table.
struct Row {
    q: f64,
    sigma: f64,
    steps: u64,
    delta: f64,
    rdp_epsilon: f64,
    pld_epsilon: f64,
}

/// The reference table of the fedsb brief (dp-accounting 0.6.0, 4 decimals).
const BRIEF_TABLE: [Row; 4] = [
    Row {
        q: 0.04,
        sigma: 1.5,
        steps: 2250,
        delta: 1e-5,
        rdp_epsilon: 7.3293,
        pld_epsilon: 6.7688,
    },
    Row {
        q: 0.01,
        sigma: 1.1,
        steps: 10000,
        delta: 1e-5,
        rdp_epsilon: 5.6320,
        pld_epsilon: 5.1926,
    },
    Row {
        q: 0.01,
        sigma: 4.0,
        steps: 1000,
        delta: 1e-5,
        rdp_epsilon: 0.3012,
        pld_epsilon: 0.2722,
    },
    Row {
        q: 0.001,
        sigma: 1.0,
        steps: 10000,
        delta: 1e-6,
        rdp_epsilon: 0.9795,
        pld_epsilon: 0.5554,
    },
];

fn rel_err(got: f64, want: f64) -> f64 {
    (got - want) / want
}

/// The table is rounded to 4 decimals, so allow half a unit in the last place
/// on top of the relative tolerance.
fn assert_rdp_close(got: f64, want: f64, rounding: f64, what: &str) {
    let err = (got - want).abs();
    assert!(
        err <= RDP_REL_TOL * want.abs() + rounding,
        "{what}: RDP epsilon {got}, reference {want}, difference {err:e}"
    );
}

fn assert_pld_close(got: f64, want: f64, what: &str) {
    let rel = rel_err(got, want);
    assert!(
        rel.abs() <= PLD_REL_TOL,
        "{what}: PLD epsilon {got}, reference {want}, relative error {rel:+.4}"
    );
}

#[test]
fn brief_table_rdp_and_pld() {
    for row in &BRIEF_TABLE {
        let run = [TrainingSegment::new(row.q, row.sigma, row.steps).unwrap()];
        let what = format!(
            "q={} sigma={} steps={} delta={}",
            row.q, row.sigma, row.steps, row.delta
        );
        let rdp = epsilon_spent(AccountantKind::Rdp, &run, row.delta).unwrap();
        let pld = epsilon_spent(AccountantKind::Pld, &run, row.delta).unwrap();
        println!(
            "{what}: RDP {rdp:.6} (ref {}), PLD {pld:.6} (ref {})",
            row.rdp_epsilon, row.pld_epsilon
        );
        assert_rdp_close(rdp, row.rdp_epsilon, 0.5e-4, &what);
        assert_pld_close(pld, row.pld_epsilon, &what);
    }
}

#[test]
fn opacus_rdp_reference() {
    // Opacus' test_rdp_accountant: sigma 1.5, q 0.04, 2250 steps, delta 1e-5.
    let run = [TrainingSegment::new(0.04, 1.5, 2250).unwrap()];
    let eps = epsilon_spent(AccountantKind::Rdp, &run, 1e-5).unwrap();
    assert!(
        rel_err(eps, 7.329_111_171_43).abs() <= RDP_REL_TOL,
        "RDP epsilon {eps} vs Opacus 7.32911117143"
    );
}

#[derive(Deserialize)]
struct Reference {
    epsilon: Vec<EpsilonCase>,
    delta: Vec<DeltaCase>,
    rdp_curves: Vec<RdpCurve>,
}

#[derive(Deserialize)]
struct EpsilonCase {
    segments: Vec<TrainingSegment>,
    delta: f64,
    rdp_epsilon: f64,
    pld_epsilon: f64,
    /// dp-accounting's optimistic (round-down) PLD: a lower bound on the
    /// true ε, loose for many steps.
    pld_optimistic_epsilon: f64,
}

#[derive(Deserialize)]
struct DeltaCase {
    segments: Vec<TrainingSegment>,
    epsilon: f64,
    rdp_delta: f64,
    pld_delta: f64,
}

#[derive(Deserialize)]
struct RdpCurve {
    sample_rate: f64,
    noise_multiplier: f64,
    orders: Vec<f64>,
    /// `null` where dp-accounting's series did not converge (+∞).
    rdp: Vec<Option<f64>>,
}

fn reference() -> Reference {
    let text = include_str!("reference/reference.json");
    serde_json::from_str(text).expect("reference.json parses")
}

#[test]
fn generated_epsilon_references() {
    for case in reference().epsilon {
        let what = format!("{:?} delta={}", case.segments, case.delta);
        let rdp = epsilon_spent(AccountantKind::Rdp, &case.segments, case.delta).unwrap();
        let pld = epsilon_spent(AccountantKind::Pld, &case.segments, case.delta).unwrap();
        println!(
            "{what}: RDP {rdp:.6} (ref {:.6}), PLD {pld:.6} (ref {:.6})",
            case.rdp_epsilon, case.pld_epsilon
        );
        assert_rdp_close(rdp, case.rdp_epsilon, 0.0, &what);
        assert_pld_close(pld, case.pld_epsilon, &what);
        assert!(
            pld >= case.pld_optimistic_epsilon,
            "{what}: PLD epsilon {pld} below the lower bound {}",
            case.pld_optimistic_epsilon
        );
    }
}

#[test]
fn generated_delta_references() {
    for case in reference().delta {
        let what = format!("{:?} epsilon={}", case.segments, case.epsilon);
        let rdp = delta_spent(AccountantKind::Rdp, &case.segments, case.epsilon).unwrap();
        let pld = delta_spent(AccountantKind::Pld, &case.segments, case.epsilon).unwrap();
        println!(
            "{what}: RDP delta {rdp:e} (ref {:e}), PLD delta {pld:e} (ref {:e})",
            case.rdp_delta, case.pld_delta
        );
        assert!(
            rel_err(rdp, case.rdp_delta).abs() <= RDP_REL_TOL,
            "{what}: RDP delta {rdp} vs {}",
            case.rdp_delta
        );
        // δ(ε) is steep; 1 % of ε moves δ by several %, so compare with 5 %.
        assert!(
            rel_err(pld, case.pld_delta).abs() <= 0.05,
            "{what}: PLD delta {pld} vs {}",
            case.pld_delta
        );
    }
}

#[test]
fn generated_rdp_curves_per_order() {
    let defaults = default_rdp_orders();
    for curve in reference().rdp_curves {
        assert_eq!(
            curve.orders, defaults,
            "generator and crate disagree on the default orders"
        );
        let got = poisson_subsampled_gaussian_rdp(
            curve.sample_rate,
            curve.noise_multiplier,
            &curve.orders,
        )
        .unwrap();
        for ((alpha, want), got) in curve.orders.iter().zip(&curve.rdp).zip(&got) {
            let what = format!(
                "q={} sigma={} alpha={alpha}",
                curve.sample_rate, curve.noise_multiplier
            );
            match want {
                None => assert!(
                    got.is_infinite(),
                    "{what}: dp-accounting gives +inf, got {got}"
                ),
                Some(want) => assert!(
                    (got - want).abs() <= 1e-9 * want.abs() + 1e-15,
                    "{what}: RDP {got} vs {want}"
                ),
            }
        }
    }
}
