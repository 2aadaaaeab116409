"""An offline English text corpus and a character-level decoder-only transformer task.

**Corpus.** The fortune cookie files of Debian's ``fortunes`` package (``apt-get install
fortunes``; they land in ``/usr/share/games/fortunes``): about 2.6 MB of English quotations,
jokes and definitions in 40-odd plain-text files, each entry ending in a line holding ``%``.
Every file but ``ascii-art`` (pictures, not language) is read in sorted name order; entries are
assigned to the test split by a fixed integer hash of their index (one in ten), the rest to
train, so the split does not depend on file sizes or Python's hash seed. ``LOZOO_TEXT_CORPUS``
(or ``corpus_dir=``) points at another directory in the same format.

**Encoding.** One token per byte of the UTF-8 text: ASCII maps to itself (vocabulary 128) and
every byte >= 128 to 26, ASCII's "substitute" control character, so non-ASCII letters become one
visible unknown symbol rather than several meaningless ones.

**Examples.** The split's entries are joined back with their ``%`` separators into one stream,
which is cut into windows of ``context + 1`` tokens starting every ``context`` tokens; a batch is
``{"x": [B, context] int64, "y": [B, context]}`` with ``y`` the next token of every position, and
the loss is the mean next-character cross-entropy over all positions (nats per character).

**Model** (:class:`CharTransformerTask`): token and learned position embeddings, ``layers``
pre-LayerNorm blocks (causal multi-head self-attention, then a 4× GELU MLP, each added to the
residual stream), a final LayerNorm and an untied linear head. Parameters are a flat
``dict[str, Tensor]`` in PyTorch layout, so any optimizer sees plain tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.base import Batch, LaneCfg, Params, StaticCfg, Task, trunc_normal
from tasks.datasets import splitmix64
from tasks.streams import BatchStream

__all__ = [
    "CORPUS_ENV",
    "DEFAULT_CORPUS_DIR",
    "VOCAB_SIZE",
    "CharTransformerConfig",
    "CharTransformerTask",
    "TextCorpus",
    "load_corpus",
]

DEFAULT_CORPUS_DIR = Path("/usr/share/games/fortunes")
CORPUS_ENV = "LOZOO_TEXT_CORPUS"
VOCAB_SIZE = 128
UNKNOWN_TOKEN = 26  # ASCII SUB ("substitute"): the token of every non-ASCII byte
EXCLUDED_FILES = ("ascii-art",)
TEST_EVERY = 10  # one entry in ten is a test entry
SEPARATOR = b"\n%\n"


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """The encoded train and test token streams (uint8) and where they came from."""

    directory: Path
    files: tuple[str, ...]
    num_bytes: int  # size of the files read
    num_entries: int
    train: Tensor
    test: Tensor
    sha256: str  # of the raw bytes of every file read, in order

    def describe(self) -> str:
        return (
            f"Debian fortunes corpus at {self.directory}: {len(self.files)} files, "
            f"{self.num_bytes / 1e6:.2f} MB, {self.num_entries} entries -> "
            f"{len(self.train)} train / {len(self.test)} test characters"
        )

    def split(self, name: str) -> Tensor:
        if name not in ("train", "test"):
            raise ValueError(f"unknown split {name!r}; the text corpus has train and test")
        return self.train if name == "train" else self.test


def _missing(directory: Path, why: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"text corpus not found: {directory} {why}. The text_transformer problem trains on "
        f"the fortune files of Debian's 'fortunes' package: apt-get install fortunes (installs "
        f"{DEFAULT_CORPUS_DIR}), or set {CORPUS_ENV} to a directory of files in the same "
        "format (entries separated by lines holding '%')."
    )


def encode(data: bytes) -> Tensor:
    """Bytes → uint8 tokens: ASCII kept, every byte >= 128 replaced by :data:`UNKNOWN_TOKEN`."""
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    arr[arr >= VOCAB_SIZE] = UNKNOWN_TOKEN
    return torch.from_numpy(arr)


_LOCK = threading.Lock()
_CACHE: dict[tuple[str, tuple], TextCorpus] = {}


def load_corpus(corpus_dir: str | os.PathLike[str] | None = None) -> TextCorpus:
    """Read, split and encode the corpus (cached in process by path, sizes and mtimes)."""
    where = corpus_dir if corpus_dir is not None else os.environ.get(CORPUS_ENV) or None
    directory = Path(where) if where is not None else DEFAULT_CORPUS_DIR
    if not directory.is_dir():
        raise _missing(directory, "is not a directory")
    paths = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix != ".dat" and p.name[0] != "."
        and p.name not in EXCLUDED_FILES
    )  # fmt: skip
    if not paths:
        raise _missing(directory, "holds no corpus files")
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    key = (str(directory.resolve()), stamp)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        digest = hashlib.sha256()
        entries: list[bytes] = []
        total = 0
        for path in paths:
            data = path.read_bytes()
            digest.update(data)
            total += len(data)
            entries += [e.strip(b"\n") for e in data.split(b"\n%\n") if e.strip(b"\n%")]
        if len(entries) < TEST_EVERY:
            raise _missing(directory, f"holds only {len(entries)} entries")
        is_test = splitmix64(np.arange(len(entries))) % np.uint64(TEST_EVERY) == 0
        train = SEPARATOR.join(e for e, t in zip(entries, is_test) if not t)
        test = SEPARATOR.join(e for e, t in zip(entries, is_test) if t)
        corpus = TextCorpus(
            directory=directory,
            files=tuple(p.name for p in paths),
            num_bytes=total,
            num_entries=len(entries),
            train=encode(train),
            test=encode(test),
            sha256=digest.hexdigest(),
        )
        _CACHE[key] = corpus
        return corpus


@dataclasses.dataclass(frozen=True)
class CharTransformerConfig(StaticCfg):
    """Shape config of the character-level transformer."""

    kind = "char_transformer"
    layers: int = 2
    width: int = 64
    heads: int = 4
    context: int = 64
    batch_size: int = 32
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


class CharTransformerTask(Task):
    """Next-character prediction on the text corpus with a small decoder-only transformer."""

    num_classes = VOCAB_SIZE
    splits = ("train", "test")

    def __init__(
        self,
        static: CharTransformerConfig | None = None,
        corpus_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.static = static or CharTransformerConfig()
        self.corpus_dir = corpus_dir
        s = self.static
        hidden = s.mlp_ratio * s.width
        shapes: dict[str, tuple[int, ...]] = {
            "embed.weight": (VOCAB_SIZE, s.width),
            "pos.weight": (s.context, s.width),
        }
        for i in range(s.layers):
            b = f"block{i}."
            shapes.update(
                {
                    b + "ln1.weight": (s.width,),
                    b + "ln1.bias": (s.width,),
                    b + "attn.qkv.weight": (3 * s.width, s.width),
                    b + "attn.qkv.bias": (3 * s.width,),
                    b + "attn.out.weight": (s.width, s.width),
                    b + "attn.out.bias": (s.width,),
                    b + "ln2.weight": (s.width,),
                    b + "ln2.bias": (s.width,),
                    b + "mlp.fc.weight": (hidden, s.width),
                    b + "mlp.fc.bias": (hidden,),
                    b + "mlp.proj.weight": (s.width, hidden),
                    b + "mlp.proj.bias": (s.width,),
                }
            )
        shapes.update(
            {
                "ln_f.weight": (s.width,),
                "ln_f.bias": (s.width,),
                "head.weight": (VOCAB_SIZE, s.width),
                "head.bias": (VOCAB_SIZE,),
            }
        )
        self._shapes = shapes

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def hidden_matrices(self) -> list[str]:
        """The 2-D weights inside the blocks (not the embeddings, not the output head)."""
        return [n for n, s in self._shapes.items() if n.startswith("block") and len(s) == 2]

    def init(self, gen: torch.Generator, lane_cfg: Mapping[str, Tensor]) -> Params:
        """Linear weights truncated normal 1/√fan_in; embeddings 0.02; LayerNorm 1/0; biases 0."""
        params: Params = {}
        for name, shape in self._shapes.items():
            if name in ("embed.weight", "pos.weight"):
                params[name] = trunc_normal(shape, 0.02, gen)
            elif name.endswith(".weight") and len(shape) == 2:
                params[name] = trunc_normal(shape, 1.0 / math.sqrt(shape[1]), gen)
            elif ".ln" in name or name.startswith("ln"):
                params[name] = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
            else:
                params[name] = torch.zeros(shape)
        return params

    def logits(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        s = self.static
        batch, length = x.shape
        h = F.embedding(x, params["embed.weight"]) + params["pos.weight"][:length]
        for i in range(s.layers):
            b = f"block{i}."
            a = F.layer_norm(h, (s.width,), params[b + "ln1.weight"], params[b + "ln1.bias"])
            qkv = F.linear(a, params[b + "attn.qkv.weight"], params[b + "attn.qkv.bias"])
            q, k, v = (
                t.view(batch, length, s.heads, s.width // s.heads).transpose(1, 2)
                for t in qkv.split(s.width, dim=-1)
            )
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            att = att.transpose(1, 2).reshape(batch, length, s.width)
            h = h + F.linear(att, params[b + "attn.out.weight"], params[b + "attn.out.bias"])
            m = F.layer_norm(h, (s.width,), params[b + "ln2.weight"], params[b + "ln2.bias"])
            m = F.gelu(F.linear(m, params[b + "mlp.fc.weight"], params[b + "mlp.fc.bias"]))
            h = h + F.linear(m, params[b + "mlp.proj.weight"], params[b + "mlp.proj.bias"])
        h = F.layer_norm(h, (s.width,), params["ln_f.weight"], params["ln_f.bias"])
        return F.linear(h, params["head.weight"], params["head.bias"])

    def loss(self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg) -> Tensor:
        logits = self.logits(params, batch["x"])
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), batch["y"].reshape(-1))

    def normalizer(self, loss: Tensor) -> Tensor:
        from tasks.base import classification_normalizer

        return classification_normalizer(loss, VOCAB_SIZE)

    def metrics(
        self, params: Mapping[str, Tensor], batch: Batch, lane_cfg: LaneCfg
    ) -> dict[str, Tensor]:
        logits = self.logits(params, batch["x"]).reshape(-1, VOCAB_SIZE)
        y = batch["y"].reshape(-1)
        return {
            "loss": F.cross_entropy(logits, y),
            "accuracy": (logits.argmax(-1) == y).to(torch.float32).mean(),
        }

    def windows(self, split: str) -> dict[str, Tensor]:
        """Every ``context + 1`` window of the split, starting every ``context`` tokens."""
        self._check_split(split)
        tokens = load_corpus(self.corpus_dir).split(split).long()
        c = self.static.context
        count = (len(tokens) - 1) // c
        starts = torch.arange(count) * c
        win = tokens[starts.unsqueeze(1) + torch.arange(c + 1)]
        return {"x": win[:, :-1].contiguous(), "y": win[:, 1:].contiguous()}

    def batches(
        self,
        split: str,
        n_streams: int,
        gen_or_seed: torch.Generator | int,
        *,
        device: torch.device | str | None = None,
    ) -> BatchStream:
        arrays = self.windows(split)
        if device is not None:
            arrays = {k: v.to(device) for k, v in arrays.items()}
        return BatchStream(arrays, n_streams, self.static.batch_size, gen_or_seed, name=split)

    def data_fingerprint(self) -> str:
        corpus = load_corpus(self.corpus_dir)
        return f"fortunes:{corpus.sha256}"
