//! Log-space arithmetic and the special functions the accountants need
//! (erfc, the standard normal CDF and its logarithm and inverse, ln|Γ|).
//!
//! These mirror the scipy functions dp-accounting calls (`special.log_ndtr`,
//! `special.gammaln`, `stats.norm.cdf/logcdf/ppf`). erfc and lgamma come from
//! the `libm` crate (the musl implementations, accurate to about one ulp and
//! relatively accurate deep into the tails); the far tail of log erfc, where
//! erfc underflows, uses its asymptotic expansion.

use std::f64::consts::{FRAC_1_SQRT_2, LN_2, PI, SQRT_2};

/// ln(e^x + e^y) without overflow; `-inf` is the log of zero.
pub(crate) fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// ln(e^x − e^y) for x > y; `-inf` when x == y.
pub(crate) fn log_sub(x: f64, y: f64) -> f64 {
    if y == f64::NEG_INFINITY {
        return x;
    }
    if x <= y {
        return f64::NEG_INFINITY;
    }
    x + (-(y - x).exp()).ln_1p()
}

/// ln(a·e^b + c), careful with signs (dp-accounting's
/// `common.log_a_times_exp_b_plus_c`). The caller guarantees the argument of
/// the logarithm is positive; otherwise the result is NaN or `-inf`.
pub(crate) fn log_a_times_exp_b_plus_c(a: f64, b: f64, c: f64) -> f64 {
    if a == 0.0 {
        return c.ln();
    }
    if a < 0.0 {
        return log_sub(c.ln(), (-a).ln() + b);
    }
    if b == 0.0 {
        return (a + c).ln();
    }
    let d = b + a.ln();
    if c == 0.0 {
        d
    } else if c < 0.0 {
        log_sub(d, (-c).ln())
    } else {
        log_add(d, c.ln())
    }
}

/// ln(erfc(x)), accurate also where erfc(x) underflows.
pub(crate) fn log_erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 26.0 {
        // erfc(26) ≈ 5.7e-296 is still a normal number, and musl's erfc is
        // relatively accurate all the way there.
        return libm::erfc(x).ln();
    }
    if x == f64::INFINITY {
        return f64::NEG_INFINITY;
    }
    // erfc(x) = e^{-x²} / (x √π) · (1 + Σ_{k≥1} (−1)^k (2k−1)!! / (2x²)^k).
    // For x > 26 the terms shrink by a factor of at least 1/676 at first;
    // twelve terms are far below double precision.
    let inv_two_x2 = 1.0 / (2.0 * x * x);
    let mut term = 1.0;
    let mut series = 1.0;
    for k in 1..=12 {
        term *= -((2 * k - 1) as f64) * inv_two_x2;
        series += term;
    }
    -x * x - x.ln() - 0.5 * PI.ln() + series.ln()
}

/// The standard normal CDF Φ(x).
pub(crate) fn ndtr(x: f64) -> f64 {
    0.5 * libm::erfc(-x * FRAC_1_SQRT_2)
}

/// ln Φ(x), accurate in both tails (scipy's `special.log_ndtr`).
pub(crate) fn log_ndtr(x: f64) -> f64 {
    if x > 6.0 {
        // Φ(x) = 1 − Φ(−x) with Φ(−x) < 1e-9.
        return (-ndtr(-x)).ln_1p();
    }
    log_erfc(-x * FRAC_1_SQRT_2) - LN_2
}

/// The inverse of Φ: the x with Φ(x) = p, for p in (0, 1).
///
/// Acklam's rational approximation (relative error < 1.2e-9) refined by two
/// Halley steps against [`ndtr`], which makes it accurate to a few ulps, also
/// for tiny p.
pub(crate) fn ndtri(p: f64) -> f64 {
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.02425;
    let tail = |t: f64| {
        (((((C[0] * t + C[1]) * t + C[2]) * t + C[3]) * t + C[4]) * t + C[5])
            / ((((D[0] * t + D[1]) * t + D[2]) * t + D[3]) * t + 1.0)
    };
    let mut x = if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (-p).ln_1p()).sqrt())
    };
    for _ in 0..2 {
        // Work in the tail where Φ is relatively accurate.
        let e = if x <= 0.0 {
            ndtr(x) - p
        } else {
            (1.0 - p) - ndtr(-x)
        };
        let u = e * (2.0 * PI).sqrt() * (0.5 * x * x).exp();
        if !u.is_finite() {
            break;
        }
        x -= u / (1.0 + 0.5 * x * u);
    }
    x
}

/// ln|Γ(x)| (scipy's `special.gammaln`).
pub(crate) fn ln_abs_gamma(x: f64) -> f64 {
    libm::lgamma_r(x).0
}

/// ln|C(n, k)| for real n and k.
pub(crate) fn log_comb(n: f64, k: f64) -> f64 {
    ln_abs_gamma(n + 1.0) - ln_abs_gamma(k + 1.0) - ln_abs_gamma(n - k + 1.0)
}

/// √2, re-exported for the RDP formulas.
pub(crate) const SQRT2: f64 = SQRT_2;

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn log_erfc_matches_direct_and_asymptotic_regions() {
        // Values from mpmath at 50 digits.
        let cases = [
            (0.0, 0.0),
            (1.0, -1.849_605_509_933_248_2),
            (10.0, -102.879_889_024_844_89),
            (25.9, -674.637_351_895_319_2),
            (26.1, -685.045_032_903_309_4),
            (100.0, -10_005.177_585_122_664),
            (-3.0, 0.693_136_135_250_446_8),
        ];
        for (x, want) in cases {
            let got = log_erfc(x);
            assert!(
                close(got, want, 1e-12),
                "log_erfc({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn ndtri_inverts_ndtr_in_the_tails() {
        for p in [
            1e-300,
            9.643_749_239_819_589e-23,
            1e-10,
            0.01,
            0.3,
            0.5,
            0.9,
            0.999_999,
        ] {
            let x = ndtri(p);
            assert!(close(ndtr(x), p, 1e-12), "ndtr(ndtri({p})) = {}", ndtr(x));
        }
        // scipy.stats.norm.ppf(0.5 * exp(-50))
        assert!(close(
            ndtri(0.5 * (-50.0f64).exp()),
            -9.745_474_864_965_935,
            1e-12
        ));
    }

    #[test]
    fn log_ndtr_is_accurate_in_both_tails() {
        assert!(close(log_ndtr(-40.0), -804.608_442_013_754_9, 1e-12));
        assert!(close(log_ndtr(0.0), -LN_2, 1e-15));
        assert!(close(log_ndtr(8.0), -6.220_960_574_271_786e-16, 1e-9));
    }

    #[test]
    fn log_space_helpers() {
        assert!(close(log_add(1.0f64.ln(), 2.0f64.ln()), 3.0f64.ln(), 1e-15));
        assert_eq!(log_add(f64::NEG_INFINITY, 0.5), 0.5);
        assert!(close(log_sub(3.0f64.ln(), 1.0f64.ln()), 2.0f64.ln(), 1e-15));
        assert_eq!(log_sub(1.0, 1.0), f64::NEG_INFINITY);
        assert!(close(
            log_a_times_exp_b_plus_c(0.5, 2.0, -0.25),
            (0.5 * 2.0f64.exp() - 0.25).ln(),
            1e-14
        ));
        assert!(close(log_comb(10.0, 3.0), 120.0f64.ln(), 1e-13));
    }
}
