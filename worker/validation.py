"""Turning pydantic's validation errors into `InvalidInput` that names each field."""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

from pydantic import ConfigDict, ValidationError, validate_call

from longhaul.models import InvalidInput


def invalid_input(exc: ValidationError, *, prefix: Optional[str] = None,
                  positional: Sequence[str] = ()) -> InvalidInput:
    """One `InvalidInput` listing every problem as ``field: message (got value)``.

    `positional` names a function's parameters, so an error about its
    second positional argument says which parameter that is.
    """
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        if loc and isinstance(loc[0], int) and loc[0] < len(positional):
            loc[0] = positional[loc[0]]
        where = ".".join(str(part) for part in loc) or "input"
        if err["type"] == "unexpected_keyword_argument":
            problems.append(f"{where}: unknown keyword")
            continue
        got = f" (got {err['input']!r:.80})" if "input" in err and err["type"] != "missing" else ""
        problems.append(f"{where}: {err['msg']}{got}")
    text = "; ".join(problems)
    return InvalidInput(f"{prefix}: {text}" if prefix else text)


F = TypeVar("F", bound=Callable[..., Any])


def strict(fn: F) -> F:
    """Check a public function's arguments against its signature: `InvalidInput` naming each bad one.

    An unknown keyword or a value of the wrong type is refused before the
    function runs, as is any `ValidationError` the function itself raises
    (a value a schema refuses), so callers see one error type that names
    the field. Values are converted as pydantic converts them (``"5"`` for
    an int is 5; ``"five"`` is refused).
    """
    validated = validate_call(config=ConfigDict(arbitrary_types_allowed=True))(fn)
    positional = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return validated(*args, **kwargs)
        except ValidationError as exc:
            raise invalid_input(exc, positional=positional) from None

    return call  # type: ignore[return-value]


def unknown_keywords(given: Iterable[str], accepted: Iterable[str], *, what: str,
                     also_known: Iterable[str] = ()) -> Optional[InvalidInput]:
    """`InvalidInput` naming each keyword of `given` that is not `accepted`, else None.

    Each is shown with its closest match among `accepted` and `also_known`
    (the caller's own parameters: ``thread`` suggests ``thread_id``).
    """
    accepted = sorted(accepted)
    unknown = [name for name in given if name not in accepted]
    if not unknown:
        return None
    candidates = [*accepted, *also_known]
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"{name}: unknown keyword{hint}")
    return InvalidInput("; ".join(problems) + f" ({what}: {', '.join(accepted)})")
