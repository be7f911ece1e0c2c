"""The schema's verdict as lines a person can act on: key, value given, what is allowed."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipeline.schema.sections import Params


class InvalidConfig(ValueError):
    """The config breaks the schema; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def validate_params(params: Any) -> dict:
    """`params` as it is, once it matches the schema; else InvalidConfig with every problem."""
    parse_params(params)
    return params


def parse_params(params: Any) -> Params:
    """The typed config of `params` (a composed config, as Hydra and DVC write it); else
    InvalidConfig with every problem."""
    if not isinstance(params, dict):
        raise InvalidConfig([f"the config is a {type(params).__name__}, not a mapping of keys"])
    try:
        config = Params.model_validate(params)
    except ValidationError as exc:
        errors = [(config_key(e["loc"], params), e) for e in exc.errors()]
        # a union reports every member it tried: keep the deepest, most specific lines
        kept = [
            (key, e)
            for key, e in errors
            if e["type"] in ("value_error", "extra_forbidden", "missing")
            or not any(len(k) > len(key) and k[: len(key)] == key for k, _ in errors)
        ]
        problems = [problem(key, e, params) for key, e in kept]
        raise InvalidConfig(list(dict.fromkeys(problems))) from None
    config._composed = params
    return config


def dotted(loc: list) -> str:
    """models.cnn3d.head.units[0]"""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")


def problem(loc: list, error: dict, params: dict) -> str:
    """One line: the full key, the value given, what is allowed."""
    key = dotted(loc) or "(the config)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return unknown_setting(loc, error["input"])
    if kind == "missing":
        return f"{key}: missing; must be {describe(loc)}"
    if kind == "value_error":  # a check across keys: its own message (naming them at the top)
        message = error["msg"].removeprefix("Value error, ")
        return f"{key}: {message}" if loc else message
    return f"{key}={lookup(params, loc)!r}: must be {describe(loc)}"


def config_key(loc: tuple, params: dict) -> list:
    """The error's location without the union members pydantic names in it (`int`,
    `StepDecay`, `constrained-int`, `literal['all']`): a part that is not a key (or index)
    of the config at that point and not the last part is such a tag."""
    key, value = [], params
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if has_key(value, part):
            value = value[part]
        elif not last or is_variant_tag(part):
            continue
        key.append(part)
    return key


def has_key(value, part) -> bool:
    if isinstance(value, dict):
        return part in value
    return isinstance(value, list) and isinstance(part, int) and part < len(value)


def unknown_setting(loc: list, value) -> str:
    """The line for a key the schema does not have, naming the settings its parent has."""
    parent = dotted(loc[:-1]) or "the config"
    known = ", ".join(sorted(field_names(loc[:-1]))) or "no settings of that name"
    return f"{dotted(loc)}={value!r}: not a setting of {parent} (it has: {known})"


def is_variant_tag(part) -> bool:
    return isinstance(part, str) and (
        part[:1].isupper() or "[" in part or "-" in part or part in ("int", "float", "str")
    )


def lookup(params: dict, loc: list):
    value = params
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def field_at(loc: list) -> tuple[Any, FieldInfo | None]:
    """(annotation, FieldInfo) of the schema at `loc`, walking models, lists and dicts."""
    annotation, info = Params, None
    for part in loc:
        annotation = unwrap_optional(annotation)
        origin = typing.get_origin(annotation)
        if isinstance(part, int) and origin is list:
            annotation, info = element(annotation)
        elif isinstance(part, str) and origin is dict:
            annotation, info = element(annotation, index=1)
        else:
            model = model_in(annotation, part)
            if model is None:
                return None, None
            info = model.model_fields[part]
            annotation = info.annotation
    return annotation, info


def element(annotation, index: int = 0) -> tuple[Any, FieldInfo | None]:
    inner = typing.get_args(annotation)[index]
    if typing.get_origin(inner) is Annotated:
        base, *metadata = typing.get_args(inner)
        return base, FieldInfo.from_annotation(inner)
    return inner, None


def unwrap_optional(annotation):
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        lists = [a for a in args if typing.get_origin(a) in (list, dict)]
        return lists[0] if len(lists) == 1 else annotation
    return annotation


def model_in(annotation, field: str | None = None) -> type[BaseModel] | None:
    """The model among `annotation`'s alternatives (the first with `field`, if given)."""
    models = [
        a for a in alternatives(annotation) if isinstance(a, type) and issubclass(a, BaseModel)
    ]
    return next((m for m in models if field is None or field in m.model_fields), None)


def field_names(loc: list) -> list[str]:
    annotation, _ = field_at(loc)
    model = model_in(unwrap_optional(annotation)) if annotation is not None else None
    return list(model.model_fields) if model else []


def describe(loc: list) -> str:
    """What the schema allows at `loc`, in words: `a whole number >= 1`, `one of 'adam',
    'adamw'`, `null or a number > 0`..."""
    annotation, info = field_at(loc)
    if annotation is None:
        return "a valid value"
    bounds = bound_words(info)
    return " or ".join(dict.fromkeys(kind_words(a, bounds) for a in alternatives(annotation)))


def alternatives(annotation) -> list:
    """The members of a union, through `Annotated` wrappers (a discriminated union)."""
    if typing.get_origin(annotation) is Annotated and model_like(typing.get_args(annotation)[0]):
        return alternatives(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in alternatives(arg)]
    return [annotation]


def model_like(annotation) -> bool:
    """A model, or a union or `Annotated` that holds one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return typing.get_origin(annotation) in (Union, types.UnionType, Annotated) and any(
        model_like(a) for a in typing.get_args(annotation)
    )


def bound_words(info: FieldInfo | None) -> str:
    words = []
    for item in info.metadata if info else []:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                words.append(f"{sign} {getattr(item, attr)}")
        if getattr(item, "min_length", None):
            words.append(f"with at least {item.min_length} entries")
        if getattr(item, "pattern", None):
            words.append(f"matching {item.pattern}")
    return " and ".join(words)


def kind_words(annotation, bounds: str) -> str:
    if typing.get_origin(annotation) is Annotated:
        base, *_ = typing.get_args(annotation)
        return kind_words(base, bound_words(FieldInfo.from_annotation(annotation)))
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(annotation))
    if origin is list:
        inner, info = element(annotation)
        item = kind_words(inner, bound_words(info))
        return f"a list (of {item}){' ' + bounds if bounds else ''}"
    if origin is dict:
        return "a mapping"
    if annotation is str and bounds == "with at least 1 entries":
        return "a non-empty text"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}
    if annotation in names:
        return names[annotation] + (f" {bounds}" if bounds else "")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping with " + ", ".join(annotation.model_fields)
    return str(annotation)
