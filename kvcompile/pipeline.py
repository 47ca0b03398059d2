"""``build``: corpus files in, a verified ``.kvpack`` out. The whole compile, in order."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .builder import BuildOptions, check_fits, compile_corpus, tokenize
from .corpus import Skipped, read_corpus
from .models import LoadedModel
from .pack import check_output, pack_tensors_and_header, write_pack
from .recipe import Recipe


@dataclass
class BuildReport:
    output: str
    documents: int
    skipped: list[Skipped]
    cache_tokens: int
    kept_tokens: int  # summed over layers and KV heads
    full_tokens: int  # cache_tokens x layers x KV heads
    bytes: int
    seconds: dict[str, float] = field(default_factory=dict)


def build(
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    lm: LoadedModel,
    recipe: Recipe,
    options: BuildOptions,
    text_field: str = "text",
    progress: Callable[[str, int, int], None] | None = None,
) -> BuildReport:
    """Compile the corpus at ``paths`` into ``output`` (written atomically).

    ``progress(stage, done, total)`` is called during prefill (tokens) and writing.
    """
    options.validate()
    check_output(output)
    t0 = time.perf_counter()
    documents, skipped = read_corpus(paths, text_field=text_field)
    tk = tokenize(documents, recipe, lm)
    check_fits(tk, options, lm)
    t1 = time.perf_counter()
    report = (lambda n: progress("prefill", n, tk.total)) if progress else None
    compiled = compile_corpus(tk, options, lm, progress=report)
    t2 = time.perf_counter()
    tensors, header = pack_tensors_and_header(compiled, documents, lm, recipe, options)
    size = write_pack(output, tensors, header)
    if progress:
        progress("write", 1, 1)
    t3 = time.perf_counter()
    cfg = lm.config
    return BuildReport(
        output=os.fspath(Path(output)),
        documents=len(documents),
        skipped=skipped,
        cache_tokens=tk.total,
        kept_tokens=sum(map(sum, header["cache"]["kept"])),
        full_tokens=tk.total * cfg.num_hidden_layers * cfg.num_key_value_heads,
        bytes=size,
        seconds={"read": t1 - t0, **compiled.seconds, "compile": t2 - t1, "write": t3 - t2, "total": t3 - t0},
    )
