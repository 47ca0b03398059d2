"""``merge``: packs of disjoint corpora written as one pack, with neither the model nor the text.

A pack compiled in ``independent`` context holds segments that depend on their own
document alone (each was compiled right after the framing), so the pack of a union is the
packs' segments one after another: the first pack's framing and segments, then each later
pack's segments, moved to where its corpus now starts. Encoded blocks are copied as they
are (codecs never group across a segment, :mod:`kvcompile.codecs`), positions are
shifted, the manifests and segment lists are concatenated, and the segment keys are kept:
the result is the pack a clean ``independent`` build of the union writes, and a rebuild of
the union from it reuses every segment. The segment indexes (:mod:`kvcompile.retrieval`)
are concatenated too; a merge with a pack written before them has none.

What would make that untrue is refused: other models, recipes, framings or options,
``chained`` context (a segment depends on the documents before it), and options whose
segments depend on the whole corpus (``--budget``, ``--budgets corpus``, RVQ's
codebooks, streamed ``independent`` segments' shares of the window).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from . import __version__
from .codecs import copy_runs
from .container import DTYPES
from .errors import OptionError
from .format import FORMAT_VERSION, encode_positions, zstd_frame
from .pack import Pack, check_same_model, load
from .rebuild import output_lock
from .writer import check_output, index_tensor, manifest_tensor, seal, write_pack


@dataclass
class MergeReport:
    output: str
    packs: int
    documents: int
    tokens: int  # corpus tokens
    bytes: int


def merge(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> MergeReport:
    """Write the packs at ``paths``, in order, as one pack at ``output`` (atomically, under the
    build lock). Raises OptionError / ModelMismatchError for packs that cannot be merged."""
    if len(paths) < 2:
        raise OptionError("give at least two packs to merge")
    check_output(output)
    packs = [load(p) for p in paths]
    _check_mergeable(packs)
    tensors, header = _merged(packs)
    with output_lock(output):
        size = write_pack(output, tensors, header)
    return MergeReport(os.fspath(output), len(packs), header["corpus"]["documents"], header["corpus"]["tokens"], size)


def _check_mergeable(packs: list[Pack]) -> None:
    check_same_model(packs, "merge")
    first = packs[0]
    for p in packs[1:]:
        for section in ("recipe", "framing", "options"):
            if p.header[section] != first.header[section]:
                key = next(k for k in sorted(set(p.header[section]) | set(first.header[section]))
                           if p.header[section].get(k) != first.header[section].get(k))
                raise OptionError(f"{p.path} and {first.path} differ in {section}.{key} "
                                  f"({p.header[section].get(key)!r} and {first.header[section].get(key)!r}): "
                                  "merge packs built with the same recipe and options")
    o = first.header["options"]
    why = None
    if o["context"] != "independent":
        why = (f"was built with --context {o['context']}, so each segment depends on other documents: build the "
               "packs with --context independent")
    elif o["budget"] is not None:
        why = "was built with --budget, whose share per document depends on the whole corpus: build with --ratio"
    elif o["selection"].get("budgets") == "corpus":
        why = "was built with --budgets corpus, whose budgets depend on the whole corpus: build with --budgets document"
    elif o.get("quant", {}).get("name") == "rvq":
        why = "is quantised with rvq, whose codebooks are learned on the whole corpus: rebuild the union"
    elif o.get("stream"):
        why = ("was streamed in independent context, where each document's room depends on the whole corpus: "
               "rebuild the union")
    if why:
        raise OptionError(f"cannot merge {first.path}: it {why}")
    seen: dict[str, str] = {}
    for p in packs:
        for d in p.manifest():
            if d["path"] in seen:
                raise OptionError(f"document {d['path']!r} is in both {seen[d['path']]} and {p.path}: a merged "
                                  "corpus holds each path once")
            seen[d["path"]] = str(p.path)
    tokens = len(first.framing.prefix_ids) + sum(p.header["corpus"]["tokens"] for p in packs)
    if tokens > first.model["max_positions"]:
        raise OptionError(f"the merged corpus would take {tokens} positions, more than the model's window of "
                          f"{first.model['max_positions']}: build the union with --stream instead")


def _merged(packs: list[Pack]) -> tuple[dict[str, torch.Tensor], dict]:
    """The merged pack's tensors and header."""
    first = packs[0]
    n_prefix = len(first.framing.prefix_ids)
    heads, head_dim = first.model["num_kv_heads"], first.model["head_dim"]
    shifts, at = [], 0  # corpus tokens before each pack
    for p in packs:
        shifts.append(at)
        at += p.header["corpus"]["tokens"]
    bins = [len(p.header["segments"]) + 1 for p in packs]  # runs per head: the framing, then each segment
    total_bins = 1 + sum(b - 1 for b in bins)

    tensors: dict[str, torch.Tensor] = {}
    kept, positions, layers = [], [], []
    for li in range(len(first.kept)):
        # Rows per (head, bin) of the union: the first pack's framing, then every pack's segments.
        runs = []
        for h in range(heads):
            runs.append(first.runs(li)[h * bins[0]])
            for p, b in zip(packs, bins):
                runs += p.runs(li)[h * b + 1 : (h + 1) * b]
        entry = {}
        for part in ("keys", "values"):
            codec, _, _ = first.encoded(li, part)
            named = {role: torch.empty(shape, dtype=DTYPES[dtype][0])
                     for role, (dtype, shape) in codec.layout(runs, head_dim).items()}
            offset = 0  # the union's bin of each pack's first segment, less one
            for k, (p, b) in enumerate(zip(packs, bins)):
                _, old, old_runs = p.encoded(li, part)
                lo = 0 if k == 0 else 1  # the first pack gives the framing too
                copy_runs(codec, named, runs, old, old_runs,
                          [(h * total_bins + offset + j, h * b + j) for h in range(heads) for j in range(lo, b)])
                offset += b - 1
            names = first.layout["layers"][li][part]["tensors"]
            tensors.update({names[role]: t for role, t in named.items()})
            entry[part] = first.layout["layers"][li][part]
        layers.append(entry)
        per_head = [[] for _ in range(heads)]
        for p, shift in zip(packs, shifts):
            for h, rows in enumerate(torch.split(p.positions[li], p.kept[li])):
                per_head[h].append(rows if p is first else rows[rows >= n_prefix] + shift)
        cols = [torch.cat(h) for h in per_head]
        kept.append([len(c) for c in cols])
        positions.append(torch.cat(cols))
    tensors["positions"] = zstd_frame(encode_positions(positions, kept))

    manifest, segments = [], []
    for p, shift in zip(packs, shifts):
        base = len(manifest)
        for d in p.manifest():
            manifest.append({**d, "segment": d["segment"] + len(segments)})
        segments += [{**s, "documents": [base + i for i in s["documents"]],
                      "tokens": [t + shift for t in s["tokens"]]} for s in p.header["segments"]]
    data = manifest_tensor(manifest, tensors)
    index = [t for p in packs for t in p.segment_terms()] if all("index" in p.header["corpus"] for p in packs) else None
    corpus_tokens = at
    header = {**first.header, "version": list(FORMAT_VERSION), "generator": f"kvcompile {__version__}",
              "corpus": {**{k: v for k, v in first.header["corpus"].items() if k != "index"},
                         "documents": len(manifest), "tokens": corpus_tokens,
                         "manifest_sha256": hashlib.sha256(data).hexdigest(), "manifest_size": len(data),
                         **({"index": index_tensor(index, tensors)} if index is not None else {})},
              "cache": {**first.layout, "tokens": n_prefix + corpus_tokens,
                        "question_position": n_prefix + corpus_tokens, "kept": kept, "layers": layers},
              "segments": segments}
    return tensors, seal(header, tensors)
