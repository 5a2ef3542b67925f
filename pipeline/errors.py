"""Finding the user-meaningful error inside the wrappers Ray puts around task and UDF errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err``, then what it wraps: Ray's ``.cause`` (task errors) and ``__cause__`` (UDF errors)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        nxt = getattr(current, "cause", None)
        current = nxt if isinstance(nxt, BaseException) else current.__cause__


def find_cause(err: BaseException, kind: type[E]) -> E | None:
    """The first error of ``kind`` in ``err``'s chain that is not itself a Ray wrapper."""
    return next((e for e in causes(err) if isinstance(e, kind) and not _is_ray_wrapper(e)), None)


def _is_ray_wrapper(err: BaseException) -> bool:
    return type(err).__module__.startswith("ray.")
