"""Run passes in order: each pass says whether it modified the graph (torch.fx's ``PassResult``), the order rules
between passes are data checked before anything runs, every pass is timed and linted after, and the pass that
failed (and those before it) are named when one raises.

Example usage::

    gm = run_passes(gm, [annotate, insert_quantizers, assign_bits, verify], ctx)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxquant.errors import FxQuantError, PassError

from .context import PassContext, PassRecord

Pass = Callable[[fx.GraphModule, PassContext], PassResult]


@dataclass(frozen=True)
class OrderRule:
    """``first`` must run before ``then`` whenever both are in a sequence of passes; ``why`` says what breaks."""

    first: Pass
    then: Pass
    why: str


def _name(fn: Pass) -> str:
    return getattr(fn, "__name__", repr(fn))


def check_order(passes: Sequence[Pass], rules: Sequence[OrderRule]) -> None:
    """Raise FxQuantError naming the first rule ``passes`` break (both passes present, in the wrong order).

    Example usage::

        check_order([insert_quantizers, annotate], [OrderRule(annotate, insert_quantizers, "specs first")])
    """
    position = {fn: i for i, fn in enumerate(passes)}
    for rule in rules:
        if rule.first in position and rule.then in position and position[rule.first] > position[rule.then]:
            raise FxQuantError(f"pass {_name(rule.first)} must run before {_name(rule.then)}: {rule.why}")


def run_passes(
    gm: fx.GraphModule, passes: Sequence[Pass], ctx: PassContext, rules: Sequence[OrderRule] = ()
) -> fx.GraphModule:
    """Apply ``passes`` to ``gm`` in order, after checking them against ``rules``; returns the final graph module.

    Example usage::

        gm = run_passes(gm, PREPARE_PASSES, ctx, ORDER_RULES)
    """
    check_order(passes, rules)
    done: list[str] = []
    for fn in passes:
        name = _name(fn)
        notes_before = len(ctx.notes)
        start = time.perf_counter()
        try:
            result = fn(gm, ctx)
            gm = result.graph_module
            gm.graph.lint()
        except FxQuantError:
            raise
        except Exception as err:
            raise PassError(name, done, err) from err
        ctx.records.append(
            PassRecord(name, ctx.piece, result.modified, time.perf_counter() - start, ctx.notes[notes_before:])
        )
        done.append(name)
    return gm
