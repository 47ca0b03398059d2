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
    err.print("[bold red]error:[/] " + escape(message), soft_wrap=True)


DebugOpt = typer.Option(False, "--debug", help="Show tracebacks on errors.")
ModelOpt = typer.Option(None, "--model", "-m", help="Model: an alias (smollm2-135m, qwen2.5-coder-0.5b), a local directory or .gguf file, or a Hub id.")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")


@app.command()
def build(
    corpus: List[Path] = typer.Argument(..., help="Folders (searched recursively) or files of .txt .md .rst .html .jsonl .json .csv .parquet."),
    output: Path = typer.Option(..., "--output", "-o", help="The .kvpack to write (replaced atomically)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="A built-in recipe: faq, qa, summarize, multihop (default: qa)."),
    task_file: Optional[Path] = typer.Option(None, "--task-file", help="Your own recipe (TOML)."),
    probe: List[str] = typer.Option([], "--probe", help="A sample question to guide compression (repeatable)."),
    probes: Optional[Path] = typer.Option(None, "--probes", help="A file of sample questions, one per line (or JSONL)."),
    model: Optional[str] = ModelOpt,
    ratio: Optional[float] = typer.Option(None, "--ratio", "-r", help="Share of the cache's tokens to keep, in (0, 1] (recipe default: 0.25)."),
    budget: Optional[int] = typer.Option(None, "--budget", "-b", help="Tokens to keep per KV head (overrides --ratio)."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Tokens prefilled per chunk (recipe default: 2048)."),
    sinks: Optional[int] = typer.Option(None, "--sinks", help="First tokens always kept (recipe default: 4)."),
    scorer: str = typer.Option("task_aware", "--scorer", help="task_aware, or stride (an even-stride baseline)."),
    doc_floor: Optional[float] = typer.Option(None, "--doc-floor", help="Share of each document's length-proportional budget it keeps at least, in [0, 1] (coverage)."),
    dtype: str = typer.Option("fp16", "--dtype", help="Storage codec: fp16, bf16 or fp32."),
    text_field: str = typer.Option("text", "--text-field", help="Column holding the text in .jsonl/.json/.csv/.parquet files."),
    device: Optional[str] = DeviceOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    debug: bool = DebugOpt,
) -> None:
    """Compile CORPUS into a .kvpack."""
    from .builder import BuildOptions
    from .models import load_model
    from .pipeline import build as run_build
    from .recipe import load_recipe, read_probes

    with _errors(debug):
        if task and task_file:
            raise OptionError("give --task or --task-file, not both")
        recipe = load_recipe(file=task_file) if task_file else load_recipe(task or "qa")
        extra = list(probe) + (read_probes(probes) if probes else [])
        if extra:
            recipe = recipe.with_probes(extra)
        defaults = recipe.options
        options = BuildOptions(
            ratio=ratio if ratio is not None else (None if budget is not None else defaults.get("ratio", 0.25)),
            budget=budget if budget is not None else (defaults.get("budget") if ratio is None else None),
            chunk_size=chunk_size if chunk_size is not None else defaults.get("chunk_size", 2048),
            sinks=sinks if sinks is not None else defaults.get("sinks", 4),
            scorer=scorer,
            codec=dtype,
        )
        if doc_floor is not None:
            options.doc_floor = doc_floor
        options.validate()
        from .codecs import get_codec

        get_codec(options.codec), options.make_scorer()  # fail on bad names before loading a model
        lm = load_model(model, device=device, progress=not quiet)
        with _progress(quiet) as progress:
            report = run_build(corpus, output, lm, recipe, options, text_field=text_field, progress=progress)
        for s in report.skipped:
            err.print(f"[yellow]skipped[/] {escape(s.path)}: {escape(s.reason)}", soft_wrap=True)
        kept = report.kept_tokens / report.full_tokens
        err.print(
            f"[green]wrote[/] {escape(report.output)}: {report.documents} documents, {report.cache_tokens} tokens, "
            f"kept {kept:.1%} ({_mib(report.bytes)}) in {report.seconds['total']:.1f} s",
            soft_wrap=True,
        )


@app.command()
def query(
    pack: Path = typer.Argument(..., help="The .kvpack to ask."),
    question: Optional[str] = typer.Argument(None, help="The question; without one, an interactive prompt."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Longest answer, in tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer and timings as JSON."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to use (default: the pack's)."),
    device: Optional[str] = DeviceOpt,
    debug: bool = DebugOpt,
) -> None:
    """Answer QUESTION from PACK (streamed), or start a prompt loop."""
    from .models import load_model
    from .pack import load

    with _errors(debug):
        t0 = time.perf_counter()
        p = load(pack)
        lm = load_model(model or p.model["name"], device=device, progress=False)
        session = p.session(lm)
        load_s = time.perf_counter() - t0
        if question is not None:
            _answer(session, question, max_new_tokens, as_json, load_s)
            return
        err.print(f"[dim]{p.path}: {p.header['corpus']['documents']} documents; empty line or Ctrl-D to quit[/]")
        while True:
            try:
                q = input("? ")
            except EOFError:
                break
            if not q.strip():
                break
            try:
                _answer(session, q, max_new_tokens, as_json, load_s)
            except KvcompileError as e:  # a bad question does not end the session
                _error(str(e))


def _answer(session, question: str, max_new_tokens: int, as_json: bool, load_s: float) -> None:
    timings: dict = {}
    if as_json:
        text = "".join(session.stream(question, max_new_tokens, timings))
        print(json.dumps({"question": question, "answer": text.strip(),
                          "timings": {"pack_load_s": round(load_s, 4), "ttft_s": round(timings["ttft"], 4),
                                      "decode_s": round(timings["decode"], 4), "tokens": timings["tokens"],
                                      "tokens_per_s": round(timings["tokens_per_s"], 2)}}))
        return
    for piece in session.stream(question, max_new_tokens, timings):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def inspect(
    pack: Path = typer.Argument(..., help="The .kvpack to describe."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    debug: bool = DebugOpt,
) -> None:
    """Describe PACK: model, recipe, documents, tokens kept per layer and head, bytes."""
    from .pack import load

    with _errors(debug):
        p = load(pack)
        h, sizes, manifest = p.header, p.sizes(), p.manifest()
        kept, full = p.kept, p.layout["tokens"]
        if as_json:
            print(json.dumps({
                "path": p.path, "version": h["version"], "model": h["model"], "recipe": h["recipe"]["name"],
                "options": h["options"], "documents": manifest, "cache_tokens": full, "kept": kept,
                "kept_share": sum(map(sum, kept)) / (full * len(kept) * len(kept[0])), "bytes": sizes,
            }, indent=2))
            return
        m = h["model"]
        out.print(f"[bold]{p.path}[/]  kvpack {h['version'][0]}.{h['version'][1]}")
        out.print(f"model     {m['name']} ({m['architecture']}, {m['num_layers']} layers, {m['num_kv_heads']} KV heads, "
                  f"fingerprint {m['fingerprint'][:12]})")
        o = h["options"]
        budget = f"budget {o['budget']}" if o["budget"] is not None else f"ratio {o['ratio']}"
        out.print(f"recipe    {h['recipe']['name']} ({len(h['recipe']['probes'])} probes); {budget}, "
                  f"scorer {o['scorer']['name']}, codec {o['codec']['name']}, chunk {o['chunk_size']}")
        out.print(f"corpus    {len(manifest)} documents, {h['corpus']['tokens']} tokens (+{full - h['corpus']['tokens']} framing)")
        docs = Table("document", "tokens", "sha256", box=None, pad_edge=False)
        for d in manifest[:20]:
            docs.add_row(d["path"], str(d["tokens"]), d["sha256"][:12])
        if len(manifest) > 20:
            docs.add_row(f"... {len(manifest) - 20} more", "", "")
        out.print(docs)
        heads = Table("layer", *[f"head {i}" for i in range(len(kept[0]))], "kept", box=None, pad_edge=False)
        for li, row in enumerate(kept):
            heads.add_row(str(li), *map(str, row), f"{sum(row) / (full * len(row)):.1%}")
        out.print(heads)
        share = sum(map(sum, kept)) / (full * len(kept) * len(kept[0]))
        parts = ", ".join(f"{k} {_mib(sizes[k])}" for k in ("keys", "values", "positions", "manifest", "header") if sizes[k])
        out.print(f"tokens    kept {share:.1%} of {full} per layer and head")
        out.print(f"bytes     {_mib(sizes['file'])} ({parts})")
        out.print(f"positions zstd of deltas: {sizes['positions'] / max(1, sum(map(sum, kept))):.2f} bytes per kept "
                  f"token (int32: 4)")
        out.print(f"vs full   fp16 full cache {_mib(sizes['full_fp16'])}: pack is {sizes['ratio_vs_full_fp16']:.1%} of it "
                  f"({1 / sizes['ratio_vs_full_fp16']:.1f}x smaller)")


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
                tasks[stage] = bar.add_task({"prefill": "prefill (tokens)", "write": "writing"}.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=done)

        yield update


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
