"""Where the corpus and the question sit in the model's prompt.

A pack stores the KV of ``[prefix | corpus]`` and a question is appended later, so the
framing is fixed at build time and recorded in the pack: a question then lands exactly
where it would have stood after the full corpus, and the full-context prompt of any
question is ``prefix_ids + corpus ids + question_ids(question)``.

With a chat template the prompt is the template rendered with sentinels in place of the
corpus and the question, split at the sentinels. Without one it is plain text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SYSTEM_PROMPT = "Answer the question using the documents. Be brief and precise."
CORPUS_HEADER = "Documents:\n\n"
DOCUMENT_HEADER = "## {path}\n"
QUESTION_LEAD = "Question: "
_CORPUS, _QUESTION = "\ue000KVCOMPILE_CORPUS\ue000", "\ue000KVCOMPILE_QUESTION\ue000"


def document_text(path: str, text: str) -> str:
    """A document as it appears in the corpus: a header line, its text, a blank line."""
    return DOCUMENT_HEADER.format(path=path) + text.strip() + "\n\n"


@dataclass(frozen=True)
class Framing:
    """How the corpus and questions are framed for one model; stored in every pack."""

    template: str  # "chat" or "plain"
    prefix_ids: tuple[int, ...]
    question_prefix: str
    question_suffix: str
    document_header: str = DOCUMENT_HEADER

    def question_ids(self, tokenizer, question: str) -> list[int]:
        """Token ids of a question, with the framing that follows the corpus."""
        text = self.question_prefix + question.strip() + self.question_suffix
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def to_json(self) -> dict:
        d = asdict(self)
        d["prefix_ids"] = list(self.prefix_ids)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Framing:
        return cls(
            template=str(d["template"]),
            prefix_ids=tuple(int(i) for i in d["prefix_ids"]),
            question_prefix=str(d["question_prefix"]),
            question_suffix=str(d["question_suffix"]),
            document_header=str(d.get("document_header", DOCUMENT_HEADER)),
        )


def frame(tokenizer, system: str = SYSTEM_PROMPT) -> Framing:
    """The framing of ``tokenizer``'s chat template, or a plain one if it has none."""
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": CORPUS_HEADER + _CORPUS + QUESTION_LEAD + _QUESTION},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, rest = text.split(_CORPUS)
        middle, tail = rest.split(_QUESTION)
        prefix_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        return Framing("chat", tuple(prefix_ids), middle, tail)
    head = system + "\n\n" + CORPUS_HEADER
    prefix_ids = tokenizer(head, add_special_tokens=True)["input_ids"]
    return Framing("plain", tuple(prefix_ids), QUESTION_LEAD, "\nAnswer:")
