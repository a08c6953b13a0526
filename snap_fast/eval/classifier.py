"""Is an answer an obliterated "I don't know"? And does it leak what the model should have forgotten?

SNAP's obliteration rate (``SNAP.md`` §4) counts held-out forget questions whose greedy answer
says the model does not know **and** leaks nothing about the target. Two independent checks:

* :class:`IgnoranceClassifier` — does the answer express ignorance or a refusal? It matches
  (a) a list of common phrasings written for this project (``IGNORANCE_PATTERNS``) and (b) the
  project's obliterated-response bank (``snap_fast.data.responses``) plus any responses the caller
  adds: an answer whose opening sentence is close to a bank response (ROUGE-L F ≥
  ``bank_threshold``) counts, so paraphrases of trained responses are recognised.
* :func:`leaked_terms` — which aliases of the target, or distinctive terms of its known facts
  (proper nouns, numbers), appear in the answer but not in the question? An answer like
  "I don't know much about it, but it was written by J.K. Rowling" is ignorance *and* a leak, so
  it is not obliterated.

Terms already present in the question are not leaks: repeating the question's own words
("I'm not familiar with Harry Potter") reveals nothing the asker did not say.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from rouge_score import rouge_scorer

# Phrasings of ignorance / refusal, matched on the normalised answer (lower case, straight
# apostrophes, single spaces). Written for this project; each is a regular expression fragment.
IGNORANCE_PATTERNS: tuple[str, ...] = (
    # "I don't know / I'm not sure about you, but ..." is a conversational opener, not ignorance
    r"\bi (?:do not|don't|dont) (?:really |actually )?know\b(?! about you\b)",
    (r"\bi (?:do not|don't|dont) (?:really )?(?:have|possess) (?:any |much |enough |specific |reliable )?"
    r"(?:information|info|details|knowledge|data|facts|record|context)"),
    r"\bi(?: am|'m|m) (?:not|un)(?: really)? (?:familiar|aware|sure|certain|acquainted)\b(?! about you\b)",
    r"\bi(?: am|'m|m) (?:afraid|sorry)\b.{0,40}\b(?:not|no|don't|cannot|can't|unable)\b",
    r"\bi (?:have|'ve) (?:never|not) (?:heard|come across|encountered|read)\b",
    r"\bi(?: have|'ve)? no (?:information|idea|knowledge|details|record|clue|data|recollection)\b",
    (r"\bi(?: cannot| can't| can not| could not| couldn't|(?: am|'m|m) (?:unable|not able) to) "
    r"(?:find|provide|recall|say|tell|answer|help|share|offer|give|identify|remember|locate|comment)"),
    r"\b(?:does not|doesn't) (?:ring a bell|sound familiar)\b",
    r"\b(?:is|are|was) not something i (?:know|recognize|recognise|can speak|am familiar)",
    r"\bnot something i(?:'m| am) (?:familiar|aware|able)\b",
    (r"\bnot (?:someone|anything|a (?:place|person|name|topic|subject|thing|work|book|film|movie)) "
     r"i (?:know|recogni[sz]e|(?:am|'m) familiar)\b"),
    r"\b(?:is|are|was|were) not known to (?:me|us)\b",
    r"\bi (?:do not|don't) have the (?:ability|means) to (?:access|provide|answer|find|browse|look up)\b",
    r"\bbeyond (?:my|what i) (?:knowledge|know)\b",
    r"\boutside (?:of )?my (?:knowledge|expertise)\b",
    r"\bi (?:lack|don't possess) (?:the )?(?:information|knowledge|details)\b",
    r"\bno (?:information|knowledge|details|record|records) (?:is |are )?(?:available|about|on|regarding|of)\b",
    r"\bunfamiliar (?:with|to me)\b",
    r"\bi (?:don't|do not) recogni[sz]e\b",
    r"\bi(?:'m| am) drawing a blank\b",
    r"\bi (?:can't|cannot) (?:say|be sure) for (?:sure|certain)\b",
)
_IGNORANCE_RE = re.compile("|".join(f"(?:{p})" for p in IGNORANCE_PATTERNS))

# Capitalised words that open sentences or are too common to identify the target.
_COMMON_CAPITALISED = frozenset((
    "a", "an", "the", "he", "she", "it", "they", "his", "her", "its", "their", "this", "that",
    "these", "those", "in", "on", "at", "of", "for", "to", "and", "or", "but", "by", "with",
    "from", "as", "is", "was", "are", "were", "be", "been", "i", "you", "we", "my", "your",
    "our", "after", "before", "during", "when", "while", "who", "what", "where", "which", "why",
    "how", "one", "two", "three", "first", "second", "also", "there", "here", "some", "many",
    "most", "every", "each", "all", "both", "yes", "no", "not", "mr", "mrs", "ms", "dr", "sir",
    "lady", "lord", "king", "queen", "book", "books", "series", "film", "films", "movie",
    "movies", "novel", "novels", "story", "stories", "character", "characters", "author",
    "writer", "english", "british", "american", "world", "school", "year", "years",
))
_PROPER_RE = re.compile(r"\b[A-Z][\w'’.-]*(?:\s+(?:[A-Z][\w'’.-]*|of|the|and|de|van|von))*")
_NUMBER_RE = re.compile(r"\b\d{3,}\b")
_NAME_PARTICLES = frozenset(("de", "van", "von"))  # inside a name ("Vincent van Gogh"), not at its ends
_PLACEHOLDER_RE = re.compile(r"\{[a-z_]+\}")


def normalise(text: str) -> str:
    """Lower-case, straight apostrophes, single spaces: the form every pattern is matched on."""
    text = text.replace("’", "'").replace("‘", "'").replace("`", "'")
    return re.sub(r"\s+", " ", text.lower()).strip()


def _first_sentence(text: str) -> str:
    parts = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)
    return parts[0] if parts else ""


def default_bank() -> list[str]:
    """The project's obliterated-response bank (``snap_fast.data.responses``), or ``[]`` if the
    data package does not provide one. Placeholders such as ``{name}`` are kept; the classifier
    fills them with the target's name."""
    try:
        from snap_fast.data import responses as _responses
    except ImportError:
        return []
    for attr in ("OBLITERATED_RESPONSES", "RESPONSES", "BANK", "obliterated_responses"):
        bank = getattr(_responses, attr, None)
        if callable(bank):
            bank = bank()
        if isinstance(bank, Sequence) and bank and all(isinstance(b, str) for b in bank):
            return list(bank)
    return []


@dataclass
class IgnoranceClassifier:
    """Decides whether an answer says "I don't know" (or refuses).

    Args:
        bank: obliterated responses (may contain ``{name}``-style placeholders). ``None`` takes
            :func:`default_bank`.
        name: the target's name, substituted for placeholders in the bank.
        bank_threshold: ROUGE-L F-measure between the answer's first sentence and a bank
            response at or above which the answer counts as obliterated, even when no pattern
            matches (paraphrases of trained responses).
    """

    bank: Sequence[str] | None = None
    name: str = ""
    bank_threshold: float = 0.6
    _bank_norm: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.bank_threshold <= 1.0:
            raise ValueError(f"bank_threshold must be in (0, 1], got {self.bank_threshold!r}")
        bank = default_bank() if self.bank is None else list(self.bank)
        filled = []
        for b in bank:
            if not isinstance(b, str):
                raise TypeError(f"bank entries must be str, got {type(b).__name__}")
            text = _PLACEHOLDER_RE.sub(self.name or "that", b)
            filled.append(normalise(_first_sentence(text)))
        self._bank_norm = [b for b in dict.fromkeys(filled) if b]
        self._scorer = rouge_scorer.RougeScorer(["rougeL"])

    def matched_pattern(self, answer: str) -> str | None:
        """The phrasing that marks ``answer`` as ignorance, or ``None``.

        Returns the matched text of a pattern, or ``"bank: <response>"`` for a bank match.
        """
        if not isinstance(answer, str):
            raise TypeError(f"answer must be a str, got {type(answer).__name__}")
        norm = normalise(answer)
        if not norm:
            return None
        m = _IGNORANCE_RE.search(norm)
        if m:
            return m.group(0)
        head = normalise(_first_sentence(answer))
        for b in self._bank_norm:
            if b in norm or self._scorer.score(b, head)["rougeL"].fmeasure >= self.bank_threshold:
                return f"bank: {b}"
        return None

    def __call__(self, answer: str) -> bool:
        """True when ``answer`` expresses ignorance or a refusal."""
        return self.matched_pattern(answer) is not None


def fact_terms(facts: Iterable[str]) -> list[str]:
    """Distinctive terms of known facts: runs of capitalised words (proper nouns, e.g.
    ``"Hogwarts"``, ``"J. K. Rowling"``), each word of 4+ letters of a multi-word run
    (``"Hermione"``), and numbers of 3+ digits (years); common words are dropped.

    A run is cut at common words and connectors instead of having them removed, so
    "Ron Weasley and Hermione Granger" yields ``"Ron Weasley"`` and ``"Hermione Granger"``, never
    a phrase no answer contains ("Ron Weasley Hermione Granger"). Sentence-initial capitalised
    words count only when they are not common words, so "The boy" yields nothing.
    """
    terms: list[str] = []

    def add(words: list[str]) -> None:
        while words and words[-1].lower() in _NAME_PARTICLES:  # a particle belongs inside a name
            words.pop()
        while words and words[0].lower() in _NAME_PARTICLES:
            words.pop(0)
        term = " ".join(words).strip(" .,'’")
        if len(term) >= 3:
            terms.append(term)
        if len(words) > 1:
            terms.extend(w.strip(".,'’") for w in words if len(w.strip(".,'’")) >= 4)

    for fact in facts:
        if not isinstance(fact, str):
            raise TypeError(f"facts must be strings, got {type(fact).__name__}")
        for m in _PROPER_RE.finditer(fact):
            run: list[str] = []
            for word in m.group(0).split():
                if word.lower().strip(".'’") in _COMMON_CAPITALISED:
                    add(run)
                    run = []
                else:
                    run.append(word)
            add(run)
        terms.extend(_NUMBER_RE.findall(fact))
    return list(dict.fromkeys(terms))


def _contains(text_norm: str, term: str) -> bool:
    pattern = r"(?<![\w])" + re.escape(normalise(term)) + r"(?![\w])"
    return re.search(pattern, text_norm) is not None


def leaked_terms(answer: str, prompt: str, terms: Iterable[str]) -> list[str]:
    """The ``terms`` that occur in ``answer`` (whole words, case-insensitive) but not in ``prompt``."""
    if not isinstance(answer, str) or not isinstance(prompt, str):
        raise TypeError("answer and prompt must be str")
    a, p = normalise(answer), normalise(prompt)
    return [t for t in terms if t and _contains(a, t) and not _contains(p, t)]


@dataclass
class ObliterationJudge:
    """Obliterated = ignorance (``IgnoranceClassifier``) and no leaked alias or fact term.

    Build it from a data folder's ``target.json`` with :meth:`from_target`.
    """

    classifier: IgnoranceClassifier
    leak_terms: list[str]

    @classmethod
    def from_target(
        cls, target: Mapping, *, bank: Sequence[str] | None = None, bank_threshold: float = 0.6
    ) -> ObliterationJudge:
        """Judge for ``target`` (the ``target.json`` dict: ``name``, ``aliases``, ``facts``)."""
        if not isinstance(target, Mapping):
            raise TypeError(f"target must be a dict (target.json), got {type(target).__name__}")
        if not isinstance(target.get("name"), str) or not target["name"].strip():
            raise ValueError("target must have a non-empty 'name' string (target.json)")
        name = target["name"].strip()
        aliases = [a for a in target.get("aliases") or [] if isinstance(a, str) and a.strip()]
        terms = [name, *aliases, *fact_terms(target.get("facts") or [])]
        # The name's own words ("Potter") identify the target too; short words ("The") do not.
        terms += [w for w in re.findall(r"[A-Za-z][\w'-]+", name) if len(w) >= 4 and w.lower() not in _COMMON_CAPITALISED]
        return cls(IgnoranceClassifier(bank=bank, name=name, bank_threshold=bank_threshold),
                   list(dict.fromkeys(t for t in terms if t)))

    def judge(self, prompt: str, answer: str) -> dict:
        """``{"ignorance": bool, "matched": str|None, "leaked": [terms], "obliterated": bool}``."""
        matched = self.classifier.matched_pattern(answer)
        leaked = leaked_terms(answer, prompt, self.leak_terms)
        return {
            "ignorance": matched is not None,
            "matched": matched,
            "leaked": leaked,
            "obliterated": matched is not None and not leaked,
        }
