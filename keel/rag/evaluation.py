"""Retrieval quality on a labelled question set, and the gate an index version must pass.

Each labelled question names its page and a passage of it that answers it. A retrieved
chunk counts as relevant when it comes from that page and holds the whole passage, so the
labels do not depend on how the pages were chunked, and a chunker that cuts answers apart
scores lower.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.rag.chunking import Chunk

QUESTIONS_FILE = Path(__file__).resolve().parent / "corpus" / "questions.jsonl"
DEFAULT_KS = (1, 3, 5, 10)
# recall@5 may fall this much below the published version's before a new one is refused.
DEFAULT_MAX_RECALL_DROP = 0.05
# A first version has nothing to compare against; it must reach this on its own.
DEFAULT_MIN_RECALL_AT_5 = 0.6


@dataclass(frozen=True)
class LabelledQuestion:
    """A question, the page that answers it and the answering passage, quoted exactly."""

    question: str
    doc_id: str
    answer: str


def load_questions(path: Path = QUESTIONS_FILE) -> list[LabelledQuestion]:
    """The labelled set, one JSON object per line; errors name the line that is wrong."""
    questions = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            questions.append(LabelledQuestion(row["question"], row["doc_id"], row["answer"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a labelled question ({error})") from error
    if not questions:
        raise ValueError(f"{path} holds no labelled questions")
    return questions


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def is_relevant(chunk: Chunk, question: LabelledQuestion) -> bool:
    """The chunk is from the question's page and holds the whole answering passage."""
    return chunk.doc_id == question.doc_id and _squash(question.answer) in _squash(chunk.text)


def evaluate(
    questions: list[LabelledQuestion],
    retrieve: Callable[[str, int], list[Chunk]],
    ks: tuple[int, ...] = DEFAULT_KS,
) -> dict[str, Any]:
    """recall@k for each k and MRR@max(k), plus each question's first relevant rank."""
    depth = max(ks)
    ranks: list[int | None] = []
    for question in questions:
        found = next(
            (
                rank
                for rank, chunk in enumerate(retrieve(question.question, depth), start=1)
                if is_relevant(chunk, question)
            ),
            None,
        )
        ranks.append(found)
    total = len(questions)
    result: dict[str, Any] = {
        f"recall_at_{k}": sum(1 for r in ranks if r is not None and r <= k) / total for k in ks
    }
    result[f"mrr_at_{depth}"] = sum(1.0 / r for r in ranks if r is not None) / total
    result["questions"] = total
    result["ranks"] = ranks
    return result


def recall_gate(
    candidate_recall_at_5: float,
    published_recall_at_5: float | None,
    max_drop: float = DEFAULT_MAX_RECALL_DROP,
    min_recall: float = DEFAULT_MIN_RECALL_AT_5,
) -> tuple[bool, str]:
    """Whether a candidate index may be published, and why (for the check's description)."""
    if candidate_recall_at_5 < min_recall:
        return False, (f"recall@5 {candidate_recall_at_5:.3f} is below the floor {min_recall:.2f}")
    if published_recall_at_5 is None:
        return True, f"recall@5 {candidate_recall_at_5:.3f}; no published index to compare with"
    drop = published_recall_at_5 - candidate_recall_at_5
    if drop > max_drop:
        return False, (
            f"recall@5 fell from {published_recall_at_5:.3f} (published) to "
            f"{candidate_recall_at_5:.3f}, more than the allowed {max_drop:.2f}"
        )
    return True, (
        f"recall@5 {candidate_recall_at_5:.3f} against {published_recall_at_5:.3f} published "
        f"(allowed drop {max_drop:.2f})"
    )
