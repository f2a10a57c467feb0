"""WGSL pieces shared by the matmul generators (gen_matmul_subgroup.py and
gen_matmul_texture.py): both kernels give each of the 8 lanes of a subgroup
TM rows x 4 columns of a tile, share the rows of A with subgroupBroadcast and
keep everything in named values (llvmpipe lowers array locals to memory).
Each function returns lines of WGSL, indented by `indent` spaces.
"""

COMP = "xyzw"


def accumulators(tm, indent=4):
    """`accI` = row I of the tile, this lane's 4 columns, set to zero."""
    pad = " " * indent
    return [f"{pad}var acc{i} = vec4<f32>(0.0);" for i in range(tm)]


def transpose_b(rows, indent):
    """b0..b3 (already declared) = rows 4kq..4kq+3 of op(B) from the 4 stored
    rows of B (TRANS_B) named in `rows`, one vec4 of 4 k each."""
    pad = " " * indent
    return [
        f"{pad}b{kk} = vec4<f32>(" + ", ".join(f"{y}.{COMP[kk]}" for y in rows) + ");"
        for kk in range(4)
    ]


def broadcast_fma(tm, indent):
    """acc += A·B over 4 k: row I of the tile at k = 4kq .. 4kq+3 is lane I % 8's
    `av{I / 8}`, broadcast to all lanes, times b0..b3."""
    pad = " " * indent
    lines = []
    for i in range(tm):
        lines.append(f"{pad}let s{i} = subgroupBroadcast(av{i // 8}, {i % 8}u);")
        for kk in range(4):
            lines.append(f"{pad}acc{i} = fma(vec4<f32>(s{i}.{COMP[kk]}), b{kk}, acc{i});")
    return lines


def stores(c_base, tm):
    """Writes the accumulators: row m0 + I, columns c0 .. c0+3."""
    return [f"    store4({c_base}, m0 + {i}u, c0, acc{i});" for i in range(tm)]
