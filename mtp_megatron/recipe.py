"""Recipes: YAML files with ``base:`` inheritance and dotted command-line overrides.

A recipe names its base (a path relative to itself) and changes only what its ablation is about;
``key.sub=value`` overrides are applied last, values parsed as YAML (``true``, ``4``, ``null``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from mtp_megatron.config import ConfigError, Recipe, from_dict


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and its chain of bases into one merged dict (without the ``base`` key)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' does not exist; recipes live in recipes/ (*.yaml)")
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"recipe bases form a cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(load_recipe_dict(path.parent / base, (*_seen, path)), data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; the path must exist unless its parent is a free mapping."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    raise ConfigError(f"override '{key}': '{part}' is not a section")
            node = node[part]
        node[parts[-1]] = value
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge, override, type-check and validate a recipe: every error surfaces here."""
    data = apply_overrides(load_recipe_dict(path), overrides or [])
    data.setdefault("name", Path(path).stem)
    recipe = from_dict(Recipe, data)
    recipe.validate()
    return recipe
