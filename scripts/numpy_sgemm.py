#!/usr/bin/env python3
"""numpy's sgemm on the shapes of `cargo xtask bench engine`, the CPU baseline
of the matmul target in BENCHMARKS.md: for each (M, K, N), 3 warm-ups and
20 timed `a @ b` on float32, GFLOP/s of the best and the median.

Needs: pip install numpy. Run it right after the GPU benchmark, on the same
machine and with nothing else running: `python3 scripts/numpy_sgemm.py`.
"""
import time

import numpy as np

SHAPES = [(2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (1024, 1024, 1024)]

for m, k, n in SHAPES:
    a = np.random.rand(m, k).astype(np.float32)
    b = np.random.rand(k, n).astype(np.float32)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    gflop = 2 * m * k * n / 1e9
    print(f"M={m:5} K={k:5} N={n:5}  best {gflop / min(times):6.1f}  median {gflop / np.median(times):6.1f} GFLOP/s")
