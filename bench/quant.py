"""Quantised packs: gain kept against bytes, for each codec alone and stacked on selection (issue 13).

For each corpus, an fp16 pack is built at each kept ratio (1.0 is every token: the codec
alone). Each codec then encodes that pack's stored rows exactly as ``build --quant``
encodes a compiled layer (same runs, same groups, the codec's own round trip), and the
decoded rows are attended through the loader's path. Bytes are those of the encoded
tensors plus the pack's positions, against the fp16 full cache. One difference from a
real ``build --quant``: under ``chained`` context a real build compiles each document
after the *quantised* rows of the documents before it, where here they saw fp16 rows.
``--check-build`` measures that difference on real builds (``int4`` and ``kvmix`` at
0.25 on the first corpus).

References at the same questions: the full context, no context, kvpress presses at
fp16 (``bench/peers.py``'s captured path), and transformers' ``QuantizedCache`` (quanto
backend, ``optimum-quanto``) over the full context: the corpus prefilled into it, its
dequantised keys and values answered from (``--caches``, skipped where quanto is missing).
Statistics as in ``bench/peers.py``: gain kept pooled over questions and corpora with
delta-method standard errors, and paired differences against the fp16 pack at the same ratio.

    python bench/quant.py                  # 4 corpora x 30 questions, Qwen2.5-Coder-0.5B
    python bench/quant.py --corpora squad:14 --questions 5 --ratios 1,0.25
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from peers import DEFAULT_CORPORA, capture, compress, corpus_of, import_kvpress, presses  # noqa: E402

from kvcompile.builder import BuildOptions  # noqa: E402
from kvcompile.cache import forward  # noqa: E402
from kvcompile.evaluation import answercache, stats  # noqa: E402
from kvcompile.evaluation.methods import SessionMethod, pack_method, prefill_method  # noqa: E402
from kvcompile.evaluation.run import MethodResult, fill_gain_kept, linearised  # noqa: E402
from kvcompile.kvmix import layer_bits  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.pack import load  # noqa: E402
from kvcompile.pipeline import build  # noqa: E402
from kvcompile.ragged import RaggedKV  # noqa: E402
from kvcompile.recipe import load_recipe  # noqa: E402
from kvcompile.rope import place, rotaries  # noqa: E402
from kvcompile.session import Session  # noqa: E402

QUANTS = ("fp16", "int8", "int4", "int3", "int2", "kvmix", "rvq")  # each alone, every token kept
STACKED = ("fp16", "int4", "int2", "kvmix", "rvq")  # on task-aware selection
PRESSES = ("snapkv", "knorm")
CACHES = ("quanto:4", "quanto:2")  # transformers' QuantizedCache, backend:bits, at its defaults otherwise


@torch.no_grad()
def encoded_kv(pack, lm, options: BuildOptions, positions: str = "original") -> tuple[list[RaggedKV], int]:
    """The pack's rows through ``options``' codecs, placed as the loader places them (keys at
    ``positions``, :meth:`Pack.attended_positions`); and the bytes of the encoded keys and
    values plus the pack's positions."""
    cap = lm.capability
    codecs = options.codecs(cap.num_layers, cap.head_dim)
    per_layer = rotaries(lm.model)
    at, _ = pack.attended_positions(positions)
    kv, nbytes = [], pack.sizes()["positions"]
    for li, (kc, vc) in enumerate(codecs):
        layer, runs = pack.layer(li), pack.runs(li)
        parts = []
        for codec, rows in ((kc, layer.keys), (vc, layer.values)):
            codec = codec.fit(rows.shape[0], rows.shape[1])  # as the writer does (RVQ sizes its codebooks)
            encoded = codec.encode(rows.float(), runs)
            nbytes += sum(t.numel() * t.element_size() for t in encoded.values())
            parts.append(codec.decode(encoded, runs, cap.head_dim))
        layer = layer.replace(keys=parts[0], values=parts[1], positions=at[li])
        kv.append(place(layer, [per_layer[li]], lm.device, lm.dtype))
    return kv, nbytes


def _stored_bytes(t) -> int:
    """Bytes of a quanto tensor's parts: integer data as stored, floats (scales, shifts) at 2
    bytes, as in an fp16 deployment whatever dtype this CPU run computes in."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * (2 if t.is_floating_point() else t.element_size())


@torch.no_grad()
def quantized_cache_kv(lm, context: list[int], backend: str, nbits: int) -> tuple[list[RaggedKV], int]:
    """The context prefilled into transformers' ``QuantizedCache`` (its defaults: groups of 64,
    keys and values quantised along the same axis, after RoPE); each layer's dequantised rows
    as a pack-shaped prefix, and the bytes of what the cache stores."""
    from transformers import QuantizedCache

    cache = QuantizedCache(backend=backend, config=lm.config, nbits=nbits)
    forward(lm.model, torch.tensor([context], device=lm.device), cache, logits_to_keep=1)
    kv, nbytes = [], 0
    positions = torch.arange(len(context), device=lm.device)
    for layer in cache.layers:
        stored = (layer._quantized_keys, layer._quantized_values)
        keys, values = (layer._dequantize(q)[0].to(lm.dtype) for q in stored)
        nbytes += sum(_stored_bytes(q) for q in stored)
        kv.append(RaggedKV.from_dense(keys, values, positions.expand(keys.shape[0], -1)))
    return kv, nbytes


def run_corpus(spec: str, lm, recipe, ratios, quants, stacked, press_names, n_questions, tmp: Path, log,
               nll_cache: Path | None, check_build: bool, caches=()) -> dict:
    evalset, folder, qas, tk = corpus_of(spec, n_questions, tmp, lm, recipe)
    context = tk.stream()
    cached = partial(answercache.cached, folder=nll_cache, lm=lm, framing=tk.framing, tally={})
    makers = [
        cached(partial(prefill_method, lm, tk.framing, context, "full", "full", 1.0), kind="full", context_ids=context),
        cached(partial(prefill_method, lm, tk.framing, tk.prefix_ids, "none", "none", 0.0), kind="none",
               context_ids=tk.prefix_ids),
    ]
    bits = None
    if any(q.startswith("kvmix") for q in [*quants, *stacked]):
        t0 = time.perf_counter()
        bits = layer_bits(tk, lm)
        log(f"  kvmix profile in {time.perf_counter() - t0:.0f} s: key bits {[b[0] for b in bits]}, "
            f"value bits {[b[1] for b in bits]}")
    full_bytes, build_s = None, {}
    for r in ratios:
        path = tmp / f"{folder.name}-{r:g}.kvpack"
        t0 = time.perf_counter()
        build([folder], path, lm, recipe, BuildOptions(ratio=r))
        build_s[f"fp16@{r:g}"] = time.perf_counter() - t0
        log(f"  built the fp16 pack at {r:g} in {build_s[f'fp16@{r:g}']:.0f} s")
        pack = load(path)
        full_bytes = pack.sizes()["full_fp16"]
        for q in (quants if r == 1 else stacked):
            q_codec, _, positions = q.partition("+")  # fp16+compact: keys at compacted positions
            name, _, share = q_codec.partition("/")  # int2/0.05: with a share of rows stored exactly
            options = BuildOptions(ratio=r, quant="none" if name == "fp16" else name,
                                   layer_bits=bits if name == "kvmix" else None,
                                   quant_outliers=float(share) if share else None)

            def make(q=q, options=options, pack=pack, r=r, positions=positions or "original"):
                t = time.perf_counter()
                kv, nbytes = encoded_kv(pack, lm, options, positions)
                session = Session.over(lm, tk.framing, kv, pack.attended_positions(positions)[1])
                return SessionMethod(session, f"{q}@{r:g}", "pack", r, kv_bytes=nbytes,
                                     setup_seconds=time.perf_counter() - t)
            makers.append(make)
    if check_build:
        for q in ("int4", "kvmix"):
            if q not in stacked or 0.25 not in ratios:
                continue
            path = tmp / f"{folder.name}-{q}-build.kvpack"
            t0 = time.perf_counter()
            build([folder], path, lm, recipe, BuildOptions(ratio=0.25, quant=q))
            build_s[f"{q}-build@0.25"] = time.perf_counter() - t0

            def make_built(q=q, path=path):
                m = pack_method(load(path), lm)
                m.name = f"{q}-build@0.25"
                return m
            makers.append(make_built)
    if press_names:
        captured = capture(lm, context + tk.probe_ids)

        def peer(name, r):
            press = presses(r, len(tk.probe_ids), [name])[name]
            kv = compress(press, lm, captured, len(context), r)
            return SessionMethod(Session.over(lm, tk.framing, kv, len(context)), f"{name}@{r:g}", "peer", r)
        makers += [partial(peer, name, r) for r in ratios if r < 1 for name in press_names]
    for backend, nbits in caches:
        def reference(backend=backend, nbits=nbits):
            t = time.perf_counter()
            kv, nbytes = quantized_cache_kv(lm, context, backend, nbits)
            return SessionMethod(Session.over(lm, tk.framing, kv, len(context)),
                                 f"QuantizedCache-{backend}-int{nbits}@1", "cache", 1.0, kv_bytes=nbytes,
                                 setup_seconds=time.perf_counter() - t)
        makers.append(reference)
    t0 = time.perf_counter()
    results = nlls_only(makers, qas)
    log(f"  {len(makers)} methods x {len(qas)} questions in {time.perf_counter() - t0:.0f} s")
    return {"spec": spec, "name": evalset.name, "tokens": tk.total, "questions": len(qas), "build_s": build_s,
            "full_fp16_bytes": full_bytes, "kvmix_bits": bits, "results": results}


def nlls_only(makers, qas) -> list[MethodResult]:
    """Each method's gold-answer NLL per question (the measure here; nothing is generated)."""
    results = []
    for make in makers:
        method = make()
        rows = [{"id": qa.id, "nll": method.answer_nll(qa)} for qa in qas]
        results.append(MethodResult(method.name, method.kind, method.ratio, method.kv_bytes, method.kv_tokens,
                                    method.setup_seconds, None, rows))
        del method
    fill_gain_kept(results)
    return results


def aggregate(runs: list[dict]) -> list[dict]:
    """Per method: gain kept pooled over corpora, bytes against the fp16 full cache, and the
    paired difference against the fp16 pack at the same ratio."""
    by = {}
    for run in runs:
        res = {r.name: r for r in run["results"]}
        for r in run["results"]:
            if r.kind in ("full", "none"):
                continue
            z = linearised(run["results"], r)
            entry = by.setdefault(r.name, {"method": r.name, "kind": r.kind, "z": [], "diff": [], "x": [],
                                           "ref_z": []})
            entry["z"].append(z)
            entry["x"].append(run["full_fp16_bytes"] / r.kv_bytes)
            family, _, ratio = r.name.partition("@")
            ref = res.get(f"fp16@{ratio}")
            if ref is not None:  # "of fp16" divides by the fp16 pack on the same corpora
                entry["ref_z"].append(linearised(run["results"], ref))
            if r.kind == "pack" and ref is not None and ref is not r:
                entry["diff"].append([a - b for a, b in zip(z, linearised(run["results"], ref))])
    out = []
    for name, e in by.items():
        gain = stats.pooled(e["z"])
        diff = stats.pooled(e["diff"]) if e["diff"] else None
        ref_gain = stats.pooled(e["ref_z"]).mean if e["ref_z"] else float("nan")
        out.append({"method": name, "kind": e["kind"], "gain_kept": gain.mean, "se": gain.se,
                    "times_smaller": sum(e["x"]) / len(e["x"]),
                    "of_fp16_pack": gain.mean / ref_gain if ref_gain and not math.isnan(ref_gain) else None,
                    "minus_fp16_pack": diff.mean if diff else None, "minus_fp16_pack_se": diff.se if diff else None,
                    "questions": gain.questions, "corpora": gain.corpora})
    return out


def _f(x, digits=2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(rows: list[dict], runs: list[dict], meta: dict) -> str:
    lines = [
        "# Quantised packs (issue 13)",
        "",
        f"{meta['model']} on {meta['device']}, {meta['date']}; {len(runs)} corpora "
        f"({', '.join(r['spec'] for r in runs)}), {sum(r['questions'] for r in runs)} questions. "
        "Gain kept: the share of the full context's gold-answer NLL gain over no context, pooled "
        "over questions and corpora, ± its standard error. \"x smaller\": the fp16 full cache's bytes "
        "over the method's (encoded keys and values plus positions; presses: their fp16 rows). "
        "\"of fp16\": gain kept over that of the fp16 pack at the same ratio; the paired column is "
        "the per-question difference from it ± its standard error. Reproduce: "
        f"`{meta['command']}`.",
        "",
        "| method | kept ratio | x smaller | gain kept | of fp16 | minus fp16 pack (paired) | questions |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (-float(r["method"].partition("@")[2] or 0), r["kind"] != "pack",
                                         r["method"])):
        fam, _, ratio = r["method"].partition("@")
        paired = (f"{r['minus_fp16_pack']:+.3f} ± {r['minus_fp16_pack_se']:.3f}"
                  if r["minus_fp16_pack"] is not None and fam != "fp16" else "–")
        lines.append(f"| {fam} | {ratio} | {r['times_smaller']:.1f} | {_f(r['gain_kept'])} ± {_f(r['se'])} | "
                     f"{_f(r['of_fp16_pack'])} | {paired} | {r['questions']} |")
    lines += ["", "kvmix bits per layer (keys, values), from each corpus's profile:", ""]
    for run in runs:
        if run.get("kvmix_bits"):
            lines.append(f"- {run['spec']}: keys {[b[0] for b in run['kvmix_bits']]}, "
                         f"values {[b[1] for b in run['kvmix_bits']]}")
    lines += ["", "Build times (s): " + "; ".join(f"{run['spec']}: " + ", ".join(
        f"{k} {v:.0f}" for k, v in run["build_s"].items()) for run in runs), ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = sorted({r["method"].partition("@")[0] for r in rows})
    for fam in families:
        pts = sorted((r["times_smaller"], r["gain_kept"]) for r in rows if r["method"].partition("@")[0] == fam)
        kind = next(r["kind"] for r in rows if r["method"].partition("@")[0] == fam)
        label = {"pack": fam, "peer": f"{fam} (kvpress, fp16)", "cache": f"{fam} (transformers)"}[kind]
        ax.plot(*zip(*pts), marker={"pack": "o", "peer": "x", "cache": "s"}[kind],
                linestyle="-" if kind == "pack" else ":", label=label)
    ax.axvline(30, color="grey", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("times smaller than the fp16 full cache")
    ax.set_ylabel("gain kept")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--corpora", default=DEFAULT_CORPORA)
    ap.add_argument("--ratios", default="1,0.5,0.25,0.1")
    ap.add_argument("--quants", default=",".join(QUANTS), help="codecs at ratio 1 (name, or name/share: "
                    "with that share of rows stored exactly)")
    ap.add_argument("--stacked", default=",".join(STACKED), help="codecs at the ratios below 1 (name+compact: "
                    "with the keys at compacted positions, compared with the fp16 pack at original ones)")
    ap.add_argument("--presses", default=",".join(PRESSES), help="kvpress presses at fp16 ('' for none)")
    ap.add_argument("--caches", default=",".join(CACHES), help="transformers QuantizedCache references over the "
                    "full context, backend:bits ('' for none; skipped where the backend is not installed)")
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check-build", action="store_true", help="also build int4 and kvmix packs at 0.25 for real")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "quant")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="write one report from several quant.json")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.merge:
        parts = [json.loads(p.read_text(encoding="utf-8")) for p in args.merge]
        runs = merge_runs([c for part in parts for c in part["corpora"]])
        meta = {k: parts[0][k] for k in ("model", "device", "date")}
        meta["command"] = " + ".join(part["command"] for part in parts)
        write(runs, meta, args.out)
        log(f"wrote {args.out}/quant.{{md,json,png}}")
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    quants = [q for q in args.quants.split(",") if q.strip()]
    stacked = [q for q in args.stacked.split(",") if q.strip()]
    press_names = [p for p in args.presses.split(",") if p.strip()]
    if press_names:
        import_kvpress()
    caches = [(b, int(n)) for b, _, n in (c.partition(":") for c in args.caches.split(",") if c.strip())]
    if caches and importlib.util.find_spec("optimum") is None:
        print("optimum-quanto is not installed: no QuantizedCache references (make install-bench)", file=sys.stderr)
        caches = []
    lm = load_model(args.model, device="cpu", progress=False)
    recipe = load_recipe("qa")
    runs = []
    meta = {"model": lm.name, "device": f"CPU ({args.threads} thread)", "date": time.strftime("%Y-%m-%d"),
            "command": "python bench/quant.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="quant-") as tmp:
        for i, spec in enumerate(c.strip() for c in args.corpora.split(",") if c.strip()):
            log(f"{spec}:")
            runs.append(run_corpus(spec, lm, recipe, ratios, quants, stacked, press_names, args.questions,
                                   Path(tmp), log, answercache.default_folder(), args.check_build and i == 0,
                                   caches))
            write(runs, meta, args.out)  # after each corpus: a long run that stops early still reports
            log(f"wrote {args.out}/quant.{{md,json,png}}")
    return 0


def merge_runs(corpora: list[dict]) -> list[dict]:
    """Saved corpora (``quant.json``'s ``corpora``) as runs, one per corpus spec: a later run of
    the same corpus adds its methods and replaces those of the same name (a rerun of one codec,
    or references added on the same questions)."""
    by_spec: dict[str, dict] = {}
    for c in corpora:
        run = by_spec.setdefault(c["spec"], {**c, "methods": {}})
        run["build_s"] = {**run.get("build_s", {}), **c.get("build_s", {})}
        run["kvmix_bits"] = c.get("kvmix_bits") or run.get("kvmix_bits")
        for m in c["methods"]:
            if m["kind"] in ("full", "none"):
                m = {**m, "name": m["kind"]}
            old = run["methods"].get(m["name"])
            if old is not None and [r["id"] for r in old["rows"]] != [r["id"] for r in m["rows"]]:
                raise SystemExit(f"{c['spec']}: {m['name']} was measured on other questions; cannot merge")
            run["methods"][m["name"]] = m
    return [{**{k: v for k, v in run.items() if k != "methods"},
             "results": [MethodResult(m["name"], m["kind"], m["ratio"], m["kv_bytes"], 0.0, 0.0, None, m["rows"])
                         for m in run["methods"].values()]} for run in by_spec.values()]


def write(runs: list[dict], meta: dict, out: Path) -> None:
    for run in runs:
        fill_gain_kept(run["results"])
    rows = aggregate(runs)
    out.mkdir(parents=True, exist_ok=True)
    data = {**meta, "rows": rows, "corpora": [{**{k: v for k, v in run.items() if k != "results"},
                                               "methods": [{"name": r.name, "kind": r.kind, "ratio": r.ratio,
                                                            "kv_bytes": r.kv_bytes, "gain_kept": r.gain_kept,
                                                            "gain_kept_se": r.gain_kept_se, "rows": r.rows}
                                                           for r in run["results"]]} for run in runs]}
    (out / "quant.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / "quant.md").write_text(markdown(rows, runs, meta), encoding="utf-8")
    plot(rows, out / "quant.png")


if __name__ == "__main__":
    raise SystemExit(main())
