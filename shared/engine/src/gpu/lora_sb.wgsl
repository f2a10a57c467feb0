// Per-sample gradient of the LoRA-SB matrix R for one adapted linear layer:
//
//     G[n, i, j] = Σ_{t : sample_of[t] = n} U[t, i] · XA[t, j]
//
// with U = dY·B (rows×r) and XA = X·Aᵀ (rows×r, saved by the forward), i.e.
// G_n = (dY_n·B)ᵀ·(X_n·Aᵀ). Tokens whose sample_of is not n (padding uses
// 0xFFFFFFFF) are skipped. Only the token window [n·window, (n+1)·window) is
// scanned: window = sequence length for the padded [batch, seq] layout, or the
// total row count for any other order.
//
// The products around it (X·Aᵀ, ·Rᵀ, ·Bᵀ and dY·B, ·R, ·A) run on matmul.wgsl.
// One invocation per (i, j); workgroup_id.z = n.

struct Params {
    rows: u32,
    rank: u32,
    batch: u32,
    window: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> u: array<f32>;
@group(0) @binding(2) var<storage, read> xa: array<f32>;
@group(0) @binding(3) var<storage, read> sample_of: array<u32>;
@group(0) @binding(4) var<storage, read_write> grad: array<f32>;

@compute @workgroup_size(8, 8, 1)
fn grad_r(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let i = gid.y;
    let n = gid.z;
    if i >= p.rank || j >= p.rank || n >= p.batch {
        return;
    }
    let start = n * p.window;
    let end = min(start + p.window, p.rows);
    var s = 0.0;
    for (var t = start; t < end; t++) {
        if sample_of[t] == n {
            s = fma(u[t * p.rank + i], xa[t * p.rank + j], s);
        }
    }
    grad[(n * p.rank + i) * p.rank + j] = s;
}
