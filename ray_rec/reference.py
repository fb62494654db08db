"""The configuration reference (docs/configuration.md), generated from `ray_rec.config`."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import fields
from typing import Any

from pydantic import BaseModel

from ray_rec.config import SECTIONS, PrepareOptions, ServeConfig, StateConfig


def _field_notes(cls: type) -> dict[str, str]:
    """Each field's comment in this module's source: the lines of comments right above it and the
    one after it on its line."""
    import inspect

    notes: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        found = re.match(r"(\w+): [^#]*?(?:#\s*(.*))?$", text)
        if found and not text.startswith(("def ", "return", "model_config")):
            notes[found.group(1)] = " ".join([*above, found.group(2) or ""]).strip()
        above = []
    return notes


def reference() -> str:
    """The configuration reference as Markdown (docs/configuration.md is this text): every setting
    of every section with its type, default and meaning, read from the classes above."""
    def shown(value: Any) -> str:  # noqa: ANN401
        return f"`{str(value).lower() if isinstance(value, bool) else list(value) if isinstance(value, tuple) else value}`"

    out = ["# Configuration reference", "",
           "Generated from `ray_rec/config/sections.py` and `serving.py` by `ray-rec config --reference`; `ray-rec config [--config F] [--set ...] "
           "[--data D]` prints the resolved values of a run.", ""]
    blurbs = {"model": "`--config` YAML section `model:` / `--set model.FIELD=VALUE`",
              "data": "`data:`", "train": "`train:`", "eval": "`eval:`"}
    for name, cls in SECTIONS.items():
        doc = (cls.__doc__ or "").strip().replace("\n", " ")
        out += [f"## `{name}` ({blurbs[name]})", "", " ".join(doc.split()), "", "| setting | type | default | meaning |", "|---|---|---|---|"]
        hints, notes = typing.get_type_hints(cls), _field_notes(cls)
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            meaning = notes.get(f.name, "")
            derived = {"model.num_negatives": "from the loss", "train.batch_size": "from the examples (`model.examples`)",
                       "model.block": "from the tracker"}
            value = shown(default) if default is not None else derived.get(f"{name}.{f.name}", "from the data set")
            out.append(f"| `{name}.{f.name}` | `{_type_name(hints[f.name])}` | {value} | {meaning} |")
        out.append("")
    out += ["## `prepare` (`ray-rec prepare` flags, or `prepare:` in the file of `ray-rec prepare --config`)", "", "| setting | type | default | meaning |", "|---|---|---|---|"]
    hints, notes = typing.get_type_hints(PrepareOptions), _field_notes(PrepareOptions)
    for f in fields(PrepareOptions):
        default = "required" if f.default is dataclasses.MISSING else shown(f.default) if f.default is not None else "none"
        out.append(f"| `{f.name}` | `{_type_name(hints[f.name])}` | {default} | {notes.get(f.name, '')} |")
    out += ["", "## `serve` (the Serve application's `args`; `ray-rec serve` flags)", "",
            "| setting | type | default | meaning |", "|---|---|---|---|"]
    for prefix, model in (("", ServeConfig), ("state.", StateConfig)):
        for key, info in model.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                continue  # a nested section: its own rows follow
            default = "required" if info.is_required() else shown(info.default) if info.default is not None else "none"
            out.append(f"| `{prefix}{key}` | `{_type_name(info.annotation)}` | {default} | {info.description or ''} |")
    return "\n".join(out) + "\n"


def _type_name(hint: Any) -> str:  # noqa: ANN401
    text = re.sub(r"\btyping\.|<class '(\w+)'>", lambda m: m.group(1) or "", str(hint)).replace("NoneType", "None")
    return text.replace(" | ", " or ")  # a bar would end the Markdown table's cell
