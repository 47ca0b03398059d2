"""Which methods an evaluation runs, built from packs, a corpus and the baselines asked for."""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

from ..builder import tokenize
from ..corpus import Document
from ..errors import CorpusError, OptionError
from ..models import LoadedModel
from ..recipe import Recipe
from .methods import Method, RagMethod, SelectMethod, pack_method, prefill_method

BASELINES = ("full", "rag", "none")


def parse_baselines(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise OptionError(f"unknown baseline {unknown[0]!r}: choose from {', '.join(BASELINES)} (comma-separated)")
    return names


def check_corpus(pack, documents: Sequence[Document]) -> None:
    """Refuse to compare a pack with baselines over another corpus than the one it was built from."""
    built = [m["sha256"] for m in pack.manifest()]
    given = [d.sha256 for d in documents]
    if built != given:
        differ = sum(a != b for a, b in zip(built, given)) + abs(len(built) - len(given))
        raise CorpusError(
            f"{pack.path} was built from another corpus ({len(built)} documents; {differ} differ from the "
            f"{len(given)} given): point --corpus at the documents it was built from, or rebuild the pack"
        )


def plan(lm: LoadedModel, packs: Sequence, documents: Sequence[Document] | None, recipe: Recipe,
         baselines: Sequence[str], rag_chunk: int = 128,
         positions: Sequence[str] = ("auto",), select: float | None = None,
         sparsity: dict | None = None, ape=None) -> list[Callable[[], Method]]:
    """One maker per method: the baselines (``full``, ``none``, and ``rag`` at each pack's
    token budget, unless that budget holds the whole corpus), then the packs, each at every
    mode of ``positions``, with ``sparsity`` each pack decoded sparsely too
    (:meth:`Session.sparsify`'s arguments, ``kvcompile[sparse]``), and with ``select``
    each pack's segments chosen per question within that budget
    (``select``, named ``select@RATIO`` when there are several packs; with ``ape`` also
    ``select[ape]``, the same segments with APE's boundary repair). Makers are called one at
    a time by `evaluate`."""
    if not packs and "rag" in baselines:
        raise OptionError("the rag baseline takes its token budget from a pack: give a pack or --sweep")
    makers: list[Callable[[], Method]] = []
    if baselines and documents is None:
        raise OptionError("the baselines need the corpus: give --corpus DIR (or --dataset), or --baselines ''")
    if documents is not None:
        for pack in packs:
            check_corpus(pack, documents)
        tk = tokenize(list(documents), recipe, lm)
        if "full" in baselines:
            if tk.total >= lm.max_positions:
                raise CorpusError(f"the corpus ({tk.total} tokens) does not fit {lm.name}'s window of "
                                  f"{lm.max_positions}: drop 'full' from --baselines")
            makers.append(partial(prefill_method, lm, tk.framing, tk.stream(), "full", "full", 1.0))
        if "none" in baselines:
            makers.append(partial(prefill_method, lm, tk.framing, tk.prefix_ids, "none", "none", 0.0))
    for pack in packs:
        makers += [partial(pack_method, pack, lm, mode) for mode in positions]
        if sparsity is not None:
            makers.append(partial(pack_method, pack, lm, "auto", sparsity))
        budgets = [round(pack.mean_kept())]
        if select is not None:
            label = "select" if len(packs) == 1 else f"select@{pack.kept_ratio():.2g}"
            makers.append(partial(SelectMethod, pack, lm, select, label))
            if ape is not None:
                makers.append(partial(SelectMethod, pack, lm, select, label.replace("select", "select[ape]"), ape))
            # rag at the selection's budget too (framing included, as in the selection's sessions)
            corpus = pack.header["corpus"]["tokens"]
            budgets.append(round(len(pack.framing.prefix_ids) + (select * corpus if select < 1 else select)))
        if "rag" in baselines:
            # A budget that holds the whole corpus retrieves every chunk: that is the full context.
            for budget in dict.fromkeys(b for b in budgets if b < tk.total):
                ratio = budget / pack.layout["tokens"]
                makers.append(partial(RagMethod, lm, tk.framing, tk.doc_ids, budget, rag_chunk, f"rag@{ratio:.2g}",
                                      ratio))
    return makers
