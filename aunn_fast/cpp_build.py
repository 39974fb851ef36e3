"""Build and load the optional C++ extension (``csrc/``) that provides the ``cpp`` backend's operators.

The extension is compiled just in time on first use with ``torch.utils.cpp_extension.load`` (ninja and a C++
compiler), for the CPU it runs on (``-O3 -march=native``; ``AUNN_FAST_CPP_MARCH`` names another target), into
a cache directory keyed by the Python, torch and source versions, the flags and the CPU's model and
instruction-set flags, so a home directory shared by machines with different CPUs never loads a binary built for
another one. Later processes load the cached build in well under a second. ``AUNN_FAST_CPP=0`` turns the
extension off; without a compiler, or when the build fails, the package runs as before and
:func:`unavailable_reason` says why (a failed build also warns once).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ENV_SWITCH = "AUNN_FAST_CPP"  # "0" turns the extension off; "1" or unset: build and use it where possible
ENV_CACHE = "AUNN_FAST_CPP_CACHE"  # where builds are kept (default: $XDG_CACHE_HOME/aunn_fast/cpp)
ENV_MARCH = "AUNN_FAST_CPP_MARCH"  # the -march= target (default native); e.g. haswell emulates an AVX2-only CPU
EXTENSION_NAME = "aunn_fast_cpp"
CPU_SOURCES = ("cpu/mlp.cpp", "cpu/ops.cpp")
CUDA_EXTENSION_NAME = "aunn_fast_cuda"
# Built only with nvcc and a CUDA build of torch. fused_step*: the `cuda` backend (aunn_fast/cuda_backend.py);
# wide_*: the H >= 256 products (aunn_fast/cuda_wide.py).
CUDA_SOURCES = (
    "cuda/bindings.cpp",
    "cuda/scale.cu",
    "cuda/fused_step.cu",
    "cuda/fused_step_bindings.cpp",
    "cuda/wide_bindings.cpp",
    "cuda/wide_forward.cu",
    "cuda/wide_backward.cu",
)
# Built for the machine it runs on (or $AUNN_FAST_CPP_MARCH); never -ffast-math (the results must match the
# reference's float32 math). -fno-math-errno only lets sqrt compile to the instruction; -fopenmp makes
# at::parallel_for use torch's OpenMP threads (libgomp is the one torch already loaded);
# -mprefer-vector-width=512: loops the compiler vectorises itself use AVX-512's full width where the target has
# it (gcc's default for Intel targets is 256 bits).
CXX_FLAGS = ("-O3", "-fno-math-errno", "-fopenmp", "-mprefer-vector-width=512")
LD_FLAGS = ("-fopenmp",)

_lock = threading.Lock()
_state: dict[str, str | None] = {}  # per extension name: None once loaded, else why not; absent until tried


def source_dir() -> Path | None:
    """csrc/: inside the installed package (a wheel), or next to it (a source checkout / editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    return None


def _cpu_description() -> str:
    """The CPU's model name and instruction-set flags (Linux: /proc/cpuinfo), else what platform reports."""
    model, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model.strip():
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return f"{platform.machine()}|{model}|{flags}"


def march() -> str:
    """The -march= target: $AUNN_FAST_CPP_MARCH (letters, digits, '-', '_', '.') or "native"."""
    value = os.environ.get(ENV_MARCH, "native")
    if not (value and all(c.isalnum() or c in "-_." for c in value)):
        raise ValueError(f"{ENV_MARCH} must name a -march= target such as native or haswell, got {value!r}")
    return value


def cxx_flags() -> tuple[str, ...]:
    """The compiler flags of a build: CXX_FLAGS and the -march= target."""
    return (*CXX_FLAGS, f"-march={march()}")


def build_key(src: Path) -> str:
    """A digest of everything the binary depends on: CPU, Python, torch, flags and every source file, and where
    the sources are (ninja's build file names them by absolute path: two checkouts sharing one folder would
    recompile it at every alternate load)."""
    digest = hashlib.sha256()
    for part in (_cpu_description(), sys.version, torch.__version__, " ".join(cxx_flags()), str(src.resolve())):
        digest.update(part.encode() + b"\0")
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.suffix in (".cpp", ".h", ".cu", ".cuh"):
            digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    """The directory that holds one build folder per build key."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aunn_fast" / "cpp"


def _precondition_failure() -> str | None:
    """Why a build cannot even start, or None."""
    setting = os.environ.get(ENV_SWITCH, "1")
    if setting == "0":
        return f"turned off by {ENV_SWITCH}=0"
    if setting != "1":
        return f"{ENV_SWITCH} must be 0 or 1, got {setting!r}"
    try:
        march()
    except ValueError as exc:
        return str(exc)
    if source_dir() is None:
        return "the C++ sources (csrc/) are not installed with this package"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (looked for {compiler!r}; set CXX or install g++)"
    return None


@contextlib.contextmanager
def _exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold an flock on ``build_dir`` while building: the kernel releases it when its holder dies, unlike the
    ``lock`` file torch's own build baton leaves behind a killed process (which makes every later build wait
    forever). Under the flock no live aunn_fast process is building there, so a ``lock`` file is such a
    leftover and is removed."""
    with open(build_dir / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(name: str, sources: tuple[str, ...]) -> None:
    """Compile (or reuse) and load an extension; its operators appear under torch.ops.aunn_fast."""
    from torch.utils import cpp_extension

    src = source_dir()
    assert src is not None
    key = build_key(src)
    build_dir = cache_root() / f"{name}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob(f"{name}*.so")):
        print(
            f"aunn_fast: building the {name} extension for this machine (once, a minute or two) in {build_dir}",
            file=sys.stderr,
            flush=True,
        )
    with _exclusive_build(build_dir):
        cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in sources],
            extra_cflags=[*cxx_flags(), f"-DAUNN_BUILD_KEY={key}"],
            extra_cuda_cflags=["-O3"],
            extra_ldflags=list(LD_FLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )


def _loaded(name: str, sources: tuple[str, ...], precondition: Callable[[], str | None]) -> str | None:
    """None once the extension ``name`` is loaded (built on the first call unless ``precondition`` says why
    not), else why not; decided once per process."""
    if name in _state:  # read without the lock once decided, which torch.compile traces
        return _state[name]
    with _lock:
        if name not in _state:
            reason = precondition()
            if reason is None:
                try:
                    _build(name, sources)
                except Exception as exc:  # a compiler error, a missing header, ...: the package still runs
                    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                    reason = f"building the C++ extension failed ({first.strip()[:300]}); set {ENV_SWITCH}=0 to skip it"
                    warnings.warn(
                        f"aunn_fast: the {name} extension is unavailable: {reason}", RuntimeWarning, stacklevel=3
                    )
            _state[name] = reason
        return _state[name]


def check_setting() -> None:
    """ValueError unless AUNN_FAST_CPP is unset, 0 or 1, and AUNN_FAST_CPP_MARCH a plain -march= target."""
    setting = os.environ.get(ENV_SWITCH, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{ENV_SWITCH} must be 0 or 1, got {setting!r}")
    march()


def unavailable_reason() -> str | None:
    """None once the CPU extension is loaded (building it on the first call if needed), else why it is not."""
    return _loaded(EXTENSION_NAME, CPU_SOURCES, _precondition_failure)


def cuda_unavailable_reason() -> str | None:
    """None once the CUDA extension (csrc/cuda) is loaded, else why not: it needs a CUDA build of torch and nvcc
    (CUDA_HOME or the PATH) besides what the CPU extension needs."""

    def precondition() -> str | None:
        from torch.utils import cpp_extension

        if torch.version.cuda is None:
            return "torch is not a CUDA build"
        if cpp_extension.CUDA_HOME is None:
            return "nvcc was not found (set CUDA_HOME)"
        home = cpp_extension.CUDA_HOME
        if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            # e.g. /usr/local/bin/nvcc as a wrapper script, from which torch guesses /usr/local
            return f"CUDA_HOME {home} has no include/cuda_runtime.h (set CUDA_HOME, e.g. /usr/local/cuda)"
        return _precondition_failure()

    return _loaded(CUDA_EXTENSION_NAME, CUDA_SOURCES, precondition)
