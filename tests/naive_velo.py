"""A deliberately naive VeLO written straight from the published description, as a test oracle.

Independent of ``lopt.velo``: float64 numpy, explicit loops over elements, its own factored-axes
rules, PyLO's checkpoint layout (``(out, in)`` matrices, banks ``(K, out, in)``), no folding of the
normaliser into weights. Slow on purpose.
"""

from __future__ import annotations

import math

import numpy as np

PROGRESS = [0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1]
BM, BV, BF = [0.9, 0.99, 0.999], 0.999, [0.9, 0.99, 0.999]


def factored_axes(shape, rule):
    """(d1, d0) for rank ≥ 2, else None; ``rule`` "first" (reference) or "pylo"."""
    n = len(shape)
    if n < 2:
        return None
    if rule == "first":  # d0 = longest axis, ties to the earlier; d1 = longest of the rest
        d0 = 0
        for a in range(1, n):
            if shape[a] > shape[d0]:
                d0 = a
        rest = [a for a in range(n) if a != d0]
        d1 = rest[0]
        for a in rest[1:]:
            if shape[a] > shape[d1]:
                d1 = a
        return d1, d0
    order = []  # insertion sort, ascending, stable
    for a in range(n):
        i = len(order)
        while i > 0 and shape[order[i - 1]] > shape[a]:
            i -= 1
        order.insert(i, a)
    x, y = order[-2], order[-1]
    if shape[x] != shape[y]:
        return x, y
    if n == 4 and (x, y) == (0, 1):
        return 0, 1
    return y, x


def drop(idx, axis):
    return idx[:axis] + idx[axis + 1 :]


def srsqrt(x):
    return 1.0 / math.sqrt(max(x, 1e-9))


def new_tensor_state(shape, rule, h0, c0):
    shape = shape or (1,)
    st = {
        "m": {i: [0.0] * 3 for i in np.ndindex(*shape)},
        "v": {i: 0.0 for i in np.ndindex(*shape)},
        "h": np.array(h0, dtype=np.float64),
        "c": np.array(c0, dtype=np.float64),
    }
    fd = factored_axes(shape, rule)
    if fd is None:
        st["vd"] = {i: [0.0] * 3 for i in np.ndindex(*shape)}
    else:
        d1, d0 = fd
        st["r"] = {drop(i, d0): [0.0] * 3 for i in np.ndindex(*shape)}
        st["c_fac"] = {drop(i, d1): [0.0] * 3 for i in np.ndindex(*shape)}
    return st


def new_state(shapes, rule, rnn):
    h0 = np.asarray(rnn["lstm_init_state.0"], dtype=np.float64).reshape(-1)
    c0 = np.asarray(rnn["lstm_init_state.1"], dtype=np.float64).reshape(-1)
    return {
        "t": 0,
        "loss_means": [0.0] * 10,
        "loss_min": [999999999999.0] * 10,
        "loss_count": 0,
        "tensors": {name: new_tensor_state(s, rule, h0, c0) for name, s in shapes.items()},
    }


def loss_features(st, loss, num_steps):
    decays = [math.exp(-1.0 / 10 ** (1 + i * (math.log10(num_steps) - 1) / 9)) for i in range(10)]
    k = st["loss_count"]
    prev = [st["loss_means"][i] / (1 - decays[i] ** (k + 1)) for i in range(10)]
    amax = loss if k == 0 else max(prev)
    clipped = min(2 * abs(amax), loss)
    for i in range(10):
        st["loss_means"][i] = decays[i] * st["loss_means"][i] + (1 - decays[i]) * clipped
        st["loss_min"][i] = min(st["loss_min"][i], st["loss_means"][i] / (1 - decays[i] ** (k + 1)))
    st["loss_count"] = k + 1
    big_k = st["loss_count"]
    if big_k <= 2:
        return [0.0] * 9
    cm = [st["loss_means"][i] / (1 - decays[i] ** big_k) for i in range(10)]
    rmin = st["loss_min"]
    out = []
    for j in range(9):
        x = (cm[j] - rmin[j]) / max(1e-8, cm[j + 1] - rmin[j]) - 1
        out.append(min(max(x, -1.0), 1.0))
    return out


def clog(x):
    return 0.5 * min(max(math.log(1e-8 + abs(10 * x)), -5.0), 5.0)


def lstm_input(p, ts, t, num_steps, lfeat):
    elements = list(np.ndindex(*p.shape))
    n = len(elements)
    k = 1.0 / math.sqrt(max(sum(p[i] ** 2 for i in elements) / n, 1e-9))
    mu = [sum(k * ts["m"][i][j] for i in elements) / n for j in range(3)]
    var_m = [sum((k * ts["m"][i][j] - mu[j]) ** 2 for i in elements) / n for j in range(3)]
    mean_rms = sum(k * ts["v"][i] for i in elements) / n
    var_rms = [sum((k * ts["v"][i] - mu[j]) ** 2 for i in elements) / n for j in range(3)]
    frac = [math.tanh(10 * (t / num_steps - tau)) for tau in PROGRESS]
    rank = sum(1 for s in p.shape if s > 1)
    onehot = [1.0 if r == rank else 0.0 for r in range(5)]
    return (
        frac
        + list(lfeat)
        + [clog(mean_rms)]
        + onehot
        + [clog(x) for x in var_m]
        + [clog(x) for x in var_rms]
    )


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def rnn_forward(rnn, rows, hs, cs):
    w = {k: np.asarray(v, dtype=np.float64) for k, v in rnn.items()}
    x = np.asarray(rows, dtype=np.float64)
    pooled = np.max(np.maximum(x @ w["mix_layer2.weight"].T + w["mix_layer2.bias"], 0), axis=0)
    xm = x @ w["final_mix_layer.weight"].T + w["final_mix_layer.bias"] + pooled
    out = []
    for r in range(len(rows)):
        z = w["lstm.linear.weight"] @ np.concatenate([xm[r], hs[r]]) + w["lstm.linear.bias"]
        hsz = len(hs[r])
        i, g, f, o = (z[q * hsz : (q + 1) * hsz] for q in range(4))
        c = sigmoid(f + 1) * cs[r] + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        ctrl = w["rnn_to_controls.weight"] @ h + w["rnn_to_controls.bias"]
        lr_mult = float((w["step_size.weight"] @ h + w["step_size.bias"])[0])
        out.append((ctrl, lr_mult, h, c))
    return out


def mlp_weights(mlp, ctrl):
    banks = {k: np.asarray(v, dtype=np.float64) for k, v in mlp.items()}
    kk = len(ctrl)

    def mix(key):
        return 100.0 * sum(ctrl[q] * banks[key][q] for q in range(kk)) / kk

    layers = [(mix("input_weights_"), mix("input_bias_"))]
    i = 0
    while f"hidden_weights_.{i}" in banks:
        layers.append((mix(f"hidden_weights_.{i}"), mix(f"hidden_bias_.{i}")))
        i += 1
    layers.append((mix("output_weights_"), mix("output_bias_")))
    return layers


def element_step(p, g, ts, layers, lr_mult, rule):
    """Update ``ts`` in place and return the step array (``p_new = p − lr·step``)."""
    shape = p.shape
    elements = list(np.ndindex(*shape))
    n = len(elements)
    g = {i: min(max(float(g[i]), -1000.0), 1000.0) for i in elements}
    gs = {i: g[i] ** 2 + 1e-30 for i in elements}
    for i in elements:
        ts["m"][i] = [BM[j] * ts["m"][i][j] + (1 - BM[j]) * g[i] for j in range(3)]
        ts["v"][i] = BV * ts["v"][i] + (1 - BV) * g[i] ** 2
    fd = factored_axes(shape, rule)
    feats = {}
    if fd is not None:
        d1, d0 = fd
        for axis, store in ((d0, "r"), (d1, "c_fac")):
            sums = {}
            for i in elements:
                sums.setdefault(drop(i, axis), []).append(gs[i])
            for red, vals in sums.items():
                mean = sum(vals) / len(vals)
                ts[store][red] = [BF[j] * ts[store][red][j] + (1 - BF[j]) * mean for j in range(3)]
        # RF: r divided by its mean over the entries that differ only in the d1 coordinate
        d1_in_r = d1 - (1 if d1 > d0 else 0)
        rf = {}
        for red in ts["r"]:
            peers = [q for q in ts["r"] if drop(q, d1_in_r) == drop(red, d1_in_r)]
            for j in range(3):
                mean = sum(ts["r"][q][j] for q in peers) / len(peers)
                rf[(red, j)] = srsqrt(ts["r"][red][j] / (mean + 1e-9))
        for i in elements:
            rid, cid = drop(i, d0), drop(i, d1)
            row = ts["r"][rid]
            col = ts["c_fac"][cid]
            both = [rf[(rid, j)] * srsqrt(col[j]) for j in range(3)]
            feats[i] = (
                [g[i] * both[j] for j in range(3)],
                row,
                col,
                [ts["m"][i][j] * both[j] for j in range(3)],
            )
    else:
        for i in elements:
            ts["vd"][i] = [BF[j] * ts["vd"][i][j] + (1 - BF[j]) * gs[i] for j in range(3)]
            vd = ts["vd"][i]
            feats[i] = (
                [g[i] * srsqrt(vd[j] + 1e-9) for j in range(3)],
                vd,
                vd,
                [ts["m"][i][j] * vd[j] ** -0.5 for j in range(3)],
            )
    x = {}
    for i in elements:
        m, v = ts["m"][i], ts["v"][i]
        rv = 1.0 / math.sqrt(v + 1e-6)
        fac_g, row, col, fac_m = feats[i]
        x[i] = (
            [g[i], min(max(g[i], -0.1), 0.1), float(p[i])]
            + list(m)
            + [v]
            + [mj * rv for mj in m]
            + [rv]
            + fac_g
            + [g[i] * rv]
            + list(row)
            + list(col)
            + [1.0 / math.sqrt(r + 1e-8) for r in row]
            + [1.0 / math.sqrt(c + 1e-8) for c in col]
            + fac_m
        )
    for ch in range(30):
        scale = 1.0 / math.sqrt(1e-5 + sum(x[i][ch] ** 2 for i in elements) / n)
        for i in elements:
            x[i][ch] *= scale
    param_scale = math.sqrt(sum(float(p[i]) ** 2 for i in elements) / n + 1e-9)
    step = np.zeros(shape)
    for i in elements:
        h = np.asarray(x[i])
        for li, (w, b) in enumerate(layers):
            h = w @ h + b
            if li < len(layers) - 1:
                h = np.maximum(h, 0)
        step[i] = lr_mult * param_scale * h[0] * math.exp(1e-3 * h[1]) * 1e-3
    return step


def step(params, grads, st, rnn, mlp, loss, num_steps, rule="first", lr=1.0, wd=0.0):
    """One VeLO step over ``params`` (dict of arrays); returns new params, mutates ``st``."""
    lfeat = loss_features(st, float(loss), num_steps)
    active = [name for name in params if grads.get(name) is not None]
    arrays = {
        name: (
            np.asarray(params[name], dtype=np.float64).reshape(np.shape(params[name]) or (1,)),
            np.asarray(grads[name], dtype=np.float64).reshape(np.shape(params[name]) or (1,)),
        )
        for name in active
    }
    rows = [lstm_input(arrays[n][0], st["tensors"][n], st["t"], num_steps, lfeat) for n in active]
    outs = rnn_forward(
        rnn, rows, [st["tensors"][n]["h"] for n in active], [st["tensors"][n]["c"] for n in active]
    )
    new = dict(params)
    for name, (ctrl, lr_mult, h, c) in zip(active, outs):
        ts = st["tensors"][name]
        ts["h"], ts["c"] = h, c
        p, g = arrays[name]
        s = element_step(p, g, ts, mlp_weights(mlp, ctrl), lr_mult, rule)
        new[name] = (p * (1 - lr * wd) - lr * s).reshape(np.shape(params[name]))
    st["t"] += 1
    return new
