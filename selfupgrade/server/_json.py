"""JSON from the network: one parser for every request body and frame hbs reads."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["UntrustedJSONError", "loads_untrusted"]


class UntrustedJSONError(ValueError):
    """A body or frame that is not JSON hbs accepts; the message says why."""


def _no_constant(name: str) -> Any:
    raise UntrustedJSONError(f"{name} is not a number hbs accepts (JSON has no {name})")


def loads_untrusted(data: bytes | str) -> Any:
    """Parse JSON received from a client.

    Raises:
        UntrustedJSONError: not valid JSON; ``NaN``/``Infinity`` (Python's parser takes them,
            JSON does not, and no limit or version may be one); nesting so deep that the
            parser would run out of stack.
    """
    try:
        return json.loads(data, parse_constant=_no_constant)
    except UntrustedJSONError:
        raise
    except RecursionError:
        raise UntrustedJSONError("JSON nested too deeply") from None
    except ValueError as exc:
        raise UntrustedJSONError(f"not valid JSON: {exc}") from None
