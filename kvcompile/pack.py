"""Reading packs: load, verify and use one.

The byte layout and the header are specified in docs/kvpack-format.md; this module
follows it. A pack is untrusted input: :meth:`Pack.load` validates before allocating
and refuses anything it cannot account for. Reading a pack needs no compiler: nothing
here imports the build code (kvcompile/writer.py writes packs).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .cache import PackCache
from .codecs import codec_for_pack
from .container import Container
from .errors import ModelMismatchError, PackError
from .format import FORMAT_VERSION, decode_positions, unzstd
from .framing import Framing
from .models import LoadedModel, load_model
from .ragged import RaggedKV
from .rope import Rotary, place


class Pack:
    """A loaded, verified pack. Use :func:`kvcompile.load` to get one."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = os.fspath(path)
        self.container = c = Container(self.path)
        text, digest = c.metadata.get("kvpack"), c.metadata.get("kvpack_sha256")
        if text is None or digest is None:
            raise PackError(f"{self.path}: not a kvpack (a safetensors file without a kvpack header)")
        if hashlib.sha256(text.encode()).hexdigest() != digest:
            raise PackError(f"{self.path}: corrupt pack (header checksum mismatch): rebuild it")
        try:
            h = json.loads(text)
            major, minor = h["version"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise PackError(f"{self.path}: corrupt pack (header is not a kvpack header): rebuild it") from None
        if not all(type(v) is int and v >= 0 for v in (major, minor)):
            raise PackError(f"{self.path}: corrupt pack (format version {h['version']!r} is malformed): rebuild it")
        if h.get("format") != "kvpack":
            raise PackError(f"{self.path}: not a kvpack (format {h.get('format')!r})")
        if major > FORMAT_VERSION[0]:
            raise PackError(f"{self.path}: pack format {major}.{minor} is newer than this kvcompile reads "
                            f"({FORMAT_VERSION[0]}.x): upgrade kvcompile (pip install -U kvcompile)")
        self.header = h
        self._tensors: dict[str, torch.Tensor] = {}
        try:
            self._check_structure()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PackError(f"{self.path}: corrupt pack (header field {e} is missing or malformed): "
                            "rebuild it") from None
        if verify:
            for name in c.entries:
                self._tensor(name)
        self.positions = decode_positions(  # per layer [N]
            unzstd(c.raw(self.layout["positions"]), 4 * sum(map(sum, self.kept)), "positions", self.path),
            self.kept, self.layout["tokens"], self.path)

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
        m, cache = self.model, self.layout
        layers, heads, head_dim = int(m["num_layers"]), int(m["num_kv_heads"]), int(m["head_dim"])
        kept = cache["kept"]
        for where, value in (("cache.tokens", cache["tokens"]), ("cache.question_position", cache["question_position"]),
                             ("corpus.manifest_size", self.header["corpus"]["manifest_size"])):
            if type(value) is not int or value < 0:
                raise PackError(f"{self.path}: corrupt pack ({where} is not a count): rebuild it")
        if cache["question_position"] > int(m["max_positions"]):
            raise PackError(f"{self.path}: corrupt pack (question position beyond the model's window): rebuild it")
        if (len(kept) != layers or any(len(k) != heads for k in kept)
                or any(not isinstance(n, int) or n < 0 or n > cache["tokens"] for k in kept for n in k)):
            raise PackError(f"{self.path}: corrupt pack (kept counts do not match {layers} layers x {heads} heads)")
        if len(cache["layers"]) != layers:
            raise PackError(f"{self.path}: corrupt pack (expected {layers} layer entries)")
        checksums = self.header["checksums"]
        if not isinstance(checksums, dict):
            raise PackError(f"{self.path}: corrupt pack (checksums are not a map)")
        known = {cache["positions"], self.header["corpus"]["manifest"]}
        for li, entry in enumerate(cache["layers"]):
            for part in ("keys", "values"):
                codec = codec_for_pack(entry[part]["codec"])
                names = entry[part]["tensors"]
                expected = codec.layout(sum(kept[li]), head_dim)
                if set(names) != set(expected):
                    raise PackError(f"{self.path}: corrupt pack (layer {li} {part} should have tensors "
                                    f"{sorted(expected)}, has {sorted(names)})")
                for role, name in names.items():
                    if name not in self.container:
                        raise PackError(f"{self.path}: corrupt pack (tensor {name!r} is missing)")
                    dtype, shape, _, _ = self.container.entries[name]
                    if (dtype, shape) != expected[role]:
                        raise PackError(f"{self.path}: corrupt pack (tensor {name!r} is {dtype} {list(shape)}, "
                                        f"expected {expected[role][0]} {list(expected[role][1])})")
                    known.add(name)
        for name in self.container.entries:
            if name not in known:
                raise PackError(f"{self.path}: pack holds tensor {name!r}, which this kvcompile does not know: "
                                "upgrade kvcompile")
            if name not in checksums:
                raise PackError(f"{self.path}: corrupt pack (tensor {name!r} has no checksum)")
        for name in (cache["positions"], self.header["corpus"]["manifest"]):
            if name not in self.container or self.container.entries[name][0] != "U8":
                raise PackError(f"{self.path}: corrupt pack (tensor {name!r} is missing or not bytes)")
        self.head_dim = head_dim

    def _tensor(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            data = self.container.raw(name)
            if hashlib.sha256(data).hexdigest() != self.header["checksums"].get(name):
                raise PackError(f"{self.path}: corrupt pack (checksum mismatch in {name!r}): rebuild it")
            self._tensors[name] = self.container.to_tensor(name, data)
        return self._tensors[name]

    # -- contents ----------------------------------------------------------------------

    def layer(self, li: int) -> RaggedKV:
        """Layer ``li`` as stored: pre-RoPE keys, values, positions; on the CPU."""
        parts = []
        for part in ("keys", "values"):
            entry = self.layout["layers"][li][part]
            codec = codec_for_pack(entry["codec"])
            parts.append(codec.decode({r: self._tensor(n) for r, n in entry["tensors"].items()},
                                      sum(self.kept[li]), self.head_dim))
        return RaggedKV.from_rows(parts[0], parts[1], self.positions[li], self.kept[li])

    def manifest(self) -> list[dict]:
        """The corpus manifest: one ``{"path", "sha256", "tokens", "segment"}`` per document."""
        c = self.header["corpus"]
        raw = self._tensor(c["manifest"]).numpy().tobytes()
        data = unzstd(raw, c["manifest_size"], "manifest", self.path)
        if hashlib.sha256(data).hexdigest() != c["manifest_sha256"]:
            raise PackError(f"{self.path}: corrupt pack (manifest checksum mismatch): rebuild it")
        return json.loads(data)

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
        """Refuse a model other than the pack's, naming both."""
        if lm.fingerprint != self.model["fingerprint"]:
            raise ModelMismatchError(
                f"{self.path} was built with model {self.model['name']!r} (fingerprint "
                f"{self.model['fingerprint'][:12]}), not {lm.name!r} ({lm.fingerprint[:12]}): "
                f"query it with --model {self.model['name']} or rebuild the pack with this model"
            )

    def place(self, lm: LoadedModel) -> list[RaggedKV]:
        """The pack's KV made attendable on ``lm``'s device and dtype, one layer at a time:
        each layer's keys rotated to their stored positions in one call for all heads.
        Questions start at ``question_position``. Refuses another model than the pack's."""
        self.check_model(lm)
        rotary = Rotary.of(lm.model) if self.model["rope"] else None
        return [place(self.layer(li), rotary, lm.device, lm.dtype) for li in range(len(self.kept))]

    @property
    def question_position(self) -> int:
        return self.layout["question_position"]

    def cache(self, model: LoadedModel | str | None = None, kv: list[RaggedKV] | None = None) -> PackCache:
        """A fresh transformers ``Cache`` over this pack, for one question.

        For callers of ``model.generate``: inside ``kvcompile.attention.pack_attention(model)``,
        pass input ids that start with ``question_position`` placeholder ids (they are never
        embedded: generate only feeds the ids past the cache's length). See docs/python-api.md.
        """
        if kv is None:
            lm = model if isinstance(model, LoadedModel) else load_model(model or self.model["name"], progress=False)
            kv = self.place(lm)
        return PackCache(kv, self.question_position)

    def session(self, model: LoadedModel | str | None = None):
        """A :class:`~kvcompile.session.Session` answering questions from this pack."""
        from .session import Session

        return Session(self, model)

    # -- sizes -------------------------------------------------------------------------

    def sizes(self) -> dict:
        """Bytes by part, and the fp16 full cache it replaces."""
        m, c = self.model, self.container
        full = 2 * m["num_layers"] * m["num_kv_heads"] * self.layout["tokens"] * m["head_dim"] * 2
        by_part = {"keys": 0, "values": 0, "positions": 0, "manifest": 0, "other": 0}
        for name in c.entries:
            part = name.split(".")[2] if name.startswith("layers.") else name
            by_part[part if part in by_part else "other"] += c.nbytes(name)
        return {"file": c.size, "header": c.data_start, **by_part, "full_fp16": full,
                "positions_raw_int32": 4 * sum(map(sum, self.kept)),
                "ratio_vs_full_fp16": c.size / full if full else 0.0}


def load(path: str | os.PathLike, verify: bool = True) -> Pack:
    """Open and verify a ``.kvpack`` file."""
    return Pack(path, verify=verify)
