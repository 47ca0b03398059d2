"""kvcompile: compile a document corpus into a compressed, task-aware KV cache.

    import kvcompile
    pack = kvcompile.load("faq.kvpack")
    print(pack.session().ask("How do I reset my password?").text)
"""

__version__ = "0.1.0"


def load(path, verify: bool = True):
    """Open and verify a ``.kvpack``; see :class:`kvcompile.pack.Pack`."""
    from .pack import load as _load

    return _load(path, verify=verify)
