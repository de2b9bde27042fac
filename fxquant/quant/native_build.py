"""Compile and load fxquant's fused CPU fake-quant kernel (``native/fake_quant.c``) on first use.

The C file has no dependency but the C library: it is compiled with the machine's C compiler (``$CC``, else
``cc``) into a per-user cache (``$FXQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxquant``, else
``~/.cache/fxquant``) in about a second, and loaded with ``ctypes``. The cached file's name is a hash of the
source, the compiler's identity, the flags and the CPU's feature flags, since it is built with ``-march=native``:
a home directory shared between different machines never loads a build made for another CPU.

Nothing happens at import time. Without a compiler, or when the build fails, :func:`native_library` warns once
and returns None and fxquant uses the torch-ops kernel (same numerics, slower on CPU). ``FXQUANT_NATIVE_KERNEL=0``
turns the native kernel off without a warning.

Example usage::

    lib = native_library()
    print("native kernel" if lib is not None else "torch-ops kernel")
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path

INTERFACE_VERSION = 3  # fxq_version() of a build this module can call
_SOURCE = ("native", "fake_quant.c")
# -ffp-contract=off: x·(1/s) and the rounding must stay separate float32 operations, as in torch's kernels.
_FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
# Tried in order: not every compiler knows -march=native, or has OpenMP (macOS's clang); the last always builds.
_VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())


class NativeKernelUnavailable(RuntimeError):
    """Why the native kernel could not be built or loaded (reported once, as a warning)."""


def cache_dir() -> Path:
    """Where compiled kernels are kept.

    Example usage::

        print(cache_dir())   # e.g. /root/.cache/fxquant
    """
    explicit = os.environ.get("FXQUANT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fxquant"


def native_kernel_requested() -> bool:
    """False when ``FXQUANT_NATIVE_KERNEL`` is ``0``/``false``/``no``/``off`` (read on every call: cheap).

    Example usage::

        native_kernel_requested()   # True unless the environment turned it off
    """
    return os.environ.get("FXQUANT_NATIVE_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on the first call; None when ``FXQUANT_NATIVE_KERNEL=0`` or (with one
    warning) when it cannot be built.

    Example usage::

        lib = native_library()
    """
    return _loaded_library() if native_kernel_requested() else None


@functools.cache
def _loaded_library() -> ctypes.CDLL | None:
    try:
        return _load(_built_library())
    except NativeKernelUnavailable as reason:
        warnings.warn(
            f"fxquant: the native CPU fake-quant kernel is unavailable ({reason}); using the torch-ops kernel "
            "(same numerics, slower on CPU). Set FXQUANT_NATIVE_KERNEL=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _source_bytes() -> bytes:
    return resources.files("fxquant.quant").joinpath(*_SOURCE).read_bytes()


def _compiler() -> str:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise NativeKernelUnavailable(f"no C compiler: {compiler!r} is not on PATH")
    return compiler


def _compiler_identity(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeKernelUnavailable(f"{compiler} --version failed: {error}") from error
    return done.stdout.splitlines()[0] if done.stdout else compiler


def _cpu_features() -> str:
    """The CPU's feature flags (Linux), else the machine name: what -march=native depends on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _built_library() -> Path:
    source = _source_bytes()
    compiler = _compiler()
    identity = "\n".join([_compiler_identity(compiler), repr((_FLAGS, _VARIANTS)), _cpu_features()])
    key = hashlib.sha256(source + identity.encode()).hexdigest()[:16]
    target = cache_dir() / f"fake_quant-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NativeKernelUnavailable(f"cannot create the cache folder {target.parent}: {error}") from error
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        c_file = Path(scratch) / "fake_quant.c"
        c_file.write_bytes(source)
        built = Path(scratch) / target.name
        errors = ""
        for extra in _VARIANTS:
            command = [compiler, *_FLAGS, *extra, str(c_file), "-o", str(built)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as error:
                raise NativeKernelUnavailable(f"{compiler} failed to run: {error}") from error
            if done.returncode == 0:
                os.replace(built, target)  # atomic: a concurrent process sees the old state or the whole file
                return target
            errors = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise NativeKernelUnavailable(f"{compiler} could not compile {'/'.join(_SOURCE)}: {errors}")


def _load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise NativeKernelUnavailable(f"cannot load {path}: {error}") from error
    lib.fxq_version.restype = ctypes.c_int
    lib.fxq_version.argtypes = []
    if lib.fxq_version() != INTERFACE_VERSION:
        raise NativeKernelUnavailable(f"{path} has interface {lib.fxq_version()}, expected {INTERFACE_VERSION}")
    pointer, count, number = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.fxq_forward.restype = None
    lib.fxq_forward.argtypes = [
        pointer, pointer, count, count, pointer, number, number, number, number, number, ctypes.c_int,
    ]  # fmt: skip
    lib.fxq_backward.restype = ctypes.c_int
    lib.fxq_backward.argtypes = [
        pointer, pointer, pointer, count, count, pointer, number,
        number, number, number, number, number, number, number, pointer, pointer, ctypes.c_int,
    ]  # fmt: skip
    return lib
