"""Packs: write one from a compiled corpus, and load, verify and use one.

The byte layout and the header are specified in docs/kvpack-format.md; this module
follows it. A pack is untrusted input: :meth:`Pack.load` validates before allocating
and refuses anything it cannot account for.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import zstandard

from . import __version__
from .builder import BuildOptions, Compiled, Segment, segment_keys
from .cache import PackCache, Prefix
from .codecs import codec_for_pack, get_codec
from .container import Container, tensor_bytes, write_container
from .corpus import Document
from .errors import ModelMismatchError, OptionError, PackError
from .framing import Framing
from .models import LoadedModel, load_model
from .recipe import Recipe
from .rope import Rotary

FORMAT_VERSION = (1, 0)
ZSTD_LEVEL = 19


def _zstd(data: bytes) -> torch.Tensor:
    # Fixed level, no checksum/size variance: equal input -> equal bytes.
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8) if frame else torch.empty(0, dtype=torch.uint8)


def _unzstd(data: bytes, size: int, what: str, path: str) -> bytes:
    """Decompress one zstd frame that must hold exactly ``size`` bytes.

    The frame's declared size is checked first: python-zstandard trusts it over
    ``max_output_size``, so a hostile frame could otherwise make us allocate anything.
    """
    try:
        declared = zstandard.frame_content_size(data)
        if declared != size:
            raise PackError(f"{path}: corrupt pack ({what} declares {declared} bytes, expected {size}): rebuild it")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError:
        raise PackError(f"{path}: corrupt pack ({what} does not decompress): rebuild it") from None
    if len(out) != size:
        raise PackError(f"{path}: corrupt pack ({what} has {len(out)} bytes, expected {size}): rebuild it")
    return out


def encode_positions(positions: list[list[torch.Tensor]]) -> bytes:
    """Delta-coded little-endian int32, (layer, head) runs in order (format spec, section 4)."""
    runs = []
    for layer in positions:
        for p in layer:
            p = p.cpu().to(torch.int64)
            runs.append(torch.diff(p, prepend=torch.zeros(1, dtype=torch.int64)) if p.numel() else p)
    flat = torch.cat(runs) if runs else torch.empty(0, dtype=torch.int64)
    return flat.to(torch.int32).numpy().astype("<i4").tobytes()


def decode_positions(data: bytes, kept: list[list[int]], limit: int, path: str) -> list[list[torch.Tensor]]:
    """Inverse of :func:`encode_positions`, validating monotonicity and bounds."""
    flat = torch.from_numpy(np.frombuffer(data, dtype="<i4").astype(np.int64))
    out, i = [], 0
    for counts in kept:
        layer = []
        for n in counts:
            run = flat[i : i + n]
            i += n
            if n and (run[0] < 0 or (run[1:] < 1).any()):
                raise PackError(f"{path}: corrupt pack (positions are not increasing): rebuild it")
            p = run.cumsum(0)
            if n and p[-1] >= limit:
                raise PackError(f"{path}: corrupt pack (a position is beyond the cache): rebuild it")
            layer.append(p)
        out.append(layer)
    return out


def model_identity(lm: LoadedModel) -> dict:
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "name": lm.name,
        "fingerprint": lm.fingerprint,
        "architecture": (cfg.architectures or [type(lm.model).__name__])[0],
        "num_layers": cfg.num_hidden_layers,
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "max_positions": lm.max_positions,
        "rope": Rotary.of(lm.model) is not None,
    }


def pack_tensors_and_header(
    compiled: Compiled, documents: list[Document], lm: LoadedModel, recipe: Recipe, options: BuildOptions
) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a pack holds: its tensors and its header (format spec, section 2)."""
    tk = compiled.tokenized
    codec = get_codec(options.codec)
    tensors: dict[str, torch.Tensor] = {}
    layer_entries = []
    for li, (kl, vl) in enumerate(zip(compiled.keys, compiled.values)):
        entry = {}
        for part, heads in (("keys", kl), ("values", vl)):
            named = codec.encode(torch.cat(heads))
            names = {role: f"layers.{li}.{part}" + ("" if role == "data" else f".{role}") for role in named}
            tensors.update({names[role]: t for role, t in named.items()})
            entry[part] = {"codec": codec.name, **codec.params(), "tensors": names}
        layer_entries.append(entry)
    kept = [[int(p.numel()) for p in layer] for layer in compiled.positions]
    tensors["positions"] = _zstd(encode_positions(compiled.positions))

    seg_keys = segment_keys(documents, lm.fingerprint, recipe, options)
    manifest, segments, offset = [], [], 0
    for i, (d, ids, key) in enumerate(zip(documents, tk.doc_ids, seg_keys)):
        manifest.append({"path": d.path, "sha256": d.sha256, "tokens": len(ids), "segment": i})
        segments.append({"documents": [i], "tokens": [offset, offset + len(ids)], "key": key})
        offset += len(ids)
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    tensors["manifest"] = _zstd(manifest_bytes)

    def part_bytes(part: str) -> int:
        return sum(t.numel() * t.element_size() for n, t in tensors.items()
                   if n.startswith("layers.") and n.split(".")[2] == part)

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
            "selection": {"head_floor": options.head_floor},
            "context": options.context,
            "codec": {"name": codec.name, **codec.params()},
        },
        "framing": tk.framing.to_json(),
        "corpus": {"documents": len(documents), "tokens": tk.corpus_tokens, "manifest": "manifest",
                   "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                   "manifest_size": len(manifest_bytes)},
        "cache": {"tokens": tk.total, "question_position": tk.total, "kept": kept, "positions": "positions",
                  "layers": layer_entries},
        "segments": segments,
        "checksums": {n: hashlib.sha256(tensor_bytes(t)).hexdigest() for n, t in sorted(tensors.items())},
        "payload_bytes": {"keys": part_bytes("keys"), "values": part_bytes("values"),
                          "positions": tensors["positions"].numel(), "manifest": tensors["manifest"].numel()},
    }
    return tensors, header


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
        self.positions = decode_positions(
            _unzstd(c.raw(self.layout["positions"]), 4 * sum(map(sum, self.kept)), "positions", self.path),
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

    def layer(self, li: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Layer ``li``'s kept keys (pre-RoPE) and values: per KV head ``[kept, head_dim]``."""
        counts = self.kept[li]
        out = []
        for part in ("keys", "values"):
            entry = self.layout["layers"][li][part]
            codec = codec_for_pack(entry["codec"])
            x = codec.decode({r: self._tensor(n) for r, n in entry["tensors"].items()}, sum(counts), self.head_dim)
            out.append(list(x.split(counts)))
        return out[0], out[1]

    def manifest(self) -> list[dict]:
        """The corpus manifest: one ``{"path", "sha256", "tokens", "segment"}`` per document."""
        c = self.header["corpus"]
        raw = self._tensor(c["manifest"]).numpy().tobytes()
        data = _unzstd(raw, c["manifest_size"], "manifest", self.path)
        if hashlib.sha256(data).hexdigest() != c["manifest_sha256"]:
            raise PackError(f"{self.path}: corrupt pack (manifest checksum mismatch): rebuild it")
        return json.loads(data)

    def segments(self, wanted: list[int]) -> dict[int, Segment]:
        """Segments ``wanted`` (indices into ``header["segments"]``) cut out of the payload, as
        the builder makes them: rows as stored, positions relative to the document's start."""
        n_prefix = self.layout["tokens"] - self.header["corpus"]["tokens"]
        spans = {j: [n_prefix + t for t in self.header["segments"][j]["tokens"]] for j in wanted}
        out = {j: Segment([], [], []) for j in wanted}
        for li in range(len(self.kept)):
            keys, values = self.layer(li)
            for j, (lo, hi) in spans.items():
                rows = [(p >= lo) & (p < hi) for p in self.positions[li]]
                out[j].keys.append([k[r] for k, r in zip(keys, rows)])
                out[j].values.append([v[r] for v, r in zip(values, rows)])
                out[j].positions.append([p[r] - lo for p, r in zip(self.positions[li], rows)])
        return out

    def check_model(self, lm: LoadedModel) -> None:
        """Refuse a model other than the pack's, naming both."""
        if lm.fingerprint != self.model["fingerprint"]:
            raise ModelMismatchError(
                f"{self.path} was built with model {self.model['name']!r} (fingerprint "
                f"{self.model['fingerprint'][:12]}), not {lm.name!r} ({lm.fingerprint[:12]}): "
                f"query it with --model {self.model['name']} or rebuild the pack with this model"
            )

    def prefixes(self, lm: LoadedModel) -> tuple[list[Prefix], int]:
        """The pack's KV rotated to its stored positions, on ``lm``'s device and dtype.

        Returns the per-layer prefixes and the position where a question starts.
        """
        self.check_model(lm)
        rotary = Rotary.of(lm.model) if self.model["rope"] else None
        prefixes = []
        for li in range(len(self.kept)):
            keys, values = self.layer(li)
            ks, vs = [], []
            for k, v, p in zip(keys, values, self.positions[li]):
                k = k.to(lm.device, lm.dtype)
                ks.append(rotary.apply(k, p.to(lm.device)) if rotary is not None else k)
                vs.append(v.to(lm.device, lm.dtype))
            prefixes.append(Prefix(ks, vs))
        return prefixes, self.layout["question_position"]

    def cache(self, model: LoadedModel | str | None = None, prefixes: list[Prefix] | None = None) -> PackCache:
        """A fresh transformers ``Cache`` over this pack, for one question.

        For callers of ``model.generate``: switch the model to the ``"kvcompile"``
        attention (:func:`kvcompile.attention.use_pack_attention`) and pass input ids
        that start with ``question_position`` placeholder ids (they are never embedded:
        generate only feeds the ids past the cache's length). See docs/python-api.md.
        """
        if prefixes is None:
            lm = model if isinstance(model, LoadedModel) else load_model(model or self.model["name"], progress=False)
            prefixes, _ = self.prefixes(lm)
        return PackCache(prefixes, self.layout["question_position"])

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
