// Exact (erf-based) GELU and its slope, shared by `gelu.wgsl` and by the
// matmul kernels' epilogue (EPILOGUE in `matmul_common.wgsl`). A prelude:
// the launchers put this file in front of those that name it.
//
//     gelu(v)  = v · Φ(v),            Φ(v) = (1 + erf(v / √2)) / 2
//     gelu'(v) = Φ(v) + v · φ(v),     φ(v) = exp(-v² / 2) / √(2π)
//
// erf uses Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), the same
// accuracy class as f32 itself. Its exp(-z²) at z = v / √2 is exp(-v² / 2) =
// √(2π) · φ(v), so one exp serves the value and the slope.

const GELU_INV_SQRT2: f32 = 0.70710678118654752;
const GELU_INV_SQRT_2PI: f32 = 0.39894228040143268;

// vec2(gelu(v), gelu'(v)).
fn gelu_and_slope(v: f32) -> vec2<f32> {
    let z = v * GELU_INV_SQRT2;
    let a = abs(z);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let e = exp(-a * a);
    let cdf = 0.5 * (1.0 + sign(z) * (1.0 - poly * e));
    return vec2<f32>(v * cdf, cdf + v * GELU_INV_SQRT_2PI * e);
}
