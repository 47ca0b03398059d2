"""Recipes: what a pack will be asked, written down before it is built.

A recipe is a small TOML file: a task description, a few example questions ("probes")
and default build options. The description and probes are placed where a question
would stand while the corpus is scored, so they steer which tokens are kept; the TOML
text itself is stored in every pack.

Schema::

    name = "faq"                  # required; a builtin's name equals its file name
    description = \"\"\"...\"\"\"       # required: what later questions look like and
                                  # which facts in the documents they need
    probes = ["How do I ...?"]    # optional: example questions, generic to the task
    [options]                     # optional defaults for build options, any subset of:
    ratio = 0.25                  # share of tokens kept, 0 < ratio <= 1
    budget = 2048                 # tokens kept, > 0 (overrides ratio)
    chunk_size = 2048             # tokens per prefill chunk, >= 16
    sinks = 4                     # first tokens always kept, >= 0

Any other key is an error, so a typo ("probe = [...]") cannot pass silently. Builtin
recipes live in the sub-package ``kvcompile.recipes`` (the top-level ``recipes/``
folder): ``builtin_recipes()`` lists them and ``load_recipe("faq")`` loads one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import RecipeError

DEFAULT_RECIPE = "qa"

_TOP_KEYS = ("name", "description", "probes", "options")
_OPTION_KEYS = ("ratio", "budget", "chunk_size", "sinks")


@dataclass(frozen=True)
class Recipe:
    """A task description, probe questions and default build options.

    ``source`` is the TOML text exactly as read; it goes into every pack. Probes added
    with ``with_probes`` are not in ``source``, only in ``probes`` and ``task_prompt()``.
    """

    name: str
    description: str
    probes: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def with_probes(self, probes: Sequence[str]) -> Recipe:
        """A copy with ``probes`` added after the recipe's own (stripped, deduplicated)."""
        return replace(self, probes=_dedup([*self.probes, *probes]))

    def task_prompt(self) -> str:
        """The text placed where a question would stand when scoring the corpus."""
        prompt = self.description.strip()
        if self.probes:
            prompt += "\n\nExample questions:\n" + "\n".join(f"- {p}" for p in self.probes)
        return prompt


def builtin_recipes() -> list[str]:
    """The names of the recipes shipped with kvcompile, sorted."""
    return sorted(p.name[: -len(".toml")] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def load_recipe(name: str | None = None, file: str | os.PathLike | None = None) -> Recipe:
    """Load a builtin recipe by ``name``, or a recipe from a TOML ``file``.

    Pass exactly one of them. A ``name`` that is not a builtin but ends in ``.toml`` is
    read as a file, so a single ``--recipe`` option can take either.
    """
    if name is not None and file is not None:
        raise RecipeError(f"both a recipe name ('{name}') and a recipe file ('{file}') given: pass one of them")
    if name is None and file is None:
        raise RecipeError(f"no recipe given: pass a name ({', '.join(builtin_recipes())}) or a .toml file")
    if name is not None:
        available = builtin_recipes()
        if name in available:
            resource = _builtin_dir() / f"{name}.toml"
            return _parse(resource.read_bytes().decode("utf-8-sig"), f"builtin recipe '{name}'", builtin=name)
        if name.lower().endswith(".toml"):
            file = name
        else:
            raise RecipeError(
                f"unknown recipe '{name}': choose one of {', '.join(available)}, or pass a .toml file"
            )
    path = Path(file)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe file '{file}' does not exist: pass a .toml recipe or a builtin name") from None
    except OSError as e:
        raise RecipeError(f"recipe file '{file}' cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe file '{file}' is not valid UTF-8 (at byte {e.start}): save it as UTF-8") from None
    return _parse(text, f"recipe file '{file}'")


def read_probes(file: str | os.PathLike) -> list[str]:
    """Read probe questions from a file.

    Plain text: one question per line; blank lines and lines starting with ``#`` are
    ignored. ``.jsonl``: one JSON object per line with a ``"question"`` field (other
    fields, such as answers, are ignored).
    """
    path = Path(file)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise RecipeError(f"probes file '{file}' does not exist") from None
    except OSError as e:
        raise RecipeError(f"probes file '{file}' cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"probes file '{file}' is not valid UTF-8 (at byte {e.start}): save it as UTF-8") from None

    probes: list[str] = []
    jsonl = path.suffix.lower() == ".jsonl"
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        if not jsonl:
            probes.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"probes file '{file}' line {lineno} is not valid JSON ({e.msg})") from None
        question = record.get("question") if isinstance(record, dict) else None
        if not isinstance(question, str):
            raise RecipeError(f'probes file \'{file}\' line {lineno} has no "question" string field')
        if question.strip():
            probes.append(question.strip())

    if not probes:
        raise RecipeError(
            f"probes file '{file}' has no questions: write one question per line"
            + (' or one {"question": ...} object per line' if jsonl else "")
        )
    return probes


# --- parsing and validation --------------------------------------------------------


def _builtin_dir():
    from importlib.resources import files

    try:
        return files("kvcompile.recipes")
    except ModuleNotFoundError:
        # Running from a source checkout that is not installed: the setuptools mapping
        # of recipes/ to kvcompile.recipes does not exist yet, the folder does.
        return Path(__file__).resolve().parent.parent / "recipes"


def _parse(text: str, where: str, builtin: str | None = None) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # The message carries the place: "... (at line 3, column 7)".
        raise RecipeError(f"{where} is not valid TOML: {e}") from None

    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise RecipeError(f"{where} has unknown key '{unknown[0]}': allowed keys are {', '.join(_TOP_KEYS)}")
    for key in ("name", "description"):
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            what = "is missing" if key not in data else "must be a non-empty string"
            raise RecipeError(f"{where}: '{key}' {what}")
    name = data["name"].strip()
    if builtin is not None and name != builtin:
        raise RecipeError(f"{where} says name = '{name}': a builtin's name must match its file name")

    probes = data.get("probes", [])
    if not isinstance(probes, list) or not all(isinstance(p, str) for p in probes):
        raise RecipeError(f"{where}: 'probes' must be a list of strings")

    return Recipe(
        name=name,
        description=data["description"].strip(),
        probes=_dedup(probes),
        options=_options(data.get("options", {}), where),
        source=text,
    )


def _options(options: Any, where: str) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise RecipeError(f"{where}: 'options' must be a table ([options])")
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in _OPTION_KEYS:
            raise RecipeError(f"{where} has unknown option '{key}': allowed options are {', '.join(_OPTION_KEYS)}")
        # bool is an int in Python; "ratio = true" is a mistake, not 1.
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        integer = isinstance(value, int) and not isinstance(value, bool)
        if key == "ratio":
            ok, rule = number and 0 < value <= 1, "a number with 0 < ratio <= 1"
            value = float(value) if ok else value
        elif key == "budget":
            ok, rule = integer and value > 0, "an integer > 0"
        elif key == "chunk_size":
            ok, rule = integer and value >= 16, "an integer >= 16"
        else:
            ok, rule = integer and value >= 0, "an integer >= 0"
        if not ok:
            raise RecipeError(f"{where}: option '{key}' = {value!r} must be {rule}")
        checked[key] = value
    return checked


def _dedup(probes: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for p in probes:
        p = p.strip()
        if p:
            seen.setdefault(p, None)
    return tuple(seen)
