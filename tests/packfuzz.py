"""A seeded, bounded fuzzer of packs, as an attacker would edit them (issue 10).

Every case mutates a valid pack, then loads it, inspects it (text and JSON), asks it a
question and plans a rebuild from it. The only acceptable outcomes are a correct result
or one clear error line (a ``KvcompileError``, exit code 2 from the CLI). A case fails
if anything else is raised, if it takes longer than ``--case-timeout`` seconds, or if a
rebuild would reuse rows that are not the document's own.

Mutation families (chosen at random per case):

- ``bytes``: bit flips, overwritten bytes, truncation, appended garbage; no repair (the
  checksums must catch them).
- ``table``: the safetensors table edited (hostile entries, duplicate keys, NaN, depth
  bombs, a 10^6-entry table).
- ``header``: one field of the kvpack header replaced by a hostile value, removed, or
  joined by an unknown deep key; the header hash is repaired.
- ``manifest`` and ``positions``: the compressed tensors rewritten (edited JSON, edited
  deltas, decompression bombs); checksums, sizes and hashes repaired.
- ``rebuild``: the lies that would make a rebuild reuse the wrong rows (segment spans,
  keys and manifest entries moved between documents); everything repaired.

``tests/test_fuzz.py`` runs a few hundred cases in ``make test``; ``make fuzz`` runs more
(``python tests/packfuzz.py --help``). Failures print the seed and case number, which
reproduce them exactly.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

HOSTILE = [
    None, True, False, 0, -1, 1, 3, 2**24, 2**31, 2**63, 2**64, -(2**63), 1.5, 1e308, "", "30", "fp16",
    "x" * 100_000, "\ud800", "\x1b[2J\nred", "{path.__class__}", "{", "}", "layers.k0", [], {}, [[]], [0] * 10_000,
    ["a"], {"name": "x"}, "@@RAW:[" + "[]," * 1_000_000 + "[]]@@",
    "@@RAW:Infinity@@", "@@RAW:NaN@@", "@@RAW:-Infinity@@", "@@RAW:" + "9" * 5000 + "@@",
    "@@RAW:" + "[" * 50_000 + "]" * 50_000 + "@@", "@@RAW:" + "{\"a\":" * 2000 + "0" + "}" * 2000 + "@@",
]


def _dumps(value) -> str:
    """JSON text; ``"@@RAW:x@@"`` strings become the raw token ``x`` (NaN, huge numbers, bombs)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    while '"@@RAW:' in text:
        start = text.index('"@@RAW:')
        end = text.index('@@"', start + 7)
        text = text[:start] + text[start + 7:end] + text[end + 3:]
    return text


def _paths(node, prefix=(), rng=None, limit=8):
    """Paths to nodes of a JSON tree (a few items of long lists)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,), rng, limit)
    elif isinstance(node, list):
        idx = range(len(node)) if len(node) <= limit else sorted(rng.sample(range(len(node)), limit))
        for i in idx:
            yield from _paths(node[i], prefix + (i,), rng, limit)


def _edit_json(tree, rng: random.Random) -> str:
    """Replace, remove or add one node of ``tree`` in place; return a description."""
    paths = [p for p in _paths(tree, rng=rng) if p]
    path = rng.choice(paths)
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    last, action = path[-1], rng.random()
    if action < 0.12 and isinstance(parent, dict):
        del parent[last]
        return f"del {path}"
    if action < 0.2 and isinstance(parent, dict):
        parent["unknown_" + str(rng.randrange(100))] = rng.choice(HOSTILE)
        return f"add unknown key beside {path}"
    if action < 0.3:  # a plausible lie: another node's value, or an integer nudged by one
        value = parent[last]
        new = value + rng.choice([-1, 1]) if type(value) is int else copy.deepcopy(
            _get(tree, rng.choice(paths)))
    else:
        new = rng.choice(HOSTILE)
    parent[last] = new
    return f"set {path} = {str(new)[:40]!r}"


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


class Pack:
    """A pack taken apart: its tensors (raw bytes), its table entries and its header."""

    def __init__(self, path: Path):
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        table = json.loads(data[8:8 + n])
        self.bytes = data
        self.metadata = table.pop("__metadata__")
        self.header = json.loads(self.metadata["kvpack"])
        start = 8 + n
        self.tensors = {name: (e["dtype"], e["shape"], data[start + e["data_offsets"][0]:start + e["data_offsets"][1]])
                        for name, e in table.items()}

    def assemble(self, header=None, tensors=None, table_text=None, header_text=None) -> bytes:
        """A pack of these parts, with every hash repaired (what anyone can do)."""
        header = copy.deepcopy(self.header) if header is None else header
        tensors = self.tensors if tensors is None else tensors
        if table_text is None:
            if header_text is None:
                if isinstance(header.get("checksums"), dict):
                    header["checksums"] = {n: hashlib.sha256(b).hexdigest() for n, (_, _, b) in tensors.items()}
                header_text = _dumps(header)
            table, offset = {}, 0
            for name in sorted(tensors):
                dtype, shape, blob = tensors[name]
                table[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
                offset += len(blob)
            try:
                digest = hashlib.sha256(header_text.encode()).hexdigest()
            except UnicodeEncodeError:
                digest = "0" * 64
            table["__metadata__"] = {"kvpack": header_text, "kvpack_sha256": digest}
            table_text = _dumps(table)
        raw = table_text.encode("utf-8", "surrogatepass")
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + b"".join(tensors[n][2] for n in sorted(tensors))


def _frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def _bomb(declared: int) -> bytes:
    small = zstandard.ZstdCompressor(level=19).compress(bytes(1000))
    return small[:4] + bytes([0xE0]) + struct.pack("<Q", declared) + small[7:]


def mutate(pack: Pack, rng: random.Random) -> tuple[str, bytes]:
    """One hostile variant of ``pack``: ``(description, file bytes)``."""
    family = rng.choice(["bytes", "table", "header", "header", "header", "manifest", "positions", "rebuild", "rebuild"])
    header, tensors = copy.deepcopy(pack.header), dict(pack.tensors)

    if family == "bytes":
        data = bytearray(pack.bytes)
        kind = rng.choice(["flip", "overwrite", "truncate", "append"])
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif kind == "overwrite":
            i = rng.randrange(len(data))
            data[i:i + 8] = rng.randbytes(8)
        elif kind == "truncate":
            del data[rng.randrange(len(data)):]
        else:
            data += rng.randbytes(rng.randint(1, 64))
        return f"bytes {kind}", bytes(data)

    if family == "table":
        kind = rng.choice(["entry", "entry", "dup", "bomb", "huge", "huge-escaped", "nan"])
        header_text = _dumps(header)
        digest = hashlib.sha256(header_text.encode()).hexdigest()
        table, offset = {}, 0
        for name in sorted(tensors):
            dtype, shape, blob = tensors[name]
            table[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
            offset += len(blob)
        table["__metadata__"] = {"kvpack": header_text, "kvpack_sha256": digest}
        if kind == "entry":
            what = _edit_json(table, rng)
            return f"table {what}", pack.assemble(tensors=tensors, table_text=_dumps(table))
        text = _dumps(table)
        if kind == "dup":
            text = '{"positions":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},' + text[1:]
        elif kind == "bomb":
            text = text[:-1] + ',"z":' + "[" * 100_000 + "]" * 100_000 + "}"
        elif kind.startswith("huge"):  # 10^6 entries, the second time with keys no byte search finds
            key = "data_offsets" if kind == "huge" else "data\\u005foffsets"
            text = text[:-1] + "".join(f',"t{i}":{{"dtype":"U8","shape":[0],"{key}":[0,0]}}'
                                       for i in range(10**6)) + "}"
        else:
            text = text.replace('"data_offsets":[0,', '"data_offsets":[NaN,', 1)
        return f"table {kind}", pack.assemble(tensors=tensors, table_text=text)

    if family == "header":
        what = _edit_json(header, rng)
        return f"header {what}", pack.assemble(header=header)

    if family == "manifest":
        raw = zstandard.ZstdDecompressor().decompress(pack.tensors["manifest"][2])
        manifest = json.loads(raw)
        kind = rng.choice(["edit", "edit", "bomb", "garbage"])
        if kind == "edit":
            what = _edit_json(manifest, rng)
            raw = _dumps(manifest).encode("utf-8", "surrogatepass")
            blob = _frame(raw)
        elif kind == "bomb":
            what, blob = "bomb", _bomb(rng.choice([2**35, 2**62, len(raw) + 1]))
        else:
            what, blob = "garbage", rng.randbytes(40)
        tensors["manifest"] = ("U8", [len(blob)], blob)
        header["corpus"]["manifest_sha256"] = hashlib.sha256(raw).hexdigest()
        header["corpus"]["manifest_size"] = len(raw) if kind != "bomb" else zstandard.frame_content_size(blob)
        header["payload_bytes"]["manifest"] = len(blob)
        return f"manifest {what}", pack.assemble(header=header, tensors=tensors)

    if family == "positions":
        raw = zstandard.ZstdDecompressor().decompress(pack.tensors["positions"][2])
        deltas = np.frombuffer(raw, dtype="<i4").copy()
        kind = rng.choice(["delta", "delta", "short", "bomb"])
        if kind == "delta":
            i = rng.randrange(len(deltas))
            deltas[i] = rng.choice([-1, 0, 1, 2**31 - 1, -(2**31), int(deltas[i]) + 1])
            blob, what = _frame(deltas.tobytes()), f"delta[{i}] = {deltas[i]}"
        elif kind == "short":
            blob, what = _frame(deltas[:-1].tobytes()), "one short"
        else:
            blob, what = _bomb(2**35), "bomb"
        tensors["positions"] = ("U8", [len(blob)], blob)
        header["payload_bytes"]["positions"] = len(blob)
        return f"positions {what}", pack.assemble(header=header, tensors=tensors)

    # rebuild: lies about which rows belong to which document
    segments, kind = header["segments"], rng.choice(["span", "swap-keys", "key", "manifest-sha", "tokens"])
    j = rng.randrange(len(segments))
    if kind == "span":
        segments[j]["tokens"][rng.randrange(2)] += rng.choice([-3, -1, 1, 3])
    elif kind == "swap-keys" and len(segments) > 1:
        k = (j + 1) % len(segments)
        segments[j]["key"], segments[k]["key"] = segments[k]["key"], segments[j]["key"]
    elif kind == "key":
        segments[j]["key"] = segments[(j + 1) % len(segments)]["key"]
    elif kind == "tokens":
        segments[j]["tokens"][1] = 0
    else:
        raw = zstandard.ZstdDecompressor().decompress(pack.tensors["manifest"][2])
        manifest = json.loads(raw)
        k = (j + 1) % len(manifest)
        manifest[j]["sha256"], manifest[k]["sha256"] = manifest[k]["sha256"], manifest[j]["sha256"]
        raw = _dumps(manifest).encode()
        blob = _frame(raw)
        tensors["manifest"] = ("U8", [len(blob)], blob)
        header["corpus"].update(manifest_sha256=hashlib.sha256(raw).hexdigest(), manifest_size=len(raw))
        header["payload_bytes"]["manifest"] = len(blob)
    return f"rebuild {kind} segment {j}", pack.assemble(header=header, tensors=tensors)


def _memory() -> tuple[int, int]:
    """This process's resident and peak resident bytes (VmRSS, VmHWM)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def run_isolated(harness: Harness, path: Path, timeout: float, check_reuse: bool = True) -> tuple[str, int]:
    """``harness.run(path, check_reuse)`` in a forked child: ``(outcome, peak memory growth in bytes)``.

    A child can be killed when it hangs, and its peak resident memory starts from what it
    shares with the parent, so the growth is the reader's alone.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        rss0, _ = _memory()
        try:
            outcome = harness.run(path, check_reuse)
        except BaseException as e:  # noqa: BLE001 - every escape is a finding
            outcome = f"crash {type(e).__name__}: {str(e)[:300]}"
        growth = max(0, _memory()[1] - rss0)
        os.write(write, json.dumps([outcome, growth]).encode())
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        return "hang", 0
    with os.fdopen(read, "rb") as f:
        data = f.read()
    if not data:
        return f"crash: child died (status {status})", 0
    outcome, growth = json.loads(data)
    return outcome, growth


class Harness:
    """Runs one mutated pack through load, inspect, query and a rebuild plan."""

    def __init__(self, pack_path: Path, corpus: Path, model_dir: Path | None):
        from kvcompile.builder import BuildOptions, segment_keys
        from kvcompile.corpus import read_corpus
        from kvcompile.pack import load
        from kvcompile.recipe import load_recipe

        self.original = load(pack_path)
        self.documents, _ = read_corpus([corpus])
        h = self.original.header
        options = BuildOptions(ratio=h["options"]["ratio"], budget=h["options"]["budget"],
                               chunk_size=h["options"]["chunk_size"], sinks=h["options"]["sinks"],
                               scorer=h["options"]["scorer"]["name"], codec=h["options"]["codec"]["name"])
        options.context, options.stream = h["options"]["context"], bool(h["options"].get("stream"))
        options.budgets = h["options"]["selection"]["budgets"]
        options.stream_scorer = h["options"].get("stream_scorer", {}).get("name")
        self.fingerprint = h["model"]["fingerprint"]
        self.keys = segment_keys(self.documents, self.fingerprint, load_recipe(h["recipe"]["name"]), options)
        assert self.keys == [s["key"] for s in h["segments"]], "the harness must reproduce the pack's keys"
        self.truth = self.original.segments(list(range(len(h["segments"]))))
        self.lm = None
        if model_dir is not None:
            from kvcompile.models import load_model

            self.lm = load_model(str(model_dir), device="cpu", progress=False)

    def run(self, path: Path, check_reuse: bool = True) -> str:
        """``refused`` or ``accepted``; raises AssertionError (or anything unexpected) on a failure.

        ``check_reuse``: a rebuild must reuse only the rows the original pack held for the
        document. Not for edits of the KV payload itself (with checksums repaired): those
        are a different pack, not a lie about this one (docs/security.md).
        """
        from typer.testing import CliRunner

        from kvcompile.cli import app
        from kvcompile.errors import KvcompileError
        from kvcompile.pack import load
        from kvcompile.rebuild import plan_rebuild

        runner = CliRunner()
        for args in (["inspect", str(path)], ["inspect", str(path), "--json"]):
            result = runner.invoke(app, args)
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            code, stderr = result.exit_code, result.stderr
            del result  # its exception's traceback holds what the reader read
            assert code in (0, 2), f"{args[-1]}: exit {code}"
            if code == 2:
                lines = stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {stderr!r}"
                assert "\x1b" not in stderr
        try:
            pack = load(path)
        except KvcompileError:
            outcome = "refused"
        else:
            outcome = "accepted"
            if self.lm is not None:
                try:
                    pack.session(self.lm).ask("When is payment due?", max_new_tokens=2)
                except KvcompileError:
                    pass
        plan = plan_rebuild(self.documents, self.keys, path, self.fingerprint)
        if not check_reuse:
            return outcome
        truth = [hi - lo for lo, hi in (s["tokens"] for s in self.original.header["segments"])]
        plan.check_tokens(dict(enumerate(truth)),
                          {k: self.original.model[k] for k in ("num_layers", "num_kv_heads", "head_dim")})
        if plan.reuse:
            got = plan.pack.segments(sorted(set(plan.reuse.values())))
            for i, j in plan.reuse.items():
                for a, b in zip(got[j], self.truth[i]):
                    assert a.lengths == b.lengths and a.positions.equal(b.positions) and a.keys.equal(b.keys) \
                        and a.values.equal(b.values), f"a rebuild would reuse segment {j}'s rows for document {i}"
        return outcome


def fuzz(pack_path: Path, corpus: Path, model_dir: Path | None, cases: int, seed: int,
         case_timeout: float = 5.0, budget_s: float | None = None, memory_slack: int = 64 << 20) -> dict:
    """Run ``cases`` mutations (or until ``budget_s``); return a summary with every failure.

    A case fails on any exception other than KvcompileError, on a wrong reuse, when it
    runs longer than ``case_timeout`` seconds, or when its peak memory grows by more than
    twice its pack's size plus ``memory_slack``.
    """
    torch.set_num_threads(1)  # forked children must not inherit a thread pool
    harness = Harness(pack_path, corpus, model_dir)
    base = Pack(pack_path)
    harness.run(pack_path)  # imports, first load and first question happen once, here
    tmp = Path(tempfile.mkdtemp(prefix="packfuzz-"))
    summary = {"seed": seed, "cases": 0, "outcomes": {}, "families": {}, "failures": [], "max_case_s": 0.0,
               "max_memory_growth": 0}
    t_start = time.perf_counter()
    for n in range(cases):
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            break
        what, data = mutate(base, random.Random(f"{seed}:{n}"))
        path = tmp / f"case{n}.kvpack"
        path.write_bytes(data)
        t0 = time.perf_counter()
        outcome, growth = run_isolated(harness, path, case_timeout, check_reuse=not what.startswith("positions"))
        dt = time.perf_counter() - t0
        path.unlink()
        if outcome in ("refused", "accepted") and growth > 2 * len(data) + memory_slack:
            outcome = f"memory: grew by {growth >> 20} MiB for a {len(data) >> 10} KiB pack"
        summary["cases"] += 1
        summary["max_case_s"] = max(summary["max_case_s"], round(dt, 3))
        summary["max_memory_growth"] = max(summary["max_memory_growth"], growth)
        family = what.split()[0]
        summary["families"][family] = summary["families"].get(family, 0) + 1
        key = outcome if outcome in ("refused", "accepted") else "failure"
        summary["outcomes"][key] = summary["outcomes"].get(key, 0) + 1
        if key == "failure":
            summary["failures"].append({"case": n, "mutation": what[:200], "outcome": outcome})
    os.rmdir(tmp)
    summary["pack_bytes"] = len(base.bytes)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", type=Path, required=True, help="a valid pack to mutate")
    ap.add_argument("--corpus", type=Path, required=True, help="the corpus it was built from")
    ap.add_argument("--model", type=Path, help="its model directory (to ask questions of accepted packs)")
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, help="stop after this many seconds")
    ap.add_argument("--case-timeout", type=float, default=5.0)
    ap.add_argument("--json", type=Path, help="write the summary here")
    args = ap.parse_args()
    summary = fuzz(args.pack, args.corpus, args.model, args.cases, args.seed, args.case_timeout, args.budget)
    text = json.dumps(summary, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    sys.exit(1 if summary["failures"] else 0)


if __name__ == "__main__":
    main()
