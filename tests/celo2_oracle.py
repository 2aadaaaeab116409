"""An independent float64 per-element reference of the Celo2 learned rule, in NumPy.

Written from the rule's definition (docs/design/celo2.md), not from lopt.celo2: explicit loops
over the three decays and over elements, a stable argsort for the factored axes, and
Newton–Schulz one matrix at a time. Tensors are in the reference frame (``layout="as_stored"``).
"""

from __future__ import annotations

import numpy as np

BETA_M = (0.9, 0.99, 0.999)
BETA_V = 0.95
BETA_F = (0.9, 0.99, 0.999)
WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)


def split_theta(flat: np.ndarray) -> dict:
    """θ from its 347-vector in the reference's order: w0__0..w0__13, b0, w1, b1, w2, b2."""
    flat = np.asarray(flat, dtype=np.float64)
    out, pos = {}, 0
    groups = []
    for w in WIDTHS:
        groups.append(flat[pos : pos + 8 * w].reshape(w, 8))
        pos += 8 * w
    out["w0"] = groups
    for key, shape in (("b0", (8,)), ("w1", (8, 8)), ("b1", (8,)), ("w2", (8, 3)), ("b2", (3,))):
        n = int(np.prod(shape))
        out[key] = flat[pos : pos + n].reshape(shape)
        pos += n
    assert pos == 347
    return out


def zero_state(shape: tuple[int, ...]) -> dict:
    shape = shape or (1,)
    st = {"m": np.zeros(shape + (3,)), "v": np.zeros(shape)}
    if len(shape) >= 2:
        order = np.argsort(np.array(shape), kind="stable")
        a, b = int(order[-1]), int(order[-2])
        st["row"] = np.zeros(tuple(s for i, s in enumerate(shape) if i != a) + (3,))
        st["col"] = np.zeros(tuple(s for i, s in enumerate(shape) if i != b) + (3,))
    else:
        st["diag"] = np.zeros(shape + (3,))
    return st


def _norm_axes(ndim: int) -> tuple[int, ...]:
    return (ndim - 2, ndim - 1) if ndim >= 2 else (0,)


def _normalise(x: np.ndarray) -> np.ndarray:
    axes = _norm_axes(x.ndim)
    return x / np.sqrt(1e-9 + np.mean(x * x, axis=axes, keepdims=True))


def newton_schulz(x: np.ndarray) -> np.ndarray:
    a, b, c = 3.4445, -4.7750, 2.0315
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-2]):
        mat = x[idx]
        tall = mat.shape[0] > mat.shape[1]
        if tall:
            mat = mat.T
        mat = mat / (np.sqrt(np.sum(mat * mat)) + 1e-8)
        for _ in range(5):
            gram = mat @ mat.T
            mat = a * mat + (b * gram + c * gram @ gram) @ mat
        out[idx] = mat.T if tall else mat
    return out


def step(theta: dict, p: np.ndarray, g: np.ndarray, st: dict, orthogonalize: bool):
    """One step: returns (u, new_state); ``p``/``g`` float64 arrays of any rank (0-d = (1,))."""
    scalar = p.ndim == 0
    p = np.asarray(p, np.float64).reshape(p.shape or (1,))
    g = np.clip(np.asarray(g, np.float64).reshape(p.shape), -1000, 1000)
    nd = p.ndim
    m = st["m"].copy()
    for k in range(3):
        m[..., k] = BETA_M[k] * m[..., k] + (1 - BETA_M[k]) * g
    v = BETA_V * st["v"] + (1 - BETA_V) * g * g
    q = g * g + 1e-30
    r = 1.0 / np.sqrt(v + 1e-8)
    groups = [[g], [np.clip(g, -0.1, 0.1)], [p], [m[..., k] for k in range(3)], [v],
              [m[..., k] * r for k in range(3)], [r]]  # fmt: skip
    new = {"m": m, "v": v}
    if nd >= 2:
        order = np.argsort(np.array(p.shape), kind="stable")
        a, b = int(order[-1]), int(order[-2])
        row, col = st["row"].copy(), st["col"].copy()
        fac_g, fac_m, row_f, col_f = [], [], [], []
        for k in range(3):
            row[..., k] = BETA_F[k] * row[..., k] + (1 - BETA_F[k]) * q.mean(axis=a)
            col[..., k] = BETA_F[k] * col[..., k] + (1 - BETA_F[k]) * q.mean(axis=b)
            b_pos = b - 1 if b > a else b
            mu = row[..., k].mean(axis=b_pos, keepdims=True)
            rho = 1 / np.sqrt(np.maximum(row[..., k] / (mu + 1e-9), 1e-9))
            kappa = 1 / np.sqrt(np.maximum(col[..., k], 1e-9))
            mult = np.expand_dims(rho, a) * np.expand_dims(kappa, b)
            fac_g.append(g * mult)
            fac_m.append(m[..., k] * mult)
            row_f.append(np.broadcast_to(np.expand_dims(row[..., k], a), p.shape))
            col_f.append(np.broadcast_to(np.expand_dims(col[..., k], b), p.shape))
        groups += [fac_g, [g * r], row_f, col_f, [1 / np.sqrt(x + 1e-8) for x in row_f],
                   [1 / np.sqrt(x + 1e-8) for x in col_f], fac_m]  # fmt: skip
        new.update(row=row, col=col)
    else:
        diag = st["diag"].copy()
        fac_g = []
        for k in range(3):
            diag[..., k] = BETA_F[k] * diag[..., k] + (1 - BETA_F[k]) * q
            fac_g.append(g / np.sqrt(np.maximum(diag[..., k] + 1e-9, 1e-9)))
        groups += [fac_g, [g * r]]
        new["diag"] = diag
    groups = [[_normalise(ch) for ch in group] for group in groups]
    d = np.empty(p.shape)
    for idx in np.ndindex(*p.shape):  # the MLP, one element at a time
        pre = theta["b0"].copy()
        for i, group in enumerate(groups):
            x = np.array([ch[idx] for ch in group])
            pre = pre + x @ theta["w0"][i]
        h = np.maximum(pre, 0)
        h = np.maximum(h @ theta["w1"] + theta["b1"], 0)
        d[idx] = (h @ theta["w2"] + theta["b2"])[0]
    if orthogonalize and nd >= 2:
        d = newton_schulz(d)
    u = _normalise(d)
    return (u.reshape(()) if scalar else u), new


def golden_theta() -> np.ndarray:
    n = np.arange(347, dtype=np.float64)
    return 0.5 * np.sin(1.37 * n + 0.1)
