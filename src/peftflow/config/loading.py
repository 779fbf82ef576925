"""Reading configs: YAML files, ``--set KEY=VALUE`` overrides, and errors that name the fix.

The one ``--set`` parser (:func:`parse_overrides`, ``KEY=VALUE`` strings to values read as
YAML scalars) serves every command; :func:`apply_overrides` applies dotted keys to a
config for every caller alike (the command line, studies, deployments' parameters).

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftflow.config.experiment import ExperimentConfig
from peftflow.config.methods import METHOD_SETTINGS, settings_owners
from peftflow.errors import ConfigError


def parse_config(data: Mapping, source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Load a YAML config; ``overrides`` are dotted keys (``train.epochs``) applied on top."""
    path = Path(path)
    data = read_yaml_mapping(path, "config file", "pass a YAML file under configs/")
    return parse_config(apply_overrides(data, overrides or {}), source=str(path))


def read_yaml_mapping(path: Path, what: str, where: str) -> dict:
    """A YAML file holding a mapping; ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return data


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``["train.epochs=2"]`` -> ``{"train.epochs": 2}`` (values parsed as YAML scalars)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """A copy of config ``data`` with dotted ``overrides`` set.

    Setting ``method.name`` to another method starts that method from its defaults:
    the file's settings belong to the method it named (other ``method.*`` overrides apply).
    """
    tree = _deep_copy(data)
    new_method = overrides.get("method.name")
    method = tree.get("method")
    if new_method is not None and isinstance(method, Mapping) and method.get("name") != new_method:
        tree["method"] = {}
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return tree


def _deep_copy(tree: Mapping[str, Any]) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _set_dotted(tree: dict, key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[leaf] = value


# --- errors that say what to write instead ----------------------------------------------------


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: where it is, what is wrong, and what is allowed."""
    lines = [f"invalid experiment config {source}:"]
    for problem in err.errors():
        lines.append(f"  - {_describe_problem(problem)}")
    return "\n".join(lines)


def _describe_problem(problem: Mapping[str, Any]) -> str:
    loc = _visible_loc(problem["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    kind = problem["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown field; {_valid_fields_hint(problem['loc'])}"
    if kind == "missing":
        return f"{where}: required field is missing; add it"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = (problem.get("ctx") or {}).get("tag")
        named = f"unknown method {tag!r}" if tag else "method.name is missing"
        return f"{where}: {named}; valid methods: {', '.join(sorted(METHOD_SETTINGS))}"
    message = problem["msg"].removeprefix("Value error, ")
    got = problem.get("input")
    # A whole section's input says nothing new (and may hold what was refused).
    shown = "" if isinstance(got, Mapping) else f" (got {got!r})"
    return f"{where}: {message}{shown}"


def _visible_loc(loc: tuple) -> tuple:
    """The path as written in YAML: pydantic puts the union's tag after ``method``."""
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in METHOD_SETTINGS:
        return (loc[0], *loc[2:])
    return loc


def _valid_fields_hint(loc: tuple) -> str:
    """What to write instead of an unknown field: the closest valid name and all of them."""
    if len(loc) >= 3 and loc[0] == "method" and loc[1] in METHOD_SETTINGS:
        return _method_field_hint(str(loc[1]), str(loc[-1]))
    section = _section_at(loc[:-1])
    if section is None:
        return "remove it or fix its spelling"
    return _closest(str(loc[-1]), sorted(section.model_fields))


def _method_field_hint(method: str, field: str) -> str:
    """An unknown setting of one method: its own settings, or the methods that have it."""
    own = sorted(set(METHOD_SETTINGS[method].model_fields) - {"name"})
    owners = settings_owners(field)
    if field in METHOD_SETTINGS:  # the layout before per-method settings: method.lora.r
        return (
            f"method settings sit directly under `method` (e.g. method.{own[0] if own else 'name'})"
            f", not under method.{field}; method {method!r} has "
            f"{', '.join(own) if own else 'no settings'}"
        )
    if owners and not own:
        return f"method {method!r} has no settings; {field!r} is a setting of {', '.join(owners)}"
    hint = _closest(field, own) if own else f"method {method!r} has no settings"
    if owners:
        hint += f" ({field!r} is a setting of {', '.join(owners)})"
    return hint


def _closest(field: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(field, valid, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"{guess}valid fields here: {', '.join(valid)}"


def _section_at(path: tuple) -> type[BaseModel] | None:
    """The config section (a pydantic model) at ``path``, e.g. ("data", "split")."""
    section: type[BaseModel] | None = ExperimentConfig
    for part in path:
        field = section.model_fields.get(str(part)) if section else None
        annotation = field.annotation if field else None
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        section = annotation if is_model else None
    return section
