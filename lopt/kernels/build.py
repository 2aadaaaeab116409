"""Cached just-in-time builds of the C++/CUDA kernels in ``csrc/``.

Each library is compiled with ``torch.utils.cpp_extension.load`` into
``<cache>/<name>-<key>/`` where ``<cache>`` is ``$LOZOO_CACHE_DIR`` or
``platformdirs.user_cache_dir("lozoo")/kernels`` and ``<key>`` hashes the sources, the flags, and
the torch/Python/platform versions, so any change yields a fresh build and stale binaries are
never loaded. A ``filelock`` serialises concurrent builders; a process that finds the library
already built loads it directly, without ninja or a compiler.

Flags are portable on purpose, so a cached or shipped binary runs on any x86-64 CPU and gives
the same numbers everywhere: no ``-march=native`` and no ``-ffast-math``. The CPU kernel picks
AVX-512 / AVX2 / baseline code at run time instead.
``-fno-math-errno`` only lets ``sqrtf`` vectorise and ``-fno-tree-loop-distribute-patterns``
keeps short copy loops vectorised instead of turning them into ``memcpy`` calls (``rep movs``
costs more than the copy at these lengths); neither changes a result.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

CPU_LIB = "lozoo_cpu"
CUDA_LIB = "lozoo_cuda"
HEADERS = (
    "small_fc_math.h",
    "small_fc_geometry.h",
    "small_fc_checks.h",
    "velo_math.h",
    "celo2_math.h",
)
CPU_SOURCES = ("small_fc_cpu.cpp", "small_fc_cpu_simd.h", "velo_cpu.cpp", "celo2_cpu.cpp")
CUDA_SOURCES = (
    "small_fc_cuda.cpp",
    "small_fc_cuda.cu",
    "small_fc_cuda.h",
    "velo_cuda.cu",
    "celo2_cuda.cu",
)
CPU_CFLAGS = (
    "-O3",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-tree-loop-distribute-patterns",
    "-Wno-psabi",
)
CPU_LDFLAGS = ("-fopenmp",)
NVCC_FLAGS = ("-O3", "-lineinfo")


@dataclass(frozen=True)
class BuildResult:
    """Outcome of :func:`load`: ``path`` of the loaded library, or ``error`` saying why not."""

    ok: bool
    path: Path | None = None
    error: str = ""


_loaded: dict[str, BuildResult] = {}


def source_dir() -> Path:
    """Where the kernel sources live.

    ``$LOZOO_CSRC`` wins; then ``csrc/`` next to the ``lopt`` package (a source checkout or an
    editable install); then ``<prefix>/share/lozoo/csrc``, where a wheel installs them as
    ``data-files`` (pyproject ``[tool.setuptools.data-files]``).
    """
    here = Path(__file__).resolve().parent
    candidates = [here.parent.parent / "csrc"]
    for prefix in (sysconfig.get_path("data"), site.getuserbase()):
        candidates.append(Path(prefix) / "share" / "lozoo" / "csrc")
    if os.environ.get("LOZOO_CSRC"):
        candidates.insert(0, Path(os.environ["LOZOO_CSRC"]))
    for path in candidates:
        if (path / "small_fc_cpu.cpp").is_file() and (path / "small_fc_math.h").is_file():
            return path
    raise FileNotFoundError(
        "lozoo kernel sources (small_fc_cpu.cpp) not found in " + ", ".join(map(str, candidates))
    )


def cache_root() -> Path:
    if os.environ.get("LOZOO_CACHE_DIR"):
        return Path(os.environ["LOZOO_CACHE_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("lozoo")) / "kernels"


def _files(name: str) -> list[str]:
    return list(HEADERS) + list(CPU_SOURCES if name == CPU_LIB else CUDA_SOURCES)


def build_key(name: str) -> str:
    """Hash of everything that determines the binary: sources, flags, toolchain and ABI."""
    digest = hashlib.sha256()
    src = source_dir()
    for file in sorted(_files(name)):
        digest.update(file.encode())
        digest.update((src / file).read_bytes())
    flags = CPU_CFLAGS + CPU_LDFLAGS + (NVCC_FLAGS if name == CUDA_LIB else ())
    for part in (
        *flags,
        torch.__version__,
        str(torch.version.git_version),
        str(torch.version.cuda),
        sys.version,
        platform.machine(),
        os.environ.get("CXX", "c++"),
        os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
    ):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def build_dir(name: str) -> Path:
    return cache_root() / f"{name}-{build_key(name)}"


def _compile(name: str, directory: Path, verbose: bool) -> None:
    from torch.utils import cpp_extension

    src = source_dir()
    if name == CPU_LIB:
        sources = [str(src / f) for f in CPU_SOURCES if f.endswith(".cpp")]
        cuda_flags: list[str] | None = None
    else:
        sources = [str(src / f) for f in CUDA_SOURCES if not f.endswith(".h")]
        cuda_flags = list(NVCC_FLAGS)
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=list(CPU_CFLAGS),
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=list(CPU_LDFLAGS),
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )


def load(name: str = CPU_LIB, *, build: bool = True, verbose: bool = False) -> BuildResult:
    """Load library ``name`` into this process, compiling it first if ``build`` and needed.

    Never raises for a missing toolchain or a failed compile: the result carries the reason, and
    the caller decides whether that is an error (``backend="cpp"``) or a fallback (``"auto"``).
    A failed attempt is remembered for the process, so it is not retried on every step.
    """
    if name in _loaded and (_loaded[name].ok or not build or _loaded[name].error != "not built"):
        return _loaded[name]
    if name == CUDA_LIB and not load(CPU_LIB, build=build, verbose=verbose).ok:
        return BuildResult(False, error="the CPU library, which defines the op, is unavailable")
    try:
        result = _load_or_build(name, build, verbose)
    except Exception as exc:  # any toolchain/compile/load failure becomes a reason, not a crash
        result = BuildResult(False, error=f"{type(exc).__name__}: {_short(str(exc))}")
    _loaded[name] = result
    return result


def _load_or_build(name: str, build: bool, verbose: bool) -> BuildResult:
    from filelock import FileLock

    directory = build_dir(name)
    library = directory / f"{name}.so"
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if not library.is_file():
            if not build:
                return BuildResult(False, error="not built")
            if shutil.which("ninja") is None and not _ninja_importable():
                return BuildResult(
                    False, error="ninja is not installed (pip install ninja) so it cannot build"
                )
            # We hold the only lock, so a baton left by a killed build is stale.
            (directory / "lock").unlink(missing_ok=True)
            _compile(name, directory, verbose)
        torch.ops.load_library(str(library))
    return BuildResult(True, path=library)


def _ninja_importable() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


def _short(text: str, limit: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit // 2] + "\n...\n" + text[-limit // 2 :]


def nvcc_path() -> str | None:
    """The nvcc that would compile the CUDA sources ($CUDA_HOME, PATH, /usr/local/cuda)."""
    for candidate in (
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def compile_cuda_objects(out_dir: Path, nvcc: str | None = None) -> list[Path]:
    """``nvcc -c`` every ``.cu`` source and the CUDA binding against torch's headers.

    This is the CI check that the CUDA kernel compiles even on CPU-only machines (no link, no GPU
    needed): against a CPU wheel, ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE`` stands in for the
    missing generated config. Flags follow ``torch.utils.cpp_extension`` (C++20, its nvcc
    defines). Raises ``RuntimeError`` with nvcc's output on failure.
    """
    from torch.utils import cpp_extension

    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    src = source_dir()
    includes = [f"-I{p}" for p in (*cpp_extension.include_paths(), str(src))]
    objects = []
    bindings = [src / f for f in CUDA_SOURCES if f.endswith(".cpp")]
    for cu in sorted(src.glob("*.cu")) + bindings:
        obj = out_dir / (cu.name + ".o")
        cmd = [
            nvcc,
            "-c",
            str(cu),
            "-o",
            str(obj),
            "-std=c++20",
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-Xcompiler",
            "-fPIC",
            *cpp_extension.COMMON_NVCC_FLAGS,
            *NVCC_FLAGS,
            *includes,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {cu.name}:\n{proc.stdout}\n{proc.stderr}")
        objects.append(obj)
    return objects
