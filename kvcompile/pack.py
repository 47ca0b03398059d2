"""Reading packs: load, verify and use one.

The byte layout and the header are specified in docs/kvpack-format.md; this module
follows it. A pack is untrusted input: :meth:`Pack.load` validates before allocating
and refuses anything it cannot account for. Reading a pack needs no compiler: nothing
here imports the build code (kvcompile/writer.py writes packs).
"""

from __future__ import annotations

import hashlib
import os
import string
from typing import Sequence

import torch

from . import schema
from .cache import PackCache
from .codecs import Codec, codec_from_entry
from .container import Container
from .encoded import EncodedKV, EncodedPart
from .errors import ModelMismatchError, OptionError, PackError
from .format import FORMAT_VERSION, decode_positions, unzstd
from .framing import Framing
from .models import LoadedModel, load_model
from .ragged import RaggedKV, head_offsets, runs, within_heads
from .rope import place, rotaries

POSITIONS = ("auto", "original", "compact")


def visible(layer: RaggedKV, window: int | None, start: int) -> RaggedKV:
    """``layer`` without the rows no question or answer token can see: with a sliding
    ``window``, a token at position p >= ``start`` (where questions start) sees only keys
    above p - window. The file keeps them (a rebuild may need them as context); the device
    does not."""
    return layer if window is None else layer.where(layer.positions > start - window)


class Pack:
    """A loaded, verified pack. Use :func:`kvcompile.load` to get one."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = os.fspath(path)
        self.container = c = Container(self.path)
        self.header = h = self._read_header()
        self._tensors: dict[str, torch.Tensor] = {}
        self._runs: dict[int, list[int]] = {}
        self._compact: tuple[list[torch.Tensor], int] | None = None
        try:
            self._check_structure()
            self.positions = decode_positions(  # per layer [N]
                unzstd(self._tensor(self.layout["positions"]).numpy(), 4 * sum(map(sum, self.kept)), "positions",
                       self.path),
                self.kept, self.layout["tokens"], self.path)
            self._check_parts()
        except schema.SchemaError as e:
            raise PackError(f"{self.path}: corrupt pack (header field {e}): rebuild it") from None
        if verify:
            for name in c.entries:
                self._tensor(name)
        self._manifest = self._read_manifest()
        self.head_dim = h["model"]["head_dim"]

    def _read_header(self) -> dict:
        """The kvpack header: hash, format and version first (an old reader must say "upgrade",
        not "corrupt"), then the whole schema (format spec, section 8)."""
        meta = self.container.metadata
        text, digest = meta.get("kvpack"), meta.get("kvpack_sha256")
        if text is None or digest is None:
            raise PackError(f"{self.path}: not a kvpack (a safetensors file without a kvpack header)")
        if hashlib.sha256(text.encode()).hexdigest() != digest:
            raise PackError(f"{self.path}: corrupt pack (header checksum mismatch): rebuild it")
        try:
            h = schema.parse(text)
            if type(h) is not dict:
                raise schema.SchemaError("", "expected an object")
        except schema.SchemaError as e:
            raise PackError(f"{self.path}: corrupt pack (its header is {e.problem}): rebuild it") from None
        if h.get("format") != "kvpack":
            raise PackError(f"{self.path}: not a kvpack (format {str(h.get('format'))[:40]!r})")
        version = h.get("version")
        if (type(version) is not list or len(version) != 2
                or not all(type(v) is int and 0 <= v < 1 << 16 for v in version)):
            raise PackError(f"{self.path}: corrupt pack (format version {str(version)[:40]} is malformed): rebuild it")
        if version[0] > FORMAT_VERSION[0]:
            raise PackError(f"{self.path}: pack format {version[0]}.{version[1]} is newer than this kvcompile "
                            f"reads ({FORMAT_VERSION[0]}.x): upgrade kvcompile (pip install -U kvcompile)")
        try:
            return schema.check(schema.HEADER, h)
        except schema.SchemaError as e:
            raise PackError(f"{self.path}: corrupt pack (header field {e}): rebuild it") from None

    # -- structure ---------------------------------------------------------------------

    @property
    def model(self) -> dict:
        return self.header["model"]

    @property
    def layout(self) -> dict:
        """The header's ``cache`` section: kept counts, positions, per-layer codecs."""
        return self.header["cache"]

    @property
    def kept(self) -> list[list[int]]:
        return self.layout["kept"]

    @property
    def framing(self) -> Framing:
        return Framing.from_json(self.header["framing"])

    def _check_structure(self) -> None:
        """The header against itself and against the container (format spec, section 8):
        every rule that the schema's per-field types cannot express."""
        h, m, cache, c = self.header, self.model, self.layout, self.container
        fail = schema.SchemaError
        layers, heads = m["num_layers"], m["num_kv_heads"]
        if layers * heads > schema.MAX_HEADS_TOTAL:
            raise fail("model", f"{layers} layers x {heads} KV heads is more than {schema.MAX_HEADS_TOTAL} heads")
        if m["num_heads"] % heads:
            raise fail("model.num_heads", f"{m['num_heads']} is not a multiple of num_kv_heads ({heads})")
        framing, corpus = h["framing"], h["corpus"]
        if cache["tokens"] != len(framing["prefix_ids"]) + corpus["tokens"]:
            raise fail("cache.tokens", f"{cache['tokens']} is not the framing's {len(framing['prefix_ids'])} "
                                       f"plus the corpus's {corpus['tokens']} tokens")
        if cache["question_position"] != cache["tokens"]:
            raise fail("cache.question_position", f"{cache['question_position']} is not cache.tokens "
                                                  f"({cache['tokens']}): questions follow the corpus")
        # A streamed pack's corpus may be longer than the window (its questions then start at
        # compacted positions); what must fit is its longest head.
        if not h["options"].get("stream") and cache["question_position"] > m["max_positions"]:
            raise fail("cache.question_position", "beyond the model's window")
        try:  # literal text and plain {path} fields only: no attribute, index, spec or conversion
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(
                framing.get("document_header", "{path}")) if f is not None]
        except ValueError:
            fields = None
        if fields is None or any(field != ("path", "", None) for field in fields):
            raise fail("framing.document_header", "may only hold text and the field {path}")
        kept = cache["kept"]
        if len(kept) != layers or any(len(k) != heads for k in kept):
            raise fail("cache.kept", f"expected {layers} layers x {heads} KV heads")
        if any(n > cache["tokens"] for k in kept for n in k):
            raise fail("cache.kept", f"a head keeps more than the cache's {cache['tokens']} tokens")
        if max(n for k in kept for n in k) > m["max_positions"]:
            raise fail("cache.kept", "a head keeps more tokens than the model's window holds")
        if len(cache["layers"]) != layers:
            raise fail("cache.layers", f"expected {layers} layer entries, found {len(cache['layers'])}")
        index = corpus.get("index")
        for name in (cache["positions"], corpus["manifest"], *([index["tensor"]] if index else [])):
            if name not in c or c.entries[name][0] != "U8" or len(c.entries[name][1]) != 1:
                raise fail(f"tensor {name!r}", "missing or not a 1-D U8 tensor")
        if index and index["tensor"] in (cache["positions"], corpus["manifest"]):
            raise fail("corpus.index.tensor", f"tensor {index['tensor']!r} is used twice")
        if index and (index["size"] > c.size or (index["retriever"], index["stopwords"]) != ("bm25s", "en")):
            raise fail("corpus.index", "larger than the whole pack, or a retriever other than bm25s with "
                                       "English stop words")
        if set(h["checksums"]) != set(c.entries):
            odd = sorted(set(h["checksums"]) ^ set(c.entries))[0]
            raise fail("checksums", f"does not list exactly the pack's tensors ({odd!r})")
        # A manifest is a few hundred bytes per document, and a document's KV is more: a
        # manifest larger than the whole file is a decompression bomb, not a corpus.
        if corpus["manifest_size"] > c.size:
            raise fail("corpus.manifest_size", f"{corpus['manifest_size']} bytes, more than the whole pack")
        self._check_segments()

    def _check_parts(self) -> None:
        """Every layer's tensors against its codec's layout for the layer's runs (which need
        the decoded positions), and every tensor accounted for."""
        h, cache, c, fail = self.header, self.layout, self.container, schema.SchemaError
        head_dim, corpus = self.model["head_dim"], h["corpus"]
        known = {cache["positions"]: "positions", corpus["manifest"]: "manifest"}
        payload = {"keys": 0, "values": 0, "positions": c.nbytes(cache["positions"]),
                   "manifest": c.nbytes(corpus["manifest"])}
        if "index" in corpus:
            known[corpus["index"]["tensor"]] = "index"
            payload["index"] = c.nbytes(corpus["index"]["tensor"])
        for li, entry in enumerate(cache["layers"]):
            for part in ("keys", "values"):
                codec = codec_from_entry(entry[part], f"{self.path}: cache.layers[{li}].{part}")
                names = entry[part]["tensors"]
                try:
                    expected = codec.layout(self.runs(li), head_dim)
                except ValueError as e:
                    raise fail(f"cache.layers[{li}].{part}", str(e)) from None
                if set(names) != set(expected):
                    raise fail(f"cache.layers[{li}].{part}.tensors",
                               f"codec {codec.name} needs tensors {sorted(expected)}, found {sorted(names)}")
                for role, name in names.items():
                    if name not in c:
                        raise fail(f"cache.layers[{li}].{part}.tensors.{role}", f"tensor {name!r} is missing")
                    if name in known:
                        raise fail(f"cache.layers[{li}].{part}.tensors.{role}", f"tensor {name!r} is used twice")
                    dtype, shape, _, _ = c.entries[name]
                    if (dtype, shape) != expected[role]:
                        raise fail(f"tensor {name!r}", f"is {dtype} {list(shape)}, expected "
                                                       f"{expected[role][0]} {list(expected[role][1])}")
                    known[name] = part
                    payload[part] += c.nbytes(name)
        self._part_of = known  # tensor name -> "keys", "values", "positions", "manifest" or "index"
        for name in c.entries:
            if name not in known:
                raise PackError(f"{self.path}: pack holds tensor {name!r}, which this kvcompile does not know: "
                                "upgrade kvcompile")
        if h["payload_bytes"] != payload:
            raise fail("payload_bytes", f"{h['payload_bytes']} does not match the tensors ({payload})")

    def _check_segments(self) -> None:
        """Segments tile the corpus in order, and list every document once, in order."""
        h, fail = self.header, schema.SchemaError
        end, docs = 0, []
        for j, seg in enumerate(h["segments"]):
            lo, hi = seg["tokens"]
            if lo != end or hi <= lo:
                raise fail(f"segments[{j}].tokens", f"[{lo}, {hi}] does not continue the corpus at token {end}")
            end = hi
            docs += seg["documents"]
        if end != h["corpus"]["tokens"]:
            raise fail("segments", f"cover {end} corpus tokens, expected {h['corpus']['tokens']}")
        if len(docs) != h["corpus"]["documents"] or docs != list(range(len(docs))):
            raise fail("segments", f"do not list documents 0..{h['corpus']['documents'] - 1} once each, in order")

    def _read_manifest(self) -> list[dict]:
        """The corpus manifest, validated against the segments (format spec, sections 5 and 8)."""
        c, segments = self.header["corpus"], self.header["segments"]
        manifest = self._json_frame(c["manifest"], c["manifest_size"], c["manifest_sha256"], "manifest",
                                    schema.MANIFEST)
        try:
            if len(manifest) != c["documents"]:
                raise schema.SchemaError("manifest", f"lists {len(manifest)} documents, the header "
                                                     f"{c['documents']}")
            for j, seg in enumerate(segments):
                for d in seg["documents"]:
                    if manifest[d]["segment"] != j:
                        raise schema.SchemaError(f"manifest[{d}].segment", f"is not {j}")
                tokens = sum(manifest[d]["tokens"] for d in seg["documents"])
                if tokens != seg["tokens"][1] - seg["tokens"][0]:
                    raise schema.SchemaError(f"segments[{j}].tokens",
                                             f"span {seg['tokens']} but its documents have {tokens} tokens")
        except schema.SchemaError as e:
            raise PackError(f"{self.path}: corrupt pack ({e}): rebuild it") from None
        return manifest

    def segment_terms(self) -> list[dict[str, int]]:
        """Each segment's BM25 terms and counts: the segment index (format spec, section 5),
        read and validated on first use. OptionError for a pack built without one."""
        index = self.header["corpus"].get("index")
        if index is None:
            raise OptionError(f"{self.path} has no segment index (built before kvcompile wrote one): rebuild it "
                              "to select segments per question")
        terms = self._json_frame(index["tensor"], index["size"], index["sha256"], "corpus.index", schema.INDEX)
        if len(terms) != len(self.header["segments"]):
            raise PackError(f"{self.path}: corrupt pack (corpus.index: lists {len(terms)} segments, the header "
                            f"{len(self.header['segments'])}): rebuild it")
        return terms

    def _json_frame(self, name: str, size: int, sha256: str, what: str, spec: schema.Spec):
        """Tensor ``name``: one zstd frame of ``size`` bytes of JSON with this SHA-256, checked
        against ``spec`` (the manifest, the segment index)."""
        data = unzstd(self._tensor(name).numpy(), size, what, self.path)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise PackError(f"{self.path}: corrupt pack ({what} checksum mismatch): rebuild it")
        try:
            schema.check_items(data, self.container.size, what)
            return schema.check(spec, schema.parse(data), what)
        except schema.SchemaError as e:
            raise PackError(f"{self.path}: corrupt pack ({e}): rebuild it") from None

    def _tensor(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            self._tensors[name] = self.container.read(name, sha256=self.header["checksums"][name])
        return self._tensors[name]

    # -- contents ----------------------------------------------------------------------

    def runs(self, li: int) -> list[int]:
        """Layer ``li``'s runs (:meth:`RaggedKV.runs`): rows per (KV head, framing or segment)."""
        if li not in self._runs:
            n_prefix = self.layout["tokens"] - self.header["corpus"]["tokens"]
            starts = [n_prefix + seg["tokens"][0] for seg in self.header["segments"]]
            self._runs[li] = runs(self.positions[li], self.kept[li], starts)
        return self._runs[li]

    def encoded(self, li: int, part: str) -> tuple[Codec, dict[str, torch.Tensor], list[int]]:
        """Layer ``li``'s ``part`` as stored: its codec, its tensors by role (CPU), its runs."""
        entry = self.layout["layers"][li][part]
        return (codec_from_entry(entry, f"{self.path}: cache.layers[{li}].{part}"),
                {r: self._tensor(n) for r, n in entry["tensors"].items()}, self.runs(li))

    def layer(self, li: int) -> RaggedKV:
        """Layer ``li`` as stored, decoded: pre-RoPE keys, values, positions; on the CPU."""
        parts = []
        for part in ("keys", "values"):
            codec, tensors, runs = self.encoded(li, part)
            parts.append(codec.decode(tensors, runs, self.head_dim))
        return RaggedKV.from_rows(parts[0], parts[1], self.positions[li], self.kept[li])

    def manifest(self) -> list[dict]:
        """The corpus manifest: one ``{"path", "sha256", "tokens", "segment"}`` per document."""
        return [dict(d) for d in self._manifest]

    def segments(self, wanted: list[int]) -> dict[int, list[RaggedKV]]:
        """Segments ``wanted`` (indices into ``header["segments"]``) cut out of the payload, as
        the builder makes them: one RaggedKV per layer, rows as stored, positions relative
        to the document's start."""
        n_prefix = self.layout["tokens"] - self.header["corpus"]["tokens"]
        spans = {j: [n_prefix + t for t in self.header["segments"][j]["tokens"]] for j in wanted}
        out: dict[int, list[RaggedKV]] = {j: [] for j in wanted}
        for li in range(len(self.kept)):
            layer = self.layer(li)
            for j, (lo, hi) in spans.items():
                out[j].append(layer.span(lo, hi).shifted(-lo))
        return out

    def check_model(self, lm: LoadedModel) -> None:
        """Refuse a model other than the pack's, naming both; and a pack whose shape is not its
        model's (a fingerprint is only a string: an edited pack can copy it)."""
        if lm.fingerprint != self.model["fingerprint"]:
            raise ModelMismatchError(
                f"{self.path} was built with model {self.model['name']!r} (fingerprint "
                f"{self.model['fingerprint'][:12]}), not {lm.name!r} ({lm.fingerprint[:12]}): "
                f"query it with --model {self.model['name']} or rebuild the pack with this model"
            )
        cap = lm.capability
        actual = {"num_layers": cap.num_layers, "num_kv_heads": cap.num_kv_heads, "head_dim": cap.head_dim,
                  "rope": any(r is not None for r in rotaries(lm.model))}
        for key, value in actual.items():
            if self.model[key] != value:
                raise ModelMismatchError(f"{self.path}: corrupt pack (model.{key} is {self.model[key]}, but "
                                         f"{lm.name!r} has {value}): rebuild it")

    def attended_positions(self, mode: str = "auto") -> tuple[list[torch.Tensor], int]:
        """Each layer's positions ``[N]`` at which its keys are attended, and the position
        questions start at (docs/kvpack-format.md, section 4).

        ``original``: the stored positions; questions follow the whole corpus. ``compact``:
        each kept token at its rank within its own (layer, KV head), as kvpress re-rotates
        pruned keys, so every head reads a short, dense context in corpus order; questions
        start after the longest head. ``auto``: ``compact`` for RoPE models (measured better:
        docs/methods.md), ``original`` for models with absolute positions, whose stored KV
        holds its positions. With every token kept both are the same.
        """
        if mode not in POSITIONS:
            raise OptionError(f"positions must be one of {', '.join(POSITIONS)}, got {mode!r}")
        if mode == "auto":
            mode = "compact" if self.model["rope"] else "original"
        if mode != "compact":
            if self.question_position >= self.model["max_positions"]:
                raise OptionError(f"{self.path}: its corpus ({self.question_position} tokens with framing) is longer "
                                  f"than the model's window of {self.model['max_positions']}: load it with "
                                  "--positions compact")
            return self.positions, self.question_position
        if self._compact is None:
            self._compact = ([within_heads(k).to(p.dtype) for k, p in zip(self.kept, self.positions)],
                             max(max(k) for k in self.kept))
        return self._compact

    def place(self, lm: LoadedModel, positions: str = "auto") -> list[RaggedKV | EncodedKV]:
        """The pack's KV made attendable on ``lm``'s device and dtype, one layer at a time:
        each layer's keys rotated to their positions (:meth:`attended_positions` of
        ``positions``) in one call for all heads. Refuses another model than the pack's.

        Quantised layers stay encoded on the device (:class:`~kvcompile.encoded.EncodedKV`,
        decoded per use), except those with a sliding window, which are decoded here so
        that the rows no question can see are dropped."""
        self.check_model(lm)
        at, start = self.attended_positions(positions)
        per_layer = rotaries(lm.model) if self.model["rope"] else [None] * len(self.kept)
        out: list[RaggedKV | EncodedKV] = []
        for li in range(len(self.kept)):
            window = lm.capability.windows[li]
            parts = [self.encoded(li, part) for part in ("keys", "values")]
            if window is None and all(codec.quantised for codec, _, _ in parts):
                keys, values = (EncodedPart.place(*p, self.head_dim, lm.device) for p in parts)
                out.append(EncodedKV(keys, values, at[li].to(lm.device), head_offsets(self.kept[li], lm.device),
                                     tuple(self.kept[li]), per_layer[li], lm.dtype))
            else:
                layer = self.layer(li).replace(positions=at[li])
                out.append(place(visible(layer, window, start), [per_layer[li]], lm.device, lm.dtype))
        return out

    @property
    def question_position(self) -> int:
        """Where questions start at the stored positions (``original``)."""
        return self.layout["question_position"]

    def cache(self, model: LoadedModel | str | None = None, kv: list[RaggedKV] | None = None,
              positions: str = "auto") -> PackCache:
        """A fresh transformers ``Cache`` over this pack, for one question.

        For callers of ``model.generate``: inside ``kvcompile.attention.pack_attention(model)``,
        pass input ids that start with ``attended_positions(positions)[1]`` placeholder ids
        (they are never embedded: generate only feeds the ids past the cache's length). See
        docs/python-api.md.
        """
        if kv is None:
            lm = model if isinstance(model, LoadedModel) else load_model(model or self.model["name"], progress=False)
            kv = self.place(lm, positions)
        return PackCache(kv, self.attended_positions(positions)[1])

    def session(self, model: LoadedModel | str | None = None, positions: str = "auto"):
        """A :class:`~kvcompile.session.Session` answering questions from this pack, its keys
        at ``positions`` (:meth:`attended_positions`)."""
        from .session import Session

        return Session(self, model, positions)

    # -- sizes -------------------------------------------------------------------------

    def storage(self) -> dict:
        """How keys and values are stored: each layer's codecs with their parameters and bytes,
        the bytes per kept row (one token of one layer and KV head; codebooks included)
        against fp16's, and the bytes of codebooks."""
        c, rows = self.container, max(1, sum(map(sum, self.kept)))
        layers, total = [], {"keys": 0, "values": 0}
        for entry in self.layout["layers"]:
            layer = {}
            for part in ("keys", "values"):
                e = entry[part]
                nbytes = sum(c.nbytes(n) for n in e["tensors"].values())
                layer[part] = {**{k: v for k, v in e.items() if k != "tensors"}, "bytes": nbytes}
                total[part] += nbytes
            layers.append(layer)
        codebooks = sum(c.nbytes(n) for entry in self.layout["layers"] for part in ("keys", "values")
                        for role, n in entry[part]["tensors"].items() if role == "codebooks")
        return {"layers": layers, "bytes_per_row": {part: n / rows for part, n in total.items()},
                "fp16_bytes_per_row": 2 * self.model["head_dim"], "codebook_bytes": codebooks}

    def mean_kept(self) -> float:
        """Tokens kept per layer and KV head, on average: the pack's token budget."""
        kept = self.kept
        return sum(map(sum, kept)) / (len(kept) * len(kept[0]))

    def kept_ratio(self) -> float:
        """:meth:`mean_kept` over the tokens compiled (framing included)."""
        return self.mean_kept() / max(1, self.layout["tokens"])

    def sizes(self) -> dict:
        """Bytes by part, and the fp16 full cache it replaces."""
        m, c = self.model, self.container
        full = 2 * m["num_layers"] * m["num_kv_heads"] * self.layout["tokens"] * m["head_dim"] * 2
        by_part = {"keys": 0, "values": 0, "positions": 0, "manifest": 0, "index": 0, "other": 0}
        for name in c.entries:
            by_part[self._part_of.get(name, "other")] += c.nbytes(name)
        return {"file": c.size, "header": c.data_start, **by_part, "full_fp16": full,
                "positions_raw_int32": 4 * sum(map(sum, self.kept)),
                "ratio_vs_full_fp16": c.size / full if full else 0.0}


def check_same_model(packs: Sequence[Pack], action: str) -> None:
    """Refuse packs built with different models, naming both (``action``: what needs one model,
    as in "compose packs built with one model")."""
    first = packs[0]
    for p in packs[1:]:
        if p.model["fingerprint"] != first.model["fingerprint"]:
            raise ModelMismatchError(
                f"{p.path} was built with model {p.model['name']!r} ({p.model['fingerprint'][:12]}) and "
                f"{first.path} with {first.model['name']!r} ({first.model['fingerprint'][:12]}): "
                f"{action} packs built with one model")


def load(path: str | os.PathLike, verify: bool = True) -> Pack:
    """Open and verify a ``.kvpack`` file."""
    return Pack(path, verify=verify)
