"""Realistic parameter-shape mixes for the kernel benchmarks (PyTorch (out, in, ...) layout).

- ``4M``: a ResNet-18-style CNN (7×7 stem, 3×3 stages with 1×1 shortcuts, BatchNorm vectors)
  with a two-layer MLP head — conv kernels with in == out (ties), non-square matrices, vectors.
- ``25M``: a ViT/GPT-style transformer, width 512 (patch-embedding conv, token embedding,
  7 blocks of qkv / proj / fc1 / fc2 with biases and LayerNorms, classifier head).
- ``vit_b16``: ViT-B/16 (86M), the configuration of PyLO's published GPU figure.

Each set also holds one scalar parameter (a temperature), so rank 0 is exercised.
"""

from __future__ import annotations

import math

Shape = tuple[int, ...]


def _bn(c: int) -> list[Shape]:
    return [(c,), (c,)]


def cnn_4m() -> list[Shape]:
    shapes: list[Shape] = [(64, 3, 7, 7), *_bn(64)]
    cin = 64
    for cout in (64, 128, 256):
        for block in range(2):
            first_in = cin if block == 0 else cout
            shapes += [(cout, first_in, 3, 3), *_bn(cout), (cout, cout, 3, 3), *_bn(cout)]
            if block == 0 and cin != cout:
                shapes += [(cout, cin, 1, 1), *_bn(cout)]
        cin = cout
    shapes += [(1024, 256), (1024,), (1024, 1024), (1024,), (10, 1024), (10,), ()]
    return shapes


def _transformer(width: int, depth: int, mlp: int) -> list[Shape]:
    shapes: list[Shape] = []
    for _ in range(depth):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (mlp, width), (mlp,), (width, mlp), (width,)]
    return shapes


def transformer_25m() -> list[Shape]:
    shapes: list[Shape] = [(512, 3, 16, 16), (512,), (4096, 512), (197, 512), (1, 1, 512)]
    shapes += _transformer(512, 7, 2048)
    shapes += [(512,), (512,), (1000, 512), (1000,), ()]
    return shapes


def vit_b16() -> list[Shape]:
    shapes: list[Shape] = [(768, 3, 16, 16), (768,), (1, 197, 768), (1, 1, 768)]
    shapes += _transformer(768, 12, 3072)
    shapes += [(768,), (768,), (1000, 768), (1000,), ()]
    return shapes


PARAM_SETS = {"4M": cnn_4m, "25M": transformer_25m, "vit_b16": vit_b16}


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)
