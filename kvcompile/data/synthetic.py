"""Generated, seeded, licence-free evaluation corpora.

Two shapes:

- `entity_profiles`: one short profile document per made-up person or company, each
  fact stated once among bland filler sentences. Every answer is unique across the
  corpus, so it can only be recovered from its own document.
- `needles`: one long document of generic filler with a few "secret code" facts spread
  through it.

Names, cities and pets are built from syllables, so they are not real words and
tokenise into several tokens. All randomness comes from ``random.Random(seed)``: the
same arguments always give the same corpus.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kvcompile.data.qa import QA, TOKENS_PER_WORD, EvalSet
from kvcompile.errors import CorpusError, OptionError

__all__ = ["QA", "EvalSet", "entity_profiles", "needles", "write_corpus"]

# ---------------------------------------------------------------------------------
# Vocabulary. No word of one list occurs in another list, in a template or in the
# filler, so an answer string never appears outside the sentence that states it.
# ---------------------------------------------------------------------------------

_SYLLABLES = (
    "va ro tel li men quen dra lis mor tha vel kor sa ne bri dal fen gor hal jen kas "
    "lum nor pel rin sor tam ul vek wyn zar ith orn ael bel cav dor esk fal gav hem "
    "ilo jor kel lan mav nim osk pra quil ros sil tov urn vas wex yor zel"
).split()

_CITY_SUFFIXES = ("ford", "mere", "holm", "wick", "stead", "bury", "ton", "vale", "port", "dale")
_COMPANY_SUFFIXES = ("Works", "Holdings", "Trading", "Industries", "Foundry", "Mills", "Group")

_COLOURS = (
    "amber azure beige burgundy cerulean charcoal chartreuse cobalt coral crimson cyan "
    "emerald fuchsia indigo ivory jade khaki lavender lilac magenta maroon mauve mint "
    "mustard ochre olive orange peach periwinkle plum russet saffron salmon scarlet sepia "
    "sienna taupe teal turquoise ultramarine umber vermilion violet aquamarine cerise "
    "cinnabar sapphire"
).split()

_OCCUPATIONS = (
    "beekeeper", "cartographer", "clockmaker", "glassblower", "bookbinder",
    "lighthouse keeper", "stonemason", "ferry pilot", "cooper", "blacksmith", "locksmith",
    "saddler", "weaver", "tailor", "cobbler", "botanist", "geologist", "astronomer",
    "archivist", "surveyor", "shipwright", "chandler", "apothecary", "furrier", "milliner",
    "engraver", "typesetter", "falconer", "vintner", "brewer", "baker", "miller", "chemist",
    "translator", "notary", "auctioneer", "jeweller", "perfumer", "carpenter", "plumber",
    "electrician", "welder", "upholsterer", "florist", "gardener", "fisherman", "herbalist",
    "veterinarian", "dentist", "pharmacist", "architect", "librarian", "sculptor",
    "photographer", "journalist", "actuary", "midwife", "glazier", "thatcher", "wheelwright",
    "farrier", "ropemaker", "puppeteer", "magician", "acrobat", "lexicographer",
)

_PRODUCTS = (
    "ceramic tiles", "bicycle bells", "umbrellas", "fountain pens", "paper lanterns",
    "wool blankets", "copper kettles", "leather satchels", "wooden toys", "sewing machines",
    "pocket watches", "barometers", "compasses", "telescopes", "typewriters", "snow globes",
    "kites", "scented candles", "soap bars", "fishing rods", "door hinges", "picture frames",
    "board games", "jigsaw puzzles", "bird feeders", "garden gnomes", "tea sets",
    "cork boards", "rain boots", "ski goggles", "thermos flasks", "paint brushes",
    "glass marbles", "brass buttons", "chess sets", "hand fans", "oil lamps", "clay pots",
    "silk scarves", "ink stamps", "music boxes", "hot water bottles", "tape measures",
    "spinning tops", "woollen mittens", "frying pans", "salt grinders", "lamp shades",
    "hat stands", "wind chimes", "sundials",
)

_INSTRUMENTS = (
    "cello", "viola", "oboe", "bassoon", "clarinet", "flute", "piccolo", "harp",
    "harpsichord", "trombone", "tuba", "euphonium", "banjo", "mandolin", "ukulele",
    "accordion", "bagpipes", "sitar", "marimba", "xylophone", "glockenspiel", "dulcimer",
    "zither", "lute", "theorbo", "saxophone", "cornet", "bugle", "ocarina", "harmonica",
    "concertina", "tabla", "timpani", "cimbalom", "balalaika", "bouzouki", "didgeridoo",
    "koto", "shamisen", "erhu", "kalimba", "celesta", "vibraphone", "violin", "piano",
    "trumpet", "guitar",
)

_CONTAINERS = (
    "vault", "chest", "locker", "safe", "cabinet", "drawer", "strongbox", "crate", "trunk",
    "casket", "briefcase", "cupboard", "wardrobe", "suitcase", "coffer", "toolbox",
)

# Filler: singular subjects x predicates (x optional openers) give hundreds of bland,
# grammatical sentences with no digits, no names and no answer words.
_FILLER_SUBJECTS = (
    "The weather that season", "The morning light", "The village square",
    "The old road to the coast", "The afternoon", "The local newspaper",
    "The surrounding countryside", "Life in the neighbourhood", "The autumn harvest",
    "The annual fair", "The river nearby", "The evening train", "The town council meeting",
    "The winter", "The hillside path", "The nearby market", "The view from the window",
    "The spring rain", "The long summer", "The community hall", "The footpath by the canal",
    "The parish bulletin", "The week before the holidays", "The school term",
)
_FILLER_PREDICATES = (
    "was mild and largely uneventful.", "changed very little over the years.",
    "was much as it had always been.", "drew no particular attention from anyone.",
    "passed quietly, as it usually did.", "seemed calmer than most people expected.",
    "was discussed briefly and then forgotten.", "remained pleasant for most of the time.",
    "offered little that was worth writing down.", "was neither better nor worse than before.",
    "carried on at its usual unhurried pace.", "was described by many as rather ordinary.",
    "left no lasting impression on anyone.", "followed a familiar and predictable pattern.",
    "stayed quiet for weeks at a time.", "was mentioned only in passing at dinner.",
    "kept to the same routine as the year before.", "attracted the usual small crowd.",
    "was pleasant enough, if somewhat forgettable.", "went by without any real surprises.",
)
_FILLER_OPENERS = (
    "", "", "", "By all accounts, ", "As usual, ", "In those days, ", "For the most part, ",
    "Looking back, ", "Most people agreed that ", "It is often said that ",
)


def _filler_sentence(rng: random.Random) -> str:
    """One bland sentence that carries no answer."""
    opener = rng.choice(_FILLER_OPENERS)
    subject = rng.choice(_FILLER_SUBJECTS)
    if opener:
        subject = subject[0].lower() + subject[1:]
    return f"{opener}{subject} {rng.choice(_FILLER_PREDICATES)}"


class _Names:
    """Draws made-up words and unique values, never handing out the same one twice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int) -> str:
        """A new capitalised word of ``syllables`` syllables (more once those run out),
        unique in this corpus."""
        attempts = 0
        while True:
            attempts += 1
            # In very large corpora short words run out: lengthen them rather than loop.
            if attempts % 100 == 0:
                syllables += 1
            parts = [self.rng.choice(_SYLLABLES) for _ in range(syllables)]
            # A doubled syllable ("Yoryor") reads oddly; draw again.
            if any(a == b for a, b in zip(parts, parts[1:])):
                continue
            w = "".join(parts).capitalize()
            # Compared case-insensitively, so two made-up words never differ only in case.
            if w.lower() not in self.used:
                self.used.add(w.lower())
                return w

    def person(self) -> tuple[str, str]:
        """A new (first name, full name)."""
        first = self.word(2)
        return first, f"{first} {self.word(self.rng.choice((2, 3)))}"

    def city(self) -> str:
        while True:
            c = self.word(self.rng.choice((1, 2))) + self.rng.choice(_CITY_SUFFIXES)
            if c.lower() not in self.used:
                self.used.add(c.lower())
                return c

    def company(self) -> str:
        return f"{self.word(self.rng.choice((2, 3)))} {self.rng.choice(_COMPANY_SUFFIXES)}"

    def code(self) -> str:
        # Two letters and five digits: a five-digit run never contains a year as a word.
        while True:
            letters = "".join(self.rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
            c = f"{letters}-{self.rng.randrange(10000, 100000)}"
            if c not in self.used:
                self.used.add(c)
                return c


class _Pool:
    """A finite list of values handed out without replacement, in a seeded order."""

    def __init__(self, values: tuple[str, ...], rng: random.Random) -> None:
        self.values = list(values)
        rng.shuffle(self.values)

    def __bool__(self) -> bool:
        return bool(self.values)

    def take(self) -> str:
        return self.values.pop()


@dataclass(frozen=True)
class _FactKind:
    """One kind of fact: where its value comes from and how it is stated and asked."""

    name: str
    pool: str | None  # name of a finite pool, or None for a generated value
    make: Callable[[_Names], str] | None  # generator for unlimited values
    sentence: str  # template with {first}, {full}, {value}, {a} (article for value)
    question: str  # template with {full}


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


_PERSON_FACTS = (
    _FactKind("city", None, lambda n: n.city(),
              "{first} was born in the city of {value}.",
              "In which city was {full} born?"),
    _FactKind("year", "year", None,
              "According to the parish records, {first} was born in {value}.",
              "In what year was {full} born?"),
    _FactKind("occupation", "occupation", None,
              "For most of a working life, {first} earned a living as {a} {value}.",
              "What was {full}'s occupation?"),
    _FactKind("colour", "colour", None,
              "Friends know that {first}'s favourite colour has always been {value}.",
              "What is {full}'s favourite colour?"),
    _FactKind("code", None, lambda n: n.code(),
              "At the city archive, {first} holds the membership number {value}.",
              "What is {full}'s archive membership number?"),
    _FactKind("instrument", "instrument", None,
              "In the evenings, {first} likes to play the {value} at home.",
              "Which instrument does {full} play?"),
    _FactKind("pet", None, lambda n: n.word(2),
              "{first} keeps an old dog named {value}.",
              "What is the name of {full}'s dog?"),
    _FactKind("employer", None, lambda n: n.company(),
              "These days {first} is employed by a firm called {value}.",
              "Which firm employs {full}?"),
)

_COMPANY_FACTS = (
    _FactKind("city", None, lambda n: n.city(),
              "{full} has its headquarters in the city of {value}.",
              "In which city is {full} headquartered?"),
    _FactKind("year", "year", None,
              "The firm {full} was founded in {value}.",
              "In what year was {full} founded?"),
    _FactKind("product", "product", None,
              "The best-known product of {full} is its line of {value}.",
              "What is the best-known product of {full}?"),
    _FactKind("colour", "colour", None,
              "The logo of {full} is printed in {value}.",
              "What colour is the logo of {full}?"),
    _FactKind("code", None, lambda n: n.code(),
              "{full} is registered with the trade office under the code {value}.",
              "Under which code is {full} registered with the trade office?"),
    _FactKind("founder", None, lambda n: n.person()[1],
              "The person who set up {full} was {value}.",
              "Who founded {full}?"),
    _FactKind("mascot", None, lambda n: n.word(2),
              "The mascot of {full} is a parrot named {value}.",
              "What is the name of the parrot that is the mascot of {full}?"),
    _FactKind("chief", None, lambda n: n.person()[1],
              "Today {full} is run by its chief executive, {value}.",
              "Who is the chief executive of {full}?"),
)

_MAX_FACTS = min(len(_PERSON_FACTS), len(_COMPANY_FACTS))


def entity_profiles(
    n_entities: int = 20,
    seed: int = 0,
    facts_per_entity: int = 5,
    filler_sentences: int = 3,
) -> EvalSet:
    """Profiles of made-up people and companies, one document each, one question per fact.

    Each profile ("profiles/entity_07.txt") opens with a sentence naming the entity and
    ends with a closing one. In between it states ``facts_per_entity`` facts (birth
    city, year, occupation, favourite colour, membership code, ... for a person;
    headquarters, founding year, product, ... for a company), each in one sentence, in
    a random order mixed with ``filler_sentences`` bland sentences that carry no answer. Fact kinds are spread
    evenly over the entities. Every answer string occurs in exactly one document (the
    one named by ``QA.doc``). With the defaults a profile is about 130-200 tokens.

    Raises `OptionError` when the arguments are out of range, or when so many entities
    are asked for that a finite value list (colours, years, ...) runs out.
    """
    if n_entities < 1:
        raise OptionError(f"n_entities must be at least 1, got {n_entities}")
    if not 1 <= facts_per_entity <= _MAX_FACTS:
        raise OptionError(f"facts_per_entity must be between 1 and {_MAX_FACTS}, got {facts_per_entity}")
    if filler_sentences < 0:
        raise OptionError(f"filler_sentences must be at least 0, got {filler_sentences}")

    rng = random.Random(seed)
    names = _Names(rng)
    pools = {
        "year": _Pool(tuple(str(y) for y in range(1600, 2010)), rng),
        "occupation": _Pool(_OCCUPATIONS, rng),
        "colour": _Pool(tuple(_COLOURS), rng),
        "instrument": _Pool(_INSTRUMENTS, rng),
        "product": _Pool(_PRODUCTS, rng),
    }
    # How often each fact kind was used, per entity type, to spread kinds evenly.
    uses: dict[str, dict[str, int]] = {"person": {}, "company": {}}

    width = max(2, len(str(n_entities - 1)))
    documents: list[tuple[str, str]] = []
    questions: list[QA] = []
    for index in range(n_entities):
        kind = "company" if rng.random() < 0.35 else "person"
        if kind == "person":
            first, full = names.person()
            facts = _PERSON_FACTS
            intro = (f"This short profile describes {full}, who is remembered by the neighbours "
                     "as a quiet and steady presence.")
            outro = f"Little else about {first} has been written down."
        else:
            full = names.company()
            first = full
            facts = _COMPANY_FACTS
            intro = (f"This short profile describes the firm {full}, with a few details of its "
                     "history and its people.")
            outro = f"Little else about {full} appears in the public register."
        path = f"profiles/entity_{index:0{width}d}.txt"

        chosen = _choose_kinds(facts, facts_per_entity, pools, uses[kind], rng)
        if len(chosen) < facts_per_entity:
            raise OptionError(
                f"entity_profiles ran out of unique fact values at entity {index}: "
                f"ask for fewer entities (n_entities={n_entities}) or fewer facts per entity"
            )

        sentences: list[str] = []
        for fact in chosen:
            value = pools[fact.pool].take() if fact.pool else fact.make(names)
            sentences.append(fact.sentence.format(first=first, full=full, value=value, a=_article(value)))
            questions.append(QA(
                id=f"entity_{index:0{width}d}_{fact.name}",
                question=fact.question.format(full=full),
                answers=(value,),
                doc=path,
            ))
        for _ in range(filler_sentences):
            sentences.insert(rng.randrange(len(sentences) + 1), _filler_sentence(rng))
        documents.append((path, " ".join([intro, *sentences, outro]) + "\n"))

    name = f"entity_profiles_n{n_entities}_f{facts_per_entity}_seed{seed}"
    return EvalSet(name=name, documents=documents, questions=questions)


def _choose_kinds(
    facts: tuple[_FactKind, ...],
    count: int,
    pools: dict[str, _Pool],
    uses: dict[str, int],
    rng: random.Random,
) -> list[_FactKind]:
    """Pick up to ``count`` distinct fact kinds, least used first (ties broken at
    random), skipping kinds whose finite pool is empty; returned in a random order.

    Within one entity type each kind has its own pool, so one value per chosen kind
    is always there."""
    available = [f for f in facts if f.pool is None or pools[f.pool]]
    # A random key per kind breaks ties between equally used kinds.
    ranked = sorted(available, key=lambda f: (uses.get(f.name, 0), rng.random()))
    chosen = ranked[:count]
    for f in chosen:
        uses[f.name] = uses.get(f.name, 0) + 1
    rng.shuffle(chosen)
    return chosen


def needles(n_tokens_approx: int = 4000, n_needles: int = 8, seed: int = 0) -> EvalSet:
    """One document of about ``n_tokens_approx`` tokens of generic filler with
    ``n_needles`` facts ("The secret code of the teal vault is 4817.") spread evenly
    through it, and one question per needle.

    The document ("needles/haystack.txt") is split into paragraphs of a few sentences.
    Needle i sits near the fraction (i + 0.5) / n_needles of the text, with a small
    seeded jitter. Codes are unique four-digit numbers and the filler has no digits.
    """
    if n_needles < 1:
        raise OptionError(f"n_needles must be at least 1, got {n_needles}")
    keys = [(c, k) for c in _COLOURS for k in _CONTAINERS]
    if n_needles > len(keys):
        raise OptionError(f"n_needles must be at most {len(keys)}, got {n_needles}")
    if n_tokens_approx < 1:
        raise OptionError(f"n_tokens_approx must be at least 1, got {n_tokens_approx}")

    rng = random.Random(seed)
    path = "needles/haystack.txt"
    chosen_keys = rng.sample(keys, n_needles)
    codes = rng.sample(range(1000, 10000), n_needles)
    needle_sentences = [
        f"The secret code of the {colour} {container} is {code}."
        for (colour, container), code in zip(chosen_keys, codes)
    ]

    # Fill up to the token budget left after the needles themselves.
    budget_words = n_tokens_approx / TOKENS_PER_WORD - sum(len(s.split()) for s in needle_sentences)
    filler: list[str] = []
    words = 0
    while words < budget_words:
        sentence = _filler_sentence(rng)
        filler.append(sentence)
        words += len(sentence.split())

    n = len(filler)
    slot = n / n_needles
    # Centre of each 1/n slice, jittered by up to a quarter slice so depths vary by seed.
    positions = [
        min(n, max(0, round((i + 0.5 + rng.uniform(-0.25, 0.25)) * slot))) for i in range(n_needles)
    ]
    sentences = list(filler)
    # Insert from the back so earlier insertion points stay valid (and needles that
    # share a point keep their order).
    for pos, i in sorted(zip(positions, range(n_needles)), reverse=True):
        sentences.insert(pos, needle_sentences[i])

    paragraphs = []
    i = 0
    while i < len(sentences):
        size = rng.randint(4, 8)
        paragraphs.append(" ".join(sentences[i:i + size]))
        i += size
    text = "\n\n".join(paragraphs) + "\n"

    questions = [
        QA(
            id=f"needle_{i:02d}",
            question=f"What is the secret code of the {colour} {container}?",
            answers=(str(code),),
            doc=path,
        )
        for i, ((colour, container), code) in enumerate(zip(chosen_keys, codes))
    ]
    return EvalSet(name=f"needles_t{n_tokens_approx}_n{n_needles}_seed{seed}",
                   documents=[(path, text)], questions=questions)


def write_corpus(evalset: EvalSet, folder: Path) -> None:
    """Write each document of ``evalset`` under ``folder`` (its path relative to the
    folder, sub-folders created) and the questions to ``folder/questions.jsonl``
    (one ``{"id", "question", "answers"[, "doc"]}`` object per line), readable by
    `read_qa_jsonl`. Existing files of the same names are overwritten.

    Raises `CorpusError` for a document path that is absolute or leaves the folder.
    """
    folder = Path(folder)
    for path, _ in evalset.documents:
        rel = PurePosixPath(path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or path == "questions.jsonl":
            raise CorpusError(f"document path {path!r} must be a relative path inside the corpus folder")
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in evalset.documents:
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        # newline="" keeps the text byte-for-byte (no \r\n on any platform).
        with open(target, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    with open(folder / "questions.jsonl", "w", encoding="utf-8", newline="") as f:
        for qa in evalset.questions:
            row: dict[str, object] = {"id": qa.id, "question": qa.question, "answers": list(qa.answers)}
            if qa.doc is not None:
                row["doc"] = qa.doc
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
