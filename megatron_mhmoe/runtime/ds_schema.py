"""Every key of a --deepspeed_config file checked against DeepSpeed's own schema, before launch.

DeepSpeed ignores a top-level key it does not know (`zero_optimisation` trains silently at ZeRO-0) and
reports an unknown key inside a section only from deep inside `deepspeed.initialize`. The schema is
DeepSpeed's, read from the installed version, never a list of ours:
1. the top-level keys its parser asks for: `DeepSpeedConfig` is run once on the file with a dict that records
   every key read, plus the string constants of its config modules (sections parsed elsewhere, such as
   `optimizer` or `scheduler`, are named there) and the keys its config source reads straight from the
   dict (`config["sequence_parallel_size"]`);
2. the keys of each section it models with pydantic (zero_optimization, bf16, fp16, ...): those models
   forbid unknown keys, so their validation error is turned into ours, with the model's fields.
Keys starting with "_" are comments (our ds_configs use `_comment`). Unknown keys are a ValueError naming
each key, its place and the closest known key ("did you mean"). Cost: one parse of the file, ~10 ms after
DeepSpeed is imported (the engine imports it anyway).
"""
from __future__ import annotations

import copy
import difflib
import re
import sys
import types
from typing import Any, Iterable, Optional


class _Recording(dict):
    """A dict that notes which keys are read (get, [], in), at every nesting level."""

    def __init__(self, d: dict, path: tuple, seen: dict):
        super().__init__({k: _Recording(v, path + (k,), seen) if isinstance(v, dict) else v for k, v in d.items()})
        self._path, self._seen = path, seen

    def _note(self, key) -> None:
        self._seen.setdefault(self._path, set()).add(key)

    def get(self, key, *default):
        self._note(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)

    def __copy__(self):  # DeepSpeedConfig parses a copy.copy of the dict: keep recording into the same set
        out = _Recording({}, self._path, self._seen)
        dict.update(out, self)
        return out


def _constant_keys() -> set:
    """String constants of DeepSpeed's loaded config/constants modules (section and key names among them)."""
    out = set()
    for name, mod in list(sys.modules.items()):
        if name.startswith("deepspeed") and isinstance(mod, types.ModuleType) and (
                "constants" in name or name.endswith("config")):
            out.update(v for k, v in vars(mod).items() if k.isupper() and isinstance(v, str))
    return out


# A key DeepSpeed reads straight from the user's dict (`config["sequence_parallel_size"]`, `param_dict.get(...)`).
_DIRECT_READ = re.compile(r"""(?:param_dict|config|ds_config|config_dict)(?:\.get\(|\[)["']([A-Za-z_0-9]+)["']""")


def _direct_keys() -> set:
    """Keys DeepSpeed's config parser reads straight from the dict, outside its parse functions (its source,
    32 KB, scanned in well under 1 ms; the engine's source names no other top-level key)."""
    out = set()
    for name in ("deepspeed.runtime.config",):
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    out.update(_DIRECT_READ.findall(f.read()))
            except OSError:
                pass
    return out


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, sorted(k for k in known if isinstance(k, str)), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_fields(model_cls) -> set:
    fields = getattr(model_cls, "model_fields", {}) or {}
    out = set(fields)
    out.update(f.alias for f in fields.values() if getattr(f, "alias", None))
    return out


def _find_model(title: str, base):
    todo = [base]
    while todo:
        cls = todo.pop()
        if cls.__name__ == title:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _nested_model(model_cls, loc: tuple):
    """The pydantic model class at loc[:-1] below model_cls (for a nested section), or None."""
    import typing
    cls = model_cls
    for part in loc[:-1]:
        field = (getattr(cls, "model_fields", {}) or {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann] + list(typing.get_args(ann))
        cls = next((c for c in candidates if isinstance(c, type) and hasattr(c, "model_fields")), None)
        if cls is None:
            return None
    return cls


def unknown_ds_keys(ds: dict, batch: Optional[dict] = None) -> list[str]:
    """'<place>: unknown key <k> (did you mean ...)' for each key of `ds` that DeepSpeed does not know."""
    from pydantic import ValidationError

    from megatron_mhmoe.runtime.engine import deepspeed_config_api  # the one module that imports deepspeed
    DeepSpeedConfig, config_model_base, _version = deepspeed_config_api()

    probe = copy.deepcopy(ds)
    for k, v in (batch or {}).items():
        probe.setdefault(k, v)
    seen: dict = {}
    problems = []
    try:
        DeepSpeedConfig(_Recording(probe, (), seen))
    except ValidationError as e:
        model = _find_model(e.title, config_model_base)
        for err in e.errors():
            if err.get("type") != "extra_forbidden":
                continue
            loc = tuple(str(x) for x in err.get("loc", ()))
            known = _model_fields(_nested_model(model, loc)) if model is not None else set()
            section = f"section of {e.title}" + (f" at {'.'.join(loc[:-1])}" if len(loc) > 1 else "")
            problems.append(f"unknown key {loc[-1]!r} in a {section}{_suggest(loc[-1], known)}")
    except Exception:  # any other objection of DeepSpeed's is reported as before, by deepspeed.initialize
        pass
    known_top = seen.get((), set()) | _constant_keys() | _direct_keys()
    for key in ds:
        if isinstance(key, str) and key.startswith("_"):
            continue
        if key not in known_top:
            problems.append(f"unknown top-level key {key!r}{_suggest(key, known_top)}")
    return problems


def check_ds_config_keys(ds: Any, path: str, batch: Optional[dict] = None) -> None:
    """ValueError naming every key of the --deepspeed_config file that DeepSpeed would ignore or reject."""
    if not isinstance(ds, dict):
        raise ValueError(f"--deepspeed_config {path} must hold a JSON object, not a {type(ds).__name__}")
    problems = unknown_ds_keys(ds, batch)
    if problems:
        from megatron_mhmoe.runtime.engine import deepspeed_config_api
        version = deepspeed_config_api()[2]
        raise ValueError(f"--deepspeed_config {path}: {'; '.join(problems)}. DeepSpeed {version} "
                         f"would ignore a misspelt top-level key (and train without that setting): fix the "
                         f"spelling, or remove the key (keys starting with '_' are comments)")
