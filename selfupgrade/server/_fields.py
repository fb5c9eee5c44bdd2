"""The error every admin request validator raises, naming the field."""

from __future__ import annotations

__all__ = ["FieldError"]


class FieldError(ValueError):
    """An admin request is invalid; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
