"""Corpus intake: turn the folders and files a user names into a list of documents.

``read_corpus(paths)`` returns ``(documents, skipped)``:

- A folder is walked recursively. Entries are sorted by their POSIX path relative to the
  folder (plain code-point order), so the order is the same on every platform. Hidden
  files and folders (names starting with ".") are left out without a word; symbolic
  links to folders are not followed (reported in ``skipped``).
- ``.txt``, ``.md``, ``.rst`` are read as UTF-8; ``.html``/``.htm`` are reduced to their
  visible text; each record of a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file is
  one document, taken from its ``text_field`` column and named ``"data.jsonl#17"``
  (0-based row).
- Text is normalised the same way everywhere: a UTF-8 BOM is dropped and ``\\r\\n`` and
  ``\\r`` become ``\\n``. Nothing else is touched, so ``sha256`` is the hash of what the
  model will read.

Corpus files are untrusted input. Only regular files are read: a FIFO would block the
build forever, a device such as ``/dev/zero`` never ends, and files under ``/proc``,
``/sys`` and ``/dev`` (by real path) are views of the machine, not documents. A file is
checked before it is opened, opened without blocking, and checked again on what was
opened, so a path swapped in between is caught too. A file larger than
``max_file_bytes`` (default ``MAX_FILE_BYTES``, 64 MiB) is skipped: the size is checked
before reading and again while reading, since a file can grow and ``st_size`` can lie.

What gets skipped and what is an error follows one rule: a file the user named
explicitly must be usable (an unsupported extension or a data file without
``text_field`` is a ``CorpusError``), while a file found by walking a folder is skipped
and reported, so that one stray ``notes.pdf`` or ``questions.jsonl`` does not stop a
build. Special, oversized, undecodable, unreadable and empty files are always skipped,
named or not. It is an error only if no document is left, and that error says what was
skipped and why.

Document paths are relative to the input they came from (a single file: its name). If
two inputs give the same path (``a/x.md`` and ``b/x.md`` both give ``x.md``), every
document and skipped entry is prefixed with its input's name (``a/x.md``, ``b/x.md``), and with its
0-based input index as well (``0-docs/x.md``) where two inputs have the same name. A
file reached through several inputs is read once, for the first of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from .errors import CorpusError

TEXT_EXTENSIONS = (".txt", ".md", ".rst")
HTML_EXTENSIONS = (".html", ".htm")
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + HTML_EXTENSIONS + DATA_EXTENSIONS

_SUPPORTED_LIST = ", ".join(SUPPORTED_EXTENSIONS)

MAX_FILE_BYTES = 64 * 1024 * 1024  # per corpus file: far above any document, far below memory
_SPECIAL_ROOTS = ("/proc", "/sys", "/dev")  # kernel and device file systems: not documents
_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Document:
    """One document of the corpus.

    ``path`` is the POSIX path relative to the input it came from (for a single file:
    its name); a record of a data file is ``"data.jsonl#17"`` (0-based row index).
    ``sha256`` is the hex SHA-256 of ``text`` encoded as UTF-8.
    """

    path: str
    text: str
    sha256: str


@dataclass(frozen=True)
class Skipped:
    """A file or record that was left out, and why."""

    path: str
    reason: str


def read_corpus(
    paths: Sequence[str | os.PathLike], text_field: str = "text", *, max_file_bytes: int = MAX_FILE_BYTES
) -> tuple[list[Document], list[Skipped]]:
    """Read the documents under ``paths`` (folders and/or files).

    Returns the documents in a deterministic order (inputs in the order given, each
    input's files sorted by path, records in file order) and the files or records that
    were skipped. Raises ``CorpusError`` if no path is given, a path does not exist, a
    file named explicitly cannot be used, or no document is left at all. A file larger
    than ``max_file_bytes`` is skipped.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # a lone path is an easy mistake to forgive
    if not paths:
        raise CorpusError(f"no corpus paths given: pass a folder or files of {_SUPPORTED_LIST}")

    inputs = [Path(p) for p in paths]
    for given, p in zip(paths, inputs):
        if not p.exists():
            raise CorpusError(
                f"corpus path '{os.fspath(given)}' does not exist: "
                f"pass a folder or files of {_SUPPORTED_LIST}"
            )

    # (input index, path relative to that input, file on disk, named explicitly?)
    files: list[tuple[int, str, Path, bool]] = []
    walk_skipped: list[tuple[int, Skipped]] = []
    seen: set[str] = set()  # files of earlier inputs, by real path
    for i, p in enumerate(inputs):
        if p.is_dir():
            walked, skips = _walk(p)
            walk_skipped += [(i, s) for s in skips]
            entries = [(rel, f, False) for rel, f in walked]
        else:
            if p.suffix.lower() not in SUPPORTED_EXTENSIONS:
                raise CorpusError(
                    f"'{os.fspath(paths[i])}' has an unsupported extension: "
                    f"kvcompile reads {_SUPPORTED_LIST}"
                )
            entries = [(p.name, p, True)]
        real = [os.path.realpath(f) for _, f, _ in entries]
        for (rel, f, explicit), key in zip(entries, real):
            if key not in seen:
                files.append((i, rel, f, explicit))
        seen.update(real)

    prefixes = _prefixes(inputs, [rel for _, rel, _, _ in files])
    skipped = [Skipped(prefixes[i] + s.path, s.reason) for i, s in walk_skipped]
    documents: list[Document] = []
    for i, rel, f, explicit in files:
        docs, skips = _read_file(f, prefixes[i] + rel, text_field, explicit, max_file_bytes)
        documents += docs
        skipped += skips

    if not documents:
        raise CorpusError(_nothing_left(paths, skipped))
    return documents, skipped


def _walk(root: Path) -> tuple[list[tuple[str, Path]], list[Skipped]]:
    """Every supported file under ``root`` as (relative POSIX path, path), sorted."""
    found: list[tuple[str, Path]] = []
    skipped: list[Skipped] = []

    def onerror(err: OSError) -> None:
        rel = os.path.relpath(err.filename, root) if err.filename else "."
        skipped.append(Skipped(Path(rel).as_posix(), f"cannot be read ({err.strerror or err})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        base = Path(dirpath)
        kept_dirs = []
        for d in dirnames:
            if d.startswith("."):
                continue
            if (base / d).is_symlink():
                # Following links risks loops and reading outside the corpus.
                rel = (base / d).relative_to(root).as_posix()
                skipped.append(Skipped(rel, "symbolic link to a folder (not followed)"))
                continue
            kept_dirs.append(d)
        dirnames[:] = kept_dirs
        for name in filenames:
            if name.startswith("."):
                continue
            f = base / name
            rel = f.relative_to(root).as_posix()
            if f.suffix.lower() not in SUPPORTED_EXTENSIONS:
                skipped.append(Skipped(rel, "unsupported extension"))
                continue
            found.append((rel, f))

    found.sort(key=lambda item: item[0])
    skipped.sort(key=lambda s: s.path)
    return found, skipped


def _prefixes(inputs: list[Path], rels: list[str]) -> list[str]:
    """Per input, what to put before its relative paths: "" unless two of them collide."""
    if len(set(rels)) == len(rels):
        return [""] * len(inputs)
    # A folder's name, or for a single file the name of the folder holding it, so that
    # 'a/x.md' and 'b/x.md' stay 'a/x.md' and 'b/x.md'. resolve() turns '.' into a name.
    labels = [(p.resolve() if p.is_dir() else p.resolve().parent).name or "root" for p in inputs]
    if len(set(labels)) < len(labels):
        labels = [f"{i}-{label}" for i, label in enumerate(labels)]
    return [f"{label}/" for label in labels]


def _read_file(
    f: Path, name: str, text_field: str, explicit: bool, max_bytes: int
) -> tuple[list[Document], list[Skipped]]:
    ext = f.suffix.lower()
    if ext in DATA_EXTENSIONS:
        return _read_records(f, name, text_field, explicit, max_bytes)
    try:
        with _open_regular(f, max_bytes) as fd:
            raw = _read_capped(fd, max_bytes)
    except _Unusable as e:
        return [], [Skipped(name, str(e))]
    except OSError as e:
        return [], [Skipped(name, f"cannot be read ({e.strerror or e})")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start]
        return [], [Skipped(name, f"not valid UTF-8 (byte 0x{bad:02x} at offset {e.start})")]
    text = _normalise(text)
    if ext in HTML_EXTENSIONS:
        text = html_to_text(text)
    return _document(name, text)


# --- opening untrusted files -------------------------------------------------------


class _Unusable(Exception):
    """A corpus file that is not read; the message is the reason given in ``Skipped``."""


_KINDS = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def _check(st: os.stat_result, real: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "special file")
        raise _Unusable(f"not a regular file ({kind})")
    root = next((r for r in _SPECIAL_ROOTS if real == r or real.startswith(r + "/")), None)
    if root is not None:
        raise _Unusable(f"on a special file system ({root})")
    if st.st_size > max_bytes:
        raise _Unusable(_too_large(max_bytes))


def _too_large(max_bytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if max_bytes >= size and max_bytes % size == 0:
            return f"larger than the {max_bytes // size} {unit} cap per file"
    return f"larger than the {max_bytes}-byte cap per file"


@contextlib.contextmanager
def _open_regular(f: Path, max_bytes: int) -> Iterator[int]:
    """A read-only descriptor of ``f``, once it is known to be a regular file within the cap.

    Raises ``_Unusable`` (with the reason) or ``OSError``.
    """
    real = os.path.realpath(f)
    # Checked before opening, since opening a device can itself act (a tape rewinds) ...
    _check(os.stat(f), real, max_bytes)
    # ... and again on the descriptor, since the path may have been swapped in between.
    # O_NONBLOCK: opening a FIFO that has no writer returns at once instead of waiting.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(f, flags)
    try:
        _check(os.fstat(fd), real, max_bytes)
        yield fd
    finally:
        os.close(fd)


def _chunks(fd: int, max_bytes: int) -> Iterator[bytes]:
    """The bytes of ``fd``; raises ``_Unusable`` past ``max_bytes``, whatever ``st_size`` said."""
    left = max_bytes + 1  # one byte more than allowed tells "at the cap" from "over it"
    while left > 0:
        chunk = os.read(fd, min(_READ_CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        if left == 0:
            raise _Unusable(_too_large(max_bytes))
        yield chunk


def _read_capped(fd: int, max_bytes: int) -> bytes:
    return b"".join(_chunks(fd, max_bytes))


def _document(name: str, text: str) -> tuple[list[Document], list[Skipped]]:
    if not text.strip():
        return [], [Skipped(name, "empty")]
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return [Document(name, text, sha)], []


def _normalise(text: str) -> str:
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- data files (datasets) ---------------------------------------------------------

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _read_records(
    f: Path, name: str, text_field: str, explicit: bool, max_bytes: int
) -> tuple[list[Document], list[Skipped]]:
    ext = f.suffix.lower()
    with tempfile.TemporaryDirectory(prefix="kvcompile-data-") as tmp:
        # datasets opens files by path, and treats data_files as glob patterns
        # ('report[1].jsonl' matches nothing). So it gets a copy with a plain name in a
        # fresh folder, made from the descriptor checked here: it never opens a FIFO or
        # reads past the cap. The fresh cache folder also means an earlier file can never
        # be served from the cache.
        plain = Path(tmp) / f"data{ext}"
        try:
            with _open_regular(f, max_bytes) as fd, open(plain, "wb") as out:
                for chunk in _chunks(fd, max_bytes):
                    out.write(chunk)
                size = out.tell()
        except _Unusable as e:
            return [], [Skipped(name, str(e))]
        except OSError as e:
            return [], [Skipped(name, f"cannot be read ({e.strerror or e})")]
        if size == 0:
            return [], [Skipped(name, "empty")]
        if ext == ".parquet" and (unpacked := _parquet_bytes(plain)) is not None and unpacked > max_bytes:
            # Parquet is compressed: the cap on its file size does not bound what it loads.
            return [], [Skipped(name, f"{_too_large(max_bytes)} once decompressed ({unpacked} bytes)")]
        try:
            dataset = _load_dataset(plain, _BUILDERS[ext], Path(tmp) / "cache")
        except Exception as e:  # datasets and pyarrow raise many kinds; any of them means "unparsable"
            cause = e.__cause__ or e.__context__ or e
            detail = " ".join(str(cause).split())[:200] or type(cause).__name__
            return [], [Skipped(name, f"cannot be parsed as {ext} ({detail})")]

    columns = list(dataset.column_names)
    if text_field not in columns:
        listed = ", ".join(f"'{c}'" for c in columns) or "none"
        if explicit:
            raise CorpusError(
                f"'{os.fspath(f)}' has no column '{text_field}' (columns: {listed}): "
                f"pass --text-field with the column that holds the text"
            )
        return [], [Skipped(name, f"no column '{text_field}' (columns: {listed}); pass --text-field")]

    documents: list[Document] = []
    skipped: list[Skipped] = []
    for row, value in enumerate(dataset[text_field]):
        record = f"{name}#{row}"
        if value is None:
            skipped.append(Skipped(record, "empty"))
            continue
        if not isinstance(value, str):
            skipped.append(Skipped(record, f"not text ({type(value).__name__} in column '{text_field}')"))
            continue
        docs, skips = _document(record, _normalise(value))
        documents += docs
        skipped += skips
    return documents, skipped


def _parquet_bytes(f: Path) -> int | None:
    """The uncompressed size a parquet file declares for its data (None if it cannot be read:
    the loader then reports the file as unparsable)."""
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(f).metadata
        return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    except Exception:  # pyarrow raises many kinds; the loader gives the one-line reason
        return None


def _load_dataset(f: Path, builder: str, cache: Path):
    """Load one data file with ``datasets``, offline and quietly."""
    import datasets  # imported here: it is slow to import and most corpora are plain text

    with _quiet_datasets():
        return datasets.load_dataset(
            builder,
            data_files=str(f),
            split="train",
            cache_dir=str(cache),
            keep_in_memory=True,  # nothing may point into the folder the caller deletes
        )


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or info logs from datasets; restore the caller's settings after."""
    import datasets
    from datasets.utils import logging as dlog

    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = dlog.get_verbosity()
    datasets.disable_progress_bars()
    dlog.set_verbosity(dlog.CRITICAL)  # parse errors are reported by us, in Skipped
    try:
        yield
    finally:
        dlog.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


# --- HTML --------------------------------------------------------------------------

_SKIP_TAGS = {"script", "style", "head", "noscript", "template", "svg"}
_BLOCK_TAGS = set(
    """address article aside blockquote body caption dd details dialog div dl dt fieldset
    figcaption figure footer form header hgroup hr html legend main nav ol pre section
    summary table tbody tfoot thead tr ul""".split()
)
_PARAGRAPH_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip: Counter[str] = Counter()
        self.pre = 0
        self.lists: list[list] = []  # [tag, items so far] per open ul/ol
        self.row_has_cell = False

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "body":
            self.skip["head"] = 0  # an unclosed <head> must not swallow the page
        if tag in _SKIP_TAGS:
            self.skip[tag] += 1
            return
        if tag == "br":
            self.out.append("\n")
        elif tag in _PARAGRAPH_TAGS:
            self._break(2)
        elif tag in ("ul", "ol"):
            self.lists.append([tag, 0])
            self._break(1)
        elif tag == "li":
            # Keep list markers: numbered steps are often what a question asks for.
            marker = "- "
            if self.lists and self.lists[-1][0] == "ol":
                self.lists[-1][1] += 1
                marker = f"{self.lists[-1][1]}. "
            self._break(1)
            self.out.append(marker)
        elif tag in ("td", "th"):
            if self.row_has_cell:
                self.out.append(" | ")
            self.row_has_cell = True
        elif tag in _BLOCK_TAGS:
            self._break(1)
        if tag == "tr":
            self.row_has_cell = False
        if tag == "pre":
            self.pre += 1

    def handle_startendtag(self, tag: str, attrs) -> None:
        # <br/> and friends: a start without content; never opens a skipped region.
        if tag not in _SKIP_TAGS:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip[tag] = max(0, self.skip[tag] - 1)
            return
        if tag in _PARAGRAPH_TAGS:
            self._break(2)
        elif tag in ("ul", "ol"):
            if self.lists:
                self.lists.pop()
            self._break(1)
        elif tag in _BLOCK_TAGS or tag == "li":
            self._break(1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)

    def _break(self, n: int) -> None:
        """End the current line, leaving at least ``n`` newlines (2: a blank line)."""
        tail = "".join(self.out[-4:]).rstrip(" ")
        have = len(tail) - len(tail.rstrip("\n"))
        if have < n:
            self.out.append("\n" * (n - have))

    def handle_data(self, data: str) -> None:
        if any(self.skip.values()):
            return
        if self.pre:
            self.out.append(data)
            return
        # Outside <pre>, source whitespace is layout, not content: collapse it, and drop
        # it where a line starts or a space already stands.
        data = re.sub(r"\s+", " ", data)
        last = next((piece[-1] for piece in reversed(self.out) if piece), "\n")
        if last in "\n ":
            data = data.lstrip(" ")
        if data:
            self.out.append(data)

    def text(self) -> str:
        text = "".join(self.out)
        text = re.sub(r"[ \t]+\n", "\n", text)  # spaces left before a line break
        text = re.sub(r"\n{3,}", "\n\n", text)  # at most one blank line in a row
        text = text.strip("\n ")
        return text + "\n" if text else ""


def html_to_text(html: str) -> str:
    """The visible text of an HTML page: no script/style/head, one line per block."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()


# --- the "nothing left" message ----------------------------------------------------


def _nothing_left(paths: Sequence[str | os.PathLike], skipped: list[Skipped]) -> str:
    where = ", ".join(f"'{os.fspath(p)}'" for p in paths)
    if not skipped:
        return f"no documents in {where}: it holds no files of {_SUPPORTED_LIST}"
    # The part of a reason before its details is its kind: "not valid UTF-8 (byte ...)".
    kinds = Counter(re.split(r" \(|;", s.reason, maxsplit=1)[0] for s in skipped)
    breakdown = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    # Records of data files are named "data.jsonl#3"; then not everything is a file.
    noun = ("entry", "entries") if any("#" in s.path for s in skipped) else ("file", "files")
    first = skipped[0]
    return (
        f"no readable documents in {where}: {len(skipped)} {noun[len(skipped) != 1]} skipped ({breakdown}); "
        f"first: '{first.path}': {first.reason}"
    )
