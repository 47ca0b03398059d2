"""``build``: corpus files in, a verified ``.kvpack`` out. The whole compile, in order."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from .builder import BuildOptions, check_fits, compile_corpus, document_ids, fits, plan_budgets, segment_keys, tokenize
from .corpus import MAX_FILE_BYTES, Skipped, read_corpus
from .kvmix import layer_bits, recorded_bits
from .memory import PeakMemory
from .models import LoadedModel, ModelIdentity
from .probes import AutoProbes, Probing, check_scorer
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
    streamed: bool = False  # compiled at compacted positions (builder.BuildOptions.stream)
    peak_memory: int | None = None  # bytes the build added at its peak (memory.PeakMemory), None where unknown
    probes: AutoProbes | None = None  # with auto probes: those written from the corpus (or reused)


def plan(paths: Sequence[str | os.PathLike], model: ModelIdentity | LoadedModel, recipe: Recipe,
         options: BuildOptions, previous: str | os.PathLike | None, text_field: str = "text",
         max_file_bytes: int = MAX_FILE_BYTES, auto_probes: int = 0) -> tuple[RebuildPlan, list[Skipped]]:
    """Read the corpus and match it against ``previous``: what a build would reuse.

    ``model`` needs no weights (``--check``, ``--dry-run``): its fingerprint keys the
    segments, and its tokenizer and shape check that every reused segment is what the
    previous pack claims it is (:meth:`RebuildPlan.check_tokens`). With ``auto_probes``
    the probes are taken from ``previous``; if one would have to be written again (its
    source text changed), the task prompt is not known without the weights and nothing
    counts as reusable.
    """
    probing = Probing(auto_probes, model, previous, write=False) if auto_probes else None
    rebuild, skipped, _ = _match(paths, model, recipe, options, previous, text_field, max_file_bytes, probing)
    if probing is not None and probing.probes is None:
        rebuild.reuse = {}
        rebuild.caveat = ("some auto probes must be written again (their chunk, the recipe's examples or the model "
                          "changed), which changes the task prompt: every document is stale")
    _verify(rebuild, model, lambda d: len(document_ids(model.tokenizer, rebuild.documents[d])))
    return rebuild, skipped


def _match(paths, model, recipe, options, previous, text_field, max_file_bytes,
           probing: Probing | None = None) -> tuple[RebuildPlan, list[Skipped], BuildOptions]:
    """The corpus, the previous pack's segments whose keys match (not yet verified), and the
    options with their automatic choices made (:meth:`BuildOptions.resolved`).

    Under ``corpus`` budgets the keys hold budgets that only a survey with the model's
    weights can tell; until then each unchanged document is assumed to keep its previous
    budget (:meth:`RebuildPlan.previous_budgets`), which is exact when nothing changed.
    Likewise kvmix's bits per layer, which a profile with the weights decides.
    """
    options.validate()
    documents, skipped = read_corpus(paths, text_field=text_field, max_file_bytes=max_file_bytes)
    if probing is not None:  # the probes join the recipe before any key is computed
        check_scorer(options.make_scorer())
        recipe = probing.resolve(documents, recipe)
    # (an empty corpus is refused once tokenised: check_fits)
    options = options.resolved(not documents or fits(tokenize(documents, recipe, model), model.max_positions))

    def keys_for(options, budgets=None):
        return segment_keys(documents, model.fingerprint, recipe, options, budgets)

    corpus_budgets = options.surveyed
    rebuild = plan_rebuild(documents, keys_for(options, [None] * len(documents) if corpus_budgets else None),
                           previous, model.fingerprint)
    caveats, assumed = [], options
    if options.quant == "kvmix" and options.layer_bits is None:
        # The bits come from a profile of the corpus; until the build profiles it again,
        # assume the previous pack's (exact when nothing changed).
        assumed = replace(options, layer_bits=recorded_bits(rebuild.pack.header) if rebuild.pack else None)
        caveats.append("kvmix profiles the corpus again: if a layer's bits move, every document is recompiled")
    if corpus_budgets:
        caveats.append("budgets are shared by the whole corpus: the build surveys it again and also recompiles "
                       "documents whose budget moves")
    if caveats:
        rebuild.match(keys_for(assumed, rebuild.previous_budgets() if corpus_budgets else None), model.fingerprint)
        if not rebuild.up_to_date:
            rebuild.caveat = "; ".join(caveats)
    return rebuild, skipped, options


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
    auto_probes: int = 0,
) -> BuildReport:
    """Compile the corpus at ``paths`` into ``output`` (written atomically, under a lock).

    Segments whose content key is in the previous pack (``reuse``, by default ``output``
    itself when it exists) are copied from it instead of compiled. ``progress(stage,
    done, total)`` is called during prefill (tokens) and writing. ``auto_probes``: write
    that many sample questions from the corpus with the model and add them to the
    recipe's probes (:mod:`kvcompile.probes`; those the previous pack recorded for
    unchanged text are reused).
    """
    options.validate()
    lm.capability.check_context(options.context)
    check_output(output)
    with output_lock(output), PeakMemory(lm.device) as memory:
        t0 = time.perf_counter()
        previous = reuse if reuse is not None else output
        probing = Probing(auto_probes, lm, previous, progress=progress and (
            lambda done, total: progress("auto probes", done, total))) if auto_probes else None
        rebuild, skipped, options = _match(paths, lm, recipe, options, previous, text_field, max_file_bytes,
                                           probing)
        recipe = probing.recipe if probing is not None else recipe
        documents = rebuild.documents
        tk = tokenize(documents, recipe, lm)
        check_fits(tk, options, lm)
        rematch = False
        if options.quant == "kvmix" and options.layer_bits is None:
            options = replace(options, layer_bits=layer_bits(tk, lm))
            rematch = True
        if options.surveyed and rebuild.up_to_date:  # the same corpus: the survey would agree
            budgets, survey_s = rebuild.previous_budgets(), 0.0
        else:
            budgets, survey_s = plan_budgets(tk, options, lm)
            rematch = rematch or options.surveyed
        if rematch:
            rebuild.match(segment_keys(documents, lm.fingerprint, recipe, options, budgets), lm.fingerprint)
            rebuild.caveat = None  # the survey and the profile have spoken
        _verify(rebuild, lm, lambda d: len(tk.doc_ids[d]))  # the build's own tokens: no second pass
        reused = rebuild.pack.segments(sorted(set(rebuild.reuse.values()))) if rebuild.reuse else {}
        t1 = time.perf_counter()

        def report(tokens: int, docs: int) -> None:
            progress("prefill", tokens, tk.total)
            progress("documents", docs, len(documents))

        compiled = compile_corpus(tk, options, lm, budgets, progress=report if progress else None,
                                  reused={d: reused[j] for d, j in rebuild.reuse.items()})
        compiled.seconds["survey"] = survey_s
        t2 = time.perf_counter()
        tensors, header = pack_tensors_and_header(compiled, documents, lm, recipe, options,
                                                  auto_probes=probing and probing.probes,
                                                  reused=(rebuild.pack, rebuild.reuse) if rebuild.reuse else None)
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
        probes=probing and probing.probes,
        streamed=bool(options.stream),
        peak_memory=memory.peak,
        seconds={"read": t1 - t0 - survey_s, **compiled.seconds, "compile": t2 - t1, "write": t3 - t2,
                 "total": t3 - t0},
    )
