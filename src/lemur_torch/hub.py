"""How a name given for a model, tokenizer or dataset is read: a path on this machine, or a HuggingFace hub id."""

from __future__ import annotations

import os
from typing import Tuple

from huggingface_hub.utils import HFValidationError, validate_repo_id


def local_or_hub(value: str) -> Tuple[str, str]:
    """("local", path) for a path on this machine (or one written as a path: /..., ./..., ~/...), ("hub", id)
    for a syntactically valid HuggingFace hub id; ValueError saying why otherwise. Nothing is downloaded."""
    path = os.path.expanduser(value)
    if os.path.exists(path) or value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", ".."):
        return "local", path
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(f"{value!r} is neither a path on this machine nor a hub id (namespace/name)") from None
    return "hub", value
