"""Run graph passes in order; lint and recompile after each; name the failing pass and the ones before it."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

from torch.fx import GraphModule

from .errors import PassError, PeftcError

log = logging.getLogger(__name__)

Pass = tuple[str, Callable[[GraphModule], int]]


def run_passes(gm: GraphModule, passes: Sequence[Pass], before: Sequence[str] = ()) -> dict[str, int]:
    """Apply each (name, fn) to `gm`; fn returns its rewrite count. Returns {name: count}. `before` names passes
    that already ran on this graph (for error messages)."""
    done: dict[str, int] = {}
    for name, fn in passes:
        try:
            count = fn(gm)
            gm.graph.lint()
            gm.recompile()
        except PeftcError:
            raise
        except Exception as e:
            ran = ", ".join([*before, *done]) or "none"
            raise PassError(f"pass '{name}' failed (passes that ran before it: {ran}): {type(e).__name__}: {e}") from e
        done[name] = count
        log.debug("pass %s: %d rewrites", name, done[name])
    return done
