"""Vectorised truncated unrolls of 2N inner problems (docs/design/meta_training.md §2, §11).

Lanes ``0..N-1`` run θ+ε_i and lanes ``N..2N-1`` run θ−ε_i. All lanes advance one *slot* per
batched call: ``torch.func.vmap`` over (θ lane, params, optimizer state, batch, task config) of
"inner gradient + learned-optimizer update". Lanes reset independently, selected by a host-side mask
(never by Python branches on lane values), and lanes ``i`` and ``i+N`` always share their batch,
their reset draws (task config and init) and their counters: the pair differs only in ±ε.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

import lopt
from lopt.kernels.lanes import as_lane_update, guarded_apply_
from lopt.nonfinite import guarded_update
from lopt.tree import tree_map, tree_stack

from .schedules import NeverEnding, Schedule
from .seeding import meta_stream_seed

TensorTree = dict[str, Any]
LOPT_BACKENDS = ("torch", "cpp", "auto")


@dataclass
class UnrollOutput:
    """Per-slot records of one truncation (T slots, N pairs)."""

    losses: torch.Tensor  # [T, 2N] normalised loss before each update; 0 at reset slots
    mask: torch.Tensor  # [T, N] 1.0 where the slot trained, 0.0 where it reset the lane pair
    done: torch.Tensor  # [T, N] 1.0 where is_done became True after the slot
    raw_loss_sum: float  # sum of finite raw (un-normalised) positive-lane losses, for logging
    raw_loss_count: int
    inner_steps: int  # trained lane-slots over all 2N lanes


class LaneProblem(Protocol):
    """The inner problem the unroll advances: fresh lane states and one vectorised slot.

    Lane states are trees of tensors stacked over lanes. :class:`TaskLanes` is the real one
    (a task trained by a learned optimizer); the statistical tests plug in analytic problems.
    """

    def fresh(self, n: int, generator: torch.Generator) -> TensorTree: ...

    def next_batch(self) -> TensorTree: ...

    def step(self, theta_lanes: torch.Tensor, state: TensorTree, batch: TensorTree):
        """Train every lane one step: returns ``(new_state, loss [2N])`` with the loss before
        the update; losses are raw, :meth:`normalizer` maps them to the meta-loss scale."""
        ...

    def normalizer(self, loss: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_meta_split(meta_split: str, splits: tuple[str, ...]) -> None:
    """Refuse a meta-objective split the task lacks, and ``"test"`` (final reports only)."""
    if meta_split == "test":
        raise ValueError(
            "meta-loss split 'test' is refused: the test split is kept for final reports; "
            "meta-train on 'outer_valid' instead"
        )
    if meta_split not in splits:
        raise ValueError(
            f"unknown meta-loss split {meta_split!r}; this task has: {', '.join(splits)}"
        )


def _pairs_to_lanes(tree: TensorTree) -> TensorTree:
    """[N, ...] → [2N, ...]: the + and − copies of every pair."""
    return tree_map(lambda x: torch.cat([x, x]), tree)


class TaskLanes:
    """Lanes of one task (one static config) trained by a learned optimizer with per-lane θ.

    A lane state is ``{"params", "opt_state", "task_cfg"}``. With ``lopt_backend="torch"`` (the
    reference) one slot is a single ``torch.func.vmap`` over (θ lane, params, optimizer state,
    batch, task config) of the inner gradient and the architecture's ``update``. ``"cpp"`` is the
    fast path (docs/design/lanes.md): the task's batched ``lanes_grad_and_value`` (bmm / grouped
    convolution, tested equal to the vmapped gradient) and the architecture's lane-batched update
    (``lopt.Architecture.lanes_update``, a :class:`lopt.kernels.lanes.LaneUpdate`: for
    small_fc_lopt one fused op call per parameter tensor for all lanes, parity-tested against the
    vmapped core), which updates the lane state **in place**. ``"auto"`` picks ``"cpp"`` when the
    architecture has a lane update and the kernel loads. No autograd graph survives a slot.

    The per-lane loss a slot returns is the meta-objective's (meta_training.md §2.5). With
    ``meta_split=split`` (the default) it is the pre-update loss on the slot's training batch, a
    by-product of the inner gradient. Any other split of the task (``"outer_valid"``) scores the
    *post-update* params on a fresh batch of that split, drawn in step with the training batch
    (lanes ``i`` and ``i+N`` share it): the objective then rewards what generalises past the
    inner training data, at the cost of one extra forward per slot. ``"test"`` is refused: it is
    kept for final reports.
    """

    def __init__(
        self,
        task: Any,
        family: Any,
        static: Any,
        lopt_config: Any,
        num_streams: int,
        stream_seed: int,
        split: str = "train",
        lopt_backend: str = "torch",
        meta_split: str = "train",
    ) -> None:
        check_meta_split(meta_split, task.splits)
        if lopt_backend not in LOPT_BACKENDS:
            raise ValueError(
                f"unknown lopt backend {lopt_backend!r}; valid: {', '.join(LOPT_BACKENDS)}"
            )
        self.task, self.family, self.static = task, family, static
        self.lopt_config = lopt_config
        self.arch = lopt.architecture_of(lopt_config)
        self.stream = task.batches(split, num_streams, stream_seed)
        self.meta_stream = None
        if meta_split != split:
            seed = meta_stream_seed(stream_seed)
            self.meta_stream = task.batches(meta_split, num_streams, seed)
            self._meta_loss_all = torch.func.vmap(task.loss, randomness="error")
        self._step_all = torch.func.vmap(self._lane_train, randomness="error")
        self._nonfinite_skips = torch.zeros((), dtype=torch.int64)
        if lopt_backend == "cpp" and self.arch.lanes_update is None:
            raise ValueError(
                f"lopt backend 'cpp': {self.arch.name} has no fused lane kernel; use 'torch'"
            )
        if lopt_backend == "auto":
            from lopt.kernels import cpp_is_available

            fused = self.arch.lanes_update is not None and cpp_is_available()
            lopt_backend = "cpp" if fused else "torch"
        self.lopt_backend = lopt_backend
        self.lane_update = None
        if lopt_backend == "cpp":
            self.lane_update = as_lane_update(self.arch.lanes_update)
        # θ is fixed while the lanes advance: its kernel arguments are derived once per θ tensor.
        self._prepared: tuple[torch.Tensor, int, Any] | None = None

    def fresh(self, n: int, generator: torch.Generator) -> TensorTree:
        cfgs, params = [], []
        for _ in range(n):
            lane_cfg = self.family.sample_lane(generator, self.static)
            cfgs.append(lane_cfg)
            params.append(self.task.init(generator, lane_cfg))
        stacked = tree_stack(params)
        one = {k: v[0] for k, v in stacked.items()}
        zeros = self.arch.init_state(one, self.lopt_config)
        opt_state = tree_map(lambda x: x.unsqueeze(0).expand(n, *x.shape).clone(), zeros)
        return {
            "params": stacked,
            "opt_state": opt_state,
            "task_cfg": tree_stack(cfgs) if cfgs[0] else {},
        }

    def next_batch(self) -> TensorTree:
        if self.meta_stream is None:
            return next(self.stream)
        return {"inner": next(self.stream), "meta": next(self.meta_stream)}

    def _lane_train(self, theta_flat, params, opt_state, batch, task_cfg):
        theta = lopt.unflatten_theta(theta_flat, self.lopt_config)
        grads, loss = torch.func.grad_and_value(self.task.loss)(params, batch, task_cfg)
        # a lane's NaN/inf inner gradient skips that tensor's update (lopt.nonfinite)
        new_params, new_state, skipped = guarded_update(self.arch.update)(
            theta, opt_state, params, grads, self.lopt_config, loss=loss.detach()
        )
        return new_params, new_state, loss, skipped

    def _prepare(self, theta_lanes: torch.Tensor) -> Any:
        cached = self._prepared
        if cached is None or cached[0] is not theta_lanes or cached[1] != theta_lanes._version:
            prepared = self.lane_update.prepare(theta_lanes, self.lopt_config)
            self._prepared = cached = (theta_lanes, theta_lanes._version, prepared)
        return cached[2]

    def step(self, theta_lanes: torch.Tensor, state: TensorTree, batch: TensorTree):
        """One slot for every lane; returns ``(state, loss [2N])``.

        The ``"cpp"`` path updates ``state``'s params and optimizer state in place and returns
        the same tree; callers that need the old state must copy it first. ``batch`` is what
        :meth:`next_batch` returned (lane-expanded); the loss is the meta-objective's.
        """
        if self.meta_stream is None:
            return self._train_step(theta_lanes, state, batch)
        state, _ = self._train_step(theta_lanes, state, batch["inner"])
        with torch.no_grad():
            loss = self._meta_loss_all(state["params"], batch["meta"], state["task_cfg"])
        return state, loss

    def _train_step(self, theta_lanes: torch.Tensor, state: TensorTree, batch: TensorTree):
        if self.lopt_backend == "cpp":
            grads, loss = self.task.lanes_grad_and_value(state["params"], batch, state["task_cfg"])
            # a lane's NaN/inf inner gradient skips that tensor's update (lopt.nonfinite)
            skipped = guarded_apply_(
                self.lane_update, self._prepare(theta_lanes), state["opt_state"],
                state["params"], grads, self.lopt_config, loss=loss,
            )  # fmt: skip
            self._nonfinite_skips = self._nonfinite_skips + skipped.sum()
            return state, loss
        params, opt_state, loss, skipped = self._step_all(
            theta_lanes, state["params"], state["opt_state"], batch, state["task_cfg"]
        )
        self._nonfinite_skips = self._nonfinite_skips + skipped.sum()  # no host sync here
        return {"params": params, "opt_state": opt_state, "task_cfg": state["task_cfg"]}, loss

    def take_nonfinite_skips(self) -> int:
        """Tensor updates skipped for a non-finite inner gradient since the last call."""
        skips = int(self._nonfinite_skips)
        self._nonfinite_skips = torch.zeros((), dtype=torch.int64)
        return skips

    def normalizer(self, loss: torch.Tensor) -> torch.Tensor:
        return self.task.normalizer(loss)

    def state_dict(self) -> dict[str, Any]:
        out = {"stream": self.stream.state_dict()}
        if self.meta_stream is not None:
            out["meta_stream"] = self.meta_stream.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        if self.meta_stream is not None:
            self.meta_stream.load_state_dict(state["meta_stream"])


class VectorizedUnroll:
    """2N lanes of a :class:`LaneProblem`, advanced one slot at a time with per-lane θ.

    Owns the trajectory bookkeeping of design §2: host-side counters (``inner_step``,
    ``length``, ``is_done`` per pair, known before each slot, so no device sync), mask-selected
    resets with one shared draw per pair, staggered starts and the per-slot records.

    Args:
        problem: the lanes' inner problem.
        num_pairs: N; there are 2N lanes.
        schedule: trajectory lengths (drawn per pair at init and whenever a trajectory ends).
        random_offset: K; each pair starts at ``inner_step ~ randint[0, K)`` so that lanes reset
            at different slots (only the trajectory counter is offset, never the lopt's ``t``).
        seed: seeds this unroll's generator (fresh lanes, lengths, offsets).
    """

    def __init__(
        self,
        problem: LaneProblem,
        num_pairs: int,
        schedule: Schedule,
        random_offset: int = 0,
        seed: int = 0,
    ) -> None:
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        if random_offset < 0:
            raise ValueError(f"random_offset must be >= 0, got {random_offset}")
        self.problem = problem
        self.num_pairs = num_pairs
        self.schedule = schedule
        self.random_offset = int(random_offset)
        self.generator = torch.Generator().manual_seed(seed)
        self._init_lanes(offsets=self.random_offset > 0)

    def _init_lanes(self, offsets: bool) -> None:
        n = self.num_pairs
        self.state = _pairs_to_lanes(self.problem.fresh(n, self.generator))
        self.length = self.schedule.sample(n, self.generator)
        if offsets:
            self.inner_step = torch.randint(0, self.random_offset, (n,), generator=self.generator)
        else:
            self.inner_step = torch.zeros(n, dtype=torch.long)
        self.is_done = torch.zeros(n, dtype=torch.bool)

    def restart(self) -> None:
        """Fresh tasks on every lane (both signs of a pair from the same draws), no offsets."""
        self._init_lanes(offsets=False)

    def copy_positive_to_negative(self) -> None:
        n = self.num_pairs

        def copy(x: torch.Tensor) -> torch.Tensor:
            x[n:] = x[:n]
            return x

        self.state = tree_map(copy, self.state)

    @torch.no_grad()
    def _slot(self, theta_lanes: torch.Tensor):
        n = self.num_pairs
        batch = _pairs_to_lanes(self.problem.next_batch())
        reset = self.is_done.clone()
        state, loss = self.problem.step(theta_lanes, self.state, batch)
        raw = loss[:n][~reset]
        finite = torch.isfinite(raw)
        raw_sum, raw_count = float(raw[finite].sum()), int(finite.sum())
        loss = self.problem.normalizer(loss)
        if reset.any():
            # Select, never branch: the trained branch of a resetting lane is discarded, so a
            # diverged lane (NaN params) cannot leak into its fresh task.
            pairs = reset.nonzero().squeeze(1)
            lanes = torch.cat([pairs, pairs + n])
            fresh = _pairs_to_lanes(self.problem.fresh(len(pairs), self.generator))

            def put(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
                dst[lanes] = src.to(dst.dtype)  # in place: the unroll owns its lane state
                return dst

            state = tree_map(put, state, fresh)
            loss = put(loss, torch.zeros(()))
        self.state = state
        self.inner_step = torch.where(reset, 0, self.inner_step + 1)
        self.is_done = self.inner_step >= self.length
        newly_done = self.is_done & ~reset
        if newly_done.any() and not isinstance(self.schedule, NeverEnding):
            # the next trajectory's length is drawn when this one ends (reference semantics)
            self.length = self.length.clone()
            self.length[newly_done] = self.schedule.sample(int(newly_done.sum()), self.generator)
        trained = 2 * int((~reset).sum())
        return loss, (~reset).float(), self.is_done.float(), raw_sum, raw_count, trained

    def run(self, theta_lanes: torch.Tensor, num_slots: int) -> UnrollOutput:
        """Advance all lanes ``num_slots`` slots with per-lane meta-parameters ``[2N, P]``."""
        if theta_lanes.dim() != 2 or theta_lanes.shape[0] != 2 * self.num_pairs:
            raise ValueError(
                f"theta_lanes must have shape [2N={2 * self.num_pairs}, P], "
                f"got {tuple(theta_lanes.shape)}"
            )
        losses, masks, dones = [], [], []
        raw_sum, raw_count, inner = 0.0, 0, 0
        for _ in range(num_slots):
            loss, mask, done, rs, rc, tr = self._slot(theta_lanes)
            losses.append(loss)
            masks.append(mask)
            dones.append(done)
            raw_sum, raw_count, inner = raw_sum + rs, raw_count + rc, inner + tr
        return UnrollOutput(
            torch.stack(losses), torch.stack(masks), torch.stack(dones), raw_sum, raw_count, inner
        )

    # -- checkpointing ----------------------------------------------------------------------------
    # The lane state is updated in place, so a state dict holds copies and loading copies too
    # (a caller's dict never aliases the live lanes).
    def state_dict(self) -> dict[str, Any]:
        return {
            "lanes": tree_map(torch.clone, self.state),
            "inner_step": self.inner_step,
            "length": self.length,
            "is_done": self.is_done,
            "generator": self.generator.get_state(),
            "problem": self.problem.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = tree_map(
            lambda x: x.clone(memory_format=torch.contiguous_format), state["lanes"]
        )
        self.inner_step, self.length = state["inner_step"], state["length"]
        self.is_done = state["is_done"]
        self.generator.set_state(state["generator"])
        self.problem.load_state_dict(state["problem"])
