"""Reading server-sent events (`event:` / `data:` lines) from an httpx streaming response."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx


async def events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Yields (event name, JSON data); ValueError on a data line that is not a JSON object."""
    name, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            body = json.loads("\n".join(data))
            if not isinstance(body, dict):
                raise ValueError(f"SSE event {name!r} carries {type(body).__name__}, not an object")
            yield name, body
            name, data = "message", []
