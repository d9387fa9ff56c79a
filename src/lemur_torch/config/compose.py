"""Composition: conf/<name>.yaml and the command line's overrides, against the schema, into one DictConfig.

Hydra composes, OmegaConf checks every value's type against the schema (lemur_torch.config.schema): unknown
keys, wrong types and unknown choices fail here. Each failure becomes one ConfigError naming the key the user
wrote (an override that does not parse, a group option that does not exist, a key OmegaConf names relative to
its parent), before anything is built.
"""

from __future__ import annotations

from typing import List, Optional

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lemur_torch.config import schema  # noqa: F401  (registers lemur_schema, which conf/config.yaml extends)
from lemur_torch.errors import ConfigError


def load_config(overrides: Optional[List[str]] = None, config_name: str = "config") -> DictConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides against the schema; errors are ConfigError."""
    overrides = list(overrides or [])
    for override in overrides:
        _check_override_syntax(override)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lemur_torch.conf", version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        OmegaConf.resolve(cfg)
    except Exception as exc:  # Hydra's and OmegaConf's errors, turned into one line naming the key
        raise composition_error(exc, overrides) from None
    return cfg


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").strip() or override


def _check_override_syntax(override: str) -> None:
    try:
        OverridesParser.create().parse_override(override)
    except Exception as exc:  # OverrideParseException: ANTLR's message, over several lines
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("See https")]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise ConfigError(
            _override_key(override), f"cannot parse the override {override!r} ({detail}); write key=value"
        ) from None


def _full_key(key: str, overrides: List[str]) -> str:
    """OmegaConf names a node added by an override relative to its parent ('more' for +data.sources.more=...):
    the override's own key says where it is."""
    for override in overrides:
        parts = _override_key(override).split(".")
        if "." not in key and key in parts[1:]:
            return ".".join(parts[: parts.index(key, 1) + 1])
    return key


def composition_error(exc: BaseException, overrides: List[str]) -> ConfigError:
    """The key and a one-line message for an error Hydra or OmegaConf raised while composing the config.

    Hydra wraps OmegaConf's error, which knows the full key, in its own ("Error merging override
    train.seq_len=abc"): the chain is searched for it first."""
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        return ConfigError(
            group or option, f"no option {option!r} in conf/{group}/; available: {', '.join(sorted(exc.options))}"
        )
    cause: Optional[BaseException] = exc
    while cause is not None:
        key = getattr(cause, "full_key", None)
        if isinstance(cause, OmegaConfBaseException) and key:
            key, first = _full_key(str(key), overrides), str(cause).splitlines()[0]
            if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
                return ConfigError(
                    key,
                    f"no such key ({first}); check the spelling (`lemur-train --cfg` prints the "
                    "composed config), or add a new entry with +key=value",
                )
            if "is not a subclass of" in first and "." in key:
                # OmegaConf cannot add an entry to a typed mapping (data.sources) key by key; a merge can
                parent, _, name = key.rpartition(".")
                first += f"; add the entry by merging it: ++{parent}={{{name}: {{...}}}}"
            return ConfigError(key, first)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    # no key attached (e.g. an interpolation that does not resolve): the override the message mentions
    for override in overrides:
        key, _, value = override.partition("=")
        quoted = [part for i, part in enumerate(text.split("'")) if i % 2]
        if _override_key(key) in quoted or any(q and q in value for q in quoted):
            return ConfigError(_override_key(override), text)
    quoted = [part for i, part in enumerate(text.split("'")) if i % 2]
    return ConfigError(quoted[0] if quoted else "overrides", text)
