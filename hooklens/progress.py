"""Whether a progress bar shows: the caller's switch, and `TQDM_DISABLE` in the environment.

tqdm reads `TQDM_DISABLE` only as the default of its `disable` argument, and hooklens always passes `disable`
(from `progress=` / `quiet=` / `verbose=`), so the variable alone would be ignored; every bar asks here instead.
"""
from __future__ import annotations

import os

_OFF = ("", "0", "false", "no", "off")


def bar_disabled(show: bool) -> bool:
    """`disable=` for a tqdm bar the caller asked to `show`: off when not shown or when `TQDM_DISABLE` is set to a
    true value (`1`, `true`, ...), read at call time."""
    return not show or os.environ.get("TQDM_DISABLE", "").strip().lower() not in _OFF
