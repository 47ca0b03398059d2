"""What ``kvcompile eval`` shows and writes: a terminal table, JSON, and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .run import MethodResult, compare
from .stats import Estimate

# Baselines first, then packs and peers by kept ratio (largest first).
_ORDER = {"full": 0, "none": 1}


def ordered(results: list[MethodResult]) -> list[MethodResult]:
    return sorted(results, key=lambda r: (_ORDER.get(r.kind, 2), -(r.ratio or 0), r.kind != "pack", r.name))


def references(results: list[MethodResult], reference: str | None = None) -> dict[str, MethodResult]:
    """The method each result is compared with: ``reference`` (a method name) for all the others,
    or by default the unquantised pack (``kvcompile@...``) whose kept ratio is nearest, within
    0.01, for each method that is neither a baseline without a budget (full, none) nor an
    unquantised pack itself (a quantised pack, ``kvcompile[int4]@...``, is compared with it)."""
    if reference is not None:  # a name that is not a method's compares nothing (the table says so)
        ref = next((r for r in results if r.name == reference), None)
        return {} if ref is None else {r.name: ref for r in results if r is not ref}
    packs = [r for r in results if r.kind == "pack" and r.ratio is not None and r.name.startswith("kvcompile@")]
    refs = {}
    for r in results:
        quantised = r.kind == "pack" and r.name.startswith("kvcompile[")  # against the fp16 pack of its ratio
        if (r.kind in ("pack", "full", "none") and not quantised) or r.ratio is None or not packs:
            continue
        near = min(packs, key=lambda p: abs(p.ratio - r.ratio))
        if abs(near.ratio - r.ratio) < 0.01:
            refs[r.name] = near
    return refs


def comparisons(results: list[MethodResult], reference: str | None = None) -> dict[str, tuple[str, Estimate]]:
    """Per method: (reference name, paired difference in gain kept, method minus reference, with its SE)."""
    found = {}
    for name, ref in references(results, reference).items():
        est = compare(results, next(r for r in results if r.name == name), ref)
        if est is not None:
            found[name] = (ref.name, est)
    return found


def table(results: list[MethodResult], title: str, reference: str | None = None):
    """A rich Table of every method's summary, with gain kept ± its standard error and, when the
    baselines ran, the paired difference in gain kept from the reference (:func:`references`)."""
    from rich.table import Table

    vs = comparisons(results, reference)
    caption = None
    if reference is not None and not any(r.name == reference for r in results):
        caption = f"--reference {reference!r} is not one of the methods: " + ", ".join(r.name for r in ordered(results))
    elif vs:
        caption = ("gain kept ± standard error (delta method, over questions); "
                   + (f"Δ = gain kept minus {reference}'s" if reference else
                      "Δ = gain kept minus the pack's at the same kept ratio") + ", paired over the questions, ± SE")
    t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for col in ("method", "kept", "KV bytes", "contains", "EM", "F1", "NLL", "gain kept", "Δ", "TTFT s", "tok/s",
                "peak mem"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in ordered(results):
        s = r.summary()
        gain = Estimate(_nan(s["gain_kept"]), _nan(s["gain_kept_se"]), len(r.rows))
        t.add_row(r.name, _num(s["ratio"], "{:.0%}"), human_bytes(s["kv_bytes"]), _num(s["contains"], "{:.2f}"),
                  _num(s["exact_match"], "{:.2f}"), _num(s["f1"], "{:.2f}"), _num(s["nll"], "{:.3f}"),
                  gain.format(), vs[r.name][1].format(signed=True) if r.name in vs else "–",
                  _num(s["ttft_s"], "{:.2f}"), _num(s["tokens_per_s"], "{:.1f}"), human_bytes(s["peak_memory"]))
    return t


def to_json(results: list[MethodResult], meta: dict, reference: str | None = None) -> dict:
    """Every method's summary and rows, and the paired comparisons (``method - reference``)."""
    vs = comparisons(results, reference)
    return {**meta, "methods": [r.to_json() for r in ordered(results)],
            "comparisons": [{"method": name, "reference": ref, "diff": est.to_json()["mean"],
                             "se": est.to_json()["se"], "questions": est.questions}
                            for name, (ref, est) in vs.items()]}


def write(results: list[MethodResult], meta: dict, out: Path, reference: str | None = None) -> list[Path]:
    """Write ``eval.json`` (and ``eval.png`` when there is something to compare) under ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.json"]
    text = json.dumps(to_json(results, meta, reference), indent=1, ensure_ascii=False) + "\n"
    paths[0].write_text(text, encoding="utf-8")
    if plot_quality(results, out / "eval.png", meta.get("title", "")):
        paths.append(out / "eval.png")
    return paths


def plot_quality(results: list[MethodResult], path: Path, title: str = "") -> bool:
    """Quality against KV bytes and against the kept ratio, one line per method family.

    Quality is the share of the full context's NLL gain kept when ``none`` and ``full``
    ran, else F1. Returns False (and writes nothing) when there is nothing to compare.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_gain = any(r.gain_kept is not None for r in results)
    metric = "gain kept (share of full context's NLL gain)" if use_gain else "F1"

    def quality(r: MethodResult) -> float:
        return r.gain_kept if use_gain else r.summary()["f1"]

    families: dict[str, list[MethodResult]] = {}
    for r in results:
        families.setdefault(r.name.split("@")[0], []).append(r)
    if sum(len(v) for v in families.values()) < 2:
        return False

    fig, (ax_bytes, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.8))
    for family, rs in sorted(families.items()):
        rs = sorted(rs, key=lambda r: r.kv_bytes)
        style = "o-" if family == "kvcompile" else ("s--" if family == "rag" else ".:")
        width = 2.5 if family == "kvcompile" else 1.2
        ax_bytes.plot([r.kv_bytes / 2**20 for r in rs], [quality(r) for r in rs], style, lw=width, label=family)
        with_ratio = [r for r in rs if r.ratio is not None]
        if with_ratio and family not in ("full", "none"):
            ax_ratio.plot([r.ratio for r in with_ratio], [quality(r) for r in with_ratio], style, lw=width,
                          label=family)
    for r in results:
        if r.kind in ("full", "none"):
            ax_ratio.axhline(quality(r), color="gray", ls="-" if r.kind == "full" else ":", lw=1)
            ax_ratio.annotate(r.kind, (0, quality(r)), xycoords=("axes fraction", "data"), fontsize=8, color="gray")
    ax_bytes.set(xlabel="KV bytes the question attends to (MiB, fp16)", ylabel=metric, xscale="log")
    ax_ratio.set(xlabel="kept ratio (token budget / corpus)", ylabel=metric, xscale="log")
    ax_ratio.legend(fontsize=8, loc="best")
    for ax in (ax_bytes, ax_ratio):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def human_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def _nan(x) -> float:
    return float("nan") if x is None else x


def _num(x, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return fmt.format(x)
