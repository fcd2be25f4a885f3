"""Plain-text corpora for language modelling: files, a train / held-out split by document, token streams
and batches.

The offline default is the English documentation of Python 3.11 as Debian's ``python3.11-doc`` package
ships it: 497 reStructuredText sources (``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``, 11 MB of
prose with code examples and markup). ``scripts/get-lm-corpus.sh`` installs it. Any other text works: a
``.txt`` file, or a folder of ``.txt`` / ``.md`` / ``.rst`` files.

Held-out text is chosen by document, not by position, so no document is half in training and half in
evaluation: a document is held out when the CRC-32 of its path (relative to the corpus) falls in the
held-out share, a choice that does not move when files are added. A single file is split by position
instead (its last share), and so are a few documents none of which (or all of which) the hash holds out:
the last share of each is held out.

Files are read as UTF-8 (a byte-order mark is allowed). A file that is not valid UTF-8, or is mostly
control characters (binary data, or text in another encoding such as UTF-16), is refused by name:
its perplexity would measure nothing.
"""

from __future__ import annotations

import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
DEFAULT_CORPUS_PACKAGE = "python3.11-doc"
TEXT_SUFFIXES = (".txt", ".md", ".rst")
MAX_CONTROL_SHARE = 0.05  # of a file's characters; prose has next to none (tabs and line breaks do not count)


class CorpusError(ValueError):
    """The corpus cannot be used; the message says why and what to do."""


@dataclass
class Corpus:
    description: str
    train: list[str]  # documents
    heldout: list[str]


def corpus_files(path: str | Path | None) -> tuple[Path, list[Path]]:
    """The root and the text files of a corpus (sorted, so every run reads them in one order)."""
    root = Path(path).expanduser() if path is not None else DEFAULT_CORPUS
    if path is None and not root.is_dir():
        raise CorpusError(
            f"the default corpus (Python 3.11's documentation, {root}) is not installed: run "
            f"`bash scripts/get-lm-corpus.sh` (apt-get install {DEFAULT_CORPUS_PACKAGE}) or pass --text PATH "
            f"(a text file or a folder of .txt/.md/.rst files)"
        )
    if root.is_file():
        return root.parent, [root]
    if not root.is_dir():
        raise CorpusError(f"--text {root}: no such file or folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise CorpusError(f"--text {root}: the folder holds no .txt, .md or .rst files")
    return root, files


def read_text(path: Path) -> str:
    """The text of a corpus file, refused (:class:`CorpusError`, naming the file) unless it is UTF-8 text."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CorpusError(
            f"--text: {path} is not UTF-8 text (byte {error.start} is {data[error.start : error.start + 1]!r}"
            f"); it is binary, or text in another encoding. Convert it to UTF-8 (iconv -t UTF-8), or "
            f"leave it out of --text"
        ) from error
    if text:
        control = sum(1 for ch in text if unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") and not ch.isspace())
        if control > MAX_CONTROL_SHARE * len(text):
            raise CorpusError(
                f"--text: {path} is not text: {control / len(text):.0%} of its characters are control "
                f"characters (binary data, or text in another encoding such as UTF-16). Convert it to "
                f"UTF-8 text, or leave it out of --text"
            )
    return text


def load_corpus(path: str | Path | None = None, heldout_share: float = 0.1) -> Corpus:
    if not 0.0 < heldout_share < 1.0:
        raise CorpusError(f"the held-out share must be between 0 and 1, got {heldout_share}")
    root, files = corpus_files(path)
    texts = [(f.relative_to(root).as_posix(), read_text(f)) for f in files]
    size = sum(len(t) for _, t in texts)
    what = f"{DEFAULT_CORPUS_PACKAGE} ({root})" if path is None else str(Path(path).expanduser())
    threshold = int(heldout_share * 2**32)
    heldout = [t for name, t in texts if zlib.crc32(name.encode()) < threshold]
    train = [t for name, t in texts if zlib.crc32(name.encode()) >= threshold]
    if len(texts) > 1 and "".join(heldout).strip() and "".join(train).strip():
        description = (
            f"{what}: {len(texts)} documents, {size / 1e6:.1f} MB; {len(heldout)} held out "
            f"(chosen by a hash of the path)"
        )
    else:  # one file, or too few documents for the hash to hold some out and keep some: split each by position
        cuts = [int(len(text) * (1.0 - heldout_share)) for _, text in texts]
        train = [text[:cut] for (_, text), cut in zip(texts, cuts)]
        heldout = [text[cut:] for (_, text), cut in zip(texts, cuts)]
        description = (
            f"{what}: one file, {size / 1e6:.1f} MB, the last {heldout_share:.0%} held out"
            if len(texts) == 1
            else f"{what}: {len(texts)} documents, {size / 1e6:.1f} MB, too few to hold whole documents "
            f"out: the last {heldout_share:.0%} of each held out"
        )
    if not "".join(heldout).strip() or not "".join(train).strip():
        raise CorpusError(
            f"{what}: too little text ({size} characters) to hold {heldout_share:.0%} out and train on "
            f"the rest; give more text or another --heldout-share"
        )
    return Corpus(description, train, heldout)


def token_stream(tokenizer, documents: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """The documents tokenized one after another, each followed by the end-of-text token, as one 1-D tensor
    (stops once ``max_tokens`` are there, so a small evaluation does not tokenize a whole corpus)."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + separator
        if max_tokens is not None and len(ids) >= max_tokens:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length`` tokens, [count, length] (a shorter remainder is dropped)."""
    count = stream.numel() // length
    if count == 0:
        raise CorpusError(f"{stream.numel()} tokens make no window of {length}; give more text or a shorter --seq-len")
    return stream[: count * length].view(count, length)


def training_batch(stream: torch.Tensor, batch_size: int, length: int, seed: int, step: int) -> torch.Tensor:
    """Batch ``step`` of a run: ``batch_size`` windows of ``length`` tokens at random offsets drawn from
    (seed, step) alone, so a resumed run reads exactly the batches it would have read."""
    if stream.numel() <= length:
        raise CorpusError(f"the training text has {stream.numel()} tokens, fewer than one window of {length}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - length + 1, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])
