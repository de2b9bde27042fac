"""Compile fxquant's CPU fake-quant kernels and autograd node (``native/fake_quant.c`` and ``native/fake_quant_op.cpp``)
into one shared library, on first use.

The C passes are compiled as an object with the machine's C compiler (``$CC``, else ``cc``) and linked with the C++
file, which is compiled against the installed torch's headers with its C++ compiler (``$CXX``, else ``c++``; C++20,
which torch's headers need), in about 15 seconds, once per machine and torch version. :mod:`fxquant.quant.ops`
loads the result with ``torch.ops.load_library``. The library goes into a per-user cache (``$FXQUANT_CACHE_DIR``,
else ``$XDG_CACHE_HOME/fxquant``, else ``~/.cache/fxquant``) under a name that hashes the sources, the compilers'
identities, the flags, the CPU's feature flags (the C file is built with ``-march=native``, so a home directory
shared between different machines never loads a build made for another CPU) and torch's version and build.

Nothing happens at import time. Without a compiler, or when a build fails, :func:`built_op_library` raises
:class:`NativeKernelUnavailable` with a one-line reason, and the ops fall back to the torch-ops reference on CPU
and to an autograd node in Python (same numerics, slower). ``FXQUANT_NATIVE_KERNEL=0`` asks for that fallback.

Example usage::

    path = built_op_library()   # ~/.cache/fxquant/fake_quant_op-<hash>.so
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch

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
    """Why the native library could not be built (reported once, as a warning, by :mod:`fxquant.quant.ops`)."""


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
    """False when ``FXQUANT_NATIVE_KERNEL`` is ``0``/``false``/``no``/``off``. :mod:`fxquant.quant.ops` reads it
    once per process, when it registers the ops.

    Example usage::

        native_kernel_requested()   # True unless the environment turned it off
    """
    return os.environ.get("FXQUANT_NATIVE_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


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


def built_op_library() -> Path:
    """The ops' shared library (built on the first call, then taken from the cache): the C file compiled as an
    object, linked with the C++ file against torch.

    Example usage::

        torch.ops.load_library(str(built_op_library()))
    """
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
    """Compile the C file (``mode``: ``-c`` for an object) with the first flag variant the compiler accepts;
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
