"""kvcompile: compile a document corpus into a compressed, task-aware KV cache.

    import kvcompile
    pack = kvcompile.load("faq.kvpack")
    print(pack.session().ask("How do I reset my password?").text)

    both = kvcompile.compose(["handbook.kvpack", "notes.kvpack"])  # several packs as one context
    kvcompile.merge(["handbook.kvpack", "notes.kvpack"], "both.kvpack")  # ... written as one pack
"""

__version__ = "0.1.0"


def load(path, verify: bool = True):
    """Open and verify a ``.kvpack``; see :class:`kvcompile.pack.Pack`."""
    from .pack import load as _load

    return _load(path, verify=verify)


def compose(packs, model=None, positions: str = "auto"):
    """A session over several packs (paths or loaded packs) as one context; see
    :func:`kvcompile.composition.compose`."""
    from .composition import compose as _compose

    return _compose([p if not isinstance(p, (str, bytes)) and hasattr(p, "layout") else load(p) for p in packs],
                    model, positions)


def merge(packs, output):
    """Write several packs (paths) of disjoint corpora as one pack at ``output``, without the model;
    see :func:`kvcompile.merging.merge`."""
    from .merging import merge as _merge

    return _merge(packs, output)
