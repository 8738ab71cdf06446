"""The document corpus: manual pages as installed by Debian packages, rendered to plain text.

A page is read from where its package installs it (``/usr/share/man/manN/*.N.gz``), its roff
source turned into text with its section headings kept, so that the chunker can split along
them. Pages that only point at another page (``.so``) and symbolic links are skipped: they
would index the same text twice. The content hash is over the source bytes, so an unchanged
page is recognised without rendering it again.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SOURCE_DIR = Path("/usr/share/man")
SLICE_DIR = Path(__file__).resolve().parent / "corpus" / "man-pages"
SECTIONS = tuple(f"man{n}" for n in range(1, 9))

# Named characters that carry meaning in running text; the rest render as nothing.
_NAMED = {
    "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "em": "--", "en": "-",
    "hy": "-", "mi": "-", "bu": "*", "co": "(c)", "rg": "(R)", "tm": "(TM)", "ga": "`",
    "ti": "~", "ha": "^", "rs": "\\", "bv": "|", "or": "|", "pl": "+", "eq": "=", "<=": "<=",
    ">=": ">=", "!=": "!=", "->": "->", "<-": "<-", "mu": "x", "de": " degrees", "Fo": "<<",
    "Fc": ">>", "fo": "<", "fc": ">", "sl": "/", "ul": "_", "ba": "|", "dg": "+", "ss": "ss",
}  # fmt: skip
_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\([A-Za-z]{2}|[A-Za-z0-9])"  # font changes
    r"|s[+-]?\d|\*(?:\[[^\]]*\]|\(..|.)"  # size changes, string variables
    r"|\((..)|\[([^\]]*)\]"  # named characters
    r"|([-e&~0|^%:c ,/dur!])|(.))"
)
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_FONT = {"B", "I", "SM", "SB", "Nm", "Fl", "Ar", "Cm", "Pa", "Va", "Dv", "Er", "Ev", "Fn", "Fa"}
_PARAGRAPH = {"PP", "P", "LP", "sp", "Pp", "br", "IP", "TP", "HP", "TQ", "RS", "RE", "Bl", "El"}
_HEADINGS = {"SH": 1, "Sh": 1, "SS": 2, "Ss": 2}


class CorpusError(ValueError):
    """The corpus folder is missing or holds no readable page."""


@dataclass(frozen=True)
class Section:
    """A heading and the span of its text in the document (``start`` at the heading)."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class Document:
    """One rendered page: ``doc_id`` is its path under the corpus root, without ``.gz``."""

    doc_id: str
    title: str
    text: str
    content_hash: str
    sections: tuple[Section, ...] = field(default=())


def _unescape(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        two, bracket, simple, other = match.group(1, 2, 3, 4)
        if two is not None:
            return _NAMED.get(two, "")
        if bracket is not None:
            return _NAMED.get(bracket, "")
        if simple is not None:
            return {"-": "-", "e": "\\", "~": " ", "0": " ", " ": " "}.get(simple, "")
        return other or ""

    return _ESCAPE.sub(replace, text)


def _arguments(rest: str) -> list[str]:
    """Macro arguments: whitespace-separated, double quotes group words."""
    return [a if a else b for a, b in re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest)]


def render(source: str) -> tuple[str, str, list[tuple[str, int, int]]] | None:
    """Roff source -> (title, text, [(section, start, end)]); None for a ``.so`` alias page."""
    title = ""
    blocks: list[str] = []  # finished paragraphs of the current section
    words: list[str] = []  # the paragraph being filled
    fill = True
    out: list[str] = []
    spans: list[tuple[str, int, int]] = []
    heading = ""
    top = ""
    skipping_until = ""
    table_format = False

    def end_paragraph() -> None:
        if words:
            joined = " ".join(words) if fill else "\n".join(words)
            blocks.append(re.sub(r"[ \t]+", " ", joined).strip("\n "))
            words.clear()

    def end_section() -> None:
        end_paragraph()
        body = "\n\n".join(b for b in blocks if b)
        blocks.clear()
        if not heading and not body:
            return
        offset = sum(len(part) for part in out)
        chunk = (heading + "\n" + body if heading else body).strip("\n") + "\n\n"
        out.append(chunk)
        spans.append((heading or "(top)", offset, offset + len(chunk) - 2))

    for raw in source.splitlines():
        if table_format:
            # A table's options and column formats end at the first line ending in a period.
            table_format = not raw.rstrip().endswith(".")
            continue
        if skipping_until:
            if raw.strip().startswith(skipping_until):
                skipping_until = ""
            continue
        if raw.startswith(('.\\"', "'\\\"", '.\\"')) or raw.strip() in (".", "'"):
            continue
        if raw[:1] in ".'" and len(raw) > 1:
            name, _, rest = raw[1:].strip().partition(" ")
            rest = rest.strip()
            if name == "so":
                return None
            if name == "TH" or name == "Dt":
                parts = _arguments(rest)
                title = f"{parts[0]}({parts[1]})" if len(parts) > 1 else " ".join(parts)
            elif name in _HEADINGS:
                text = _unescape(" ".join(_arguments(rest))).strip()
                if _HEADINGS[name] == 1:
                    end_section()
                    top, heading = text, text
                else:
                    end_section()
                    heading = f"{top} / {text}" if top else text
            elif name in ("nf", "EX", "Bd"):
                end_paragraph()
                fill = False
            elif name in ("fi", "EE", "Ed"):
                end_paragraph()
                fill = True
            elif name in ("de", "ig"):
                skipping_until = ".."
            elif name == "TS":
                end_paragraph()
                fill = False
                table_format = True
            elif name == "TE":
                end_paragraph()
                fill = True
            elif name in _PARAGRAPH:
                end_paragraph()
                if name in ("IP", "HP") and rest:
                    tag = _unescape(_arguments(rest)[0]).strip()
                    if tag:
                        words.append(tag)
            elif name in _ALTERNATING:
                words.append(_unescape("".join(_arguments(rest))))
            elif name in _FONT or (name[:1].isupper() and len(name) == 2 and rest):
                words.append(_unescape(" ".join(_arguments(rest))))
            continue
        line = _unescape(raw.replace("\t", " "))
        if fill and not line.strip():
            end_paragraph()
        elif line.strip() or not fill:
            words.append(line.strip() if fill else line.rstrip())
    end_section()
    text = "".join(out).rstrip("\n") + "\n"
    if not title:
        title = spans[0][0] if spans else ""
    return title, text, [(name, start, min(end, len(text))) for name, start, end in spans]


def content_hash(data: bytes) -> str:
    """sha256 of a page's source bytes."""
    return hashlib.sha256(data).hexdigest()


def read_source(path: Path) -> bytes:
    """The roff bytes of a page, gzipped or not."""
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as error:  # truncated or not gzip: say which page
        raise CorpusError(f"{path}: not a readable gzipped page ({error})") from error


def document_from_bytes(doc_id: str, source: bytes) -> Document | None:
    """Render one page; None when it is an alias of another page or renders to nothing."""
    rendered = render(source.decode("utf-8", errors="replace"))
    if rendered is None:
        return None
    title, text, spans = rendered
    if len(text.strip()) < 40:
        return None
    return Document(
        doc_id=doc_id,
        title=title,
        text=text,
        content_hash=content_hash(source),
        sections=tuple(Section(*span) for span in spans),
    )


def page_files(root: Path, section: str, exclude: tuple[str, ...] = ()) -> Iterator[Path]:
    """The regular page files of one section (``man7``), sorted; links and excluded names left out.

    Args:
        root: The corpus root, holding ``man1`` .. ``man8``.
        section: One of `SECTIONS`.
        exclude: Name prefixes to leave out (generated reference pages that would swamp the
            rest, such as one page per ``gcloud`` subcommand).
    """
    folder = root / section
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file() or path.name.startswith(exclude):
            continue
        yield path


def doc_id_for(root: Path, path: Path) -> str:
    """``man7/pipe.7`` for ``<root>/man7/pipe.7.gz``."""
    return str(path.relative_to(root)).removesuffix(".gz")


def check_root(root: Path) -> None:
    """Refuse a corpus root without manual page sections."""
    if not root.is_dir() or not any((root / s).is_dir() for s in SECTIONS):
        raise CorpusError(
            f"{root} holds no man1..man8 folders: point the corpus at a manual page tree "
            f"(default {DEFAULT_SOURCE_DIR}; the shipped slice is {SLICE_DIR})"
        )


def load_corpus(root: Path = SLICE_DIR, exclude: tuple[str, ...] = ()) -> list[Document]:
    """Every page under ``root`` rendered, in a stable order."""
    check_root(root)
    documents = []
    for section in SECTIONS:
        for path in page_files(root, section, exclude):
            document = document_from_bytes(doc_id_for(root, path), read_source(path))
            if document is not None:
                documents.append(document)
    return documents
