"""A deliberately naive, per-element small_fc_lopt written straight from the spec.

Independent of ``lopt.core``: float64 numpy, explicit loops over elements, its own factored-dims
rule, no broadcasting tricks, no folding. Slow on purpose; used only as a test oracle.
"""

from __future__ import annotations

import math

import numpy as np

TAUS = [1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]


def eff_decay(base: float, offset: float) -> float:
    beta = 1.0 - math.exp(10.0 * (math.log(1.0 - base) / 10.0 + offset))
    return min(max(beta, 0.0), 1.0)


def two_largest_axes(shape: tuple[int, ...], tie_break: str) -> tuple[int, int] | None:
    """(d1, d0): d0 the largest axis, d1 the second; ties by position per ``tie_break``."""
    if len(shape) < 2:
        return None
    axes = list(range(len(shape)))

    # Selection by hand instead of a sort: d0 = max size, ties to the later ("last") or earlier.
    def better(a: int, b: int) -> bool:
        if shape[a] != shape[b]:
            return shape[a] > shape[b]
        return a > b if tie_break == "last" else a < b

    d0 = axes[0]
    for a in axes[1:]:
        if better(a, d0):
            d0 = a
    rest = [a for a in axes if a != d0]
    d1 = rest[0]
    for a in rest[1:]:
        if better(a, d1):
            d1 = a
    return d1, d0


def srsqrt(x: float) -> float:
    return 1.0 / math.sqrt(max(x, 1e-9))


def init_state(shape: tuple[int, ...], tie_break: str) -> dict:
    shape = shape or (1,)
    st = {
        "m": {i: [0.0, 0.0, 0.0] for i in np.ndindex(*shape)},
        "v": {i: 0.0 for i in np.ndindex(*shape)},
    }
    fd = two_largest_axes(shape, tie_break)
    if fd is None:
        st["vd"] = {i: [0.0, 0.0, 0.0] for i in np.ndindex(*shape)}
    else:
        d1, d0 = fd
        st["r"], st["c"] = {}, {}
        for i in np.ndindex(*shape):
            st["r"][i[:d0] + i[d0 + 1 :]] = [0.0, 0.0, 0.0]
            st["c"][i[:d1] + i[d1 + 1 :]] = [0.0, 0.0, 0.0]
    return st


def step(p: np.ndarray, g: np.ndarray, st: dict, theta: dict, cfg, t: int) -> np.ndarray:
    """Return the new parameter array; mutates ``st`` (the oracle may be stateful)."""
    scalar = p.ndim == 0
    p = np.asarray(p, dtype=np.float64).reshape(p.shape or (1,))
    g = np.asarray(g, dtype=np.float64).reshape(p.shape)
    shape = p.shape
    elements = list(np.ndindex(*shape))
    n = len(elements)
    off = {k: np.asarray(theta[k], dtype=np.float64) for k in theta}
    bm = [
        eff_decay(b, off["momentum_decays"][k]) for k, b in enumerate(cfg.initial_momentum_decays)
    ]
    bv = eff_decay(cfg.initial_rms_decays[0], off["rms_decays"][0])
    bf = [
        eff_decay(b, off["adafactor_decays"][k]) for k, b in enumerate(cfg.initial_adafactor_decays)
    ]

    for i in elements:
        for k in range(3):
            st["m"][i][k] = bm[k] * st["m"][i][k] + (1 - bm[k]) * g[i]
        st["v"][i] = bv * st["v"][i] + (1 - bv) * g[i] ** 2

    fd = two_largest_axes(shape, cfg.tie_break)
    feats = {}
    if fd is not None:
        d1, d0 = fd
        # Means of g² + 1e-30 over axis d0 (into r) and axis d1 (into c).
        r_sum, c_sum = {}, {}
        for i in elements:
            ri, ci = i[:d0] + i[d0 + 1 :], i[:d1] + i[d1 + 1 :]
            r_sum[ri] = r_sum.get(ri, 0.0) + g[i] ** 2 + 1e-30
            c_sum[ci] = c_sum.get(ci, 0.0) + g[i] ** 2 + 1e-30
        for ri in st["r"]:
            for k in range(3):
                st["r"][ri][k] = bf[k] * st["r"][ri][k] + (1 - bf[k]) * r_sum[ri] / shape[d0]
        for ci in st["c"]:
            for k in range(3):
                st["c"][ci][k] = bf[k] * st["c"][ci][k] + (1 - bf[k]) * c_sum[ci] / shape[d1]
        # Row normaliser: mean of r over axis d1 only, per remaining coordinates.
        d1r = d1 if d1 < d0 else d1 - 1
        row_mean = {}
        for ri in st["r"]:
            key = ri[:d1r] + ri[d1r + 1 :]
            acc = row_mean.setdefault(key, [0.0, 0.0, 0.0])
            for k in range(3):
                acc[k] += st["r"][ri][k] / shape[d1]
        for i in elements:
            ri, ci = i[:d0] + i[d0 + 1 :], i[:d1] + i[d1 + 1 :]
            rm = row_mean[ri[:d1r] + ri[d1r + 1 :]]
            rf = [srsqrt(st["r"][ri][k] / (rm[k] + 1e-9)) for k in range(3)]
            cf = [srsqrt(st["c"][ci][k]) for k in range(3)]
            m, v = st["m"][i], st["v"][i]
            row, col = st["r"][ri], st["c"][ci]
            x = [g[i], p[i], *m, v]
            x += [m[k] / math.sqrt(v + 1e-6) for k in range(3)]
            x += [1 / math.sqrt(v + 1e-6)]
            x += [g[i] * rf[k] * cf[k] for k in range(3)]
            x += list(row) + list(col)
            x += [1 / math.sqrt(row[k] + 1e-8) for k in range(3)]
            x += [1 / math.sqrt(col[k] + 1e-8) for k in range(3)]
            x += [m[k] * rf[k] * cf[k] for k in range(3)]
            feats[i] = x
    else:
        for i in elements:
            for k in range(3):
                st["vd"][i][k] = bf[k] * st["vd"][i][k] + (1 - bf[k]) * (g[i] ** 2 + 1e-30)
            m, v, vd = st["m"][i], st["v"][i], st["vd"][i]
            x = [g[i], p[i], *m, v]
            x += [m[k] / math.sqrt(v + 1e-6) for k in range(3)]
            x += [1 / math.sqrt(v + 1e-6)]
            x += [g[i] * srsqrt(vd[k] + 1e-9) for k in range(3)]
            x += list(vd) + list(vd)
            x += [1 / math.sqrt(vd[k] + 1e-8) for k in range(3)]
            x += [1 / math.sqrt(vd[k] + 1e-8) for k in range(3)]
            x += [m[k] / math.sqrt(vd[k] + 1e-6) for k in range(3)]
            feats[i] = x

    norms = []
    for j in range(28):
        ms = sum(feats[i][j] ** 2 for i in elements) / n
        norms.append(1 / math.sqrt(1e-5 + ms))
    time_feats = [math.tanh(t / tau - 1) for tau in TAUS]

    layers = len(cfg.layer_sizes())
    out = np.empty(shape)
    for i in elements:
        h = np.array([feats[i][j] * norms[j] for j in range(28)] + time_feats)
        for layer in range(layers):
            w = np.asarray(theta[f"w{layer}"], dtype=np.float64)
            b = np.asarray(theta[f"b{layer}"], dtype=np.float64)
            nxt = np.array(
                [sum(h[a] * w[a, o] for a in range(w.shape[0])) + b[o] for o in range(w.shape[1])]
            )
            h = np.maximum(nxt, 0.0) if layer < layers - 1 else nxt
        out[i] = p[i] - cfg.step_mult * h[0] * math.exp(cfg.exp_mult * h[1])
    return out.reshape(()) if scalar else out
