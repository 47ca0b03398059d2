"""A pack's kept tokens as one self-contained HTML page (``kvcompile inspect --html``).

Every token of every document is shaded by the share of (layer, KV head) pairs that
kept it: the background is one highlighter colour whose opacity is that share, and a
token no head kept is greyed out. A summary table at the top gives each document's share
and its longest, most-kept run of text, and links to the document. No scripts: hovering
a token shows its count in a tooltip (``title``).

Everything shown comes from the corpus or the pack, so it is untrusted: it is escaped
for HTML, and controls (bidi overrides included) are shown as escapes, as in the terminal.
"""

from __future__ import annotations

import html
from pathlib import Path

from .errors import OptionError
from .kept import MIN_SPAN_SHARE, KeptView, TextKept
from .terminal import printable

LEVELS = 20  # shades: a token's share is shown to the nearest 5%
COLOUR = "250, 204, 21"  # RGB of the highlighter (amber): dark text stays readable at full opacity
SPAN_CHARS = 160  # longest span text in the summary and span lists

_CSS = f"""
body {{ font: 15px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #111; }}
h1 {{ font-size: 1.4em; margin-bottom: .2em; }} h2 {{ font-size: 1.15em; margin: 2em 0 .3em; }}
.meta, .note {{ color: #555; }}
table {{ border-collapse: collapse; }} th, td {{ padding: .2em .6em; text-align: left; vertical-align: top; }}
th {{ border-bottom: 1px solid #999; }} tr:nth-child(even) td {{ background: #f6f6f6; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
.bar {{ display: inline-block; width: 5em; height: .7em; background: #eee; margin-right: .4em; }}
.bar i {{ display: block; height: 100%; background: rgb({COLOUR}); }}
.legend span {{ display: inline-block; padding: 0 .5em; margin-right: .2em; border: 1px solid #ddd; }}
.text {{ white-space: pre-wrap; overflow-wrap: anywhere; font: 14px/1.6 ui-monospace, monospace;
         border: 1px solid #ddd; padding: .8em; }}
q {{ font-family: ui-monospace, monospace; font-size: .92em; }}
.k0 {{ color: #9a9a9a; }}
""" + "".join(f".k{i} {{ background: rgba({COLOUR}, {i / LEVELS:.2f}); }}\n" for i in range(1, LEVELS + 1))


def render(view: KeptView) -> str:
    """The whole page for ``view``."""
    docs = view.documents
    rows = "".join(_summary_row(i, d) for i, d in enumerate(docs))
    legend = " ".join(f'<span class="k{round(s * LEVELS)}">{s:.0%}</span>' for s in (0, 0.25, 0.5, 0.75, 1))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(Path(view.path).name)}: what the pack kept</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>What {_text(view.path)} kept</h1>",
        f'<p class="meta">model {_text(view.model)}, recipe {_text(view.recipe)}; {len(docs)} documents, '
        f"{sum(d.tokens for d in docs)} tokens after {view.framing.tokens} of framing; "
        f"kept {view.corpus_share:.1%} of the documents' tokens over {view.layers} layers x "
        f"{view.kv_heads} KV heads.</p>",
        f'<p class="legend">Each token is shaded by the share of the {view.heads} (layer, KV head) pairs that '
        f"kept it: {legend}; grey text: dropped by every head. Hover a token for its count. "
        f"A kept span is a run of tokens each kept by at least {MIN_SPAN_SHARE:.0%} of them, ranked by "
        "length x mean share.</p>",
        "<table><tr><th>#</th><th>document</th><th>tokens</th><th>kept</th><th>top kept span</th></tr>",
        rows,
        "</table>",
        *([_section("framing", "Framing (what precedes the documents)", view.framing,
                    spans=False)] if view.framing.tokens else []),
        *(_section(f"doc-{i}", d.path, d) for i, d in enumerate(docs)),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def write(view: KeptView, path: Path) -> None:
    """Write the page to ``path`` (UTF-8)."""
    try:
        Path(path).write_text(render(view), encoding="utf-8")
    except OSError as e:
        raise OptionError(f"cannot write {path}: {e.strerror or e}") from None


def _summary_row(i: int, d: TextKept) -> str:
    spans = d.top_spans(top=1)
    span = f"<q>{_clip(spans[0].text)}</q> ({spans[0].tokens} tokens)" if spans else '<span class="note">none</span>'
    return (f'<tr><td class="num">{i + 1}</td><td><a href="#doc-{i}">{_text(d.path)}</a></td>'
            f'<td class="num">{d.tokens}</td><td class="num">{_bar(d.share)}{d.share:.1%}</td><td>{span}</td></tr>')


def _section(anchor: str, title: str, d: TextKept, spans: bool = True) -> str:
    head = (f'<h2 id="{anchor}">{_text(title)}</h2><p class="meta">{d.tokens} tokens from position {d.start}, '
            f"kept {d.share:.1%}</p>")
    listed = ""
    if spans:
        items = "".join(f"<li>{s.tokens} tokens from token {s.start}, mean {s.share:.0%}: <q>{_clip(s.text)}</q></li>"
                        for s in d.top_spans())
        listed = f"<ol>{items}</ol>" if items else f'<p class="note">no run kept by {MIN_SPAN_SHARE:.0%} of heads</p>'
    return f'{head}{listed}<div class="text">{_tokens(d)}</div>'


def _tokens(d: TextKept) -> str:
    """The text, one ``<span>`` per run of tokens with the same count (runs, not tokens, to
    keep the page small: a run looks the same either way)."""
    out, run, count = [], [], None
    for c, piece in zip(d.counts, d.pieces):
        if c != count and run:
            out.append(_run(count, run, d.heads))
            run = []
        count = c
        run.append(piece)
    if run:
        out.append(_run(count, run, d.heads))
    return "".join(out)


def _run(count: int, pieces: list[str], heads: int) -> str:
    level = round(count / heads * LEVELS)
    if count and not level:
        level = 1  # kept somewhere: never shown as dropped
    return f'<span class="k{level}" title="{count}/{heads}">{_text("".join(pieces), keep=chr(10) + chr(9))}</span>'


def _bar(share: float) -> str:
    return f'<span class="bar"><i style="width:{share * 100:.1f}%"></i></span>'


def _clip(text: str) -> str:
    text = " ".join(text.split())  # one line in a table cell
    return _text(text if len(text) <= SPAN_CHARS else text[: SPAN_CHARS - 1] + "\u2026")


def _text(text: str, keep: str = "") -> str:
    return html.escape(printable(text, keep=keep))
