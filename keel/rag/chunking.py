"""Structure-aware chunks: a chunk never crosses a section heading, breaks at paragraphs first.

Each chunk is the exact slice ``document.text[start:end]``, so a citation can point at the
characters it quotes. Paragraphs of a section are packed up to ``max_chars``; a paragraph
longer than that is cut at sentence, then word boundaries. Consecutive chunks of a section
share about ``overlap`` characters, so an answer that straddles a break is whole in one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass

from keel.rag.corpus import Document

_SENTENCE_END = re.compile(r"(?<=[.;:!?])\s+|\n")


@dataclass(frozen=True)
class ChunkerSettings:
    """How documents are cut; part of an index version's lineage."""

    max_chars: int = 900
    overlap: int = 150
    min_chars: int = 40

    def __post_init__(self) -> None:
        if self.max_chars < 50:
            raise ValueError(f"max_chars must be at least 50, got {self.max_chars}")
        if not 0 <= self.overlap < self.max_chars // 2:
            raise ValueError(
                f"overlap must be in [0, max_chars / 2), got {self.overlap} for {self.max_chars}"
            )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Chunk:
    """A piece of one document: where it lies (``start``..``end``) and under which heading."""

    chunk_id: str
    doc_id: str
    title: str
    section: str
    start: int
    end: int
    text: str

    def embedding_text(self) -> str:
        # The page and heading give a short chunk the context its words alone lack.
        return f"{self.title} {self.section}\n{self.text}"


def _cut_points(text: str, start: int, end: int, max_chars: int) -> list[int]:
    """Break positions in ``text[start:end]`` so that no piece exceeds ``max_chars``."""
    points = [start]
    while end - points[-1] > max_chars:
        lo, hi = points[-1], points[-1] + max_chars
        window = text[lo:hi]
        best = window.rfind("\n\n")
        if best < max_chars // 3:
            ends = [m.end() for m in _SENTENCE_END.finditer(window)]
            best = max((e for e in ends if e >= max_chars // 3), default=-1)
        if best < max_chars // 3:
            best = window.rfind(" ")
        if best <= 0:
            best = max_chars
        points.append(lo + best)
    points.append(end)
    return points


def _snap_forward(text: str, position: int, limit: int, floor: int) -> int:
    """The start of the next word from ``position`` (an overlap never starts mid-word)."""
    while position < limit and position > floor and not text[position - 1].isspace():
        position += 1
    return position


def chunk_document(document: Document, settings: ChunkerSettings) -> list[Chunk]:
    """The chunks of one document, in order."""
    text = document.text
    chunks = []
    for section in document.sections:
        pieces = _pack(text, section.start, section.end, settings.max_chars - settings.overlap)
        for n, (lo, hi) in enumerate(pieces):
            start = lo
            if n and settings.overlap:
                start = _snap_forward(
                    text, max(lo - settings.overlap, section.start), lo, section.start
                )
            while start < hi and text[start].isspace():
                start += 1
            end = hi
            while end > start and text[end - 1].isspace():
                end -= 1
            if end - start < settings.min_chars and chunks and n:
                continue
            chunks.append(
                Chunk(
                    chunk_id=f"{document.doc_id}#{start}-{end}",
                    doc_id=document.doc_id,
                    title=document.title,
                    section=section.name,
                    start=start,
                    end=end,
                    text=text[start:end],
                )
            )
    return chunks


def _pack(text: str, start: int, end: int, budget: int) -> list[tuple[int, int]]:
    """Paragraph spans of one section merged greedily up to ``budget`` characters each."""
    paragraphs = []
    position = start
    for match in re.finditer(r"\n\n", text[start:end]):
        paragraphs.append((position, start + match.end()))
        position = start + match.end()
    paragraphs.append((position, end))
    spans: list[tuple[int, int]] = []
    for lo, hi in paragraphs:
        if spans and hi - spans[-1][0] <= budget:
            spans[-1] = (spans[-1][0], hi)
            continue
        points = _cut_points(text, lo, hi, budget)
        spans.extend(itertools.pairwise(points))
    return [(lo, hi) for lo, hi in spans if text[lo:hi].strip()]


def chunk_corpus(documents: list[Document], settings: ChunkerSettings) -> list[Chunk]:
    """The chunks of every document, document by document."""
    return [chunk for document in documents for chunk in chunk_document(document, settings)]
