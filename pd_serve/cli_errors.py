"""One place that turns expected failures of a command into a one-line `error: ...` and an
exit status (no traceback): used by `pd-serve` and its `bench` and `sim` sub-commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer

T = TypeVar("T")


def or_exit(fn: Callable[[], T], errors: tuple[type[BaseException], ...] = (ValueError,),
            status: int = 2) -> T:
    """Runs `fn`; one of `errors` (default: bad configuration or input) becomes
    `error: <message>` on stderr and exit `status`."""
    try:
        return fn()
    except errors as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(status) from exc
