"""The options a task may take: those its provider and its tools declare, nothing else.

Options are the keyword arguments of `submit` beyond its own parameters
(``steps=5``, ``temperature=0.2``, ``ledger_path=...``). Each provider and
tool declares the ones it reads as a pydantic model; a task's options are
checked against the models of its provider and of the tools it may call
before it is stored, so a typo (``stesp``) or a wrong type (``steps="five"``)
is refused at once instead of ignored, or failing later in a worker.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from pydantic import BaseModel, ValidationError

from .providers import ProviderFactory, provider_options_model
from .tools import allowed_tools
from .validation import invalid_input, unknown_keywords


def checked_options(provider: str, tool_names: Optional[Sequence[str]], options: dict[str, Any], *,
                    parameters: Sequence[str],
                    providers: Optional[Mapping[str, ProviderFactory]] = None) -> dict[str, Any]:
    """`options` validated by their declaring models, as JSON values; `InvalidInput` naming any bad one.

    `tool_names` are the task's tools (None: every registered tool);
    `parameters` are the caller's own keywords, listed in the error;
    `providers` are the process's (default: the registry).
    """
    owners: list[tuple[str, type[BaseModel]]] = [
        (f"provider {provider!r}", provider_options_model(provider, providers))]
    tools = allowed_tools({} if tool_names is None else {"tools": list(tool_names)})
    owners += [(f"tool {t.name!r}", t.options) for t in tools if t.options is not None]
    accepted = {name for _owner, model in owners for name in model.model_fields}
    takes = "take" if len(owners) > 1 else "takes"
    problem = unknown_keywords(options, accepted, also_known=parameters,
                               what=f"parameters are {', '.join(parameters)}; "
                                    f"{' and '.join(owner for owner, _ in owners)} {takes}")
    if problem is not None:
        raise problem
    checked: dict[str, Any] = {}
    for owner, model in owners:
        mine = {name: value for name, value in options.items() if name in model.model_fields}
        try:
            checked.update(model.model_validate(mine).model_dump(mode="json", exclude_unset=True))
        except ValidationError as exc:
            raise invalid_input(exc, prefix=f"{owner} option") from None
    return checked
