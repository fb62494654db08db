"""Reading a run's config: YAML files, ``--set`` overrides and the ``prepare:`` section, into the
checked classes of `ray_rec.config.sections`. A bad value is reported once, naming the field, the
value and the file."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from ray_rec.config.sections import Config, DataConfig, EvalConfig, ModelConfig, PrepareOptions, TrainConfig

T = TypeVar("T")


def build(cls: type[T], values: dict[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys by name."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) in section {section!r}: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"bad settings in section {section!r}: {exc}") from None


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
PREPARE_SECTION = "prepare"  # `ray-rec prepare --config`'s settings (`prepare_settings`), beside the run's


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a `Config` from a nested dict (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ValueError("a config must be a mapping with sections model, data, train, eval")
    unknown = sorted(set(raw) - set(SECTIONS) - {PREPARE_SECTION})
    if unknown:
        raise ValueError(f"unknown config section(s): {', '.join(unknown)}; known: {', '.join([*SECTIONS, PREPARE_SECTION])}")
    return Config(**{name: build(cls, raw.get(name), name) for name, cls in SECTIONS.items()})  # type: ignore[arg-type]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set`` pairs -> dotted overrides for `load_config`. Values are YAML scalars: 32 -> int,
    0.5 -> float, true -> bool, gru -> str.

    Example:
        >>> parse_overrides(["model.dim=128", "model.tracker=gru", "train.sparse_items=false"])
        {'model.dim': 128, 'model.tracker': 'gru', 'train.sparse_items': False}
    """
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r} must look like section.field=value, e.g. model.dim=32")
        out[key.strip()] = yaml.safe_load(value)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file's sections, unchecked.

    Raises:
        ValueError: the file cannot be read, is not YAML, or is not a mapping."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping with sections model, data, train, eval, prepare")
    return raw


def prepare_settings(path: str | Path) -> dict[str, Any]:
    """The ``prepare:`` section of a config file: `PrepareOptions` fields but the per-run ``input``,
    ``output`` and ``overwrite`` (e.g. ``format``, ``columns``, ``click_events``); {} without one.

    Raises:
        ValueError: the section is not a mapping or names another setting."""
    section = read_config_file(path).get(PREPARE_SECTION) or {}
    if not isinstance(section, dict):
        raise ValueError(f"config file {path}: section {PREPARE_SECTION!r} must be a mapping")
    allowed = {f.name for f in dataclasses.fields(PrepareOptions)} - {"input", "output", "overwrite"}
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"config file {path}: unknown setting(s) in section 'prepare': {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(allowed))}")
    return section


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.
    A ``prepare:`` section is `ray-rec prepare`'s (`prepare_settings`) and is not read here.

    Example:
        >>> load_config(None, {"model.dim": 32}).model.dim
        32
    """
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ValueError(f"override {dotted!r} must look like section.field")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping")
        raw[section][key] = value
    try:
        return config_from_dict(raw)
    except ValueError as exc:
        if path is None or any(str(exc).startswith(f"{dotted}=") for dotted in overrides or {}):
            raise
        raise ValueError(f"config file {path}: {exc}") from None
