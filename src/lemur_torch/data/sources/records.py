"""What a source yields: a record is a document's text (a conversation, for chat sources) or a `Bad` saying why
it is skipped; the reasons are the keys of the per-source skip counters (`loader.stats()`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
EMPTY = "empty"
UNDECODABLE = "undecodable"
REASONS = (MALFORMED_JSON, MISSING_FIELD, EMPTY, UNDECODABLE)


@dataclass
class Bad:
    reason: str
    detail: str = ""
    loc: str = ""


Record = Tuple[str, Union[str, Bad]]  # (location, text or Bad)


def text_record(value, text_field: str) -> Union[str, Bad]:
    """A document's text from the value of its text field, or the Bad that says what is wrong with it."""
    if value is None:
        return Bad(MISSING_FIELD, f"no field {text_field!r}")
    if not isinstance(value, str):
        return Bad(MISSING_FIELD, f"field {text_field!r} is {type(value).__name__}, not a string")
    if not value.strip():
        return Bad(EMPTY, "empty document")
    return value
