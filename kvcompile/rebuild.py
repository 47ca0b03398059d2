"""Rebuilding a pack: what can be reused from a previous one, and guarding the output.

A segment is reused when its content key (:func:`kvcompile.builder.segment_keys`) is
found in the previous pack: same document, model, recipe, options and context. Nothing
here loads the model, so ``build --check`` and ``--dry-run`` are cheap.

The previous pack is untrusted input like any other. Its key proves nothing by itself
(anyone can copy a key next to other rows), so a segment is reused only when the pack
validates in full (:class:`~kvcompile.pack.Pack`) and the key agrees with what the pack
says of itself: the model, the document's path and hash, and (once tokenized) its length
and the model's shape. A pack that contradicts itself is not reused at all; the build
compiles everything and says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .corpus import Document
from .errors import OptionError, PackError
from .pack import Pack, load


@dataclass
class RebuildPlan:
    """Per document of the new corpus: ``reuse[d]`` = the previous pack's segment index, if reusable."""

    documents: list[Document]
    keys: list[str]
    reuse: dict[int, int] = field(default_factory=dict)
    pack: Pack | None = field(default=None, repr=False)  # the previous pack, when one was read
    previous_paths: list[str] = field(default_factory=list)
    note: str | None = None  # why nothing could be reused, when so
    warning: bool = False  # the note is about a previous pack that could not be trusted
    caveat: str | None = None  # what the plan cannot know before the build (corpus-wide budgets)

    def distrust(self, reason: str) -> None:
        """Reuse nothing from the previous pack: it is unreadable or contradicts itself."""
        path = self.previous
        self.reuse, self.pack, self.previous_paths, self.warning = {}, None, [], True
        self.note = f"previous pack {path} cannot be trusted ({reason})"

    def check_tokens(self, doc_tokens: dict[int, int], shape: dict) -> None:
        """Before a reused segment is copied: its token span must equal the document's new
        length (``doc_tokens``: by document index, at least those reused), and the previous
        pack's model shape (``num_layers``, ``num_kv_heads``, ``head_dim``) the model's.
        Otherwise nothing is reused."""
        if not self.reuse:  # nothing taken from it (another model, say): nothing to doubt
            return
        old = self.pack.model
        for k, v in shape.items():
            if old[k] != v:
                return self.distrust(f"its model.{k} is {old[k]}, the model's is {v}")
        for d, j in self.reuse.items():
            lo, hi = self.pack.header["segments"][j]["tokens"]
            if hi - lo != doc_tokens[d]:
                return self.distrust(f"segment {j} spans {hi - lo} tokens, but {self.documents[d].path} has "
                                     f"{doc_tokens[d]}")

    def match(self, keys: list[str], fingerprint: str | None = None) -> None:
        """Reuse the previous pack's segments whose keys are among ``keys`` (the new segments'
        keys, which replace the plan's): every one, or none if the pack contradicts itself."""
        self.keys, self.reuse = keys, {}
        if self.pack is None:
            return
        manifest = self.pack.manifest()
        where = {seg["key"]: j for j, seg in enumerate(self.pack.header["segments"])}
        self.reuse = {i: where[k] for i, k in enumerate(keys) if k in where}
        if self.reuse and fingerprint is not None and self.pack.model["fingerprint"] != fingerprint:
            return self.distrust("its segment keys are this model's, its fingerprint is another's")
        for i, j in self.reuse.items():
            seg = self.pack.header["segments"][j]
            docs = [manifest[d] for d in seg["documents"]]
            if [(m["path"], m["sha256"]) for m in docs] != [(self.documents[i].path, self.documents[i].sha256)]:
                return self.distrust(f"segment {j}'s key is that of {self.documents[i].path}, "
                                     "its manifest says otherwise")

    def previous_budgets(self) -> list[int | None]:
        """Per new document, the budget its unchanged segment had in the previous pack (same
        path and content), or ``None``: the guess a plan makes before budgets are surveyed."""
        if self.pack is None:
            return [None] * len(self.documents)
        manifest, segments = self.pack.manifest(), self.pack.header["segments"]
        known = {(m["path"], m["sha256"]): segments[m["segment"]].get("budget") for m in manifest}
        return [known.get((d.path, d.sha256)) for d in self.documents]

    @property
    def previous(self) -> str | None:
        """Path of the previous pack, when one was read."""
        return self.pack.path if self.pack is not None else None

    def status(self) -> list[tuple[str, str]]:
        """``(path, reused | recompiled | added)`` per document, then ``(path, dropped)``."""
        old = set(self.previous_paths)
        rows = [(d.path, "reused" if i in self.reuse else "recompiled" if d.path in old else "added")
                for i, d in enumerate(self.documents)]
        new = {d.path for d in self.documents}
        return rows + [(p, "dropped") for p in self.previous_paths if p not in new]

    def counts(self) -> dict[str, int]:
        c = {"reused": 0, "recompiled": 0, "added": 0, "dropped": 0}
        for _, s in self.status():
            c[s] += 1
        return c

    @property
    def up_to_date(self) -> bool:
        """The previous pack is exactly what a build would write (every segment reused in place)."""
        return (self.previous is not None and len(self.previous_paths) == len(self.documents)
                and all(self.reuse.get(i) == i for i in range(len(self.documents))))


def plan_rebuild(documents: list[Document], keys: list[str], previous: str | os.PathLike | None,
                 fingerprint: str | None = None) -> RebuildPlan:
    """Match the new segments' keys against the pack at ``previous`` (if it exists, validates
    and agrees with itself), built with the model of ``fingerprint``."""
    plan = RebuildPlan(documents, keys)
    if previous is None or not Path(previous).exists():
        plan.note = "no previous pack"
        return plan
    try:
        old = load(previous)
    except PackError as e:
        plan.note, plan.warning = f"previous pack unusable ({e})", True
        return plan
    plan.pack = old
    plan.previous_paths = [m["path"] for m in old.manifest()]
    plan.match(keys, fingerprint)
    return plan


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``output`` for the whole build; refuse if another build holds it.

    ``flock`` locks die with their process, so a killed build never leaves a stale lock.
    Holding it, stale temporary files of killed builds (``.NAME.*.tmp``) are removed.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    lock_path = output.with_name(f".{output.name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OptionError(f"cannot create the lock {lock_path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OptionError(f"another build is writing {output} (it holds {lock_path}): "
                              "wait for it to finish") from None
        remove_stale_temporaries(output)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Delete ``.NAME.*.tmp`` files left beside ``output`` by killed builds (call with the lock held)."""
    removed = []
    for tmp in output.parent.glob(f".{output.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
