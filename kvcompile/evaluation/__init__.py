"""``kvcompile eval``: a pack against full context, BM25 retrieval and no context.

``datasets`` names the built-in sets, ``methods`` the contexts compared, ``rag`` the
retrieval baseline, ``metrics`` the answer scores, ``memory`` peak memory, ``plan``
which methods run, ``run`` runs them, ``report`` shows and writes the results.
"""
