"""Import PyLO / µLO checkpoints in the Hugging Face layout (docs/design/small_fc_lopt.md §14 A).

The directory holds ``config.json`` (``PyTorchModelHubMixin``'s record of
``MetaMLP(input_size, hidden_size, hidden_layers)``) and ``model.safetensors`` (MetaMLP's state
dict, nn.Linear ``(out, in)`` layout)::

    network.input.weight   (h, 39)  -> w0 = transpose      network.input.bias   -> b0
    network.linear_{i}.weight (h, h) -> w{i+1} = transpose  network.linear_{i}.bias -> b{i+1}
    network.output.weight  (2, h)   -> w{H+1} = transpose   network.output.bias  -> b{H+1}

Shapes are inferred from the tensors and ``config.json`` is only cross-checked. What the artefact
does not carry is supplied as PyLO does: the µLO decay offsets (design §9), ``step_mult`` 1e-2,
``exp_mult`` 1e-3. The tie rule defaults to ``"first"`` (the weights were meta-trained in JAX);
use ``"last"`` for parity with PyLO's own optimizer. Pickles (``pytorch_model.bin``) are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lopt.small_fc import METAMLP_INPUT_SIZE as NUM_FEATURES
from lopt.small_fc import from_metamlp

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
        raise _fail(directory, "missing config.json (the MetaMLP constructor arguments)")
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


def convert_pylo(
    directory: PathLike,
    *,
    source: str | None = None,
    revision: str | None = None,
    tie_break: str = "first",
) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """``(θ, config, meta)`` for a PyLO HF-layout directory, without publishing anything."""
    directory = Path(directory)
    cfg, tensors = _read(directory)
    layers = _layers(directory, tensors)
    hidden = _check_shapes(directory, tensors, layers)
    _cross_check(directory, cfg, hidden, len(layers) - 2)
    linears = [
        (tensors[f"network.{module}.weight"], tensors[f"network.{module}.bias"])
        for module in layers
    ]
    theta, config = from_metamlp(linears, tie_break)  # type: ignore[arg-type]
    cached = _HF_CACHE.search(directory.resolve().as_posix())
    if cached and source is None:
        source = f"{cached.group(1)}/{cached.group(2)}"
        revision = revision or cached.group(3)
    meta = {
        "description": f"µLO / PyLO small_fc_lopt weights imported from {source or directory}.",
        "source": {
            "format": "PyLO / µLO Hugging Face layout (PyTorchModelHubMixin MetaMLP)",
            "repo_id": source,
            "revision": revision,
            "path": str(directory.resolve()),
            "sha256": {
                "model.safetensors": file_sha256(directory / "model.safetensors"),
                "config.json": file_sha256(directory / "config.json"),
            },
            "config": cfg,
        },
        "conversion": {
            "mapping": (
                "network.input→w0, network.linear_i→w{i+1}, network.output→w{H+1}; "
                "weights transposed from (out, in) to (in, out)"
            ),
            "added_by_importer": "µLO decay offsets (design §9), step_mult 1e-2, exp_mult 1e-3",
            "tie_break": tie_break,
        },
        "caveats": [
            MU_P_CAVEAT,
            "The artefact holds only the MLP; the decay offsets, step_mult (1e-2) and exp_mult "
            "(1e-3) are PyLO's constructor defaults, added by the importer.",
            f"tie_break={tie_break!r}: 'first' matches the JAX reference these weights were "
            "trained with; 'last' matches PyLO's own optimizer on square weights.",
        ],
    }
    return theta, config, meta


def import_pylo(
    directory: PathLike,
    name: str,
    *,
    version: str | Version | None = None,
    source: str | None = None,
    revision: str | None = None,
    tie_break: str = "first",
    root: PathLike | None = None,
) -> ZooEntry:
    """Convert a PyLO HF-layout directory and publish it as ``name`` (see the module doc).

    ``source``/``revision`` (e.g. ``"btherien/mulo"`` and a commit) are recorded in meta and
    card; for a Hugging Face cache snapshot path they are inferred when not given. The source
    ``README.md``, if any, is kept as the attachment ``source_README.md``.
    """
    theta, config, meta = convert_pylo(
        directory, source=source, revision=revision, tie_break=tie_break
    )
    readme = Path(directory) / "README.md"
    attachments = {"source_README.md": readme} if readme.is_file() else None
    return publish(
        theta, config, name, version=version, meta=meta, attachments=attachments, root=root
    )
