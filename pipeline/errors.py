"""One base for every error a user can cause or fix, and finding it inside Ray's wrappers.

Every user-facing error (bad input, settings, an unusable output, a store refusing, another
run holding the output) derives from :class:`PipelineError`; its message is written to be read
whole, naming the file, row, field or URL. The command line prints such an error as one message
and exits 2; anything else is a bug and keeps its traceback. Each subclass also derives from the
builtin it replaced (``ValueError``, ``RuntimeError``), so callers' ``except`` clauses still hold.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class PipelineError(Exception):
    """An error the user can fix: the message says what, where, and what is allowed."""


class SettingError(PipelineError, ValueError):
    """A setting that cannot work here (names the field, the value and what is allowed)."""


class ActorStartError(PipelineError, RuntimeError):
    """An actor of the run could not start for a reason the user can fix (its worker disagrees
    with the driver about the model, it keeps dying while loading): the run stops with this."""


_RAISED = re.compile(r"^(pipeline(?:\.\w+)+)\.(\w+): (.+)$", re.MULTILINE)


def actor_start_error(err: BaseException) -> ActorStartError | None:
    """The :class:`PipelineError` an actor's constructor raised, out of Ray's wrapper. Ray passes an
    error raised while an actor starts on as text only (``ActorDiedError``, "an error raised in its
    creation task"), with the traceback: its last ``pipeline....Error: message`` line is found
    there, and kept if that class is one of ours."""
    for e in causes(err):
        if getattr(e, "actor_init_failed", False) and (found := raised_in_text(str(e))) is not None:
            return ActorStartError(str(found))
    return None


def raised_in_text(text: str) -> PipelineError | None:
    """Our error, rebuilt from the text of a traceback that an engine passes on as text only (Ray's
    actor start, Spark's ``PythonException``): its last ``pipeline....Error: message`` line (with
    the indented lines that continue the message), where that class is one of ours and no other
    exception followed it (one raised while handling it, or because of it, is the real failure)."""
    found = list(_RAISED.finditer(text))
    if not found:
        return None
    match = found[-1]  # the last exception line of ours; an earlier one was handled or wrapped
    module, name, message = match.groups()
    after = text[match.end() :]
    if _LATER.search(after):
        return None  # another exception ended the task: not ours to name
    try:
        kind = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    if not (isinstance(kind, type) and issubclass(kind, PipelineError)):
        return None
    message = (message + _CONTINUED.match(after).group(0)).rstrip()
    try:
        return kind(message)
    except TypeError:  # a class whose constructor takes more than the message
        return PipelineError(message)


_LATER = re.compile(r"^(During handling of the above exception|The above exception was the direct cause)", re.M)
_CONTINUED = re.compile(r"(?:\n[ \t]+(?!File \")[^\n]*)*")  # indented lines under the message, not frames


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
