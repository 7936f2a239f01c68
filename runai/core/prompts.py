# -*- test-case-name: runai.test.test_prompts -*-
"""AUTOMATIC1111's prompt syntax, read once for every door: emphasis, BREAK, extra networks.

- ``(a)`` multiplies the attention to ``a`` by 1.1, ``((a))`` by 1.21, ``[a]`` divides it
  by 1.1, ``(a:1.3)`` sets the factor; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the
  characters themselves. Unbalanced brackets are read as A1111 reads them: one left open
  weighs on the rest of the prompt, a stray closing one is text.
- ``BREAK`` (a whole word, in capitals) starts a new chunk of 75 tokens.
- ``<lora:name:w>``, ``<lora:name:w_te:w_unet>`` (``te=`` and ``unet=`` too) and
  ``<lyco:...>`` (the same) name LoRA networks; every ``<kind:...>`` tag is taken out of
  the text before the rest is read, as in A1111.

What runai does not build is refused with ``bad_request`` naming it, never passed on as
text: ``AND`` (composable diffusion), ``[from:to:when]`` and ``[a|b]`` (prompts that change
over the steps), and any other extra network (``<hypernet:...>``). The result is a
:class:`Prompt`; :func:`parse` raises nothing but :class:`runai.core.errors.RunaiError`.

Torch-free: it runs on the reactor for each request, and again on the worker where a
family encodes the prompt. The work is linear in the prompt's length, times the depth of
its brackets (bounded by :data:`MAX_DEPTH`).
"""

import math
import re
from dataclasses import dataclass

from runai.core import errors

MAX_NETWORKS = 16
MAX_WEIGHT = 10.0  # emphasis and network weights lie within -MAX_WEIGHT..MAX_WEIGHT
MAX_DEPTH = 32  # brackets open at once
MAX_NAME_CHARS = 1024
ROUND, SQUARE = 1.1, 1 / 1.1
# Extra-network tags runai applies, and what each is to runai.
NETWORK_KINDS = {"lora": "lora", "lyco": "lora"}
NETWORK_OPTIONS = ("te", "unet")

_TAG = re.compile(r"<(\w+):([^>]+)>")
_AND = re.compile(r"\bAND\b")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# A1111's tokens (modules/prompt_parser.py, re_attention), in its order.
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
# The characters that matter to the schedule syntax, and escapes.
_SCHEDULE_MARKS = re.compile(r"\\.|[()\[\]:|]", re.S)
# The step number that ends ``[from:to:when]`` (lark's SIGNED_NUMBER, after optional blanks).
_WHEN = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")
# The words CLIP's tokenizer splits a text into (its pre-tokenizer's pattern, lower-cased).
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


class _Break:
    """The marker that ends a chunk, among a :class:`Prompt`'s segments."""

    def __repr__(self):
        return "BREAK"

    def __reduce__(self):
        return "BREAK"


BREAK = _Break()


@dataclass(frozen=True)
class Network:
    """An extra network a prompt names: ``kind`` ``"lora"`` (``<lyco:...>`` too), its
    ``name`` as written, its weights on the text encoders and on the denoiser."""

    kind: str
    name: str
    te: float = 1.0
    unet: float = 1.0


@dataclass(frozen=True)
class Prompt:
    """A parsed prompt: ``segments``, ``(text, weight)`` pairs (A1111's, adjacent runs of
    one weight merged) and :data:`BREAK` markers; ``plain``, the text without any syntax
    (for encoders that take no weights: T5); ``networks``, the :class:`Network` tags."""

    segments: tuple = ()
    plain: str = ""
    networks: tuple = ()

    @property
    def weighted(self):
        """Whether a weight is not 1 or a BREAK ends a chunk: the text alone says less."""
        return any(s is BREAK or s[1] != 1.0 for s in self.segments)


def _refuse(message):
    return errors.RunaiError(errors.BAD_REQUEST, message)


def _number(text, what):
    """A finite weight within the bounds, from ``text``; ``what`` names it in errors."""
    if not _NUMBER.fullmatch(text):
        raise _refuse(f"{what} must be a number, not {text[:40]!r}")
    value = float(text)
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"{what} must be between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g}, "
                                                     f"not {text.strip()[:40]}")
    return value


def _network(kind, args):
    """A :class:`Network` from a tag's ``kind`` and ``args`` (what follows its first colon)."""
    positional, named = [], {}
    for item in args.split(":"):
        key, sep, value = item.partition("=")
        if sep:
            named[key.strip()] = value
        else:
            positional.append(item)
    tag = f"<{kind}:{args[:60]}>"
    unknown = sorted(set(named) - set(NETWORK_OPTIONS))
    if unknown or len(positional) > 3:
        raise _refuse(f"{tag}: runai takes a name and at most two weights (or te=, unet=), not "
                      f"{(unknown[0] + '=') if unknown else repr(positional[3][:40])}")
    name = positional[0].strip() if positional else ""
    if not name or len(name) > MAX_NAME_CHARS:
        raise _refuse(f"{tag} has no network name" if not name else f"a network name is longer than {MAX_NAME_CHARS}")
    te = _number(positional[1], f"the weight in {tag}") if len(positional) > 1 else 1.0
    te = _number(named["te"], f"te= in {tag}") if "te" in named else te
    unet = _number(positional[2], f"the second weight in {tag}") if len(positional) > 2 else te
    unet = _number(named["unet"], f"unet= in {tag}") if "unet" in named else unet
    return Network(kind=NETWORK_KINDS[kind], name=name, te=te, unet=unet)


def _take_networks(text):
    """``(text without its tags, networks)``: A1111 takes every ``<kind:args>`` tag out."""
    networks = []

    def found(match):
        kind, args = match.group(1), match.group(2)
        if kind.lower() not in NETWORK_KINDS:
            raise _refuse(f"runai does not apply <{kind[:40]}:...> extra networks; it applies <lora:...> "
                          "and <lyco:...>")
        if len(networks) >= MAX_NETWORKS:
            raise errors.RunaiError(errors.OUT_OF_RANGE, f"a prompt names more than {MAX_NETWORKS} extra networks")
        networks.append(_network(kind.lower(), args))
        return ""

    # Up to the last '>' only: past it no tag can end, and a search from each '<' to the
    # end of a long text would make this quadratic.
    end = text.rfind(">") + 1
    return _TAG.sub(found, text[:end]) + text[end:], tuple(networks)


def _refuse_schedules(text):
    """Refuse ``[from:to:when]``, ``[to:when]`` and ``[a|b]``: prompts that change over the
    steps, which runai does not build. Escaped characters are text."""
    stack = []  # per open bracket: [kind, where a ':' last stood in it, whether a '|' did, where it opened]
    for match in _SCHEDULE_MARKS.finditer(text):
        c, i = match.group(0), match.start()
        if c in "([":
            stack.append([c, -1, False, i])
        elif stack and c == ":":
            stack[-1][1] = i
        elif stack and c == "|":
            stack[-1][2] = True
        elif c == ")" and stack and stack[-1][0] == "(":
            stack.pop()
        elif c == "]" and stack and stack[-1][0] == "[":
            _, colon, pipe, start = stack.pop()
            quoted = repr(text[start:i + 1][:80])
            if pipe:
                raise _refuse(f"runai does not alternate prompts over the steps ([a|b]: {quoted}); "
                              "write one of them, or escape the brackets: \\[ \\]")
            if colon >= 0 and _WHEN.fullmatch(text, colon + 1, i):
                raise _refuse(f"runai does not change prompts over the steps ([from:to:when]: {quoted}); "
                              "write the one you want, or escape the brackets: \\[ \\]")


def _attention(text):
    """A1111's ``parse_prompt_attention``: ``[[text, weight], ...]`` with BREAK markers.
    A BREAK between brackets still ends a chunk (A1111 would weigh the word instead)."""
    res, round_open, square_open = [], [], []

    def multiply(start, factor):
        for entry in res[start:]:
            if entry is not BREAK:
                entry[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token in "([":
            if len(round_open) + len(square_open) >= MAX_DEPTH:
                raise _refuse(f"the prompt has more than {MAX_DEPTH} brackets open at once")
            (round_open if token == "(" else square_open).append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _number(weight, f"the weight {token!r}"))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(token)):
                if k:
                    res.append(BREAK)
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    return res


def _segments(res):
    """Adjacent runs of one weight merged (as A1111 does), empty texts dropped, weights checked."""
    merged = []
    for entry in res:
        if entry is BREAK:
            merged.append(BREAK)
        elif merged and merged[-1] is not BREAK and merged[-1][1] == entry[1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(list(entry))
    segments = []
    for entry in merged:
        if entry is BREAK:
            segments.append(BREAK)
            continue
        text, weight = entry
        if not text:
            continue
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise errors.RunaiError(errors.OUT_OF_RANGE, f"the emphasis on {text[:40]!r} comes to {weight:g}; "
                                                         f"weights must be between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
        segments.append((text, weight))
    return tuple(segments)


def parse(text):
    """The :class:`Prompt` of ``text``; raises RunaiError (``bad_request`` for syntax runai
    does not build, ``out_of_range`` for a weight or a count beyond the bounds)."""
    if not isinstance(text, str):
        raise _refuse("a prompt must be a string")
    text, networks = _take_networks(text)
    if _AND.search(text):
        raise _refuse("runai does not compose prompts with AND (composable diffusion); write 'and' for the word")
    _refuse_schedules(text)
    segments = _segments(_attention(text))
    plain = "".join(" " if s is BREAK else s[0] for s in segments)
    return Prompt(segments=segments, plain=plain, networks=networks)


# -- names in a prompt (embeddings) -------------------------------------------------------


def words(text):
    """``[(start, end, word)]``: the words CLIP's tokenizer splits ``text`` into, lower-cased."""
    return [(m.start(), m.end(), m.group(0).lower()) for m in _WORDS.finditer(text)]


def name_index(names):
    """What :func:`find_names` looks names up in: ``{first word: [(count, {words: name})]}``,
    by word count, the most first. A name of no words is left out; of two names of the same
    words, the first in sorted order is kept."""
    grouped = {}
    for name in sorted(names):
        key = tuple(w for _, _, w in words(name))
        if key:
            grouped.setdefault(key[0], {}).setdefault(len(key), {}).setdefault(key, name)
    return {first: sorted(by_count.items(), reverse=True) for first, by_count in grouped.items()}


def find_names(text, index):
    """``[(start, end, name)]``: where a name of ``index`` (:func:`name_index`) stands in
    ``text`` as whole words, case-insensitively, as A1111 finds embeddings among tokens;
    the longest name first, never overlapping."""
    found, split = [], words(text)
    lowered = [w for _, _, w in split]
    i = 0
    while i < len(split):
        for count, names in index.get(lowered[i], ()):
            name = names.get(tuple(lowered[i:i + count]))
            if name is not None:
                found.append((split[i][0], split[i + count - 1][1], name))
                i += count
                break
        else:
            i += 1
    return found


def names_in(prompt, index):
    """The names of ``index`` that a :class:`Prompt`'s text uses, in order, each once."""
    seen = []
    for segment in prompt.segments:
        if segment is not BREAK:
            seen += [name for _, _, name in find_names(segment[0], index) if name not in seen]
    return tuple(seen)
