"""Stacked, checkpointable batch streams over a preloaded split (docs/design/tasks.md §2.3).

The meta-trainer draws one ``[n, B, ...]`` batch per inner step for all ``n`` lane pairs,
thousands of times a minute, so a draw is a single ``index_select`` into the preloaded split —
no Python loop over streams, no per-example work.

Semantics: stream ``i`` loops over the split forever, reshuffling every epoch with its own
permutation, with a fixed batch size and the remainder dropped. All streams draw one batch per
call with the same batch size over the same split, so their epoch boundaries coincide and one
cursor serves them all; only the permutations differ.

Each stream owns a ``torch.Generator`` seeded from the caller's generator (or int seed), drawn in
stream order, so stream ``i`` is the same whatever ``n_streams`` is. A checkpoint stores the
generators' states at the start of the current epoch plus the cursor; restoring redraws the same
permutations and leaves the generators exactly where they were, so a resumed run is
bit-identical without storing ``n × N`` permutation indices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchStream", "make_generator"]

_SEED_HIGH = 2**62


def make_generator(gen_or_seed: torch.Generator | int) -> torch.Generator:
    """Return ``gen_or_seed`` if it is a generator, else a fresh CPU generator seeded with it."""
    if isinstance(gen_or_seed, torch.Generator):
        return gen_or_seed
    if isinstance(gen_or_seed, bool) or not isinstance(gen_or_seed, int):
        raise TypeError(f"expected a torch.Generator or an int seed, got {gen_or_seed!r}")
    return torch.Generator().manual_seed(gen_or_seed)


class BatchStream:
    """``n_streams`` independent infinite shuffled streams over ``arrays``, drawn stacked.

    ``arrays`` maps batch keys to tensors sharing the leading example dimension ``N`` (e.g.
    ``{"x": [N, D], "y": [N]}``); ``next(stream)`` returns ``{"x": [n, B, D], "y": [n, B]}``
    on the arrays' device. ``name`` is informational (and checked on ``load_state_dict``).
    """

    def __init__(
        self,
        arrays: Mapping[str, Tensor],
        n_streams: int,
        batch_size: int,
        gen_or_seed: torch.Generator | int,
        *,
        name: str = "",
    ) -> None:
        if not arrays:
            raise ValueError("BatchStream needs at least one array")
        sizes = {k: int(v.shape[0]) for k, v in arrays.items()}
        num_examples = next(iter(sizes.values()))
        if len(set(sizes.values())) != 1:
            raise ValueError(f"BatchStream arrays disagree on the number of examples: {sizes}")
        if not isinstance(n_streams, int) or n_streams < 1:
            raise ValueError(f"n_streams must be a positive int, got {n_streams!r}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= num_examples:
            raise ValueError(
                f"batch_size must be an int in [1, {num_examples}] for split {name!r} "
                f"of {num_examples} examples, got {batch_size!r}"
            )
        self.arrays = dict(arrays)
        self.n_streams = n_streams
        self.batch_size = batch_size
        self.num_examples = num_examples
        self.name = name
        self._device = next(iter(arrays.values())).device
        parent = make_generator(gen_or_seed)
        seeds = torch.randint(0, _SEED_HIGH, (n_streams,), generator=parent).tolist()
        self._gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.epoch = 0
        self._start_epoch()

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def _start_epoch(self) -> None:
        self._epoch_states = [g.get_state() for g in self._gens]
        perms = [torch.randperm(self.num_examples, generator=g) for g in self._gens]
        self._perms = torch.stack(perms).to(self._device)
        self.cursor = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self.cursor + self.batch_size > self.num_examples:  # drop the remainder
            self.epoch += 1
            self._start_epoch()
        index = self._perms[:, self.cursor : self.cursor + self.batch_size].reshape(-1)
        self.cursor += self.batch_size
        lead = (self.n_streams, self.batch_size)
        return {
            k: v.index_select(0, index).view(*lead, *v.shape[1:]) for k, v in self.arrays.items()
        }

    # ``stream.next()`` reads naturally in trainer code; it is the same as ``next(stream)``.
    next = __next__

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically (tensors and ints only)."""
        return {
            "name": self.name,
            "n_streams": self.n_streams,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "epoch_start_states": torch.stack(self._epoch_states),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the stream must be over the same split and shapes."""
        for key in ("name", "n_streams", "batch_size", "num_examples"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"BatchStream.load_state_dict: {key} is {state[key]!r} in the checkpoint "
                    f"but {getattr(self, key)!r} in this stream"
                )
        cursor = int(state["cursor"])
        if not 0 <= cursor <= self.num_examples:
            raise ValueError(f"BatchStream.load_state_dict: cursor {cursor} out of range")
        states = state["epoch_start_states"]
        if states.shape[0] != self.n_streams:
            raise ValueError("BatchStream.load_state_dict: wrong number of generator states")
        for g, s in zip(self._gens, states, strict=True):
            g.set_state(s.clone())
        self._start_epoch()
        self.epoch = int(state["epoch"])
        self.cursor = cursor

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape[1:]) for k, v in self.arrays.items()}
        return (
            f"BatchStream(name={self.name!r}, n_streams={self.n_streams}, "
            f"batch_size={self.batch_size}, num_examples={self.num_examples}, shapes={shapes})"
        )
