"""pydantic's validation errors as ``file:line: key: reason`` lines, for any YAML file read by
:mod:`harness.spec.yamlsafe` (scenarios, suites).

Example::

    try:
        Suite.model_validate(raw)
    except ValidationError as e:
        problems = schema_problems(e, raw, lines, "suite.yaml", Suite)
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from harness.spec.yamlsafe import dotted, line_of, short_repr


def fields_at(loc: tuple, top: type[BaseModel]) -> list[str]:
    """Field names allowed at a location under model ``top`` (for 'did you mean'); internal fields left out."""
    model: type[BaseModel] | None = top
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
    return [k for k, f in model.model_fields.items() if not f.exclude] if model else []


# pydantic error types that mean "not the type this key takes": the message then says what the file holds there
_TYPE_ERRORS = frozenset({"int_type", "float_type", "bool_type", "string_type", "list_type", "dict_type", "model_type",
                          "model_attributes_type", "literal_error", "enum", "finite_number", "int_from_float"})
_MAPPING = "Input should be a mapping (key: value lines, indented below the key)"


def schema_problems(e: ValidationError, raw: Any, lines: dict[tuple, int], source: str, top: type[BaseModel],
                    item_shapes: dict[str, str] | None = None) -> list[str]:
    """``source:line: key: reason`` lines for pydantic's errors of ``raw`` (the YAML's value) against ``top``.

    Each location is the path of keys and indices in the file (pydantic's union-member and validator names left out);
    a union's failures at one location are joined into one reason ("a valid list or 'all-linear'"); a wrong type says
    what the file holds there (``got the text '12'``: quoted numbers are text); an unknown key names the closest
    allowed one. ``item_shapes``: per top-level list key, what an item of it must be, for an item that is no mapping
    (``{"frameworks": "a framework name or a mapping (name, label, ...)"}``).
    """
    reasons: dict[tuple, list[str]] = {}
    got: dict[tuple, str] = {}
    for err in e.errors():
        loc = _input_loc(raw, err["loc"], last_is_key=err["type"] in ("missing", "extra_forbidden"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = fields_at(loc[:-1], top)
            hint = difflib.get_close_matches(str(loc[-1]), parent, n=1)
            msg = "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else "")
            if parent:
                msg += f" (allowed: {', '.join(parent)})"
        elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = _MAPPING
            if len(loc) == 2 and isinstance(loc[1], int) and loc[0] in (item_shapes or {}):
                msg = f"Input should be {item_shapes[loc[0]]}"
        if err["type"] in _TYPE_ERRORS:
            got.setdefault(loc, got_text(err.get("input")))
        reasons.setdefault(loc, [])
        if msg not in reasons[loc]:
            reasons[loc].append(msg)
    out = []
    for loc, msgs in reasons.items():
        alike = [m for m in msgs if m.startswith("Input should be ")]
        texts = [m for m in msgs if m not in alike]
        if alike and not texts:  # else the value had a union member's type and failed its constraint: say that
            texts.insert(0, alike[0] + "".join(" or " + m.removeprefix("Input should be ") for m in alike[1:])
                         + (f", got {got[loc]}" if loc in got else ""))
        out += [f"{source}:{line_of(lines, loc)}: {dotted(loc)}: {t}" for t in texts]
    return out


def _input_loc(value: Any, loc: tuple, last_is_key: bool = False) -> tuple:
    """The part of a pydantic error location that is keys and indices of the input: pydantic adds the member of a
    union that failed (``list[str]``) and validator names (``function-after[...]``), which are no keys of the file.
    ``last_is_key``: the last part is a key even where the input lacks it (a required key that is missing)."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif not (last_is_key and i == len(loc) - 1):
            continue
        out.append(part)
    return tuple(out)


def got_text(value: Any) -> str:
    """What a YAML value is, in the words of an error message (``the text '12'``, ``true (a boolean)``)."""
    if value is None:
        return "nothing (an empty value, or null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            float(text)
        except ValueError:
            numeric = False
        else:
            numeric = text not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")
        if numeric:
            return f"the text {short_repr(value)} (a number in quotes is text: write it without quotes)"
        if text in ("true", "false", "yes", "no", "on", "off"):
            return f"the text {short_repr(value)} (write true or false, without quotes)"
        return f"the text {short_repr(value)}"
    if isinstance(value, float):
        return f"the number {value!r}" + (" (write a whole number, without '.0')" if value.is_integer() else "")
    if isinstance(value, int):
        return f"the integer {short_repr(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _model_of(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        m = _model_of(arg)
        if m is not None:
            return m
    return None
