"""Values derived from weights (folded convolutions, weights-only activations), kept between
inference calls and rebuilt as soon as a source tensor changes.

A tensor changes either in place (an optimizer step, `load_state_dict`: its `_version` grows) or by
being replaced (`.to(device)`, a new Parameter: its storage moves), so the key is both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class WeightCache:
    def __init__(self):
        self._key: tuple | None = None
        self._value: Any = None
        self.generation = 0  # counts recomputations: a key for values derived from this one

    def get(self, sources: Iterable[torch.Tensor], compute: Callable[[], Any], extra: Any = None) -> Any:
        """`compute()`, or its value from the last call if no source changed (nor `extra`, e.g. a shape).
        Under `torch.compile` always `compute()`: the compiled graph derives the values itself."""
        if torch.compiler.is_compiling():
            return compute()
        key = (extra, *((t.data_ptr(), t._version) for t in sources))
        if key != self._key:
            self._value, self._key = compute(), key
            self.generation += 1
        return self._value
