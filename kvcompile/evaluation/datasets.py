"""Built-in evaluation sets by name, as given to ``--dataset`` and ``eval-corpus``.

- ``squad:ARTICLE``: a SQuAD v2 dev article (title or 0-based index), its answerable questions;
- ``hotpotqa[:POOL[:TOKENS]]``: a pool of HotpotQA dev questions over about TOKENS (default 4000) tokens
  of paragraphs: their gold paragraphs, then distractors while they fit;
- ``synthetic[:profiles[:ENTITIES]]`` or ``synthetic:needles[:TOKENS]``: generated, any size, seeded.
"""

from __future__ import annotations

from ..data.qa import EvalSet
from ..errors import OptionError

DATASETS_HELP = "squad:ARTICLE, hotpotqa[:POOL[:TOKENS]], synthetic[:profiles[:ENTITIES]] or synthetic:needles[:TOKENS]"


def load_dataset(spec: str, seed: int = 0, questions: int | None = None) -> EvalSet:
    """The evaluation set named by ``spec`` (see the module docstring)."""
    name, _, arg = spec.partition(":")
    if name == "squad":
        from ..data.squad import squad_article

        if not arg:
            raise OptionError("--dataset squad needs an article: squad:TITLE or squad:INDEX (e.g. squad:Normans)")
        return squad_article(int(arg) if arg.isdigit() else arg, max_questions=questions)
    if name == "hotpotqa":
        from ..data.squad import hotpotqa_pool

        pool, _, tokens = arg.partition(":")
        return hotpotqa_pool(index=_int(pool or "0", spec), n_questions=questions or 8,
                             target_tokens=_int(tokens or "4000", spec), seed=seed)
    if name == "synthetic":
        from ..data.synthetic import entity_profiles, needles

        kind, _, size = arg.partition(":")
        if kind in ("", "profiles"):
            evalset = entity_profiles(n_entities=_int(size or "20", spec), seed=seed)
        elif kind == "needles":
            evalset = needles(n_tokens_approx=_int(size or "4000", spec), n_needles=questions or 8, seed=seed)
        else:
            raise OptionError(f"unknown synthetic set {kind!r} in --dataset {spec}: use profiles or needles")
        if questions is not None:
            evalset = EvalSet(evalset.name, evalset.documents, evalset.questions[:questions])
        return evalset
    raise OptionError(f"unknown dataset {spec!r}: use {DATASETS_HELP}")


def _int(text: str, spec: str) -> int:
    if not text.isdigit():
        raise OptionError(f"--dataset {spec}: {text!r} is not a non-negative whole number")
    return int(text)
