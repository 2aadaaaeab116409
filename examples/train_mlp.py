"""Train a small MLP on real digits with the learned optimizer, next to AdamW.

    python examples/train_mlp.py [--steps 500] [--weights small_fc_lopt/mlp_mnist]

``SmallFCLOpt(params)`` loads the default zoo optimizer; ``--weights`` takes any zoo reference,
a ``.safetensors`` file or a meta-training run's ``theta.safetensors``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lopt
import tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--weights", default=None, help="zoo reference or .safetensors path")
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    args = parser.parse_args()

    # Real MNIST digits (8×8), batches of 128 from the task's train split.
    family = tasks.get_family("mlp_mnist", image_sizes=8, depth=1, width=64, batch_size=128)
    static = family.sample_static(torch.Generator().manual_seed(0))
    data = family.make_task(static).batches("train", 1, 0)
    batches = [{k: v[0] for k, v in next(data).items()} for _ in range(args.steps)]

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    results = {}
    for name in ("SmallFCLOpt", "AdamW"):
        model = make_model()
        if name == "SmallFCLOpt":
            opt = lopt.SmallFCLOpt(model.parameters(), args.weights)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=args.adamw_lr)
        losses = []
        for batch in batches:
            loss = nn.functional.cross_entropy(model(batch["x"]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results[name] = losses
        tail = sum(losses[-50:]) / 50
        print(f"{name:12s} mean train loss {sum(losses) / len(losses):.4f}, last-50 {tail:.4f}")


if __name__ == "__main__":
    main()
