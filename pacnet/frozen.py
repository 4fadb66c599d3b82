"""A read-only dict for the compiler's plain data (IR, layer specs, the facts on a Net).

``types.MappingProxyType`` is read-only too, but it can be neither pickled nor deep-copied,
so a compiled net holding one could not be copied (EMA/SWA averaging) or saved whole.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, NoReturn


class FrozenDict(dict):
    """A ``dict`` that refuses every change; pickles and deep-copies as a new FrozenDict."""

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self):
        return (type(self), (dict(self),))

    def __copy__(self) -> "FrozenDict":
        return self

    def __deepcopy__(self, memo: Dict[int, Any]) -> "FrozenDict":
        return type(self)(copy.deepcopy(dict(self), memo))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"
