"""Trees of tensors: nested dicts (parameters, optimizer state, lane states) mapped leaf by leaf.

The one pytree map of lozoo: the meta-trainer's lanes, the evaluation's batched optimizers and
the held-out monitor all go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["tree_map", "tree_stack"]


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``fn`` applied to every leaf of ``tree`` (and the matching leaves of ``rest``).

    Mappings are walked in ``tree``'s key order and rebuilt as dicts; anything else is a leaf.
    The other trees must have ``tree``'s keys (extra keys are ignored).
    """
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v, *(other[k] for other in rest)) for k, v in tree.items()}
    return fn(tree, *rest)


def tree_stack(trees: Sequence[Any]) -> Any:
    """Trees of the same structure stacked leaf by leaf on a new leading axis."""
    return tree_map(lambda *leaves: torch.stack(leaves), trees[0], *trees[1:])
