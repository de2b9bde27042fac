"""Compile and load fxquant's fused CPU fake-quant kernel (``native/fake_quant.c``) and its eager op on first use.

Two builds, each into a per-user cache (``$FXQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxquant``, else
``~/.cache/fxquant``):

* :func:`native_library`: the C file alone, compiled with the machine's C compiler (``$CC``, else ``cc``) in about
  a second and loaded with ``ctypes``. It has no dependency but the C library. The compiled backward op of
  ``kernel.py`` calls it, and so does eager mode when the op below is unavailable.
* :func:`native_eager_op`: ``native/fake_quant_op.cpp``, which registers ``fxquant::fake_quantize_eager`` (the same
  C passes behind torch's dispatcher, with a C++ autograd node) and is linked with the C file compiled as an object.
  It is compiled against the installed torch's headers with the C++ compiler (``$CXX``, else ``c++``; C++20, which
  torch's headers need) in about 15 seconds, once per machine and torch version, and loaded with
  ``torch.ops.load_library``. Eager quantizers call it: it saves the Python autograd node and the ctypes call of
  each quantizer call.

A cached file's name is a hash of its sources, the compilers' identities, the flags and the CPU's feature flags,
since the C file is built with ``-march=native`` (a home directory shared between different machines never loads
a build made for another CPU), and for the op also torch's version and build: a new torch gets a new build.

Nothing happens at import time. Without a compiler, or when a build fails, the function warns once and returns None,
and fxquant falls back: from the op to the ctypes kernel (same numerics, more cost per call), from the C library to
the torch-ops kernel (same numerics, slower on CPU). ``FXQUANT_NATIVE_KERNEL=0`` turns both off and
``FXQUANT_NATIVE_OP=0`` the op alone, without a warning.

Example usage::

    lib = native_library()
    print("native kernel" if lib is not None else "torch-ops kernel")
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import torch

INTERFACE_VERSION = 3  # fxq_version() of a build this module can call
_SOURCE = ("native", "fake_quant.c")
_OP_SOURCE = ("native", "fake_quant_op.cpp")
# -ffp-contract=off: x·(1/s) and the rounding must stay separate float32 operations, as in torch's kernels.
_FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-fPIC")
# Tried in order: not every compiler knows -march=native, or has OpenMP (macOS's clang); the last always builds.
_VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())
# The op's C++ file only marshals tensors: -O2 builds it quicker than -O3 and the passes are in the C object.
_OP_FLAGS = ("-O2", "-std=c++20", "-fPIC", "-shared")
_OP_LIBRARIES = ("-lc10", "-ltorch_cpu")


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
    return _switched_on("FXQUANT_NATIVE_KERNEL")


def _switched_on(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() not in ("0", "false", "no", "off")


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


def native_eager_op() -> Callable[..., torch.Tensor] | None:
    """``torch.ops.fxquant.fake_quantize_eager.default``, built and loaded on the first call; None when
    ``FXQUANT_NATIVE_KERNEL=0`` or ``FXQUANT_NATIVE_OP=0``, when the C library is unavailable, or (with one warning)
    when the op cannot be built. Its arguments are the tensors and :class:`~fxquant.quant.native_kernel.RowGrid`'s
    numbers (see ``native/fake_quant_op.cpp``).

    Example usage::

        op = native_eager_op()
        y = op(x, step, None, *native_kernel.native_grid(None, 0, 15, 0.01))  # a RowGrid is those numbers in order
    """
    if not (native_kernel_requested() and _switched_on("FXQUANT_NATIVE_OP")):
        return None
    return _loaded_op()


@functools.cache  # one load per process: a second library registering the same op would be refused
def _loaded_op() -> Callable[..., torch.Tensor] | None:
    if _loaded_library() is None:
        return None  # no C compiler or a failed C build: already reported once
    try:
        path = _built_op_library()
        torch.ops.load_library(str(path))
        op = torch.ops.fxquant.fake_quantize_eager.default
    except (NativeKernelUnavailable, OSError, RuntimeError, AttributeError) as reason:
        warnings.warn(
            f"fxquant: the native eager fake-quant op is unavailable ({reason}); using the C kernel through ctypes "
            "(same numerics, more time per call). Set FXQUANT_NATIVE_OP=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    # Eager mode only calls it, but a tracer with fake tensors (make_fx, opcheck) needs its output's metadata.
    torch.library.register_fake("fxquant::fake_quantize_eager")(_fake_quantize_eager_meta)
    return op


def _fake_quantize_eager_meta(x: torch.Tensor, *_: object) -> torch.Tensor:
    return torch.empty_like(x)  # the op's output has x's shape and strides


def _source_bytes() -> bytes:
    return resources.files("fxquant.quant").joinpath(*_SOURCE).read_bytes()


def _op_source_bytes() -> bytes:
    return resources.files("fxquant.quant").joinpath(*_OP_SOURCE).read_bytes()


def _compiler() -> str:
    return _found(os.environ.get("CC") or "cc", "C")


def _cxx_compiler() -> str:
    return _found(os.environ.get("CXX") or "c++", "C++")


def _found(compiler: str, language: str) -> str:
    if shutil.which(compiler) is None:
        raise NativeKernelUnavailable(f"no {language} compiler: {compiler!r} is not on PATH")
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
    target = _cache_target("fake_quant", source, identity)
    if target.exists():
        return target
    with _scratch_folder(target) as scratch:
        c_file = scratch / "fake_quant.c"
        c_file.write_bytes(source)
        built = scratch / target.name
        _compile_c(compiler, c_file, built, "-shared")
        os.replace(built, target)  # atomic: a concurrent process sees the old state or the whole file
    return target


def _built_op_library() -> Path:
    """The eager op's shared library: the C file compiled as an object, linked with the C++ file against torch."""
    c_source, op_source = _source_bytes(), _op_source_bytes()
    compiler, cxx = _compiler(), _cxx_compiler()
    torch_folder = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    identity = "\n".join(
        [
            _compiler_identity(compiler),
            _compiler_identity(cxx),
            repr((_FLAGS, _VARIANTS, _OP_FLAGS, _OP_LIBRARIES, abi)),
            _cpu_features(),
            f"torch {torch.__version__} {torch.version.git_version} {torch_folder}",
        ]
    )
    target = _cache_target("fake_quant_op", c_source + op_source, identity)
    if target.exists():
        return target
    with _scratch_folder(target) as scratch:
        c_file, op_file, c_object = scratch / "fake_quant.c", scratch / "fake_quant_op.cpp", scratch / "fake_quant.o"
        c_file.write_bytes(c_source)
        op_file.write_bytes(op_source)
        variant = _compile_c(compiler, c_file, c_object, "-c")
        built = scratch / target.name
        libraries = torch_folder / "lib"
        command = [
            cxx, *_OP_FLAGS, abi, "-I", str(torch_folder / "include"), str(op_file), str(c_object),
            "-L", str(libraries), *_OP_LIBRARIES, f"-Wl,-rpath,{libraries}",
            *(("-fopenmp",) if "-fopenmp" in variant else ()),  # the C object's OpenMP calls need libgomp linked
            "-o", str(built),
        ]  # fmt: skip
        _run_compiler(command, "/".join(_OP_SOURCE))
        os.replace(built, target)
    return target


def _cache_target(stem: str, source: bytes, identity: str) -> Path:
    key = hashlib.sha256(source + identity.encode()).hexdigest()[:16]
    return cache_dir() / f"{stem}-{key}.so"


@contextlib.contextmanager
def _scratch_folder(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` (the same file system, so the finished file moves in atomically)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NativeKernelUnavailable(f"cannot create the cache folder {target.parent}: {error}") from error
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        yield Path(scratch)


def _compile_c(compiler: str, c_file: Path, output: Path, mode: str) -> tuple[str, ...]:
    """Compile the C file (``mode``: ``-shared`` or ``-c``) with the first flag variant the compiler accepts;
    returns that variant."""
    error = ""
    for extra in _VARIANTS:
        try:
            _run_compiler([compiler, *_FLAGS, mode, *extra, str(c_file), "-o", str(output)], "/".join(_SOURCE))
            return extra
        except NativeKernelUnavailable as failure:
            error = str(failure)
    raise NativeKernelUnavailable(error)


def _run_compiler(command: list[str], source: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeKernelUnavailable(f"{command[0]} failed to run: {error}") from error
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        # the first error, not the "In file included from" lines before it
        first = next((line for line in lines if "error" in line), lines[0] if lines else "no message")
        raise NativeKernelUnavailable(f"{command[0]} could not compile {source}: {first.strip()}")


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
