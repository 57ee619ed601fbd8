"""Compose a recipe with Hydra (defaults + recipe file + command-line overrides) into the typed schema.

Errors become :class:`UserError` naming the key, the file it came from where that is known, and
the fix, before any process group or GPU is touched.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ..errors import UserError
from .schema import RecipeConfig

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPES_DIR = Path(os.environ.get("QNEXT_RECIPES", REPO_ROOT / "recipes"))
GROUPS = ("model", "train", "parallel", "data", "recipe")


def available(group: str, recipes_dir: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in (recipes_dir / group).glob("*.yaml"))


def _schema_keys(cls: Any = RecipeConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_schema_keys(type(default), full + "."))
    return keys


def _did_you_mean(key: str) -> str:
    """The most likely intended key: in the same section first, a known name the unknown one extends
    or starts (``train.lr_max`` -> ``train.lr``, ``train.warmup`` -> ``train.warmup_steps``), then the
    closest spelling there, then the closest spelling anywhere."""
    keys = _schema_keys()
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    related = [n for n in siblings if leaf.startswith(n + "_") or n.startswith(leaf)]
    if related:
        best = max(related, key=lambda n: difflib.SequenceMatcher(None, leaf, n).ratio())
        return f" (did you mean '{siblings[best]}'?)"
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{siblings[close[0]]}'?)"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _files_defining(key: str, recipes_dir: Path) -> list[str]:
    """Recipe YAML files that set ``key`` (dotted), for pointing at the culprit."""
    hits = []
    parts = key.split(".")
    for path in sorted(recipes_dir.rglob("*.yaml")):
        try:
            node: Any = OmegaConf.to_container(OmegaConf.load(path))
        except Exception:
            continue
        group = path.parent.name
        # group files (e.g. parallel/8xh100.yaml) are packaged under their group name
        candidates = [node]
        if group in GROUPS and group != "recipe":
            candidates = [{group: node}]
        for cand in candidates:
            cur = cand
            for p in parts:
                if isinstance(cur, dict) and p in cur:
                    cur = cur[p]
                else:
                    break
            else:
                hits.append(str(path.relative_to(recipes_dir.parent)))
    return hits


def _split_overrides(overrides: Sequence[str], recipes_dir: Path) -> tuple[list[str], list[str]]:
    """Group selections (``recipe=x``, ``parallel=8xh100``) vs value overrides (``train.lr=1e-4``)."""
    groups, values = [], []
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"command-line override '{ov}' has no '='", hint="write key=value, e.g. train.steps=20")
        key, val = ov.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUPS:
            names = available(key, recipes_dir)
            if val not in names:
                raise UserError(
                    f"unknown {key} '{val}'", hint=f"choose one of: {', '.join(names)} (files in recipes/{key}/)"
                )
            groups.append(f"{key}={val}")
        else:
            values.append(ov)
    return groups, values


def compose(overrides: Sequence[str] = (), recipes_dir: Path | None = None):
    """Hydra composition of recipes/config.yaml with group selections; returns an untyped DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    recipes_dir = Path(recipes_dir or RECIPES_DIR).resolve()
    group_ovs, value_ovs = _split_overrides(overrides, recipes_dir)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=group_ovs)
    except HydraException as err:
        raise UserError(f"cannot compose the recipe: {err}", hint="check the recipe files under recipes/") from None
    except yaml.YAMLError as err:
        where = " ".join(str(err).split())
        raise UserError(f"a recipe file is not valid YAML: {where}", hint="fix the YAML at that file and line") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg, value_ovs


def load_config(overrides: Sequence[str] = (), recipes_dir: Path | None = None) -> RecipeConfig:
    """Recipe + overrides -> typed :class:`RecipeConfig` (interpolations resolved)."""
    recipes_dir = Path(recipes_dir or RECIPES_DIR).resolve()
    raw, value_ovs = compose(overrides, recipes_dir)
    schema = OmegaConf.structured(RecipeConfig)
    OmegaConf.set_struct(schema, True)
    try:
        merged = OmegaConf.merge(schema, raw)
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as err:
        raise _key_error(err, recipes_dir, source=None) from None
    for ov in value_ovs:
        key, val = ov.split("=", 1)
        key = key.lstrip("+~")
        try:
            OmegaConf.update(merged, key, _parse_value(val), merge=True, force_add=False)
        except (ConfigKeyError, ValidationError, OmegaConfBaseException) as err:
            raise _key_error(err, recipes_dir, source=f"command-line override '{ov}'") from None
    try:
        obj = OmegaConf.to_object(merged)
    except (ValidationError, OmegaConfBaseException) as err:
        raise _key_error(err, recipes_dir, source=None) from None
    assert isinstance(obj, RecipeConfig)
    return obj


def _parse_value(text: str) -> Any:
    """A command-line value as YAML would read it (null, numbers, booleans, [lists]); else the string."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _key_error(err: Exception, recipes_dir: Path, source: str | None) -> UserError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in msg:
        where = source or ", ".join(_files_defining(key, recipes_dir)) or "a recipe file"
        return UserError(
            f"unknown config key '{key}' (from {where}){_did_you_mean(key)}",
            hint="remove it or fix its spelling; `python -m qnext.config show` prints every valid key",
        )
    where = source or ", ".join(_files_defining(key, recipes_dir)) or "a recipe file"
    return UserError(f"bad value for config key '{key}' (from {where}): {msg}", hint="give a value of the key's type")


def to_yaml(cfg: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
