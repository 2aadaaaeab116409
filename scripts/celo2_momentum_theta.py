"""Write a Celo2 θ whose learned rule starts as Newton–Schulz-orthogonalised momentum (Muon-like).

    python scripts/celo2_momentum_theta.py OUT.safetensors [--noise 0.1] [--seed 0] [--channel 3]
        [--nesterov C]

Celo2's MLP (30 → 8 → 8 → 3, ReLU) can pass one input channel through unchanged:
``x = relu(x) − relu(−x)``. This θ routes channel 3 (the β = 0.9 momentum, normalised per tensor)
through hidden units 0 and 1 of both layers to the direction output, so the architecture's own
Newton–Schulz step and unit-RMS rescale turn it into an orthogonalised momentum update — the Muon
rule (without Nesterov) — while rank ≤ 1 tensors keep Celo2's Adam branch. ``--nesterov C`` adds
C times the normalised gradient (channel 0) to that direction, a Nesterov-style look-ahead
(momentum + C·gradient; 1.0 beat plain momentum on the held-out transformer and convnet).
``--noise`` adds the
architecture's random init scaled by that factor, so every other weight starts small but non-zero
and the meta-trainer's perturbations can grow them. Use the file with
``python -m metatrain --lopt celo2 --init-from OUT.safetensors``: meta-training then starts from
a strong hand-designed rule instead of a random one (why: docs/design/mixture.md).
"""

from __future__ import annotations

import argparse

import torch

import lopt

GRAD_CHANNEL = 0  # the raw (±1000-clipped) gradient, normalised per tensor like every channel


def momentum_theta(
    noise: float = 0.1, seed: int = 0, channel: int = 3, nesterov: float = 0.0
) -> dict[str, torch.Tensor]:
    cfg = lopt.resolve_config("celo2")
    arch = lopt.architecture_of(cfg)
    theta = arch.init_theta(cfg, torch.Generator().manual_seed(seed))
    theta = {k: v * noise for k, v in theta.items()}
    if not 0 <= channel < theta["w0"].shape[0]:
        raise SystemExit(f"error: --channel must be in [0, {theta['w0'].shape[0]}), got {channel}")
    theta["w0"][channel, 0] += 1.0  # hidden unit 0 = relu(x), unit 1 = relu(-x)
    theta["w0"][channel, 1] -= 1.0
    theta["w0"][GRAD_CHANNEL, 0] += nesterov  # the same two units then carry m + C·g
    theta["w0"][GRAD_CHANNEL, 1] -= nesterov
    theta["w1"][0, 0] += 1.0  # both copied through the second layer
    theta["w1"][1, 1] += 1.0
    theta["w2"][0, 0] += 1.0  # direction = relu(x) - relu(-x) = x
    theta["w2"][1, 0] -= 1.0
    return theta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--noise", type=float, default=0.1, help="scale of the random init added")
    parser.add_argument("--seed", type=int, default=0, help="seed of that random init")
    parser.add_argument("--channel", type=int, default=3, help="input channel to pass through")
    parser.add_argument(
        "--nesterov", type=float, default=0.0, help="add this multiple of the gradient channel"
    )
    args = parser.parse_args()
    cfg = lopt.resolve_config("celo2")
    if args.channel == GRAD_CHANNEL and args.nesterov:
        raise SystemExit("error: --nesterov adds the gradient channel; pass a momentum --channel")
    theta = momentum_theta(args.noise, args.seed, args.channel, args.nesterov)
    note = f"momentum channel {args.channel} passed through, noise {args.noise} seed {args.seed}"
    if args.nesterov:
        note += f", plus {args.nesterov:g} x gradient channel"
    lopt.save_theta(args.out, theta, cfg, {"lozoo.note": note})
    print(f"wrote {args.out}: {note}")


if __name__ == "__main__":
    main()
