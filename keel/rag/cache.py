"""Answer cache per index version: exact (same normalised question) and semantic (similar one).

An answer is only valid for the index it came from, so the cache belongs to one index
version and empties itself when asked about another. The semantic side compares the
question's vector with those of cached questions; above ``threshold`` (cosine) the cached
answer is reused. Counters say how much was saved.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_SEMANTIC_THRESHOLD = 0.95
# Dollars per 1000 tokens of an answer not generated again; a configuration, not a price list.
DEFAULT_COST_PER_1K_TOKENS = 0.002


def normalise(question: str) -> str:
    """Lower case, single spaces, no trailing punctuation: the exact cache's key."""
    return re.sub(r"\s+", " ", question.lower()).strip().rstrip("?.! ")


@dataclass
class CacheStats:
    """What the cache saved since its index version was set."""

    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    tokens_saved: int = 0
    invalidations: int = 0
    cost_per_1k_tokens: float = DEFAULT_COST_PER_1K_TOKENS
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def hit_rate(self) -> float:
        """Share of lookups answered from the cache."""
        total = self.exact_hits + self.semantic_hits + self.misses
        return (self.exact_hits + self.semantic_hits) / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters, the hit rate and the estimated cost saved."""
        return {
            "exact_hits": self.exact_hits,
            "semantic_hits": self.semantic_hits,
            "misses": self.misses,
            "hit_rate": round(self.hit_rate, 4),
            "tokens_saved": self.tokens_saved,
            "cost_saved_usd": round(self.tokens_saved / 1000 * self.cost_per_1k_tokens, 6),
            "invalidations": self.invalidations,
        }


class AnswerCache:
    """Answers of one index version, least recently used dropped past ``max_entries``."""

    def __init__(
        self,
        threshold: float = DEFAULT_SEMANTIC_THRESHOLD,
        max_entries: int = 10_000,
        cost_per_1k_tokens: float = DEFAULT_COST_PER_1K_TOKENS,
    ) -> None:
        self.threshold = threshold
        self.max_entries = max_entries
        self.version: str | None = None
        self.stats = CacheStats(cost_per_1k_tokens=cost_per_1k_tokens)
        self._answers: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._keys: list[str] = []
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._vector_of: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _reset(self, version: str) -> None:
        if self.version is not None:
            self.stats.invalidations += 1
        self.version = version
        self._answers.clear()
        self._keys = []
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._vector_of = {}

    def get(self, version: str, question: str, vector: np.ndarray) -> tuple[dict, str] | None:
        """The cached answer and ``'exact'`` or ``'semantic'``; None on a miss."""
        with self._lock:
            if version != self.version:
                self._reset(version)
            key = normalise(question)
            found = self._answers.get(key)
            kind = "exact"
            if found is None and len(self._keys):
                similarities = self._vectors @ vector
                best = int(np.argmax(similarities))
                if similarities[best] >= self.threshold:
                    found, kind = self._answers.get(self._keys[best]), "semantic"
            if found is None:
                self.stats.misses += 1
                return None
            self._answers.move_to_end(normalise(found["question"]))
            self.stats.exact_hits += kind == "exact"
            self.stats.semantic_hits += kind == "semantic"
            usage = found["answer"].get("usage", {})
            self.stats.tokens_saved += usage.get("prompt_tokens", 0) + usage.get(
                "completion_tokens", 0
            )
            return found["answer"], kind

    def put(self, version: str, question: str, vector: np.ndarray, answer: dict) -> None:
        """Remember an answer of ``version`` (a refusal is not remembered)."""
        with self._lock:
            if version != self.version:
                self._reset(version)
            key = normalise(question)
            self._answers[key] = {"question": question, "answer": answer}
            self._answers.move_to_end(key)
            while len(self._answers) > self.max_entries:
                self._answers.popitem(last=False)
            self._keys = list(self._answers)
            self._vector_of[key] = np.asarray(vector, dtype=np.float32)
            self._vector_of = {k: self._vector_of[k] for k in self._keys}
            self._vectors = np.stack([self._vector_of[k] for k in self._keys])

    def __len__(self) -> int:
        return len(self._answers)
