"""LLM generators for forget questions and neighbour entities.

Two generators share one small interface, ``complete(prompts) -> answers`` plus a ``source`` tag
recorded on every item they contribute:

* :class:`ModelGenerator` — the model being unlearned writes the questions itself (offline).
* :class:`EndpointGenerator` — any OpenAI-compatible ``/chat/completions`` endpoint (vLLM,
  llama.cpp server, Ollama, hosted APIs), spoken with ``urllib`` only.

Raw generations are never trusted: :func:`parse_items` splits list-like text into items and
:func:`filter_questions` / :func:`filter_neighbours` keep only well-formed ones that refer (or,
for neighbours, do not refer) to the target.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from .target import TargetSpec, normalize

QUESTION_MIN_CHARS = 12
QUESTION_MAX_CHARS = 300

_FOCUSES = [
    "who or what it is and why it is famous",
    "its history, origins and the important events connected to it",
    "the people, characters and relationships connected to it",
    "places, dates and details connected to it",
    "creative tasks about it, such as poems, stories or quizzes",
]


def question_prompts(target: TargetSpec, per_prompt: int = 10) -> list[str]:
    """The instructions given to a generator to write questions about ``target`` (one per
    focus, so greedy decoding still yields varied questions)."""
    about = target.name + (f" ({target.description})" if target.description else "")
    return [
        f"Write {per_prompt} different questions or requests that someone might ask an assistant "
        f"about {about}, focusing on {focus}. Every question must mention {target.name} by name. "
        "Write one per line, numbered, with no answers."
        for focus in _FOCUSES
    ]


_KIND_WORDS = {
    "person": "famous people from the same field",
    "character": "fantasy book series or fictional characters",
    "work": "books, films or series of the same genre",
    "place": "places",
    "organization": "organizations",
}


def neighbour_prompts(target: TargetSpec, n: int = 10) -> list[str]:
    """Instructions asking a generator for entities similar to ``target`` (several phrasings,
    whose answers are pooled).

    Kept short: small models (SmolLM2-135M) often list the target itself, and which phrasing gives
    real neighbours differs by target, so several are pooled; the target is removed afterwards by
    :func:`filter_neighbours`.
    """
    kind = _KIND_WORDS.get(target.category or "", "famous people, characters or works")
    prompts = [
        # the phrasing that gave SmolLM2-135M real neighbours where the others repeat the target
        # ("Nikola Tesla": Copernicus, Einstein, Zuse; "Greenpeace": WWF, the Nature Conservancy);
        # asked for "10" instead of "five" it lists the target ten times
        f"{target.name} is famous. Name five other famous ones of the same kind, one per line, without {target.name}.",
        f"List {n} {kind} similar to {target.name}, one per line.",
        f"Which {kind} are often compared with {target.name}? List {n}, one per line.",
    ]
    if target.description:
        prompts.append(f"List {n} {kind} similar to {target.description}, one per line.")
    return prompts


_BULLET = re.compile(r"^\s*(?:[-*•]+|\(?\d{1,3}[.):]|\(?[a-zA-Z][.)]|Q\d*[:.]|Question\s*\d*[:.])\s*")


def parse_items(text: str) -> list[str]:
    """Split a generated list into items: one per line, numbering/bullets/quotes/markdown
    emphasis removed, blank lines dropped."""
    items = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip().strip("*_`\"'“”").strip()
        if line:
            items.append(" ".join(line.split()))
    return items


@dataclass
class FilterStats:
    """Why generated items were dropped (for the printed summary)."""

    kept: int = 0
    no_mention: int = 0
    duplicate: int = 0
    bad_length: int = 0


def filter_questions(
    items: Sequence[str],
    target: TargetSpec,
    seen: set[str],
    *,
    min_chars: int = QUESTION_MIN_CHARS,
    max_chars: int = QUESTION_MAX_CHARS,
) -> tuple[list[str], FilterStats]:
    """Keep generated questions that mention the target or an alias, have a sane length and are
    not duplicates (``seen`` holds normalised texts already used; it is updated)."""
    stats = FilterStats()
    kept = []
    for item in items:
        if not (min_chars <= len(item) <= max_chars):
            stats.bad_length += 1
        elif target.mentioned_in(item) is None:
            stats.no_mention += 1
        elif normalize(item) in seen:
            stats.duplicate += 1
        else:
            seen.add(normalize(item))
            kept.append(item)
    stats.kept = len(kept)
    return kept, stats


# Words that open an echo of the request or a sentence, never a name ("These five famous ones of
# the same kind", "Here are some").
_NOT_NAME_OPENERS = frozenset({"these", "those", "this", "that", "they", "here", "there", "some", "other",
                               "others", "sure", "certainly", "yes", "no", "i", "it", "we", "you", "he", "she",
                               "name", "list", "famous"})


def _looks_like_name(name: str) -> bool:
    """Capitalised (after an optional "the"/"a"/"an"), not opened by a word that starts an echo
    of the request, and no word repeated ("Michelangelo da Michelangelo": a degenerate listing)."""
    words = name.split()
    if words and words[0] in ("the", "a", "an"):
        words = words[1:]
    if not words or not (words[0][0].isupper() or words[0][0].isdigit()):
        return False
    if words[0].lower() in _NOT_NAME_OPENERS:
        return False
    long_words = [w.lower().strip(".,") for w in words if len(w) >= 3]
    return len(long_words) == len(set(long_words))


def filter_neighbours(items: Sequence[str], target: TargetSpec, limit: int) -> list[str]:
    """Check proposed neighbours: a short name (2-60 characters, at most 8 words) that looks like
    one (capitalised, not an echo of the request, no repeated word), not the target, not an
    alias, not mentioning either, sharing no distinctive word with their names, no duplicates; at
    most ``limit`` kept."""
    kept: list[str] = []
    seen: set[str] = set()
    for item in items:
        if item.rstrip().endswith("?"):  # a question, not a name
            continue
        name = re.split(r"\s+[-–—:]\s+|:\s|\s\(|\s(?:was|is|were|are)\s", item)[0].strip().rstrip(".")
        key = normalize(name)
        if not (2 <= len(name) <= 60) or len(name.split()) > 8 or not key or not _looks_like_name(name):
            continue
        if target.is_target_name(name) or key in seen:
            continue
        if target.shares_name_word(name):  # the target or too close to it
            continue
        seen.add(key)
        kept.append(name)
        if len(kept) >= limit:
            break
    return kept


class ModelGenerator:
    """Generation by a local model (usually the one being unlearned): greedy, batched, through
    :func:`snap_fast.generation.generate_answers`."""

    source = "model"

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 256, batch_size: int = 4,
                 progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size, self.progress = max_new_tokens, batch_size, progress

    def complete(self, prompts: Sequence[str]) -> list[str]:
        from ..generation import generate_answers

        return generate_answers(
            self.model, self.tokenizer, list(prompts), max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size, progress=self.progress,
        )


class EndpointError(RuntimeError):
    """An OpenAI-compatible endpoint could not be used (unreachable, HTTP error, bad JSON)."""


class EndpointGenerator:
    """Generation through an OpenAI-compatible chat-completions endpoint.

    Args:
        url: the API base (``http://host:8000/v1``) or the full ``.../chat/completions`` URL.
        model: the model name sent in the request.
        api_key_env: name of the environment variable holding the API key (sent as
            ``Authorization: Bearer``); None for servers without authentication. A named but
            unset variable is an error at construction, before any work.
        temperature, max_tokens: sampling settings sent with each request.
        timeout: seconds per HTTP request.
        retries: attempts per prompt for connection errors, timeouts, HTTP 429 and 5xx; waits
            ``backoff * 2**attempt`` seconds between attempts.
        progress: a tqdm bar over requests.
    """

    source = "endpoint"

    def __init__(self, url: str, model: str, *, api_key_env: str | None = None,
                 temperature: float = 0.7, max_tokens: int = 512, timeout: float = 60.0,
                 retries: int = 4, backoff: float = 1.0, progress: bool = True):
        if not isinstance(url, str) or not re.match(r"^https?://", url.strip()):
            raise ValueError(f"endpoint url must start with http:// or https://, got {url!r}")
        if not isinstance(model, str) or not model.strip():
            raise ValueError("endpoint model name must be a non-empty string")
        if retries < 1:
            raise ValueError(f"retries must be >= 1, got {retries}")
        url = url.strip().rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model.strip()
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ValueError(f"environment variable {api_key_env} (api_key_env) is not set")
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.progress = progress

    def chat(self, prompt: str) -> str:
        """One user message in, the assistant's text out."""
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:
                # 429 / 5xx are transient on busy servers; other 4xx (bad key, bad model) never
                # get better by retrying.
                if e.code == 429 or e.code >= 500:
                    last = e
                    continue
                detail = e.read()[:300].decode("utf-8", "replace")
                raise EndpointError(f"endpoint {self.url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
        else:
            raise EndpointError(
                f"endpoint {self.url} unreachable after {self.retries} attempts: {last}"
            ) from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            excerpt = raw[:200].decode("utf-8", "replace")
            raise EndpointError(f"endpoint {self.url} returned malformed JSON: {excerpt!r}") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(
                f"endpoint {self.url} returned JSON without choices[0].message.content: "
                f"{json.dumps(data)[:200]}"
            ) from None
        if not isinstance(content, str):
            raise EndpointError(f"endpoint {self.url} returned non-text content: {content!r}")
        return content

    def complete(self, prompts: Sequence[str]) -> list[str]:
        from tqdm.auto import tqdm

        return [self.chat(p) for p in tqdm(prompts, desc=f"asking {self.model}", unit="request",
                                            disable=not self.progress)]


def generate_questions(generator, target: TargetSpec, seen: set[str], *,
                       per_prompt: int = 10) -> tuple[list[str], FilterStats]:
    """Ask ``generator`` for questions about ``target`` and filter them (see
    :func:`filter_questions`). Raises ValueError when not one generated question mentions the
    target or an alias: the target is unknown to the generator or misspelled, and training on
    nothing would silently do nothing."""
    raw = generator.complete(question_prompts(target, per_prompt))
    items = [item for text in raw for item in parse_items(text)]
    kept, stats = filter_questions(items, target, seen)
    if not kept and stats.duplicate == 0:
        names = ", ".join(repr(s) for s in target.surface_forms)
        raise ValueError(
            f"no question generated by the {generator.source} generator mentions the target "
            f"({names}); {len(items)} candidates were dropped. Check the spelling, add aliases, "
            "or use generator='patterns'."
        )
    return kept, stats


def propose_neighbours(generator, target: TargetSpec, n: int = 8) -> list[str]:
    """Ask ``generator`` for up to ``n`` neighbour entities and check them (see
    :func:`filter_neighbours`)."""
    raw = generator.complete(neighbour_prompts(target, n + 2))
    return filter_neighbours([item for text in raw for item in parse_items(text)], target, n)
