//! Times both accountants on the brief's reference settings.
//!
//! `cargo run --release -p fedsb-privacy --example accountant_timing`

use std::time::Instant;

use fedsb_privacy::{
    calibrate_noise_multiplier, epsilon_spent, AccountantKind, CalibrationTarget, TrainingSegment,
};

fn main() -> Result<(), fedsb_privacy::PrivacyError> {
    let cases = [
        (0.04, 1.5, 2250, 1e-5),
        (0.01, 1.1, 10_000, 1e-5),
        (0.01, 4.0, 1000, 1e-5),
        (0.001, 1.0, 10_000, 1e-6),
        (0.01, 1.0, 100_000, 1e-5),
    ];
    for (q, sigma, steps, delta) in cases {
        let run = [TrainingSegment::new(q, sigma, steps)?];
        for kind in [AccountantKind::Rdp, AccountantKind::Pld] {
            let start = Instant::now();
            let eps = epsilon_spent(kind, &run, delta)?;
            println!(
                "q={q} sigma={sigma} steps={steps} delta={delta:e} {kind}: epsilon {eps:.6} in {:.3} s",
                start.elapsed().as_secs_f64()
            );
        }
    }
    let target = CalibrationTarget {
        epsilon: 3.0,
        delta: 1e-5,
        sample_rate: 0.01,
        steps: 10_000,
    };
    for kind in [AccountantKind::Rdp, AccountantKind::Pld] {
        let start = Instant::now();
        let sigma = calibrate_noise_multiplier(&target, kind)?;
        println!(
            "calibrate {target:?} {kind}: sigma {sigma:.6} in {:.3} s",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
