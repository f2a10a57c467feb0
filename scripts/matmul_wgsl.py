"""WGSL pieces shared by the matmul generators (gen_matmul_subgroup.py and
gen_matmul_texture.py): both kernels give each of the 8 or 16 lanes of a
subgroup TM rows x 4 columns of a tile, share the rows of A with subgroupBroadcast and
keep everything in named values (llvmpipe lowers array locals to memory).
Each function returns lines of WGSL, indented by `indent` spaces.
"""

COMP = "xyzw"


def accumulators(tm, indent=4):
    """`accI` = row I of the tile, this lane's 4 columns, set to zero."""
    pad = " " * indent
    return [f"{pad}var acc{i} = vec4<f32>(0.0);" for i in range(tm)]


def transpose(rows, out, indent):
    """The 4×4 transpose of the vec4 values named in `rows` into `out`0 ..
    `out`3 (already declared): `outJ` = component J of each, in order. With
    TRANS_B, b0..b3 = rows 4kq..4kq+3 of op(B) from 4 stored rows of B (one
    vec4 of 4 k each); with TRANS_A (texture kernel), av0..av3 = rows of the
    tile at 4 k from 4 texels of 4 rows each."""
    pad = " " * indent
    return [
        f"{pad}{out}{kk} = vec4<f32>(" + ", ".join(f"{y}.{COMP[kk]}" for y in rows) + ");"
        for kk in range(4)
    ]


def broadcast_fma(tm, indent, lanes, trans_a=False):
    """acc += A·B over 4 k: row I of the tile at k = 4kq .. 4kq+3 is lane
    I % lanes's `av{I / lanes}`, broadcast to all lanes, times b0..b3.
    `trans_a` (texture kernel, tm = 32): under the TRANS_A override row I is
    lane I / 4's `av{I % 4}` instead (lanes 0..7 whatever the lane count)."""
    pad = " " * indent
    lines = []
    for i in range(tm):
        if trans_a:
            lines += [
                f"{pad}var s{i}: vec4<f32>;",
                f"{pad}if TRANS_A {{ s{i} = subgroupBroadcast(av{i % 4}, {i // 4}u); }}"
                f" else {{ s{i} = subgroupBroadcast(av{i // lanes}, {i % lanes}u); }}",
            ]
        else:
            lines.append(f"{pad}let s{i} = subgroupBroadcast(av{i // lanes}, {i % lanes}u);")
        for kk in range(4):
            lines.append(f"{pad}acc{i} = fma(vec4<f32>(s{i}.{COMP[kk]}), b{kk}, acc{i});")
    return lines


def stores(c_base, tm, whole_quads):
    """Writes the accumulators: row m0 + I, columns c0 .. c0+3, scaled by
    alpha, plus the bias (HAS_BIAS) and plus C (ACCUMULATE), through the
    EPILOGUE (`epilogue` in matmul_common.wgsl: GELU or gate). The parameters
    are read once, outside every branch: llvmpipe turns a uniform load inside a
    branch into a per-lane gather. `whole_quads`: N is a multiple of 4, so a
    lane's 4 columns are all inside C or all outside (one test per row);
    otherwise each column is tested."""
    L = [
        "    // The parameters, read here outside every branch: llvmpipe turns a",
        "    // uniform load inside a branch into a per-lane gather.",
        "    let mm = p.m;",
        "    let nn = p.n;",
        "    let ldc = p.ldc;",
        "    let alpha = p.alpha;",
    ]
    if whole_quads:
        L += [
            "    // N is a multiple of 4 (Variant::supports), so a lane's 4 columns are",
            "    // all inside C or all outside.",
            "    let cols_in = c0 < nn;",
            "    var bias4 = vec4<f32>(0.0);",
            "    if HAS_BIAS && cols_in {",
            "        bias4 = vec4<f32>(bias[c0], bias[c0 + 1u], bias[c0 + 2u], bias[c0 + 3u]);",
            "    }",
        ]
        for i in range(tm):
            L += [
                f"    if cols_in && m0 + {i}u < mm {{",
                f"        let idx = {c_base} + (m0 + {i}u) * ldc + c0;",
                f"        var x = alpha * acc{i} + bias4;",
                "        if ACCUMULATE { x += vec4<f32>(c[idx], c[idx + 1u], c[idx + 2u], c[idx + 3u]); }",
            ] + [
                f"        c[idx{f' + {j}u' if j else ''}] = epilogue(x.{COMP[j]}, idx{f' + {j}u' if j else ''});"
                for j in range(4)
            ] + ["    }"]
    else:
        L += ["    var bias4 = vec4<f32>(0.0);", "    if HAS_BIAS {"]
        for j in range(4):
            L.append(f"        if c0 + {j}u < nn {{ bias4.{COMP[j]} = bias[c0 + {j}u]; }}")
        L.append("    }")
        for i in range(tm):
            L += [
                f"    if m0 + {i}u < mm {{",
                f"        let idx = {c_base} + (m0 + {i}u) * ldc + c0;",
                f"        let x = alpha * acc{i} + bias4;",
            ]
            for j in range(4):
                o = f" + {j}u" if j else ""
                L += [
                    f"        if c0 + {j}u < nn {{",
                    f"            var v = x.{COMP[j]};",
                    f"            if ACCUMULATE {{ v += c[idx{o}]; }}",
                    f"            c[idx{o}] = epilogue(v, idx{o});",
                    "        }",
                ]
            L.append("    }")
    return L
