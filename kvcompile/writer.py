"""Writing packs: the tensors and header of a compiled corpus, written atomically.

docs/kvpack-format.md is the specification. The reader (kvcompile/pack.py) never
imports this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from . import __version__
from .builder import BuildOptions, Compiled, segment_keys
from .codecs import copy_runs
from .container import tensor_bytes, write_container
from .corpus import Document
from .errors import OptionError
from .format import FORMAT_VERSION, encode_positions, zstd_frame
from .kvmix import DEFAULTS as KVMIX
from .models import LoadedModel
from .recipe import Recipe
from .retrieval import RETRIEVER, segment_terms
from .rope import rotaries


def model_identity(lm: LoadedModel) -> dict:
    cfg, cap = lm.config, lm.capability
    return {
        "name": lm.name,
        "fingerprint": lm.fingerprint,
        "architecture": (cfg.architectures or [type(lm.model).__name__])[0],
        "num_layers": cap.num_layers,
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cap.num_kv_heads,
        "head_dim": cap.head_dim,
        "max_positions": lm.max_positions,
        "rope": any(r is not None for r in rotaries(lm.model)),
    }


def pack_tensors_and_header(
    compiled: Compiled, documents: list[Document], lm: LoadedModel, recipe: Recipe, options: BuildOptions,
    auto_probes=None, reused=None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a pack holds: its tensors and its header (format spec, section 2).

    ``auto_probes``: the :class:`~kvcompile.probes.AutoProbes` written from the corpus
    (already among ``recipe``'s probes), recorded as ``recipe.auto_probes`` and
    ``options.auto_probes``. ``reused``: ``(previous pack, {document: its segment})`` for
    the segments copied from a previous pack, whose encoded bytes are copied as they are
    (decoding and encoding again need not give the same bytes).
    """
    tk = compiled.tokenized
    cap = lm.capability
    codecs = options.codecs(cap.num_layers, cap.head_dim)
    starts = [len(tk.prefix_ids)]
    for ids in tk.doc_ids[:-1]:
        starts.append(starts[-1] + len(ids))
    tensors: dict[str, torch.Tensor] = {}
    layer_entries = []
    for li, (layer, part_codecs) in enumerate(zip(compiled.layers, codecs)):
        entry, runs = {}, layer.runs(starts)
        for part, rows, codec in (("keys", layer.keys, part_codecs[0]), ("values", layer.values, part_codecs[1])):
            codec = codec.fit(rows.shape[0], rows.shape[1])
            if reused and not codec.per_run:  # keys cover the whole corpus (segment_keys): all of it was reused
                named = dict(_previous(codec, reused, li, part)[0])
            else:
                named = {role: t.cpu() for role, t in codec.encode(rows, runs).items()}
                if reused:
                    _copy_reused(named, codec, runs, len(starts) + 1, reused, li, part)
            names = {role: f"layers.{li}.{part}" + ("" if role == "data" else f".{role}") for role in named}
            tensors.update({names[role]: t for role, t in named.items()})
            entry[part] = {"codec": codec.name, **codec.params(), "tensors": names}
        layer_entries.append(entry)
    kept = [list(layer.lengths) for layer in compiled.layers]
    tensors["positions"] = zstd_frame(encode_positions([layer.positions for layer in compiled.layers], kept))

    seg_keys = segment_keys(documents, lm.fingerprint, recipe, options, compiled.budgets)
    manifest, segments, offset = [], [], 0
    for i, (d, ids, key, budget) in enumerate(zip(documents, tk.doc_ids, seg_keys, compiled.budgets)):
        manifest.append({"path": d.path, "sha256": d.sha256, "tokens": len(ids), "segment": i})
        segments.append({"documents": [i], "tokens": [offset, offset + len(ids)], "key": key, "budget": budget})
        offset += len(ids)
    manifest_bytes = manifest_tensor(manifest, tensors)
    index = index_tensor(segment_terms([d.text for d in documents]), tensors)
    header = {
        "format": "kvpack",
        "version": list(FORMAT_VERSION),
        "generator": f"kvcompile {__version__}",
        "model": model_identity(lm),
        "recipe": {"name": recipe.name, "source": recipe.source, "task_prompt": recipe.task_prompt(),
                   "probes": list(recipe.probes)},
        "options": {
            "ratio": options.ratio, "budget": options.budget, "chunk_size": options.chunk_size, "sinks": options.sinks,
            "scorer": {"name": options.scorer, **options.make_scorer().params()},
            "selection": {"head_floor": options.head_floor, "budgets": options.budgets,
                          "doc_floor": options.doc_floor},
            "context": options.context,
            "codec": {"name": options.codec},
        },
        "framing": tk.framing.to_json(),
        "corpus": {"documents": len(documents), "tokens": tk.corpus_tokens, "manifest": "manifest",
                   "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                   "manifest_size": len(manifest_bytes), "index": index},
        "cache": {"tokens": tk.total, "question_position": tk.total, "kept": kept, "positions": "positions",
                  "layers": layer_entries},
        "segments": segments,
    }
    if options.quant != "none":
        header["options"]["quant"] = {"name": options.quant, "group": options.quant_group,
                                      **(KVMIX if options.quant == "kvmix" else {}), "outliers": options.outliers}
    if options.stream:
        header["options"]["stream"] = True
    if options.stream_scorer is not None:
        header["options"]["stream_scorer"] = {"name": options.stream_scorer,
                                              **options.first_pass().make_scorer().params()}
    if auto_probes is not None:
        header["recipe"]["auto_probes"] = auto_probes.to_json()
        header["options"]["auto_probes"] = auto_probes.n
    return tensors, seal(header, tensors)


def manifest_tensor(manifest: list[dict], tensors: dict[str, torch.Tensor]) -> bytes:
    """Put the corpus manifest into ``tensors`` (one zstd frame of canonical JSON); its bytes."""
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    tensors["manifest"] = zstd_frame(data)
    return data


def index_tensor(terms: list[dict[str, int]], tensors: dict[str, torch.Tensor]) -> dict:
    """Put the segment index (:func:`kvcompile.retrieval.segment_terms`, one entry per segment)
    into ``tensors``, as the manifest; its header entry (``corpus.index``)."""
    data = json.dumps(terms, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    tensors["index"] = zstd_frame(data)
    return {"tensor": "index", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **RETRIEVER}


def seal(header: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """``header`` with the checksums and payload sizes of ``tensors`` (format spec, section 2)."""
    def part_bytes(part: str) -> int:
        return sum(t.numel() * t.element_size() for n, t in tensors.items()
                   if n.startswith("layers.") and n.split(".")[2] == part)

    return {**header,
            "checksums": {n: hashlib.sha256(tensor_bytes(t)).hexdigest() for n, t in sorted(tensors.items())},
            "payload_bytes": {"keys": part_bytes("keys"), "values": part_bytes("values"),
                              "positions": tensors["positions"].numel(), "manifest": tensors["manifest"].numel(),
                              **({"index": tensors["index"].numel()} if "index" in tensors else {})}}


def _copy_reused(named: dict[str, torch.Tensor], codec, runs: list[int], bins: int, reused, li: int,
                 part: str) -> None:
    """Put the previous pack's encoded blocks of every reused segment into ``named`` (layer
    ``li``'s ``part``, runs as :meth:`RaggedKV.runs` gives them, ``bins`` per head)."""
    pack, docs = reused
    old, old_runs = _previous(codec, reused, li, part)
    old_bins = len(old_runs) // pack.model["num_kv_heads"]
    pairs = [(h * bins + d + 1, h * old_bins + j + 1) for d, j in docs.items()
             for h in range(pack.model["num_kv_heads"])]
    copy_runs(codec, named, runs, old, old_runs, pairs)


def _previous(codec, reused, li: int, part: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Layer ``li``'s ``part`` in the previous pack: its tensors and runs (its codec must be ``codec``,
    as the segment keys that matched cover every option)."""
    old_codec, old, old_runs = reused[0].encoded(li, part)
    if old_codec != codec:
        raise ValueError(f"segments reused from a pack with codec {old_codec.params()}, not {codec.params()}")
    return old, old_runs


def check_output(path: str | os.PathLike) -> None:
    """Refuse an output path that cannot become a pack, before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"output {path} is a directory: give a file name such as {path / 'corpus.kvpack'}")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise OptionError(f"cannot write {path}: its directory is not writable")


def write_pack(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict) -> int:
    """Write atomically: a temporary file in the target directory, fsync, rename.

    An interrupted or failing write leaves whatever was at ``path`` untouched.
    """
    path = Path(path)
    check_output(path)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    metadata = {"kvpack": text, "kvpack_sha256": hashlib.sha256(text.encode()).hexdigest()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would survive the rename
    except OSError as e:
        raise OptionError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            size = write_container(f, tensors, metadata)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OptionError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return size


