"""Description sets (METHOD.md Step 1): K tissue/morphology types of a cohort's H&E slides, each
with M one-sentence morphological descriptions, plus how the set was made (curated or by an LLM).

A set is a JSON file that follows `schema.json` in this folder. The package ships hand-curated
sets (`list_description_sets()`); `proalign-engine describe` asks an LLM for new ones
(see `llm.py`). Validation is our own small JSON-Schema interpreter (the subset `schema.json`
uses) plus the checks a schema cannot state: counts match k and m, type names are unique and no
sentence appears twice. Every error names the file and the field, e.g.
`lung.json: types[3].descriptions[2]: ...`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

from ...errors import ProAlignError

HERE = Path(__file__).resolve().parent
SCHEMA_PATH = HERE / "schema.json"
SCHEMA_VERSION = 1


class DescriptionError(ProAlignError):
    """A description set is missing, unreadable or does not follow the schema."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, list(problems)
        shown = "; ".join(self.problems[:8])
        more = f" (+{len(self.problems) - 8} more)" if len(self.problems) > 8 else ""
        super().__init__(f"{source}: {shown}{more}")


@dataclass(frozen=True)
class DescriptionType:
    name: str
    descriptions: tuple[str, ...]


@dataclass(frozen=True)
class DescriptionSet:
    name: str
    cohort: str
    organ: str
    version: str
    k: int
    m: int
    types: tuple[DescriptionType, ...]
    generator: dict = field(hash=False, compare=False)
    source: str | None = field(default=None, hash=False, compare=False)

    @property
    def type_names(self) -> list[str]:
        return [t.name for t in self.types]

    @property
    def sentences(self) -> list[str]:
        """All K*M sentences, type-major (type 0's M sentences first)."""
        return [d for t in self.types for d in t.descriptions]

    @property
    def hash(self) -> str:
        return description_set_hash(self)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "name": self.name, "cohort": self.cohort, "organ": self.organ,
                "version": self.version, "k": self.k, "m": self.m,
                "types": [{"name": t.name, "descriptions": list(t.descriptions)} for t in self.types],
                "generator": dict(self.generator)}

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "DescriptionSet":
        validate(data, source=source)
        types = tuple(DescriptionType(t["name"], tuple(t["descriptions"])) for t in data["types"])
        return cls(data["name"], data["cohort"], data["organ"], data["version"], data["k"], data["m"], types,
                   dict(data["generator"]), source)


SetLike = Union[DescriptionSet, dict, str, os.PathLike]


# --- a small JSON-Schema interpreter (the keywords schema.json uses) -------------------------------

_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(v: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, _TYPES[t])


def _path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def _check(v: Any, schema: dict, path: str, out: list[str]) -> None:
    where = path or "(top level)"
    if "const" in schema and v != schema["const"]:
        out.append(f"{where}: must be {json.dumps(schema['const'])}, got {json.dumps(v)[:60]}")
        return
    if "enum" in schema and v not in schema["enum"]:
        out.append(f"{where}: must be one of {', '.join(json.dumps(e) for e in schema['enum'])}, got {json.dumps(v)[:60]}")
        return
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(v, t) for t in types):
            out.append(f"{where}: must be {' or '.join(types)}, got {type(v).__name__} {json.dumps(v)[:60]}")
            return
    if isinstance(v, str):
        if len(v) < schema.get("minLength", 0):
            out.append(f"{where}: must have at least {schema['minLength']} characters, got {len(v)}")
        if len(v) > schema.get("maxLength", float("inf")):
            out.append(f"{where}: must have at most {schema['maxLength']} characters, got {len(v)}")
        if "pattern" in schema and not re.search(schema["pattern"], v):
            out.append(f"{where}: {v[:60]!r} does not match {schema['pattern']}")
    if _is_type(v, "number"):
        if v < schema.get("minimum", float("-inf")):
            out.append(f"{where}: must be >= {schema['minimum']}, got {v}")
        if v > schema.get("maximum", float("inf")):
            out.append(f"{where}: must be <= {schema['maximum']}, got {v}")
    if isinstance(v, dict):
        for key in schema.get("required", []):
            if key not in v:
                out.append(f"{_path(path, key)}: required field is missing")
        props = schema.get("properties", {})
        for key, sub in v.items():
            if key in props:
                _check(sub, props[key], _path(path, key), out)
            elif schema.get("additionalProperties", True) is False:
                out.append(f"{_path(path, key)}: unknown field (allowed: {', '.join(props)})")
    if isinstance(v, list):
        if len(v) < schema.get("minItems", 0):
            out.append(f"{where}: must have at least {schema['minItems']} items, got {len(v)}")
        if len(v) > schema.get("maxItems", float("inf")):
            out.append(f"{where}: must have at most {schema['maxItems']} items, got {len(v)}")
        if "items" in schema:
            for i, item in enumerate(v):
                _check(item, schema["items"], _path(path, i), out)


_SCHEMA: dict | None = None


def schema() -> dict:
    """The JSON Schema of a description set (schema.json)."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return _SCHEMA


def _norm_sentence(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower()).rstrip(".")


def validation_errors(data: Any) -> list[str]:
    """Every problem of a description-set dict, each as 'field: problem' (empty when valid)."""
    out: list[str] = []
    _check(data, schema(), "", out)
    if not isinstance(data, dict) or not isinstance(data.get("types"), list):
        return out
    types = data["types"]
    k, m = data.get("k"), data.get("m")
    if _is_type(k, "integer") and len(types) != k:
        out.append(f"types: has {len(types)} types, but k is {k}")
    names: dict[str, int] = {}
    seen: dict[str, str] = {}
    for i, t in enumerate(types):
        if not isinstance(t, dict):
            continue
        name = t.get("name")
        if isinstance(name, str):
            if not name.strip():
                out.append(f"types[{i}].name: is blank")
            key = name.strip().lower()
            if key in names:
                out.append(f"types[{i}].name: {name!r} repeats types[{names[key]}].name")
            names.setdefault(key, i)
        descs = t.get("descriptions")
        if not isinstance(descs, list):
            continue
        if _is_type(m, "integer") and len(descs) != m:
            out.append(f"types[{i}].descriptions: has {len(descs)} sentences, but m is {m}")
        for j, d in enumerate(descs):
            if not isinstance(d, str):
                continue
            here = f"types[{i}].descriptions[{j}]"
            if not d.strip():
                out.append(f"{here}: is blank")
                continue
            if "\n" in d or "\r" in d:
                out.append(f"{here}: contains a line break (one sentence per string)")
            key = _norm_sentence(d)
            if key in seen:
                out.append(f"{here}: repeats {seen[key]}")
            seen.setdefault(key, here)
    return out


def validate(data: SetLike, source: str | None = None) -> None:
    """Raise DescriptionError naming the file (or `source`) and each bad field; return None if valid.

    `data` is a dict, a DescriptionSet, or the path of a JSON file."""
    if isinstance(data, DescriptionSet):
        data, source = data.to_dict(), source or data.source
    elif isinstance(data, (str, os.PathLike)):
        source = source or str(data)
        data = _read_json(Path(data))
    problems = validation_errors(data)
    if problems:
        raise DescriptionError(source or "description set", problems)


# --- loading ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DescriptionError(str(path), ["file not found"])
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DescriptionError(str(path), [f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"]) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DescriptionError(str(path), [f"unreadable ({type(e).__name__}: {e})"]) from e


def _shipped() -> dict[str, Path]:
    return {p.stem: p for p in sorted(HERE.glob("*.json")) if p.name != "schema.json"}


def list_description_sets() -> list[str]:
    """Names of the description sets shipped with the package (pass one to load_descriptions)."""
    return sorted(_shipped())


def load_descriptions(name_or_path: SetLike) -> DescriptionSet:
    """A validated DescriptionSet from a shipped set's name, a JSON file path, a dict or a set."""
    if isinstance(name_or_path, DescriptionSet):
        return name_or_path
    if isinstance(name_or_path, dict):
        return DescriptionSet.from_dict(name_or_path)
    shipped = _shipped()
    s = os.fspath(name_or_path)
    if s in shipped or s.lower() in shipped:
        path = shipped[s if s in shipped else s.lower()]
    elif Path(s).is_file() or s.endswith(".json") or os.sep in s:
        path = Path(s)
    else:
        raise DescriptionError(s, [f"not a shipped description set nor a file (shipped: {', '.join(shipped)})"])
    return DescriptionSet.from_dict(_read_json(path), source=str(path))


def save_descriptions(data: Union[DescriptionSet, dict], path: str | os.PathLike) -> Path:
    """Validate and write a description set as pretty JSON (atomically)."""
    d = data.to_dict() if isinstance(data, DescriptionSet) else data
    path = Path(path)
    validate(d, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(d), encoding="utf-8")
    os.replace(tmp, path)
    return path


def dumps(d: dict) -> str:
    return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


def description_set_hash(data: SetLike) -> str:
    """Content hash of a set (16 hex digits): sha256 of its types' names and sentences, in order.

    Metadata (generator, date, version, cohort wording) does not change it; any change to a type
    name or a sentence, or to their order, does. It keys the text-prototype cache."""
    if not isinstance(data, DescriptionSet):
        data = load_descriptions(data)
    content = [[t.name, list(t.descriptions)] for t in data.types]
    blob = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(b"proalign-descriptions-v1\n" + blob).hexdigest()[:16]


def iter_sets() -> Iterable[DescriptionSet]:
    """Every shipped set, loaded and validated."""
    for name in list_description_sets():
        yield load_descriptions(name)


__all__ = ["DescriptionError", "DescriptionSet", "DescriptionType", "description_set_hash", "dumps", "iter_sets",
           "list_description_sets", "load_descriptions", "save_descriptions", "schema", "validate",
           "validation_errors"]
