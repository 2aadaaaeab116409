"""Import PyLO's learned optimizers from their Hugging Face layout (config.json + safetensors).

PyLO serves six optimizers from four checkpoint layouts; each directory is recognised by its
tensor keys (shapes are authoritative, ``config.json`` is only cross-checked):

=============  ==========================================  ==========================  ==========
PyLO class     checkpoint (Hugging Face repo)              layout                      lozoo arch
=============  ==========================================  ==========================  ==========
AdafacLO       btherien/mulo                               MetaMLP                     small_fc_lopt
MuLO           btherien/mulo (same weights)                MetaMLP                     small_fc_lopt
ELO            DiamondXL/elo                               MetaMLP                     elo
CELO2          DiamondXL/celo2                             CELO2MLP                    pylo_celo2
ELO_CELO2      DiamondXL/elo-celo2                         CELO2MLP                    elo_celo2
VeLO           Pauljanson002/VeLO_RNN + VeLO_MLP (2 dirs)  VeLO_RNN + VeLO_MLP         velo
=============  ==========================================  ==========================  ==========

One layout can hold several classes' weights, so the class comes from ``pylo_class=``, else
from the repository id (``source=`` or a Hugging Face cache path), else the layout's first
class. MetaMLP → small_fc_lopt mapping::

    network.input.weight   (h, 39)  -> w0 = transpose      network.input.bias   -> b0
    network.linear_{i}.weight (h, h) -> w{i+1} = transpose  network.linear_{i}.bias -> b{i+1}
    network.output.weight  (2, h)   -> w{H+1} = transpose   network.output.bias  -> b{H+1}

(ELO's mapping is the same without decay offsets; CELO2MLP's and VeLO's are in
:mod:`zoo.pylo_celo2` and :mod:`zoo.pylo_velo`.) What an artefact does not carry is supplied as
PyLO does (µLO's decay offsets, ``step_mult`` and ``exp_mult``) and recorded in the entry's
caveats. Pickles (``pytorch_model.bin``) are refused. A directory that fails any check raises
:class:`ImportFormatError` and nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lopt.small_fc import METAMLP_INPUT_SIZE as NUM_FEATURES
from lopt.small_fc import from_metamlp

from . import pylo_celo2, pylo_velo
from .api import publish
from .entry import ZooEntry, file_sha256, looks_like_pickle
from .errors import ImportFormatError
from .inputs import PathLike
from .refs import Version

_LINEAR = re.compile(r"network\.linear_(\d+)\.(weight|bias)")
_HF_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/([^/]+)/?$")
MU_P_CAVEAT = (
    "µLO meta-trained these weights for µP-parameterised optimizees (arXiv 2406.00153). "
    "lopt.SmallFCLOpt applies them like PyLO's AdafacLO (standard parameterisation, no µP "
    "learning-rate split); for µLO behaviour give the model µP init and output multipliers and "
    "divide the lr of hidden width×width matrices by the width multiplier (PyLO's MuLO)."
)


def _fail(directory: Path, message: str) -> ImportFormatError:
    return ImportFormatError(f"cannot import PyLO checkpoint {directory}: {message}")


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not directory.is_dir():
        raise _fail(directory, "not a directory")
    model, config = directory / "model.safetensors", directory / "config.json"
    if not model.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if looks_like_pickle(p))
        hint = f" ({', '.join(pickles)} is a pickle, which lozoo never loads)" if pickles else ""
        raise _fail(directory, f"missing model.safetensors{hint}")
    if not config.is_file():
        raise _fail(directory, "missing config.json (the model's constructor arguments)")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise _fail(directory, f"config.json is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise _fail(directory, "config.json must hold a JSON object")
    data = model.read_bytes()
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as err:
        pickle = " (it looks like a pickle)" if data[:1] == b"\x80" else ""
        message = f"model.safetensors is not valid safetensors{pickle}: {err}"
        raise _fail(directory, message) from None
    return cfg, tensors


def _layers(directory: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module names in θ order: input, linear_0..linear_{H-1}, output (H checked contiguous)."""
    indices = sorted({int(m.group(1)) for k in tensors if (m := _LINEAR.fullmatch(k))})
    if indices != list(range(len(indices))):
        raise _fail(directory, f"network.linear_* indices {indices} are not 0..H-1")
    layers = ["input", *[f"linear_{i}" for i in indices], "output"]
    expected = {f"network.{m}.{p}" for m in layers for p in ("weight", "bias")}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise _fail(
            directory,
            f"not a MetaMLP state dict: missing keys {missing}, unexpected keys {extra}",
        )
    return layers


def _check_shapes(directory: Path, tensors: dict[str, torch.Tensor], layers: list[str]) -> int:
    first = tensors["network.input.weight"]
    if first.ndim != 2 or first.shape[0] < 1:
        raise _fail(directory, f"network.input.weight has shape {tuple(first.shape)}, not (h, 39)")
    hidden = first.shape[0]
    for i, module in enumerate(layers):
        fan_in = NUM_FEATURES if i == 0 else hidden
        fan_out = 2 if module == "output" else hidden
        for part, shape in (("weight", (fan_out, fan_in)), ("bias", (fan_out,))):
            tensor = tensors[f"network.{module}.{part}"]
            if tuple(tensor.shape) != shape:
                raise _fail(
                    directory,
                    f"network.{module}.{part} has shape {tuple(tensor.shape)}, expected {shape} "
                    f"for a {NUM_FEATURES}→{hidden}→…→2 MetaMLP in (out, in) layout",
                )
            if not tensor.is_floating_point():
                raise _fail(directory, f"network.{module}.{part} is {tensor.dtype}, not floating")
    return hidden


def _cross_check(directory: Path, cfg: dict[str, Any], hidden: int, extra_layers: int) -> None:
    inferred = {"input_size": NUM_FEATURES, "hidden_size": hidden, "hidden_layers": extra_layers}
    for key, value in inferred.items():
        if key in cfg and cfg[key] != value:
            raise _fail(
                directory,
                f"config.json says {key}={cfg[key]!r} but the tensors give {value} "
                "(the tensors are authoritative; the checkpoint is inconsistent)",
            )


# -- which PyLO class, which lozoo architecture ----------------------------------------------------
PYLO_CLASSES: dict[str, tuple[str, str]] = {
    "AdafacLO": ("MetaMLP", "small_fc_lopt"),
    "MuLO": ("MetaMLP", "small_fc_lopt"),
    "ELO": ("MetaMLP", "elo"),
    "CELO2": ("CELO2MLP", "pylo_celo2"),
    "ELO_CELO2": ("CELO2MLP", "elo_celo2"),
    "VeLO": ("VeLO", "velo"),
}
"""PyLO class → (checkpoint layout, lozoo architecture)."""
HF_REPOS = {
    "btherien/mulo": "AdafacLO",
    "DiamondXL/elo": "ELO",
    "DiamondXL/celo2": "CELO2",
    "DiamondXL/elo-celo2": "ELO_CELO2",
    "Pauljanson002/VeLO_RNN": "VeLO",
    "Pauljanson002/VeLO_MLP": "VeLO",
}
"""The Hugging Face repositories PyLO loads each class from (the default class of a repo)."""
TIE_BREAKS = {
    "small_fc_lopt": ("first", "last"),
    "elo": ("first", "last"),
    "velo": ("first", "pylo"),
}


def _layout(directory: Path, tensors: dict[str, torch.Tensor]) -> str:
    keys = set(tensors)
    if "network.input.weight" in keys:
        return "MetaMLP"
    if pylo_celo2.is_celo2_mlp(keys):
        return "CELO2MLP"
    if pylo_velo.is_velo_rnn(keys):
        return "VeLO_RNN"
    if pylo_velo.is_velo_mlp(keys):
        return "VeLO_MLP"
    shown = ", ".join(sorted(keys)[:6]) + (", ..." if len(keys) > 6 else "")
    raise _fail(
        directory,
        f"not a PyLO checkpoint layout lozoo knows (keys: {shown}); expected MetaMLP "
        "(network.input.weight, ...), CELO2MLP (w0.0, dense_w.0, ...), VeLO_RNN "
        "(lstm.linear.weight, ...) or VeLO_MLP (input_weights_, ...)",
    )


def _expand(directories: Sequence[Path]) -> list[Path]:
    """A single directory without model.safetensors may hold the checkpoints in subdirectories
    (e.g. VeLO_RNN/ and VeLO_MLP/)."""
    if len(directories) == 1 and directories[0].is_dir():
        only = directories[0]
        if not (only / "model.safetensors").exists():
            subs = sorted(p for p in only.iterdir() if (p / "model.safetensors").is_file())
            if subs:
                return subs
    return list(directories)


def _directories(directory: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(directory, (str, bytes)) or hasattr(directory, "__fspath__"):
        return _expand([Path(directory)])  # type: ignore[arg-type]
    return _expand([Path(d) for d in directory])


def _pylo_class(layout: str, requested: str | None, source: str | None, where: Path) -> str:
    if requested is not None:
        if requested not in PYLO_CLASSES:
            raise _fail(where, f"unknown PyLO class {requested!r}; known: {sorted(PYLO_CLASSES)}")
        if PYLO_CLASSES[requested][0] != layout:
            fitting = sorted(c for c, (lay, _) in PYLO_CLASSES.items() if lay == layout)
            raise _fail(
                where,
                f"a {layout} checkpoint holds {' / '.join(fitting)} weights, not {requested}",
            )
        return requested
    guess = HF_REPOS.get(source or "")
    if guess is not None and PYLO_CLASSES[guess][0] == layout:
        return guess
    return next(c for c, (lay, _) in PYLO_CLASSES.items() if lay == layout)


def _source(directory: Path, source: str | None, revision: str | None):
    cached = _HF_CACHE.search(directory.resolve().as_posix())
    if cached and source is None:
        source = f"{cached.group(1)}/{cached.group(2)}"
        revision = revision or cached.group(3)
    return source, revision


def _files_record(directory: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": str(directory.resolve()),
        "sha256": {
            "model.safetensors": file_sha256(directory / "model.safetensors"),
            "config.json": file_sha256(directory / "config.json"),
        },
        "config": cfg,
    }


def _metamlp(directory: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]):
    layers = _layers(directory, tensors)
    hidden = _check_shapes(directory, tensors, layers)
    _cross_check(directory, cfg, hidden, len(layers) - 2)
    return [
        (tensors[f"network.{module}.weight"], tensors[f"network.{module}.bias"])
        for module in layers
    ]


def _tie(arch: str, tie_break: str | None, where: Path) -> str | None:
    allowed = TIE_BREAKS.get(arch)
    if tie_break is None:
        return allowed[0] if allowed else None
    if allowed is None:
        raise _fail(where, f"--tie-break does not apply to {arch} (it has no tie rule option)")
    if tie_break not in allowed:
        raise _fail(where, f"--tie-break for {arch} must be one of {allowed}, got {tie_break!r}")
    return tie_break


def _tie_caveat(arch: str, tie_break: str) -> str:
    parity = "pylo" if arch == "velo" else "last"
    return (
        f"tie_break={tie_break!r}: when a tensor's two largest dims are equal, 'first' follows "
        f"the JAX reference these weights were trained with; '{parity}' reproduces PyLO's own "
        "optimizer (re-import with --tie-break to switch)."
    )


ELO_CAVEATS = [
    "lozoo's lr multiplies PyLO's peak step: lr = 1 is PyLO's lr = 1e-3 (step_mult 1e-3).",
    "PyLO's built-in warm-up schedule is not part of the rule; use a torch lr_scheduler.",
]
CELO2_CAVEATS = [
    "lozoo's lr multiplies step_mult = 1e-3: PyLO lr = x is lozoo lr = x / 1e-3, and PyLO "
    "weight_decay = w at PyLO lr = x is lozoo weight_decay = w·1e-3.",
    "lozoo reads nn.Linear (out, in) and conv (out, in, kh, kw) weights in the JAX reference's "
    "frame (layout='torch'); PyLO applies the rule to tensors as stored, which differs on square "
    "matrices and convolutions (use layout='as_stored' for PyLO's numbers).",
    "PyLO converted these weights from a JAX codebase (scaling_l2o); that they equal "
    "amoudgl/celo2 is not established.",
]
VELO_CAVEATS = [
    "lr defaults to 1.0, which is VeLO itself; PyLO's default lr = 1e-3 makes every step 1000× "
    "smaller (its examples pass lr = 1.0).",
    "Weight decay is decoupled, p·(1 − lr·wd) − lr·step; PyLO's naive class decays the updated "
    "parameter and its CUDA class also multiplies the decay by the LSTM's step scale.",
    "num_steps (the planned number of steps) must be given; PyLO silently defaults to 10,000.",
    "PyLO's unused mix_layer1 and the MLP scratch copies are not imported. The JAX → PyLO "
    "conversion is not public, so parity with the JAX original is unverified.",
]


def convert_pylo(
    directory: PathLike | Sequence[PathLike],
    *,
    pylo_class: str | None = None,
    source: str | None = None,
    revision: str | None = None,
    tie_break: str | None = None,
) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """``(θ, config, meta)`` for PyLO checkpoint directories, without publishing anything.

    ``directory`` is one directory, or for VeLO both (``VeLO_RNN`` and ``VeLO_MLP``, in any
    order, or one directory holding the two).
    """
    dirs = _directories(directory)
    read = [(d, *_read(d)) for d in dirs]
    layouts = {d: _layout(d, tensors) for d, _, tensors in read}
    kinds = sorted(layouts.values())
    first = dirs[0]
    source, revision = _source(first, source, revision)
    if kinds == ["VeLO_MLP", "VeLO_RNN"]:
        layout = "VeLO"
    elif len(dirs) == 1 and kinds[0] in ("MetaMLP", "CELO2MLP"):
        layout = kinds[0]
    elif "VeLO_RNN" in kinds or "VeLO_MLP" in kinds:
        raise _fail(
            first,
            f"VeLO needs its two checkpoints, VeLO_RNN and VeLO_MLP (got {', '.join(kinds)}); "
            "pass both directories",
        )
    else:
        raise _fail(first, f"expected one checkpoint directory, got {len(dirs)} ({kinds})")
    cls = _pylo_class(layout, pylo_class, source, first)
    arch = PYLO_CLASSES[cls][1]
    tie = _tie(arch, tie_break, first)
    by_layout = {layouts[d]: (d, cfg, tensors) for d, cfg, tensors in read}
    try:
        theta, config, mapping, added, caveats = _convert(cls, arch, tie, by_layout)
    except pylo_velo.LayoutError as err:
        raise _fail(first, str(err)) from None
    files = {layouts[d]: _files_record(d, cfg) for d, cfg, _ in read}
    meta = {
        "description": f"PyLO's {cls} weights imported from {source or first}. {USE[cls]}",
        "pylo_class": cls,
        "source": {
            "format": f"PyLO Hugging Face layout ({' + '.join(sorted(files))})",
            "repo_id": source,
            "revision": revision,
            **(files[layout] if len(files) == 1 else {"files": files}),
        },
        "conversion": {"mapping": mapping, "added_by_importer": added, "tie_break": tie},
        "caveats": caveats + ([_tie_caveat(arch, tie)] if tie else []),
    }
    return theta, config, meta


def _convert(cls: str, arch: str, tie: str | None, by_layout: dict[str, tuple]):
    import lopt

    if cls in ("AdafacLO", "MuLO"):
        d, cfg, tensors = by_layout["MetaMLP"]
        theta, config = from_metamlp(_metamlp(d, cfg, tensors), tie)  # type: ignore[arg-type]
        mapping = (
            "network.input→w0, network.linear_i→w{i+1}, network.output→w{H+1}; weights "
            "transposed from (out, in) to (in, out)"
        )
        added = "µLO decay offsets, step_mult 1e-2, exp_mult 1e-3 (PyLO's constructor defaults)"
        caveats = [
            "The artefact holds only the MLP; the decay offsets, step_mult (1e-2) and exp_mult "
            "(1e-3) are PyLO's constructor defaults, added by the importer."
        ]
        if cls == "MuLO":
            caveats.insert(0, MULO_CAVEAT)
        else:
            caveats.insert(0, MU_P_CAVEAT)
        return theta, config, mapping, added, caveats
    if cls == "ELO":
        d, cfg, tensors = by_layout["MetaMLP"]
        base = lopt.get_architecture("elo").preset()
        theta = pylo_celo2.elo_theta_from_linears(_metamlp(d, cfg, tensors))
        config = dataclasses.replace(base, hidden_size=int(theta["w1"].shape[0]), tie_break=tie)
        mapping = "network.input/linear_0/output → w0/w1/w2 transposed to (in, out); biases b0-b2"
        added = "ELO's fixed decays (0.9, 0.99, 0.999 / 0.999 / 0.9, 0.99, 0.999), step_mult 1e-3"
        return lopt.validate_theta(theta, config), config, mapping, added, list(ELO_CAVEATS)
    if cls in ("CELO2", "ELO_CELO2"):
        d, cfg, tensors = by_layout["CELO2MLP"]
        problems = pylo_celo2.celo2_config_problems(cfg)
        if problems:
            raise pylo_velo.LayoutError("; ".join(problems))
        theta = pylo_celo2.celo2_theta_from_pylo(tensors)
        config = lopt.get_architecture(arch).preset()
        theta = lopt.validate_theta(theta, config)
        mapping = "w0.0…w0.13 stacked row-wise → w0 (30, 8); dense_w.i/dense_b.i → w{i+1}/b{i+1}"
        caveats = list(CELO2_CAVEATS)
        if cls == "ELO_CELO2":
            caveats.append(
                "adam_lr_mult is 1 (PyLO's naive class); PyLO's CUDA class defaults to 20."
            )
        return theta, config, mapping, "nothing (the artefact is the whole θ)", caveats
    rnn_dir, rnn_cfg, rnn = by_layout["VeLO_RNN"]
    mlp_dir, mlp_cfg, mlp = by_layout["VeLO_MLP"]
    config = dataclasses.replace(pylo_velo.velo_config(rnn, mlp), tie_break=tie)
    problems = pylo_velo.cross_check_configs(config, rnn_cfg, mlp_cfg)
    if problems:
        raise pylo_velo.LayoutError("; ".join(problems))
    theta = lopt.validate_theta(pylo_velo.theta_from_pylo(rnn, mlp, config), config)
    mapping = (
        "see zoo/pylo_velo.py: nn.Linear weights transposed to (in, out), banks to (K, in, out)"
    )
    return (
        theta,
        config,
        mapping,
        "nothing (mix_layer1 and scratch copies dropped)",
        list(VELO_CAVEATS),
    )


USE = {
    "AdafacLO": "Use: lopt.SmallFCLOpt(model.parameters(), weights=REF).",
    "MuLO": "Use: lopt.MuLO(model.named_parameters(), base_model, weights=REF), base_model being "
    "the same model at another width.",
    "ELO": "Use: the elo architecture's optimizer (lopt.make_optimizer(params, REF)).",
    "CELO2": "Use: the pylo_celo2 architecture's optimizer (lopt.make_optimizer(params, REF)).",
    "ELO_CELO2": "Use: the elo_celo2 architecture's optimizer (lopt.make_optimizer(params, REF)).",
    "VeLO": "Use: lopt.VeLO(model.parameters(), weights=REF, num_steps=TOTAL_STEPS), then "
    "opt.step(closure) or opt.step(loss=loss).",
}

MULO_CAVEAT = (
    "µLO weights for µP-parameterised optimizees (arXiv 2406.00153): use them with "
    "lopt.MuLO(model.named_parameters(), base_shapes, weights=REF), which divides the lr and "
    "weight decay of hidden width×width tensors by w = fan_in (PyLO's MuLO); lopt.SmallFCLOpt "
    "applies them unscaled, like PyLO's AdafacLO."
)


def import_pylo(
    directory: PathLike | Sequence[PathLike],
    name: str,
    *,
    pylo_class: str | None = None,
    version: str | Version | None = None,
    source: str | None = None,
    revision: str | None = None,
    tie_break: str | None = None,
    root: PathLike | None = None,
) -> ZooEntry:
    """Convert PyLO checkpoint directories (see :func:`convert_pylo`) and publish ``name``.

    ``source``/``revision`` (e.g. ``"btherien/mulo"`` and a commit) are recorded in meta and
    card; for a Hugging Face cache snapshot path they are inferred when not given. Source
    ``README.md`` files are kept as attachments (``source_README.md``, or one per layout).
    """
    theta, config, meta = convert_pylo(
        directory, pylo_class=pylo_class, source=source, revision=revision, tie_break=tie_break
    )
    dirs = _directories(directory)
    readmes = [d / "README.md" for d in dirs if (d / "README.md").is_file()]
    attachments = None
    if len(dirs) == 1 and readmes:
        attachments = {"source_README.md": readmes[0]}
    elif readmes:
        attachments = {f"source_README_{r.parent.name}.md": r for r in readmes}
    return publish(
        theta, config, name, version=version, meta=meta, attachments=attachments, root=root
    )
