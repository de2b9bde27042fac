"""Run passes in order: time each, tell whether it modified the graph, lint after each, and name the pass
that failed (and those before it) when one raises."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from torch import fx

from fxquant.errors import FxQuantError, PassError

from .context import PassContext, PassRecord

Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]


def _fingerprint(gm: fx.GraphModule) -> tuple[str, tuple[tuple[str, str], ...]]:
    """What a pass can change: the graph and the types of the submodules."""
    modules = tuple((name, type(m).__name__) for name, m in gm.named_modules())
    return str(gm.graph), modules


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], ctx: PassContext) -> fx.GraphModule:
    """Apply ``passes`` to ``gm`` in order.

    Example usage::

        gm = run_passes(gm, [annotate, insert_quantizers, assign_bits, verify], ctx)
    """
    done: list[str] = []
    for fn in passes:
        name = getattr(fn, "__name__", repr(fn))
        before = _fingerprint(gm)
        notes_before = len(ctx.notes)
        start = time.perf_counter()
        try:
            gm = fn(gm, ctx)
            gm.graph.lint()
        except FxQuantError:
            raise
        except Exception as err:
            raise PassError(name, done, err) from err
        ctx.records.append(
            PassRecord(
                name, ctx.piece, _fingerprint(gm) != before, time.perf_counter() - start, ctx.notes[notes_before:]
            )
        )
        done.append(name)
    return gm
