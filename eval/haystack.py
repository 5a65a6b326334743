"""RULER's haystacks without repetition, and its word pools from ``wonderwords``.

**Word pools.** RULER builds its needle keys and its common-words lists from the word lists that ship
with `wonderwords <https://pypi.org/project/wonderwords/>`_ (nouns, adjectives, verbs). :func:`word_lists`
loads them through wonderwords' public API (``RandomWord(...).filter(include_categories=[...])``), sorted,
so every draw depends only on our own seeded ``random.Random`` and never on wonderwords' global
randomness. :func:`word_pool` is RULER's cwe pool (nouns + adjectives + verbs, deduplicated and sorted;
8,166 words with wonderwords 3.0) and :func:`needle_key` a RULER word key (``adjective-noun``).

**The essay haystack.** :class:`EssayCorpus` is the package's original essays (``data/essays.txt``, about
5,150 words of natural prose) followed, once they are used up, by prose generated from a fixed seed: essay-like
paragraphs of grammatical sentences built from 46 sentence templates and wonderwords' words, each paragraph
returning to two or three topic words. No generated sentence repeats another or one of the essays (a set of
every sentence so far rejects any repeat; the essays' only repeated sentence is a three-word refrain), so a
haystack of any length -- 128k tokens and beyond -- repeats neither a sentence nor a paragraph. The corpus is
the same text in every process and for every sample (like a corpus file), built lazily and cached (100k words
take about 0.3 s). It depends on the installed wonderwords' lists (3.0 dropped a few words of 2.2): when they
change, the prompts, hence the samples' fingerprints, change with them.

:class:`FileCorpus` (``twilight eval ruler --haystack-file``) uses a text file instead (PG-19 books, say): its
words in order, never repeated; a haystack longer than the file is an :class:`~twilight_eval.common.EvalError`.

The ``noise`` haystack (RULER's repeated "The grass is green..." lines, niah_single_1 and vt) repeats by design
and is not built here.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Callable
from functools import lru_cache

from .common import EvalError, essay_text, split_sentences

#: Seed of the generated prose: changing it changes every essay haystack beyond the shipped essays.
CORPUS_SEED = "twilight-haystack/1"
#: ``haystack_source`` of the default corpus in the samples' meta.
DEFAULT_SOURCE = "essays+generated"
#: ``--haystack-file`` reads this much at most (~2.5M words, ~3M tokens: more than any context needs).
FILE_MAX_BYTES = 16 * 2 ** 20

INSTALL_HINT = "pip install 'wonderwords>=2.2' (or pip install 'twilight[eval]')"


# --------------------------------------------------------------------------- wonderwords' lists

def wonderwords_available() -> bool:
    try:
        import wonderwords  # noqa: F401
    except ImportError:
        return False
    return True


def require_wonderwords(what: str = "RULER's word pools") -> None:
    """Raise :class:`EvalError` naming the package when ``wonderwords`` is not installed."""
    if not wonderwords_available():
        raise EvalError(f"{what} come from the wonderwords package, which is not installed: {INSTALL_HINT}")


@lru_cache(maxsize=None)
def _wonderwords_category(name: str) -> tuple[str, ...]:
    """One of wonderwords' packaged lists (``NOUNS``, ``ADJECTIVES``, ``VERBS``, ``PROFANITIES``), sorted.

    The one place that touches wonderwords' API (``Defaults`` and ``RandomWord.filter``, public since 2.0):
    a wonderwords that changes it fails here, loudly, instead of somewhere in a task.
    """
    require_wonderwords()
    import wonderwords
    try:
        category = getattr(wonderwords.Defaults, name)
        try:   # 3.x: skip the prefix tries that filter() does not need
            generator = wonderwords.RandomWord(enhanced_prefixes=False, words=category)
        except TypeError:   # 2.x
            generator = wonderwords.RandomWord(words=category)
        words = generator.filter(include_categories=["words"])
    except Exception as err:  # noqa: BLE001 -- any change of the API is reported the same way
        version = getattr(wonderwords, "__version__", "?")
        raise EvalError(f"cannot read wonderwords' {name.lower()} list (wonderwords {version}: "
                        f"{type(err).__name__}: {err}); twilight_eval expects wonderwords>=2.2,<4") from err
    if not words:
        raise EvalError(f"wonderwords' {name.lower()} list is empty; twilight_eval expects wonderwords>=2.2,<4")
    return tuple(sorted(set(words)))


def word_lists() -> dict[str, tuple[str, ...]]:
    """``{"nouns", "adjectives", "verbs"}``: wonderwords' packaged lists, sorted, as RULER reads them."""
    return {"nouns": _wonderwords_category("NOUNS"), "adjectives": _wonderwords_category("ADJECTIVES"),
            "verbs": _wonderwords_category("VERBS")}


@lru_cache(maxsize=None)
def word_pool() -> tuple[str, ...]:
    """RULER's common-words pool: nouns + adjectives + verbs, deduplicated and sorted (shuffle it with a seeded rng)."""
    lists = word_lists()
    return tuple(sorted(set(lists["nouns"] + lists["adjectives"] + lists["verbs"])))


def needle_key(rng: random.Random) -> str:
    """A RULER word key, ``adjective-noun`` (uniform over wonderwords' pairs)."""
    lists = word_lists()
    return f"{rng.choice(lists['adjectives'])}-{rng.choice(lists['nouns'])}"


# --------------------------------------------------------------------------- generated prose

# Words of wonderwords' lists kept out of the generated prose (not out of RULER's pools, which follow upstream):
# profanities (wonderwords' own list is added), violent or sexual words that random sentences would make ugly,
# adjectives that cannot stand before a noun, and verb-list entries that are not base forms.
_PROSE_BLOCKLIST = frozenset("""
abuse alcoholic assassination bomb bombing bra breast bunghole drug drunk execution fetus genocide homicide homosexual
intercourse kill killer lesbian murder panties panty racism racist rape sexuality slave slavery suicide terrorism
terrorist underwear victim god
aback abaft aboard ahead amuck deeply few many much several other better best alike afraid alive aware asleep
acted altered applied audited edited enacted kept led lifted praised restored oriented buze soothsay wend man be
do go overdo undergo forego get let saw
""".split())

# Verbs of wonderwords' list that take no direct object: they get prepositional phrases instead.
_INTRANSITIVE = frozenset("""
abide alight appear apologize arise arrive awake behave belong blink blush boast complain compete concentrate
consist cough crawl creep cry dance depend disagree disappear dive dwell exist experiment fade fail float flow
glow graduate grin groan happen hop hover hurry itch jog kneel laugh lie listen live long matter meddle moan nod
occur participate pause peep pine pray preside progress queue rain reign rejoice rely remain reply respond retire
rise shiver shrug sigh sin sit ski sleep slink smile sneeze snore snow sparkle squeak squeal stare stay stink strive
succeed sweat swim thrive tremble trot tumble vanish wail wait wander weep whine wink wobble wonder yawn yell zoom
interfere originate persist rhyme
""".split())

_VOWELS = "aeiou"
_DOUBLE_FINAL = frozenset("admit begin commit control forbid forget occur omit permit prefer refer regret sublet "
                          "submit transfer upset".split())
_PLURAL_IRREGULAR = {"child": "children", "person": "people", "woman": "women", "mouse": "mice", "tooth": "teeth",
                     "foot": "feet", "goose": "geese"}


def third_person(verb: str) -> str:
    """``polish`` -> ``polishes``, ``carry`` -> ``carries``, ``mend`` -> ``mends``."""
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and len(verb) > 1 and verb[-2] not in _VOWELS:
        return verb[:-1] + "ies"
    return verb + "s"


def gerund(verb: str) -> str:
    """``mend`` -> ``mending``, ``bake`` -> ``baking``, ``tie`` -> ``tying``, ``stop`` -> ``stopping``."""
    if verb.endswith("ie"):
        return verb[:-2] + "ying"
    if verb.endswith("e") and not verb.endswith(("ee", "ye", "oe")) and len(verb) > 2:
        return verb[:-1] + "ing"
    one_syllable = re.fullmatch(r"[^aeiou]*[aeiou][bdgklmnprtvz]", verb)
    if one_syllable or verb in _DOUBLE_FINAL:
        return verb + verb[-1] + "ing"
    return verb + "ing"


def plural(noun: str) -> str | None:
    """The regular plural, or ``None`` for a noun whose plural the rules would likely get wrong."""
    if noun in _PLURAL_IRREGULAR:
        return _PLURAL_IRREGULAR[noun]
    if " " in noun or "-" in noun or noun.endswith(("f", "fe", "o", "us", "is", "um", "on", "man", "ex", "ix", "ics",
                                                    "ness", "ism", "ity", "ing", "ment", "ware", "ship")):
        return None
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in _VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


def with_article(phrase: str) -> str:
    """``a tomb``, ``an icy tomb``, ``a university``, ``an hour``."""
    word = phrase.lower()
    vowel_sound = word[0] in _VOWELS and not word.startswith(("uni", "use", "usu", "uti", "ure", "eu", "one", "once"))
    if word.startswith(("hour", "honest", "honor", "heir")):
        vowel_sound = True
    return ("an " if vowel_sound else "a ") + phrase


_ADVERBS = ("often", "rarely", "quietly", "slowly", "always", "seldom", "sometimes", "usually", "never", "carefully",
            "gladly", "eventually", "suddenly", "barely", "patiently", "secretly", "openly", "gently", "stubbornly",
            "reluctantly", "happily", "hardly ever", "cheerfully", "still")
_DEGREES = ("rarely", "never quite", "not always", "almost", "seldom", "often", "hardly ever", "sometimes", "just",
            "nearly", "not nearly", "at least")
_MODALS = ("can", "could", "might", "should", "would", "will", "must", "may")
_TIMES = ("every morning", "in the spring", "after the harvest", "on quiet afternoons", "at the end of the day",
          "twice a week", "for years", "in winter", "before dawn", "late at night", "during the long summer",
          "once a year", "on Sundays", "after the rain", "in the evening", "each autumn", "at noon",
          "from time to time", "now and then", "without warning", "in the dry years", "by the end of the week",
          "at first light", "all through the night", "in good weather", "when the market opens")
_PREPOSITIONS = ("near", "beside", "behind", "under", "above", "around", "beyond", "inside", "across", "along",
                 "toward", "against", "past", "below", "over", "through", "with", "without", "after", "before")
_OPENERS = ("In the end,", "Even so,", "For a while,", "Later,", "Meanwhile,", "Of course,", "In practice,",
            "At first,", "Still,", "Oddly enough,", "Sometimes,", "Every so often,", "In the old days,",
            "By contrast,", "On the other hand,", "In most years,", "As a rule,", "Not surprisingly,", "To be fair,",
            "For that reason,", "Now and then,", "More often than not,", "In a good year,", "Strangely,")
_ABSTRACT = ("patience", "time", "courage", "care", "practice", "attention", "skill", "luck", "effort", "money",
             "nerve", "imagination", "discipline", "strength", "planning", "thought", "goodwill")
_SINGULAR_DETERMINERS = (("the", 45), ("a", 25), ("this", 6), ("that", 4), ("every", 5), ("each", 5), ("one", 3),
                         ("another", 3), ("poss", 4))
_PLURAL_DETERMINERS = (("", 30), ("the", 30), ("most", 8), ("many", 8), ("some", 8), ("a few", 5), ("these", 4),
                       ("all the", 4), ("few", 3))

# Slots: S/s a singular noun phrase (subject), P/p a plural one, O an object (singular or plural), NP either,
# aN/aAN a noun with its article (and an adjective), A an adjective, Vt/Vt3/Vting a transitive verb (base, third
# person, -ing), Vi/Vi3 an intransitive one, ADV an adverb, DEG a degree word, M a modal, T a time, PP a
# prepositional phrase, OPEN an opener, ABS an abstract noun, Npl a bare plural noun.
_TEMPLATES = (
    "{S} {Vt3} {O}.",
    "{S} {ADV} {Vt3} {O} {PP}.",
    "{OPEN} {s} {Vt3} {O}.",
    "{P} {Vt} {O} {T}.",
    "{S} {M} {Vt} {O} if {s} {Vi3} {PP}.",
    "When {s} {Vt3} {O}, {s} {Vi3} {PP}.",
    "Because {p} {Vt} {O}, {s} {M} {Vt} {O} {T}.",
    "{Vting} {O} is {DEG} as {A} as {Vting} {O}.",
    "There is {aAN} {PP}, and {s} {Vt3} it {T}.",
    "According to {s}, {p} {M} {Vt} {O}.",
    "{S} does not {Vt} {O}, but {s} does.",
    "Some say that {s} {Vt3} {O}, while others insist that {p} {Vt} {O}.",
    "It is {A} to {Vt} {O} without {Vting} {O}.",
    "Few things are as {A} as {aN} that {Vt3} {O}.",
    "If {s} {Vt3} {O}, {s} will {Vt} {O}.",
    "{S}, which {Vt3} {O}, {Vi3} {T}.",
    "Why would {s} {Vt} {O}?",
    "{Vting} {O} takes more {ABS} than {Vting} {O}.",
    "Over time, {s} learns to {Vt} {O}.",
    "{S} seems {A} until {s} {Vt3} {O}.",
    "{OPEN} {p} {Vi} {PP}, and {s} {Vt3} {O}.",
    "{S} and {s} both {Vt} {O} {T}.",
    "Nobody knows whether {s} {M} {Vt} {O} {PP}.",
    "{S} tends to {Vt} {O} whenever {s} {Vi3}.",
    "{P} rarely {Vi} {PP} unless {s} {Vt3} {O}.",
    "To {Vt} {O} is to {Vt} {O}.",
    "{S} keeps {Vting} {O} {PP}.",
    "Is {s} {A} enough to {Vt} {O}?",
    "{S} would rather {Vt} {O} than {Vt} {O}.",
    "What {s} {Vt3} {T} is {NP}.",
    "{P} who {Vt} {O} tend to {Vi} {PP}.",
    "{S} {Vi3} {PP} while {p} {Vt} {O}.",
    "{S} is {A} and {A}, but never {A}.",
    "{S} is not {A}; {s} is simply {A}.",
    "{OPEN} nothing {Vt3} {O} quite like {s}.",
    "{S} {Vi3} {T}, and nobody asks why.",
    "Anyone who has tried to {Vt} {O} knows how {A} {s} can be.",
    "{P} {Vt} {O}, {p} {Vt} {O}, and {s} {Vi3} {PP}.",
    "The trouble with {p} is that they {Vt} {O} {T}.",
    "{S} once tried to {Vt} {O} {PP}.",
    "Sooner or later, {s} {M} have to {Vt} {O}.",
    "{S} {M} not {Vt} {O} {T}.",
    "Between {s} and {s}, only one {Vt3} {O}.",
    "{S} was never meant to {Vt} {O}.",
    "Most of the {Npl} {Vt} {O} {ADV}.",
    "No one can {Vt} {O} {T} and still {Vt} {O}.",
)
_SLOT = re.compile(r"\{(\w+)\}")


@lru_cache(maxsize=None)
def _prose_words() -> dict[str, tuple[str, ...]]:
    """wonderwords' lists as the generator uses them: lower case, no blocked or odd entries, verbs split by valency."""
    lists = word_lists()
    blocked = _PROSE_BLOCKLIST | {w.lower() for w in _wonderwords_category("PROFANITIES")}
    clean = re.compile(r"[a-z]+(?:[- ][a-z]+)*")

    def keep(words):
        return tuple(sorted({w.lower() for w in words if clean.fullmatch(w.lower()) and w.lower() not in blocked}))

    nouns, verbs = keep(lists["nouns"]), keep(lists["verbs"])
    return {"nouns": nouns, "adjectives": keep(lists["adjectives"]),
            "plurals": tuple(p for p in map(plural, nouns) if p),
            "transitive": tuple(v for v in verbs if v not in _INTRANSITIVE and "-" not in v),
            "intransitive": tuple(v for v in verbs if v in _INTRANSITIVE)}


class ProseGenerator:
    """Seeded essay-like prose from wonderwords' words; ``paragraph()`` never returns a sentence seen before.

    Each paragraph has two or three topic nouns and a topic adjective that its sentences return to, so the
    text reads as paragraphs about something rather than a stream of unrelated sentences.
    """

    def __init__(self, seed: object = CORPUS_SEED, seen: set[str] | None = None):
        self.rng = random.Random(str(seed))
        self.words = _prose_words()
        self.seen: set[str] = set() if seen is None else seen
        self.topics: tuple[str, ...] = ()
        self.topic_adjective = ""
        self._used: set[str] = set()   # nouns and adjectives of the sentence being built
        self._fillers: dict[str, Callable[[], str]] = {
            "S": lambda: self._singular(capital=True), "s": self._singular, "P": lambda: self._plural(capital=True),
            "p": self._plural, "O": self._object, "NP": self._object, "aN": lambda: with_article(self._noun()),
            "aAN": lambda: with_article(f"{self._adjective()} {self._noun()}"), "A": self._adjective,
            "Vt": lambda: self._pick("transitive"), "Vt3": lambda: third_person(self._pick("transitive")),
            "Vting": lambda: gerund(self._pick("transitive")), "Vi": lambda: self._pick("intransitive"),
            "Vi3": lambda: third_person(self._pick("intransitive")), "ADV": lambda: self.rng.choice(_ADVERBS),
            "DEG": lambda: self.rng.choice(_DEGREES), "M": lambda: self.rng.choice(_MODALS),
            "T": lambda: self.rng.choice(_TIMES), "OPEN": lambda: self.rng.choice(_OPENERS),
            "ABS": lambda: self.rng.choice(_ABSTRACT), "Npl": lambda: self._pick("plurals"),
            "PP": lambda: f"{self.rng.choice(_PREPOSITIONS)} {self._object()}",
        }

    # ------------------------------------------------------------------ words and phrases

    def _pick(self, kind: str) -> str:
        return self.rng.choice(self.words[kind])

    def _noun(self) -> str:
        """A noun not used yet in this sentence, often one of the paragraph's topics."""
        topics = [t for t in self.topics if t not in self._used]
        noun = self.rng.choice(topics) if topics and self.rng.random() < 0.35 else self._pick("nouns")
        while noun in self._used:
            noun = self._pick("nouns")
        self._used.add(noun)
        return noun

    def _adjective(self) -> str:
        """An adjective not used yet in this sentence, sometimes the paragraph's."""
        topical = self.topic_adjective not in self._used and self.rng.random() < 0.2
        adjective = self.topic_adjective if topical else self._pick("adjectives")
        while adjective in self._used:
            adjective = self._pick("adjectives")
        self._used.add(adjective)
        return adjective

    def _singular(self, capital: bool = False) -> str:
        rng = self.rng
        det = rng.choices([d for d, _ in _SINGULAR_DETERMINERS], [w for _, w in _SINGULAR_DETERMINERS])[0]
        head = self._noun()
        if rng.random() < 0.35:
            head = f"{self._adjective()} {head}"
        if det == "poss":
            phrase = f"the {self._noun()}'s {head}"
        elif det == "a":
            phrase = with_article(head)
        else:
            phrase = f"{det} {head}"
        if rng.random() < 0.12:
            phrase += f" of the {self._noun()}"
        return phrase[0].upper() + phrase[1:] if capital else phrase

    def _plural(self, capital: bool = False) -> str:
        rng = self.rng
        det = rng.choices([d for d, _ in _PLURAL_DETERMINERS], [w for _, w in _PLURAL_DETERMINERS])[0]
        head = self._pick("plurals")
        if rng.random() < 0.35:
            head = f"{self._adjective()} {head}"
        phrase = f"{det} {head}" if det else head
        return phrase[0].upper() + phrase[1:] if capital else phrase

    def _object(self) -> str:
        return self._plural() if self.rng.random() < 0.3 else self._singular()

    # ------------------------------------------------------------------ sentences and paragraphs

    def sentence(self) -> str:
        """One new sentence (never one in ``seen``); adds it to ``seen``."""
        while True:
            template = self.rng.choice(_TEMPLATES)
            self._used.clear()
            text = _SLOT.sub(lambda m: self._fillers[m.group(1)](), template)
            text = text[0].upper() + text[1:]
            if text not in self.seen:
                self.seen.add(text)
                return text

    def paragraph(self) -> list[str]:
        """4 to 9 new sentences about two or three topic nouns."""
        self.topics = tuple(self._pick("nouns") for _ in range(self.rng.choice((2, 2, 3))))
        self.topic_adjective = self._pick("adjectives")
        return [self.sentence() for _ in range(self.rng.randint(4, 9))]


# --------------------------------------------------------------------------- corpora

class Corpus:
    """A haystack text, as the words RULER takes a prefix of (whitespace collapsed, as RULER does)."""

    source: str = ""

    @property
    def size(self) -> int | None:
        """Words available (``None``: as many as asked for)."""
        return None

    def words(self, n: int) -> list[str]:
        raise NotImplementedError

    def text(self, n: int) -> str:
        """The first ``n`` words, joined by single spaces."""
        return " ".join(self.words(n))


class EssayCorpus(Corpus):
    """The shipped essays, then generated prose that repeats no sentence: as long as needed, never repeated."""

    source = DEFAULT_SOURCE

    def __init__(self, seed: object = CORPUS_SEED):
        essays = re.sub(r"\s+", " ", essay_text()).strip()
        self._words: list[str] = essays.split(" ")
        self.essay_words = len(self._words)
        self.paragraphs: list[str] = []   # the generated ones
        self._generator = ProseGenerator(seed, seen=set(split_sentences(essays)))

    def words(self, n: int) -> list[str]:
        while len(self._words) < n:
            paragraph = " ".join(self._generator.paragraph())
            self.paragraphs.append(paragraph)
            self._words.extend(paragraph.split(" "))
        return self._words[:n]


class FileCorpus(Corpus):
    """A UTF-8 text file's words, in order (``--haystack-file``); only its first :data:`FILE_MAX_BYTES` are read."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(FILE_MAX_BYTES + 1)
        except OSError as err:
            raise EvalError(f"--haystack-file: cannot read {path}: {err.strerror or err}") from err
        if len(raw) > FILE_MAX_BYTES:   # cut at ASCII whitespace: never inside a UTF-8 character
            raw = raw[:max(raw.rfind(b" ", 0, FILE_MAX_BYTES), raw.rfind(b"\n", 0, FILE_MAX_BYTES), 0)]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise EvalError(f"--haystack-file: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
        self._text = re.sub(r"\s+", " ", text.lstrip("\ufeff")).strip()
        if not self._text:
            raise EvalError(f"--haystack-file: {path} holds no text")
        self._size = self._text.count(" ") + 1
        self.bytes = len(raw)
        self.sha1 = hashlib.sha1(raw).hexdigest()   # of the bytes read
        self.source = f"file:{os.path.basename(path)}"

    @property
    def size(self) -> int:
        return self._size

    def words(self, n: int) -> list[str]:
        if n > self._size:
            raise EvalError(f"--haystack-file: {self.path} has {self._size} words, {n} were asked for")
        return self._text.split(" ", n)[:n]


@lru_cache(maxsize=None)
def default_corpus() -> EssayCorpus:
    """The default essay haystack, one per process (it grows as longer haystacks are asked for)."""
    require_wonderwords("RULER's essay haystack (generated past the shipped essays)")
    return EssayCorpus()


@lru_cache(maxsize=8)
def _file_corpus(path: str, mtime_ns: int, size: int) -> FileCorpus:
    return FileCorpus(path)


def file_corpus(path: str) -> FileCorpus:
    """The haystack of ``--haystack-file PATH`` (read once per process while the file is unchanged)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise EvalError(f"--haystack-file: cannot read {path}: {err.strerror or err}") from err
    if not os.path.isfile(path):
        raise EvalError(f"--haystack-file: {path} is not a file")
    return _file_corpus(os.path.abspath(path), st.st_mtime_ns, st.st_size)
