"""The ``kvcompile`` command line: build, query, inspect.

Every user mistake ends in one line on stderr and a non-zero exit code; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import KvcompileError, OptionError
from .terminal import printable

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compile a document corpus into a compressed, task-aware KV cache (.kvpack) and answer questions from it.",
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn kvcompile's errors into one line and an exit code; tracebacks only with --debug."""
    try:
        yield
    except KvcompileError as e:
        if debug:
            raise
        _error(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        err.print("[bold red]interrupted[/]: nothing was written")
        raise typer.Exit(130) from None


def _error(message: str) -> None:
    err.print("[bold red]error:[/] " + _show(message), soft_wrap=True)


def _show(text: object) -> str:
    """Untrusted text (file names, anything from a pack) as rich markup: one line, inert."""
    return escape(printable(text))


DebugOpt = typer.Option(False, "--debug", help="Show tracebacks on errors.")
ModelOpt = typer.Option(None, "--model", "-m", help="Model: an alias (smollm2-135m, qwen2.5-coder-0.5b), a local directory or .gguf file, or a Hub id.")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")
ApeOpt = typer.Option(None, "--ape", metavar="T,S", help="With --select: boundary repair of the segments attended side by side (APE): their attention logits divided by temperature T, their log-sum-exp scaled by T*S (e.g. 0.9,0.9; 1,1 is no repair).")
SparseOpt = typer.Option(None, "--sparse", metavar="TOP_K", help="Decode with RocketKV's hybrid sparse attention: each step attends, per KV head, only to the prefix pages its query scores best from per-page key bounds. TOP_K: auto (the paper's budget split for what the pack kept), a share of each head's rows (0.25), or a number of rows (256); 1 attends to everything (exact).")
SparsePageOpt = typer.Option(None, "--sparse-page", min=1, help="With --sparse: rows per page summary (default: the paper's split).")
SparseChannelsOpt = typer.Option(None, "--sparse-channels", min=1, help="With --sparse: query channels the page scores read (default: the paper's split).")
PositionsOpt = typer.Option("auto", "--positions", help="Where the kept keys stand: compact (contiguous within each layer and KV head, in corpus order; the question right after the longest head), original (their corpus positions), or auto (compact; original for models with absolute positions).")


@app.command()
def build(
    corpus: List[Path] = typer.Argument(..., help="Folders (searched recursively) or files of .txt .md .rst .html .jsonl .json .csv .parquet."),
    output: Path = typer.Option(..., "--output", "-o", help="The .kvpack to write (replaced atomically)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="A built-in recipe: faq, qa, summarize, multihop (default: qa)."),
    task_file: Optional[Path] = typer.Option(None, "--task-file", help="Your own recipe (TOML)."),
    probe: List[str] = typer.Option([], "--probe", help="A sample question to guide compression (repeatable)."),
    probes: Optional[Path] = typer.Option(None, "--probes", help="A file of sample questions, one per line (or JSONL)."),
    auto_probes: Optional[str] = typer.Option(None, "--auto-probes", metavar="N", help="Have the model write N sample questions from the corpus, in the recipe's style, and add them to the probes (recorded in the pack; reused by rebuilds while their source text is unchanged)."),
    model: Optional[str] = ModelOpt,
    ratio: Optional[float] = typer.Option(None, "--ratio", "-r", help="Share of the cache's tokens to keep, in (0, 1] (recipe default: 0.25)."),
    budget: Optional[int] = typer.Option(None, "--budget", "-b", help="Tokens to keep per KV head (overrides --ratio)."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Tokens prefilled per chunk (recipe default: 2048)."),
    sinks: Optional[int] = typer.Option(None, "--sinks", help="First tokens always kept (recipe default: 4)."),
    scorer: str = typer.Option("task_aware", "--scorer", help="task_aware; snapkv (RocketKV's SnapKV++ with the task prompt as window); lagkv (attention-free); or stride (an even-stride baseline)."),
    recon: Optional[float] = typer.Option(None, "--recon", help="Task-aware scorer, --context whole: the weight in [0, 1] of reconstruction (what the model attends to when it repeats the corpus, KVzip) against the task prompt's attention (default 0.5; 0: off, one forward of the corpus less)."),
    context: str = typer.Option("auto", "--context", help="auto (default): whole when the corpus fits the model's window, else chained (streamed). chained: each document compiled after what was kept of the documents before it (an edit recompiles from there on); independent: after the framing alone (an edit recompiles that document only; lower quality, see docs/nightly.md); whole: one prefill of the whole corpus and one repeat of it (--recon), selected at once and cut into documents (rows as the full context has them; an edit recompiles every document)."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Compile chunk by chunk after the compacted kept tokens, so that a corpus longer than the model's window fits in bounded memory (default: only when the corpus does not fit)."),
    stream_scorer: str = typer.Option("auto", "--stream-scorer", help="When the build streams: compress the stream with this scorer first (lagkv: attention-free and recursive, no task prompt per chunk), keeping what the window holds (at most 4x the budget); --scorer then selects the budget among those survivors at once (an edit recompiles every document). auto (default): lagkv when --scorer reads the task prompt and the build is chained; none: --scorer scores every chunk itself (an edit recompiles from that document on). Ignored when the corpus fits the window (read whole)."),
    budgets: str = typer.Option("auto", "--budgets", help="auto (default): corpus under --context whole and after a stream scorer (one selection over the corpus), else document. document: every document keeps the same share of its tokens; corpus: documents compete for the budget, as one selection over the whole corpus with the task prompt decides (chained or independent: a survey prefill first, and an edit also recompiles documents whose budget moves)."),
    reuse: Optional[Path] = typer.Option(None, "--reuse", help="Reuse unchanged segments of this pack (default: the existing --output)."),
    check: bool = typer.Option(False, "--check", help="Exit 0 if the pack is up to date, 1 (listing what is stale) if not; builds nothing, loads no model weights."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be reused, recompiled, added and dropped; build nothing."),
    dtype: str = typer.Option("fp16", "--dtype", help="Storage of what is not quantised: fp16, bf16 or fp32."),
    quant: str = typer.Option("none", "--quant", help="Quantise what is kept: int8, int4, int3, int2 (KIVI groups: keys per channel, values per token); kvmix (bits per layer from gradient profiling; more for the top 20% of layers); or rvq (residual vector quantisation, codebooks learned on this corpus; any edit recompiles every document). Default none."),
    quant_group: int = typer.Option(32, "--quant-group", help="With --quant: tokens per key group and channels per value group."),
    rvq_depth: int = typer.Option(2, "--rvq-depth", help="With --quant rvq: residual levels (one byte each) per sub-vector."),
    rvq_group: int = typer.Option(8, "--rvq-group", help="With --quant rvq: channels per sub-vector (default 8: with depth 2, 2 bits per value)."),
    quant_outliers: Optional[float] = typer.Option(None, "--quant-outliers", help="With --quant: the share of each head's rows (per document) that quantise worst, stored exactly in fp16 (default: 0; kvmix 0.1)."),
    text_field: str = typer.Option("text", "--text-field", help="Column holding the text in .jsonl/.json/.csv/.parquet files."),
    max_file_mib: int = typer.Option(64, "--max-file-mib", min=1, help="Skip corpus files larger than this (MiB)."),
    device: Optional[str] = DeviceOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    debug: bool = DebugOpt,
) -> None:
    """Compile CORPUS into a .kvpack."""
    from .builder import BuildOptions
    from .models import load_model
    from .pipeline import build as run_build
    from .probes import check_count, check_scorer
    from .recipe import load_recipe, read_probes

    with _errors(debug):
        if task and task_file:
            raise OptionError("give --task or --task-file, not both")
        recipe = load_recipe(file=task_file) if task_file else load_recipe(task or "qa")
        extra = list(probe) + (read_probes(probes) if probes else [])
        if extra:
            recipe = recipe.with_probes(extra)
        n_auto = check_count(auto_probes) if auto_probes is not None else 0
        defaults = recipe.options
        options = BuildOptions(
            ratio=ratio if ratio is not None else (None if budget is not None else defaults.get("ratio", 0.25)),
            budget=budget if budget is not None else (defaults.get("budget") if ratio is None else None),
            chunk_size=chunk_size if chunk_size is not None else defaults.get("chunk_size", 2048),
            sinks=sinks if sinks is not None else defaults.get("sinks", 4),
            scorer=scorer,
            codec=dtype,
            quant=quant,
            quant_group=quant_group,
            quant_outliers=quant_outliers,
            rvq_depth=rvq_depth,
            rvq_group=rvq_group,
        )
        if recon is not None:
            if scorer != "task_aware":
                raise OptionError(f"--recon weighs the task_aware scorer's reconstruction term; the {scorer} scorer "
                                  "has none: drop --recon")
            options.scorer_params = {"recon": recon}
        options.context, options.budgets, options.stream = context, budgets, stream
        options.stream_scorer = stream_scorer
        options.validate()  # bad codec and quant names fail before a model is loaded
        options.make_scorer()
        options.resolved(fits=True)  # an explicit context that cannot read reconstruction, too
        if n_auto:
            check_scorer(options.make_scorer())
        if check or dry_run:
            from .models import identify
            from .pipeline import plan

            if check and dry_run:
                raise OptionError("give --check or --dry-run, not both")
            rebuild, skipped = plan(corpus, identify(model), recipe, options,
                                    reuse if reuse is not None else output, text_field, max_file_mib << 20,
                                    auto_probes=n_auto)
            _skipped(skipped)
            _print_plan(rebuild, verbose=True)
            if check:
                raise typer.Exit(0 if rebuild.up_to_date else 1)
            return
        lm = load_model(model, device=device, progress=not quiet)
        with _progress(quiet) as progress:
            report = run_build(corpus, output, lm, recipe, options, text_field=text_field,
                               max_file_bytes=max_file_mib << 20, progress=progress,
                               reuse=reuse, auto_probes=n_auto)
        _skipped(report.skipped)
        if report.probes is not None:
            ap = report.probes
            new = [q for q in ap.questions if q not in recipe.probes]  # an echo of the recipe's adds nothing
            err.print(f"auto probes: {len(new)} new questions from {len(ap.probes)} chunks "
                      f"({ap.generated} written, {ap.reused} reused)")
        _print_plan(report.plan, verbose=False)
        kept = report.kept_tokens / report.full_tokens
        streamed = ", streamed at compacted positions" if report.streamed else ""
        peak = f", peak memory +{_mib(report.peak_memory)}" if report.peak_memory is not None else ""
        err.print(
            f"[green]wrote[/] {_show(report.output)}: {report.documents} documents, {report.cache_tokens} tokens, "
            f"kept {kept:.1%} ({_mib(report.bytes)}) in {report.seconds['total']:.1f} s{streamed}{peak}",
            soft_wrap=True,
        )


def _skipped(skipped) -> None:
    for s in skipped:
        err.print(f"[yellow]skipped[/] {_show(s.path)}: {_show(s.reason)}", soft_wrap=True)


def _print_plan(rebuild, verbose: bool) -> None:
    """What a (re)build reuses, recompiles, adds and drops: counts, and with ``verbose`` every change."""
    c = rebuild.counts()
    if rebuild.previous is None:
        lead = "[bold yellow]warning:[/] " if rebuild.warning else ""
        err.print(f"{lead}{_show(rebuild.note)}: compiling all {len(rebuild.documents)} documents", soft_wrap=True)
    else:
        err.print(f"{c['reused']} reused, {c['recompiled']} recompiled, {c['added']} added, {c['dropped']} dropped "
                  f"(against {_show(rebuild.previous)})" + (": up to date" if rebuild.up_to_date else ""),
                  soft_wrap=True)
    if rebuild.caveat:
        err.print(f"[dim]{_show(rebuild.caveat)}[/]", soft_wrap=True)
    if verbose:
        for path, status in rebuild.status():
            if status != "reused":
                out.print(f"{status:10} {_show(path)}", soft_wrap=True)


@app.command()
def query(
    args: List[str] = typer.Argument(..., metavar="PACK... [QUESTION]", help="The .kvpack to ask (several: answered as one context, one after another), then the question; without one, an interactive prompt."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Longest answer, in tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer and timings as JSON."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to use (default: the pack's)."),
    positions: str = PositionsOpt,
    select: Optional[float] = typer.Option(None, "--select", metavar="BUDGET", help="Attend only to the segments the question ranks best (BM25 over the pack's segment index), within BUDGET kept tokens per head (a number below 1: that share of the corpus's tokens)."),
    always: List[str] = typer.Option([], "--always", metavar="PATH", help="With --select: a document always attended (repeatable)."),
    ape: Optional[str] = ApeOpt,
    sparse: Optional[str] = SparseOpt,
    sparse_page: Optional[int] = SparsePageOpt,
    sparse_channels: Optional[int] = SparseChannelsOpt,
    device: Optional[str] = DeviceOpt,
    debug: bool = DebugOpt,
) -> None:
    """Answer QUESTION from PACK (streamed), or start a prompt loop. Several packs built with one
    model are answered as one context (compacted positions unless --positions original)."""
    from .composition import compose
    from .models import load_model
    from .pack import load

    with _errors(debug):
        t0 = time.perf_counter()
        paths, question = _packs_and_question(args)
        if select is not None and len(paths) > 1:
            raise OptionError("--select takes one pack: merge several with kvcompile merge first")
        if always and select is None:
            raise OptionError("--always needs --select")
        repair = _ape(ape, select)
        sparsity = _sparsity(sparse, sparse_page, sparse_channels)
        if repair is not None and sparsity is not None:
            raise OptionError("--sparse and --ape do not combine: choose one")
        packs = [load(p) for p in paths]
        lm = load_model(model or packs[0].model["name"], device=device, progress=False)
        if sparsity is not None:
            sparsity["kept_ratio"] = packs[0].kept_ratio()
        if select is not None:
            from .retrieval import Selector

            session = Selector(packs[0], lm, select, _segments_of(packs[0], always), repair)
        else:
            session = packs[0].session(lm, positions) if len(packs) == 1 else compose(packs, lm, positions)
            if sparsity is not None:
                session.sparsify(**sparsity)
        load_s = time.perf_counter() - t0
        if question is not None:
            _answer(session, question, max_new_tokens, as_json, load_s, sparsity)
            return
        documents = sum(p.header["corpus"]["documents"] for p in packs)
        err.print(f"[dim]{', '.join(_show(p.path) for p in packs)}: {documents} documents; "
                  "empty line or Ctrl-D to quit[/]")
        while True:
            try:
                q = input("? ")
            except EOFError:
                break
            if not q.strip():
                break
            try:
                _answer(session, q, max_new_tokens, as_json, load_s, sparsity)
            except KvcompileError as e:  # a bad question does not end the session
                _error(str(e))


def _packs_and_question(args: list[str]) -> tuple[list[Path], str | None]:
    """``PACK... [QUESTION]``: the last argument is the question unless it names a pack (a
    ``.kvpack`` path or an existing file)."""
    last = args[-1]
    try:
        names_a_file = Path(last).is_file()
    except (OSError, ValueError):  # a question too long, or with a NUL, to be a path
        names_a_file = False
    if len(args) == 1 or last.endswith(".kvpack") or names_a_file:
        return [Path(a) for a in args], None
    return [Path(a) for a in args[:-1]], last


def _segments_of(pack, paths: list[str]) -> list[int]:
    """The segments holding the documents at ``paths`` (``--always``)."""
    by_path = {d["path"]: d["segment"] for d in pack.manifest()}
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise OptionError(f"--always {missing[0]!r} is not a document of {pack.path} (see kvcompile inspect)")
    return sorted({by_path[p] for p in paths})


def _ape(text: str | None, select: float | None):
    """``--ape T,S`` as an :class:`~kvcompile.repair.Ape` (None without it); it needs ``--select``."""
    from .repair import Ape

    if text is None:
        return None
    if select is None:
        raise OptionError("--ape repairs the boundaries of segments chosen per question: it needs --select")
    return Ape.parse(text)


def _sparsity(top_k: str | None, page: int | None, channels: int | None) -> dict | None:
    """``Session.sparsify``'s arguments from ``--sparse``, ``--sparse-page`` and ``--sparse-channels``."""
    from .sparse import parse_top_k

    if top_k is None:
        if page is not None or channels is not None:
            raise OptionError("--sparse-page and --sparse-channels need --sparse")
        return None
    return {"top_k": parse_top_k(top_k), "page": page, "channels": channels}


def _answer(session, question: str, max_new_tokens: int, as_json: bool, load_s: float,
            sparsity: dict | None = None) -> None:
    timings: dict = {}
    extra = {}
    from .retrieval import Selector

    if isinstance(session, Selector):  # the question chooses the segments first
        t0 = time.perf_counter()
        session, chosen = session.session(question)
        if sparsity is not None:
            session.sparsify(**sparsity)
        extra = {"select_s": round(time.perf_counter() - t0, 4), "segments": chosen.segments,
                 "selected_tokens": round(chosen.tokens, 1)}
    if session.sparse is not None:
        extra["sparse"] = session.sparse_report()
    if as_json:
        text = "".join(session.stream(question, max_new_tokens, timings))
        print(json.dumps({"question": question, "answer": text.strip(),
                          "timings": {"pack_load_s": round(load_s, 4), "ttft_s": round(timings["ttft"], 4),
                                      "decode_s": round(timings["decode"], 4), "tokens": timings["tokens"],
                                      "tokens_per_s": round(timings["tokens_per_s"], 2)}, **extra}))
        return
    for piece in session.stream(question, max_new_tokens, timings):
        # The answer is text the pack steered: newlines stay, escapes do not reach the terminal.
        sys.stdout.write(printable(piece, keep="\n\t"))
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def inspect(
    pack: Path = typer.Argument(..., help="The .kvpack to describe."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON (with --corpus: each document's top kept spans and every token's kept share)."),
    corpus: List[Path] = typer.Option([], "--corpus", "-c", help="The documents the pack was built from (checked against its manifest): show what it kept of their text."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write a page of every document, each token shaded by the share of (layer, KV head) pairs that kept it (needs --corpus)."),
    text_field: str = typer.Option("text", "--text-field", help="Column holding the text in .jsonl/.json/.csv/.parquet corpus files."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="With --corpus: tokenize with another copy of the pack's model (default: the pack's; no weights are loaded)."),
    debug: bool = DebugOpt,
) -> None:
    """Describe PACK: model, recipe, documents, tokens kept per layer and head, bytes; with --corpus, what it kept of each document's text."""
    from .kept import document_shares, document_starts, heads_total, load_view
    from .kept_html import write as write_html
    from .pack import load

    with _errors(debug):
        if html_out is not None and not corpus:
            raise OptionError("--html shows the documents' text, which a pack does not store: give --corpus DIR, "
                              "the documents the pack was built from")
        p = load(pack)
        h, sizes, manifest = p.header, p.sizes(), p.manifest()
        kept, full = p.kept, p.layout["tokens"]
        view = load_view(p, corpus, model, text_field) if corpus else None
        if html_out is not None:
            write_html(view, html_out)
            err.print(f"[green]wrote[/] {_show(html_out)}: {len(view.documents)} documents, kept "
                      f"{view.corpus_share:.1%} of their tokens", soft_wrap=True)
        doc_shares = [d.share for d in view.documents] if view else document_shares(p)
        if as_json:
            if view:
                documents = [{**d, **v.to_json()} for d, v in zip(manifest, view.documents)]
            else:
                documents = [{**d, "start": s, "kept_share": round(k, 4)}
                             for d, s, k in zip(manifest, document_starts(p), doc_shares)]
            info = {
                "path": p.path, "version": h["version"], "model": h["model"], "recipe": h["recipe"]["name"],
                "options": h["options"], "documents": documents, "cache_tokens": full, "kept": kept,
                "kept_share": sum(map(sum, kept)) / (full * len(kept) * len(kept[0])), "bytes": sizes,
                "heads": heads_total(p), "storage": p.storage(),
                "question_position": {"original": p.question_position,
                                      "compact": p.attended_positions("compact")[1]},
            }
            if view:
                info["framing"] = {k: v for k, v in view.framing.to_json().items() if k != "path"}
            print(json.dumps(info, indent=2))
            return
        m = h["model"]
        out.print(f"[bold]{_show(p.path)}[/]  kvpack {h['version'][0]}.{h['version'][1]}", soft_wrap=True)
        out.print(f"model     {_show(m['name'])} ({_show(m['architecture'])}, {m['num_layers']} layers, "
                  f"{m['num_kv_heads']} KV heads, fingerprint {m['fingerprint'][:12]})", soft_wrap=True)
        o = h["options"]
        budget = f"budget {o['budget']}" if o["budget"] is not None else f"ratio {o['ratio']}"
        if o["selection"].get("budgets") == "corpus":
            budget += (" shared by the corpus (one selection)" if o["context"] == "whole" or "stream_scorer" in o
                       else f" shared by the corpus (floor {_show(o['selection'].get('doc_floor'))})")
        recon = o["scorer"].get("recon")
        scorer = _show(o["scorer"]["name"]) + (f" with reconstruction {recon:g}" if isinstance(recon, (int, float))
                                               and recon > 0 else "")
        if "stream_scorer" in o:
            scorer = f"{_show(o['stream_scorer']['name'])} while streaming, then {scorer} over what it kept"
        out.print(f"recipe    {_show(h['recipe']['name'])} ({len(h['recipe']['probes'])} probes); {budget}, "
                  f"scorer {scorer}, codec {_show(o['codec']['name'])}, chunk {o['chunk_size']}, "
                  f"context {_show(o['context'])}",
                  soft_wrap=True)
        out.print(f"corpus    {len(manifest)} documents, {h['corpus']['tokens']} tokens (+{full - h['corpus']['tokens']} framing)")
        compact = p.attended_positions("compact")[1]
        if p.question_position > m["max_positions"]:
            out.print(f"positions streamed past the window of {m['max_positions']}: questions start at {compact} "
                      "(compact: the longest head's kept tokens)", soft_wrap=True)
        else:
            out.print(f"positions questions start at {compact} (compact: the longest head's kept tokens) or "
                      f"{p.question_position} (--positions original)"
                      + (", compiled compacted (--stream)" if o.get("stream") else ""), soft_wrap=True)
        spans = ["top kept span"] if view else []
        docs = Table("document", "tokens", "kept", "sha256", *spans, box=None, pad_edge=False)
        for i, d in enumerate(manifest[:20]):
            top = view.documents[i].top_spans(top=1) if view else []
            span = [_show(" ".join(top[0].text.split())[:60]) if top else "-"] if view else []
            docs.add_row(_show(d["path"]), str(d["tokens"]), f"{doc_shares[i]:.1%}", d["sha256"][:12], *span)
        if len(manifest) > 20:
            docs.add_row(f"... {len(manifest) - 20} more", "", "", "", *[""] * len(spans))
        out.print(docs)
        storage = p.storage()
        quantised = "quant" in o
        shown = min(len(kept[0]), 16)  # wider models: the first 16 heads, and every layer's share
        more = [f"+{len(kept[0]) - shown} heads"] if shown < len(kept[0]) else []
        bits = ["K bits", "V bits"] if quantised else []
        heads = Table("layer", *[f"head {i}" for i in range(shown)], *more, "kept", *bits, box=None, pad_edge=False)
        for li, row in enumerate(kept[:64]):
            stored = [str(storage["layers"][li][part].get("bits", "-")) for part in ("keys", "values")]
            heads.add_row(str(li), *map(str, row[:shown]), *["..."] * len(more), f"{sum(row) / (full * len(row)):.1%}",
                          *(stored if quantised else []))
        if len(kept) > 64:
            heads.add_row(f"... {len(kept) - 64} more layers", *[""] * (shown + len(more) + 1 + len(bits)))
        out.print(heads)
        if quantised:
            described = "; ".join(f"{part} {_codec_text([layer[part] for layer in storage['layers']])}"
                                  for part in ("keys", "values"))
            per_row = storage["bytes_per_row"]
            out.print(f"quant     {_show(o['quant']['name'])}: {described}", soft_wrap=True)
            out.print(f"          bytes per kept token and head: keys {per_row['keys']:.1f}, values "
                      f"{per_row['values']:.1f} (fp16: {storage['fp16_bytes_per_row']} each), with scales and zeros"
                      + (f"; codebooks {_mib(storage['codebook_bytes'])}" if storage["codebook_bytes"] else ""))
        share = sum(map(sum, kept)) / (full * len(kept) * len(kept[0]))
        parts = ", ".join(f"{k} {_mib(sizes[k])}" for k in ("keys", "values", "positions", "manifest", "index", "header")
                          if sizes[k])
        out.print(f"tokens    kept {share:.1%} of {full} per layer and head")
        out.print(f"bytes     {_mib(sizes['file'])} ({parts})")
        out.print(f"positions zstd of deltas: {sizes['positions'] / max(1, sum(map(sum, kept))):.2f} bytes per kept "
                  f"token (int32: 4)")
        out.print(f"vs full   fp16 full cache {_mib(sizes['full_fp16'])}: pack is {sizes['ratio_vs_full_fp16']:.1%} of it "
                  f"({1 / sizes['ratio_vs_full_fp16']:.1f}x smaller)")


def _codec_text(parts: list[dict]) -> str:
    """``int4 per channel over 32 tokens`` from the codec entries of one part in every layer
    (bits given as a range with their mean when layers differ, as kvmix's do)."""
    part = parts[0]
    if part["codec"] == "rvq":
        return (f"rvq depth {part['depth']}, codebooks of {part['size']} x {part['group']} channels"
                + (" (interleaved)" if part["interleave"] else ""))
    if part["codec"] != "int":
        return part["codec"]
    bits = [p.get("bits", 0) for p in parts]
    width = f"int{bits[0]}" if len(set(bits)) == 1 else \
        f"{min(bits)}-{max(bits)} bits (mean {sum(bits) / len(bits):.2f})"
    over = "tokens" if part["per"] == "channel" else "channels"
    return f"{width} per {part['per']} over {part['group']} {over}"


@app.command()
def merge(
    packs: List[Path] = typer.Argument(..., help="Packs of disjoint corpora, built alike with --context independent, in corpus order."),
    output: Path = typer.Option(..., "--output", "-o", help="The .kvpack to write (replaced atomically)."),
    debug: bool = DebugOpt,
) -> None:
    """Write several packs as one, with neither the model nor the corpus: the pack a build of the union would write."""
    from .merging import merge as run_merge

    with _errors(debug):
        report = run_merge(packs, output)
        err.print(f"[green]wrote[/] {_show(report.output)}: {report.documents} documents from {report.packs} packs, "
                  f"{report.tokens} tokens ({_mib(report.bytes)})", soft_wrap=True)


@app.command()
def models(
    model: Optional[str] = typer.Argument(None, help="A model (alias, directory, Hub id): check it instead of listing."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    debug: bool = DebugOpt,
) -> None:
    """List the model types kvcompile serves exactly, and those it refuses and why; or check MODEL."""
    from .capability import support_table

    with _errors(debug):
        if model is not None:
            _check_model(model, as_json)
            return
        rows = support_table()
        if as_json:
            print(json.dumps([{"model_type": t, "status": s} for t, s in rows], indent=2))
            return
        table = Table("model type", "status", box=None, pad_edge=False)
        for t, status in rows:
            table.add_row(t, "[green]supported[/]" if status == "supported" else f"refused: {escape(status)}")
        out.print(table)


def _check_model(model: str, as_json: bool) -> None:
    """What kvcompile knows about MODEL's config (no weights are loaded); ModelError if refused."""
    from .capability import capability
    from .models import model_config

    config, label = model_config(model)
    cap = capability(config)
    windows = sorted({w for w in cap.windows if w is not None})
    info = {"model_type": cap.model_type, "supported": True, "rope": cap.rope_type,
            "sliding_window_layers": sum(w is not None for w in cap.windows), "layers": cap.num_layers,
            "windows": windows, "softcap": cap.softcap}
    if as_json:
        print(json.dumps(info, indent=2))
        return
    out.print(f"{_show(label)}: model type {_show(cap.model_type)}, supported (RoPE {_show(cap.rope_type)}"
              + (f", sliding window {windows} on {info['sliding_window_layers']} of {cap.num_layers} layers"
                 if windows else "") + (f", softcap {cap.softcap}" if cap.softcap else "") + ")", soft_wrap=True)


@app.command("eval")
def eval_(
    packs: List[Path] = typer.Argument(None, help="Packs to evaluate (any number; none with --sweep)."),
    qa: Optional[Path] = typer.Option(None, "--qa", help="Questions: JSONL with 'question', 'answers' (a list) and optional 'id'."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="A built-in set: squad:ARTICLE, hotpotqa[:POOL], synthetic[:profiles[:N]|needles[:TOKENS]]."),
    corpus: List[Path] = typer.Option([], "--corpus", "-c", help="The corpus the packs were built from (for the baselines and --sweep; not needed with --dataset)."),
    baselines: str = typer.Option("full,rag,none", "--baselines", help="Comma-separated: full, rag, none ('' for none)."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="Also build and evaluate packs at these kept ratios, e.g. 0.5,0.25,0.1."),
    quant: str = typer.Option("none", "--quant", help="With --sweep: build each ratio with these codecs, e.g. none,int4,kvmix (quantised packs are compared with the fp16 pack of their ratio)."),
    positions: str = typer.Option("auto", "--positions", help="Evaluate each pack with its keys at these positions, comma-separated: auto, original, compact (e.g. auto,original: a pack at original positions, named kvcompile[original]@RATIO, is compared with the same pack at the default)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Recipe for --sweep builds (default: qa)."),
    questions: Optional[int] = typer.Option(None, "--questions", "-n", help="Ask only the first N questions."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Longest generated answer, in tokens."),
    rag_chunk: int = typer.Option(128, "--rag-chunk", help="Tokens per BM25 chunk for the rag baseline."),
    select: Optional[float] = typer.Option(None, "--select", metavar="BUDGET", help="Also answer from each pack's segments that each question ranks best (query --select), within BUDGET kept tokens per head (below 1: that share of the corpus); the method is named select."),
    ape: Optional[str] = typer.Option(None, "--ape", metavar="T,S", help="With --select: also answer from the same segments with APE's boundary repair (query --ape), named select[ape]."),
    sparse: Optional[str] = typer.Option(None, "--sparse", metavar="TOP_K", help="Also decode each pack with RocketKV's hybrid sparse attention (query --sparse), named kvcompile[sparse]@RATIO: auto, a share of each head's rows, or a number of rows."),
    sparse_page: Optional[int] = SparsePageOpt,
    sparse_channels: Optional[int] = SparseChannelsOpt,
    reference: Optional[str] = typer.Option(None, "--reference", help="Method the others are compared with (paired difference in gain kept ± SE), e.g. kvcompile@0.25; default: the pack at the same kept ratio."),
    seed: int = typer.Option(0, "--seed", help="Seed for generated datasets and HotpotQA pools."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Write eval.json and eval.png (and --sweep packs) here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    debug: bool = DebugOpt,
) -> None:
    """Score packs against full context, BM25 retrieval and no context on the same questions."""
    import tempfile

    import torch

    from .builder import BuildOptions
    from .corpus import read_corpus
    from .data.qa import read_qa_jsonl
    from .data.synthetic import write_corpus
    from .evaluation import report
    from .evaluation.datasets import load_dataset
    from .evaluation.plan import parse_baselines, plan
    from .evaluation.run import evaluate
    from .models import load_model
    from .pack import POSITIONS, load
    from .pipeline import build as run_build
    from .recipe import load_recipe

    with _errors(debug), tempfile.TemporaryDirectory(prefix="kvcompile-eval-") as tmp:
        if (qa is None) == (dataset is None):
            raise OptionError("give --qa FILE or --dataset NAME (one of them)")
        if questions is not None and questions < 1:
            raise OptionError(f"--questions must be at least 1, got {questions}")
        if max_new_tokens < 1:
            raise OptionError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        ratios = _ratios(sweep) if sweep else []
        if not packs and not ratios:
            raise OptionError("nothing to evaluate: give packs, or --sweep RATIOS to build them")
        wanted = parse_baselines(baselines)
        repair, sparsity = _ape(ape, select), _sparsity(sparse, sparse_page, sparse_channels)
        torch.manual_seed(seed)
        work = out_dir if out_dir is not None else Path(tmp)

        if dataset is not None:
            evalset = load_dataset(dataset, seed=seed, questions=questions)
            corpus = [work / "corpus"]
            write_corpus(evalset, corpus[0])
            qas, title = evalset.questions, evalset.name
        else:
            qas, title = read_qa_jsonl(qa), qa.name
        qas = qas[:questions] if questions else qas
        documents = None
        if corpus:
            documents, _ = read_corpus(corpus)
        opened = [load(p) for p in packs or []]
        lm = load_model(model or (opened[0].model["name"] if opened else None), device=device, progress=not quiet)
        recipe = load_recipe(task or "qa")
        quants = [q.strip() for q in quant.split(",") if q.strip()] or ["none"]
        for q in quants:
            BuildOptions(quant=q).validate()
        for r in ratios:
            if documents is None:
                raise OptionError("--sweep builds packs from the corpus: give --corpus DIR or --dataset")
            for q in quants:
                path = work / "packs" / f"{recipe.name}-{r:g}{'' if q == 'none' else '-' + q}.kvpack"
                path.parent.mkdir(parents=True, exist_ok=True)
                if not quiet:
                    err.print(f"building {_show(path)} at ratio {r:g}" + ("" if q == "none" else f", {q}"))
                run_build(corpus, path, lm, recipe, BuildOptions(ratio=r, quant=q))
                opened.append(load(path))
        modes = [m.strip() for m in positions.split(",") if m.strip()] or ["auto"]
        for m in modes:
            if m not in POSITIONS:
                raise OptionError(f"--positions takes {', '.join(POSITIONS)} (comma-separated), not {m!r}")
        makers = plan(lm, opened, documents, recipe, wanted, rag_chunk, modes, select, sparsity, repair)
        with _question_bar(quiet, len(makers) * len(qas)) as step:
            results = evaluate(makers, qas, lm.device, max_new_tokens, step)

        meta = {"title": f"{title} — {lm.name}, {len(qas)} questions", "model": lm.name, "questions": len(qas),
                "dataset": dataset, "qa": str(qa) if qa else None, "seed": seed, "max_new_tokens": max_new_tokens,
                "rag_chunk": rag_chunk, "device": str(lm.device)}
        if as_json:
            print(json.dumps(report.to_json(results, meta, reference), indent=1, ensure_ascii=False))
        else:
            out.print(report.table(results, meta["title"], reference), width=None if out.is_terminal else 160)
        if out_dir is not None:
            for p in report.write(results, meta, out_dir, reference):
                err.print(f"[green]wrote[/] {_show(p)}")


@app.command("eval-corpus")
def eval_corpus(
    dataset: str = typer.Argument(..., help="squad:ARTICLE, hotpotqa[:POOL], synthetic[:profiles[:N]|needles[:TOKENS]]."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the documents and questions.jsonl into."),
    questions: Optional[int] = typer.Option(None, "--questions", "-n", help="Keep only the first N questions."),
    seed: int = typer.Option(0, "--seed", help="Seed for generated datasets and HotpotQA pools."),
    debug: bool = DebugOpt,
) -> None:
    """Write a built-in dataset as a corpus folder (+ questions.jsonl) for build and eval --qa."""
    from .data.synthetic import write_corpus
    from .evaluation.datasets import load_dataset

    with _errors(debug):
        evalset = load_dataset(dataset, seed=seed, questions=questions)
        write_corpus(evalset, output)
        err.print(f"[green]wrote[/] {_show(output)}: {len(evalset.documents)} documents, "
                  f"{len(evalset.questions)} questions in questions.jsonl")


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--sweep takes comma-separated ratios such as 0.5,0.25,0.1, not {text!r}") from None
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise OptionError(f"--sweep ratios must be in (0, 1], got {text!r}")
    return ratios


@contextlib.contextmanager
def _question_bar(quiet: bool, total: int):
    """A progress callback over (method, question) steps, drawn with rich unless quiet."""
    if quiet or not err.is_terminal and os.environ.get("KVCOMPILE_PROGRESS") != "1":
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("questions", total=total)
        yield lambda name: bar.update(task, advance=1, description=name)


@contextlib.contextmanager
def _progress(quiet: bool):
    """A progress callback for build (prefill tokens), drawn with rich unless quiet."""
    if quiet or not err.is_terminal and os.environ.get("KVCOMPILE_PROGRESS") != "1":
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task({"prefill": "prefill (tokens)", "documents": "documents", "write": "writing"}.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=done)

        yield update


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
