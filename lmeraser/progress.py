"""Progress bars for long loops when a person is watching (a terminal), nothing otherwise.

Logs stay the record (every loop also logs its milestones); the bar is only for the eye, so it
goes to stderr and only when stderr is a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        yield from progress.track(items, total=total, description=description)
