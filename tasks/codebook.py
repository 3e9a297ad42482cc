"""The codebook task: nonce words that each stand for a digit, facts only an agent can give.

"Decode: nomi riro" is answered "nomi = 6. riro = 7. So the code is \\boxed{67}.". Which
digit a word stands for is drawn from ``fact_seed``, so no policy can know it before
training: the only place a fact appears is the Knowledge oracle's reply ("nomi = 6.
riro = 7."), which is literally how the solo solution begins. The task exists to test
whether training on an agent's reply teaches the policy to reason without it
(``benchmarks/codebook.py``, ``docs/efficacy.md``).

Words come in disjoint sets (:data:`WORD_SETS`), fixed for every seed:

- ``warmup``: the format warm-up's words; their facts teach the format, never the RL facts.
- ``rl``: the RL words. Their ordered pairs split by content into ``train`` and
  ``held_out`` questions (a sha256 of the pair, :func:`held_out_pair`), so every held-out
  fact was met in training but no held-out question was.
- ``floor``: words no run trains on: the chance floor (about 1% per question).
- ``calibration``: words for the one calibration run that fixes the budget, never
  evaluated in the experiment.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any, Literal

from tasks.answers import answer_line, last_boxed, strip_markdown
from tasks.base import Problem, RewardResult, Task

#: Consonant-vowel syllables of the nonce words.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aiou"
#: Two-syllable words that are English (or common loan) words, never used.
_REAL_WORDS = frozenset(
    "data diva gala kilo koto lava lima mama memo papa pita polo puma soda sofa "
    "tofu tuba vida zulu kiwi mini taxi radi sumo judo kudo rota lido fugu tutu "
    "mafia mala mia nano pago pika riga sari tiki tuna vino visa bali dodo gogo "
    "kaka lulu momo nana nini pipi poko toto bobo dada baba pogo dado loto".split()
)
WORD_SET_SIZES: dict[str, int] = {"warmup": 10, "rl": 12, "floor": 12, "calibration": 12}
#: Which fact a word set's facts come from is seeded per set, so sets never share facts.
_SET_SALT = {"warmup": 1, "rl": 2, "floor": 3, "calibration": 4}

Split = Literal["all", "train", "held_out"]


def _word_pool(count: int) -> list[str]:
    """``count`` distinct nonce words, the same on every machine (a fixed seed)."""
    rng = random.Random(20261207)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2))
        if word in seen or word in _REAL_WORDS or word[:2] == word[2:]:
            continue
        seen.add(word)
        words.append(word)
    return words


def _word_sets() -> dict[str, tuple[str, ...]]:
    pool = _word_pool(sum(WORD_SET_SIZES.values()))
    sets, start = {}, 0
    for name, size in WORD_SET_SIZES.items():
        sets[name] = tuple(pool[start : start + size])
        start += size
    return sets


#: The disjoint word sets, by name.
WORD_SETS: dict[str, tuple[str, ...]] = _word_sets()


def codebook(words: tuple[str, ...], fact_seed: int, salt: int) -> dict[str, int]:
    """Each word's digit: every digit once (while words last), then random ones, shuffled."""
    rng = random.Random(fact_seed * 1000 + salt)
    digits = list(range(10))[: len(words)] + [rng.randrange(10) for _ in range(len(words) - 10)]
    rng.shuffle(digits)
    return dict(zip(words, digits, strict=True))


def held_out_pair(first: str, second: str, fraction: float) -> bool:
    """Whether the question "first second" is held out: a stable hash of its content."""
    digest = hashlib.sha256(f"{first} {second}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def solo_solution(words: list[str], book: dict[str, int]) -> str:
    """The solution the policy writes alone: each word's digit, then the boxed code."""
    lines = " ".join(f"{w} = {book[w]}." for w in words)
    code = "".join(str(book[w]) for w in words)
    return f"{lines} So the code is \\boxed{{{code}}}."


class CodebookTask(Task):
    """Decode two nonce words into a two-digit code (module docstring).

    Args:
        words: which word set (:data:`WORD_SETS`): ``warmup``, ``rl``, ``floor``, ``calibration``.
        fact_seed: draws each word's digit; a seed of the experiment.
        split: ``train`` or ``held_out`` pairs of the set (by :func:`held_out_pair`), or ``all``.
        held_out_fraction: share of the pairs held out.
        seed: the order of the problems (not which ones).
        size: accepted for config compatibility; must not exceed the pairs available.
    """

    answer_format = 'Write each word\'s digit as "word = digit.", then the code in \\boxed{}.'

    def __init__(
        self,
        *,
        words: str = "rl",
        fact_seed: int = 0,
        split: Split = "all",
        held_out_fraction: float = 0.25,
        seed: int = 0,
        size: int | None = None,
    ) -> None:
        super().__init__()
        if words not in WORD_SETS:
            raise ValueError(
                f"unknown codebook word set {words!r}; expected one of {', '.join(WORD_SETS)}"
            )
        if split not in ("all", "train", "held_out"):
            raise ValueError(f"codebook split must be all, train or held_out, got {split!r}")
        if not 0.0 < held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
        self.words = words
        self.fact_seed = fact_seed
        self.split = split
        self.held_out_fraction = held_out_fraction
        self.seed = seed
        self.size = size
        self.name = "codebook"
        self.book = codebook(WORD_SETS[words], fact_seed, _SET_SALT[words])

    def pairs(self) -> list[tuple[str, str]]:
        """The ordered pairs of distinct words of this split."""
        words = WORD_SETS[self.words]
        out = []
        for a in words:
            for b in words:
                if a == b:
                    continue
                held = held_out_pair(a, b, self.held_out_fraction)
                if self.split == "all" or (self.split == "held_out") == held:
                    out.append((a, b))
        return out

    def load(self) -> list[Problem]:
        pairs = self.pairs()
        if self.size is not None and self.size > len(pairs):
            raise ValueError(
                f"codebook ({self.words}, {self.split}) has {len(pairs)} questions; size {self.size} asks more"
            )
        random.Random(self.seed).shuffle(pairs)
        pairs = pairs[: self.size] if self.size is not None else pairs
        return [
            Problem(
                id=f"codebook/{self.words}/{a}-{b}",
                task=self.name,
                question=f"Decode: {a} {b}",
                reference=f"{self.book[a]}{self.book[b]}",
                solution=solo_solution([a, b], self.book),
                metadata={"words": [a, b], "word_set": self.words, "fact_seed": self.fact_seed},
            )
            for a, b in pairs
        ]

    def extract_answer(self, response: str) -> str | None:
        boxed = last_boxed(response)
        if boxed is not None:
            return strip_markdown(boxed)
        line = answer_line(response)
        return strip_markdown(line) if line is not None else None

    def score(self, problem: Problem, response: str) -> RewardResult:
        extracted = self.extract_answer(response)
        if extracted is None:
            return RewardResult(score=0.0, correct=False, reason="no answer")
        code = re.sub(r"\s+", "", extracted)
        correct = code == problem.reference
        return RewardResult(
            score=1.0 if correct else 0.0,
            correct=correct,
            extracted=extracted,
            reason="" if correct else "wrong answer",
        )

    @property
    def privileged(self) -> frozenset[str]:
        return frozenset({"facts"})

    def facts(self, problem: Problem) -> list[str]:
        """Each word's digit, in the question's order: "nomi = 6.", "riro = 7."."""
        return [f"{w} = {self.book[w]}." for w in problem.metadata["words"]]

    def answer_spans(self, problem: Problem, text: str) -> list[tuple[int, int]]:
        """The whole code as a digit string ("73"), not its digits one by one (facts state those)."""
        code = re.escape(problem.reference)
        return [m.span() for m in re.finditer(rf"(?<!\d){code}(?!\d)", text)]

    def answer_direction(self, problem: Problem, candidate: str) -> str | None:
        """None: a code has no order that helps ("too large" would leak digits)."""
        return None


def make_codebook(**kwargs: Any) -> CodebookTask:
    """``make_task("codebook", words=..., fact_seed=..., split=...)``."""
    return CodebookTask(**kwargs)
