"""``build``: corpus files in, a verified ``.kvpack`` out. The whole compile, in order."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .builder import BuildOptions, check_fits, compile_corpus, document_ids, segment_keys, tokenize
from .corpus import MAX_FILE_BYTES, Skipped, read_corpus
from .models import LoadedModel, ModelIdentity
from .rebuild import RebuildPlan, output_lock, plan_rebuild
from .recipe import Recipe
from .writer import check_output, pack_tensors_and_header, write_pack


@dataclass
class BuildReport:
    output: str
    documents: int
    skipped: list[Skipped]
    cache_tokens: int
    kept_tokens: int  # summed over layers and KV heads
    full_tokens: int  # cache_tokens x layers x KV heads
    bytes: int
    plan: RebuildPlan
    seconds: dict[str, float] = field(default_factory=dict)


def plan(paths: Sequence[str | os.PathLike], model: ModelIdentity | LoadedModel, recipe: Recipe,
         options: BuildOptions, previous: str | os.PathLike | None, text_field: str = "text",
         max_file_bytes: int = MAX_FILE_BYTES) -> tuple[RebuildPlan, list[Skipped]]:
    """Read the corpus and match it against ``previous``: what a build would reuse.

    ``model`` needs no weights (``--check``, ``--dry-run``): its fingerprint keys the
    segments, and its tokenizer and shape check that every reused segment is what the
    previous pack claims it is (:meth:`RebuildPlan.check_tokens`).
    """
    rebuild, skipped = _match(paths, model, recipe, options, previous, text_field, max_file_bytes)
    _verify(rebuild, model, lambda d: len(document_ids(model.tokenizer, rebuild.documents[d])))
    return rebuild, skipped


def _match(paths, model, recipe, options, previous, text_field, max_file_bytes) -> tuple[RebuildPlan, list[Skipped]]:
    """The corpus, and the previous pack's segments whose keys match (not yet verified)."""
    options.validate()
    documents, skipped = read_corpus(paths, text_field=text_field, max_file_bytes=max_file_bytes)
    keys = segment_keys(documents, model.fingerprint, recipe, options)
    return plan_rebuild(documents, keys, previous, model.fingerprint), skipped


def _verify(rebuild: RebuildPlan, model: ModelIdentity | LoadedModel, tokens: Callable[[int], int]) -> None:
    """Keep the matched segments only if spans and shape are the model's (``tokens(d)``:
    document ``d``'s token count, asked for the reused documents only)."""
    cap = model.capability
    rebuild.check_tokens({d: tokens(d) for d in rebuild.reuse},
                         {"num_layers": cap.num_layers, "num_kv_heads": cap.num_kv_heads, "head_dim": cap.head_dim})


def build(
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    lm: LoadedModel,
    recipe: Recipe,
    options: BuildOptions,
    text_field: str = "text",
    max_file_bytes: int = MAX_FILE_BYTES,
    progress: Callable[[str, int, int], None] | None = None,
    reuse: str | os.PathLike | None = None,
) -> BuildReport:
    """Compile the corpus at ``paths`` into ``output`` (written atomically, under a lock).

    Segments whose content key is in the previous pack (``reuse``, by default ``output``
    itself when it exists) are copied from it instead of compiled. ``progress(stage,
    done, total)`` is called during prefill (tokens) and writing.
    """
    options.validate()
    lm.capability.check_context(options.context)
    check_output(output)
    with output_lock(output):
        t0 = time.perf_counter()
        rebuild, skipped = _match(paths, lm, recipe, options, reuse if reuse is not None else output,
                                  text_field, max_file_bytes)
        documents = rebuild.documents
        tk = tokenize(documents, recipe, lm)
        check_fits(tk, options, lm)
        _verify(rebuild, lm, lambda d: len(tk.doc_ids[d]))  # the build's own tokens: no second pass
        reused = rebuild.pack.segments(sorted(set(rebuild.reuse.values()))) if rebuild.reuse else {}
        t1 = time.perf_counter()
        report = (lambda n: progress("prefill", n, tk.total)) if progress else None
        compiled = compile_corpus(tk, options, lm, progress=report,
                                  reused={d: reused[j] for d, j in rebuild.reuse.items()})
        t2 = time.perf_counter()
        tensors, header = pack_tensors_and_header(compiled, documents, lm, recipe, options)
        size = write_pack(output, tensors, header)
        if progress:
            progress("write", 1, 1)
        t3 = time.perf_counter()
    return BuildReport(
        output=os.fspath(Path(output)),
        documents=len(documents),
        skipped=skipped,
        cache_tokens=tk.total,
        kept_tokens=sum(map(sum, header["cache"]["kept"])),
        full_tokens=tk.total * lm.capability.num_layers * lm.capability.num_kv_heads,
        bytes=size,
        plan=rebuild,
        seconds={"read": t1 - t0, **compiled.seconds, "compile": t2 - t1, "write": t3 - t2, "total": t3 - t0},
    )
