"""Token streams for the trainer, and deterministic, resumable batches drawn from them.

Three sources, one shape (a 1-D array of token ids per split):

* the default corpus, present on every machine: the ``.py`` sources of this Python's standard library, read in
  sorted path order (test folders left out) up to ``max_bytes``, byte-level (vocab 256). A file goes to val when the
  SHA-1 of its relative path is 0 mod 10, so the split does not depend on the cap or on the other files;
* ``--data FILE.txt`` (any file that is not ``.bin``): its bytes, vocab 256, the last 10% as val;
* ``--data FILE.bin``: uint16 token ids (GPT-2 BPE, nanoGPT's format), memory-mapped, vocab 50257, the last 10% as
  val; or a folder holding ``train.bin`` and ``val.bin``.

Documents (the trainer's ``--docs``): ``concat`` (the default) trains on the streams above, windows running across
file boundaries. ``pack`` and ``pad`` need document boundaries: the stdlib corpus is then built with an EOT token
before every file (byte 0, NUL, which Python source never contains: the compiler rejects it), a ``.bin`` file has
GPT-2's ``<|endoftext|>`` (50256) between documents already, and a text file has none (an error). ``pack`` draws
the same random windows and cuts each into its documents for the model (:func:`pack_documents`: cu_seqlens and
in-document positions, computed here on the host); ``pad`` (:class:`PaddedSampler`) puts every document chunk of
at most block_size tokens in a row of its own, padded, the padding left out of the loss (target -1).

Batches are a pure function of (seed, split, batch index): offsets come from ``numpy.random.default_rng([seed,
split, index])``. The loader's whole state is the number of batches drawn, so a checkpoint restores it exactly. Every
rank draws the same global batch and keeps its own rows, so N ranks see together what one process sees alone.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

BYTE_VOCAB = 256
GPT2_VOCAB = 50257
BYTE_EOT = 0  # NUL: the document separator of the byte-level corpus with documents (no Python source contains it)
GPT2_EOT = 50256  # <|endoftext|>, which nanoGPT's .bin files hold between documents
DOC_MODES = ("concat", "pack", "pad")
IGNORE = -1  # the target of a padding position: the model's cross-entropy ignores it
DEFAULT_MAX_BYTES = 10_000_000  # CPython 3.11: 629 files, 8.8 MB train + 1.1 MB val, read in 0.05 s (warm cache)
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_SPLITS = {"train": 0, "val": 1}


class DataError(ValueError):
    """Data that cannot be trained on as asked; the message names the option (--data, --block-size, ...)."""


@dataclass
class Dataset:
    train: np.ndarray  # (N_train,) uint8 or uint16 token ids
    val: np.ndarray  # (N_val,)
    vocab_size: int
    description: str
    source: str  # "stdlib" or the path given as --data
    eot: int | None = None  # the token that starts (stdlib) or ends (.bin) each document; None: no documents


def load(data: str | None, max_bytes: int = DEFAULT_MAX_BYTES, docs: bool = False) -> Dataset:
    """The trainer's data: the stdlib corpus when data is None, else :func:`load_file`. docs: keep document
    boundaries (an EOT token between documents), as ``--docs pack`` and ``--docs pad`` need."""
    if data is None:
        return stdlib_corpus(max_bytes, docs=docs)
    ds = load_file(data)
    if docs:
        if ds.vocab_size != GPT2_VOCAB:
            raise DataError(f"--data {data}: a text file holds no document boundaries, which --docs pack and pad "
                            f"need; use the default corpus or a .bin token file (documents ended by {GPT2_EOT})")
        ds.eot = GPT2_EOT
        ds.description += f"; documents end with <|endoftext|> ({GPT2_EOT})"
    return ds


def stdlib_corpus(max_bytes: int = DEFAULT_MAX_BYTES, docs: bool = False) -> Dataset:
    """The standard library's .py files (sorted, test folders skipped) as bytes, capped at max_bytes in total.

    docs=False: each file followed by a newline. docs=True: each file preceded by BYTE_EOT (same sizes, same files),
    so every document starts with EOT and a model sees where one file ends and the next begins."""
    root = stdlib_root()
    parts = {"train": [], "val": []}
    total = nfiles = 0
    eot = bytes([BYTE_EOT])
    for path in py_files(root):
        if total + os.path.getsize(path) + 1 > max_bytes:
            continue  # not break: the cap keeps the files that fit, whatever the size of one big file
        with open(path, "rb") as f:
            text = f.read()
        if docs and eot in text:
            raise DataError(f"default corpus: {path} contains a NUL byte, the document separator of --docs pack/pad")
        split = file_split(path, root)
        parts[split].append(eot + text if docs else text + b"\n")
        total += len(text) + 1
        nfiles += 1
    train, val = (np.frombuffer(b"".join(parts[s]), dtype=np.uint8) for s in ("train", "val"))
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    desc = (f"Python {py} stdlib .py sources ({root}), {nfiles} files, {total / 1e6:.1f} MB, byte-level (vocab 256); "
            f"val = files whose path hashes to 0 mod 10")
    if docs:
        desc += f"; one document per file, each starting with EOT = byte {BYTE_EOT}"
    return Dataset(train, val, BYTE_VOCAB, desc, "stdlib", BYTE_EOT if docs else None)


def file_split(path: str, root: str) -> str:
    """"val" when the SHA-1 of the path relative to root (with / separators) is 0 mod 10, else "train": the rule of
    the default corpus, which the fine-tuning task (gptkernels/classify_data.py) follows too, so a val file is never
    trained on by either."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    return "val" if int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10 == 0 else "train"


def stdlib_root() -> str:
    root = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"default corpus: the standard library folder {root!r} does not exist; pass --data")
    return root


def py_files(root: str):
    """The .py files under root in sorted order, test folders skipped."""
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)  # in place: os.walk descends in this order
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(d, name)


def load_file(path: str, val_fraction: float = 0.1) -> Dataset:
    """A text file (bytes), a uint16 .bin token file, or a folder with train.bin and val.bin."""
    if os.path.isdir(path):
        tr, va = os.path.join(path, "train.bin"), os.path.join(path, "val.bin")
        if not (os.path.isfile(tr) and os.path.isfile(va)):
            raise FileNotFoundError(f"--data: folder {path!r} has no train.bin and val.bin")
        train, val = _memmap(tr), _memmap(va)
        desc = f"{path}/{{train,val}}.bin, uint16 tokens"
        return Dataset(train, val, GPT2_VOCAB, f"{desc} (vocab {GPT2_VOCAB} unless --vocab-size)", path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no such file: {path!r}")
    if path.endswith(".bin"):
        tokens, vocab, kind = _memmap(path), GPT2_VOCAB, "uint16 tokens"
    else:
        with open(path, "rb") as f:
            tokens, vocab, kind = np.frombuffer(f.read(), dtype=np.uint8), BYTE_VOCAB, "bytes"
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
    return Dataset(train, val, vocab, f"{path}, {len(tokens):,} {kind} (vocab {vocab}), last 10% as val", path)


def _memmap(path: str) -> np.ndarray:
    if os.path.getsize(path) % 2:
        raise DataError(f"--data: {path!r} has an odd number of bytes; a .bin file holds uint16 token ids")
    if os.path.getsize(path) == 0:
        raise DataError(f"--data: {path!r} is empty")
    return np.memmap(path, dtype=np.uint16, mode="r")


@dataclass
class Batch:
    """One rank's rows of a global batch, on the device, with what the model needs to treat them right."""

    x: torch.Tensor  # (b, T) int64 input token ids
    y: torch.Tensor  # (b, T) int64 next-token targets, IGNORE (-1) at padding
    tokens: int  # real (non-padding) targets in the whole global batch, all ranks together: what tokens/s counts
    cu_seqlens: torch.Tensor | None = None  # (nseq + 1,) int32 document starts in x.view(-1) (pack only)
    max_seqlen: int | None = None  # the longest document in x (pack only)
    position_ids: torch.Tensor | None = None  # (b, T) int64 positions within each document (pack only)

    def model_kwargs(self) -> dict:
        """Keyword arguments of GPT.forward for these rows: none for plain rows, and none for packed rows that hold one
        document each (no EOT past a row's first token), whose attention and positions are then the plain ones, so
        they take the dense causal path. Decided from shapes alone (every row start is a document start, so nseq ==
        rows exactly then): no device sync."""
        if self.cu_seqlens is None or self.cu_seqlens.numel() - 1 == self.x.shape[0]:
            return {}
        return {"cu_seqlens": self.cu_seqlens, "max_seqlen": self.max_seqlen, "position_ids": self.position_ids}


def pack_documents(x: np.ndarray, eot: int):
    """Document boundaries of a packed batch, from the token ids alone (host-side numpy, before the batch moves).

    x: (b, T) token ids where every occurrence of ``eot`` starts a new document (the stdlib corpus puts EOT before
    each file; nanoGPT's .bin files put it after each document, so it then starts the next one, the last token of a
    document predicting EOT as its end). Every row start is a document start as well: a window cut mid-document
    continues it with positions from 0, as the padded layout does with its later chunks of a long document.

    Returns (cu_seqlens (nseq + 1,) int32 offsets into x.reshape(-1), max_seqlen int, position_ids (b, T) int64).
    """
    b, T = x.shape
    starts = x == eot  # (b, T)
    starts[:, 0] = True
    first = np.flatnonzero(starts)  # (nseq,) flat index of each document's first token
    cu = np.append(first, b * T).astype(np.int32)
    lens = np.diff(cu)
    position_ids = np.arange(b * T, dtype=np.int64) - np.repeat(first, lens)
    return cu, int(lens.max()), position_ids.reshape(b, T)


def _to_device(arrays, device):
    """numpy arrays -> tensors on device (pinned and non-blocking to CUDA: the host never waits for the copy)."""
    out = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    if torch.device(device).type == "cuda":
        return [t.pin_memory().to(device, non_blocking=True) for t in out]
    return out


class BatchSampler:
    """Random windows of block_size + 1 tokens, the same for a given (seed, split, index) on every machine.

    ``get(split, index, rank, world)`` returns this rank's rows of global batch ``index``: x, y (B // world, T) int64.
    ``get_batch`` returns them as a :class:`Batch`; with ``pack`` (the dataset must have an eot), the batch also
    carries its documents' boundaries (:func:`pack_documents`), so the model attends within each document only.
    """

    def __init__(self, dataset: Dataset, block_size: int, batch_size: int, seed: int, vocab_size: int,
                 pack: bool = False):
        for split in ("train", "val"):
            n = len(getattr(dataset, split))
            if n < block_size + 1:
                raise DataError(f"--block-size {block_size}: the {split} split of {dataset.source} has only {n} "
                                 f"tokens, fewer than block_size + 1; use a smaller --block-size or "
                                 f"{'a larger --corpus-bytes' if dataset.source == 'stdlib' else 'more --data'}")
        if pack and dataset.eot is None:
            raise DataError(f"--docs pack: {dataset.source} was loaded without document boundaries (no EOT token)")
        self.data, self.block_size, self.batch_size, self.seed = dataset, block_size, batch_size, seed
        self.vocab_size, self.pack = vocab_size, pack

    def _rows(self, split: str, index: int, rank: int, world: int) -> np.ndarray:
        tokens = getattr(self.data, split)
        T = self.block_size
        rng = np.random.default_rng([self.seed, _SPLITS[split], index])
        starts = rng.integers(0, len(tokens) - T, size=self.batch_size)  # the global batch; high is exclusive
        b = self.batch_size // world
        batch = np.stack([tokens[s: s + T + 1] for s in starts])  # the global batch, read once
        # Checked over the whole global batch, so every rank raises together (one rank exiting alone would leave
        # the others waiting in the next all-reduce).
        _check_vocab(self.data, int(batch.max()), self.vocab_size)
        return batch[rank * b:(rank + 1) * b].astype(np.int64)  # (b, T + 1)

    def get(self, split: str, index: int, rank: int = 0, world: int = 1, device="cpu"):
        rows = self._rows(split, index, rank, world)
        x, y = _to_device((rows[:, :-1], rows[:, 1:]), device)
        return x, y

    def get_batch(self, split: str, index: int, rank: int = 0, world: int = 1, device="cpu") -> Batch:
        rows = self._rows(split, index, rank, world)
        x, y = rows[:, :-1], rows[:, 1:]
        tokens = self.batch_size * self.block_size
        if not self.pack:
            return Batch(*_to_device((x, y), device), tokens)
        cu, max_seqlen, pos = pack_documents(x, self.data.eot)
        x, y, cu, pos = _to_device((x, y, cu, pos), device)
        return Batch(x, y, tokens, cu, max_seqlen, pos)


def _check_vocab(data: Dataset, top: int, vocab_size: int):
    if top >= vocab_size:
        raise DataError(f"--data {data.source}: token id {top} >= vocab size {vocab_size} "
                        f"(set --vocab-size to the tokenizer's vocabulary)")


def document_chunks(tokens: np.ndarray, eot: int, block_size: int):
    """The padded layout's rows: every document cut into chunks of at most block_size (input, target) pairs.

    A document runs from one EOT to the next (from the stream's start for the first); its pairs are its positions,
    the target of its last one being the next document's EOT, exactly the targets that packed windows train on.
    Returns (start, length) int64 arrays, one entry per chunk: the inputs are tokens[start : start + length] and the
    targets tokens[start + 1 : start + length + 1].
    """
    n = len(tokens)
    starts = np.flatnonzero(np.asarray(tokens) == eot)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.append(starts[1:], n - 1)  # the last document has no target for its last token
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    per_doc = -(-(ends - starts) // block_size)  # ceil: chunks of each document
    first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)  # index of the document's first chunk, per chunk
    chunk_start = np.repeat(starts, per_doc) + block_size * (np.arange(per_doc.sum()) - first)
    return chunk_start.astype(np.int64), np.minimum(block_size, np.repeat(ends, per_doc) - chunk_start).astype(np.int64)


class PaddedSampler:
    """The padded layout, the baseline of packing: each row is one document chunk of at most block_size tokens,
    filled up with EOT whose targets are IGNORE, so the loss covers the same real targets and nothing else.

    Chunks are drawn without replacement: global row g of the run is chunk perm_e[g mod n] of epoch e = g // n, with
    perm_e = default_rng([seed, split, e, 1]).permutation(n); so batches are again a pure function of (seed, split,
    index), and each epoch sees every real token once, as the packed windows do on average.
    """

    def __init__(self, dataset: Dataset, block_size: int, batch_size: int, seed: int, vocab_size: int):
        if dataset.eot is None:
            raise DataError(f"--docs pad: {dataset.source} was loaded without document boundaries (no EOT token)")
        self.chunks = {}
        for split in ("train", "val"):
            tokens = getattr(dataset, split)
            if len(tokens) < 2:
                raise DataError(f"--docs pad: the {split} split of {dataset.source} has fewer than 2 tokens")
            self.chunks[split] = document_chunks(tokens, dataset.eot, block_size)
        self.data, self.block_size, self.batch_size, self.seed = dataset, block_size, batch_size, seed
        self.vocab_size = vocab_size
        self._perms = {}

    def padding_fraction(self, split: str = "train") -> float:
        """The share of the row slots that padding fills, over one epoch."""
        lengths = self.chunks[split][1]
        return 1.0 - lengths.sum() / (len(lengths) * self.block_size)

    def _perm(self, split: str, epoch: int) -> np.ndarray:
        key = (split, epoch)
        if key not in self._perms:
            if len(self._perms) >= 4:  # a run reads one or two epochs at a time per split
                self._perms.pop(next(iter(self._perms)))
            n = len(self.chunks[split][0])
            self._perms[key] = np.random.default_rng([self.seed, _SPLITS[split], epoch, 1]).permutation(n)
        return self._perms[key]

    def get_batch(self, split: str, index: int, rank: int = 0, world: int = 1, device="cpu") -> Batch:
        tokens = getattr(self.data, split)
        starts, lengths = self.chunks[split]
        B, T = self.batch_size, self.block_size
        epoch, j = np.divmod(index * B + np.arange(B), len(starts))
        pick = np.array([self._perm(split, int(e))[i] for e, i in zip(epoch, j)])  # (B,) chunk of each row
        x = np.full((B, T), self.data.eot, dtype=np.int64)
        y = np.full((B, T), IGNORE, dtype=np.int64)
        for r, (s, n) in enumerate(zip(starts[pick], lengths[pick])):
            x[r, :n] = tokens[s: s + n]
            y[r, :n] = tokens[s + 1: s + n + 1]
        _check_vocab(self.data, int(max(x.max(), y.max())), self.vocab_size)
        b = B // world
        x, y = _to_device((x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]), device)
        return Batch(x, y, int(lengths[pick].sum()))

    def get(self, split: str, index: int, rank: int = 0, world: int = 1, device="cpu"):
        batch = self.get_batch(split, index, rank, world, device)
        return batch.x, batch.y


def make_sampler(dataset: Dataset, docs: str, block_size: int, batch_size: int, seed: int, vocab_size: int):
    """The sampler of a --docs mode: BatchSampler (concat, pack) or PaddedSampler (pad)."""
    if docs not in DOC_MODES:
        raise DataError(f"--docs {docs!r}: must be one of {', '.join(DOC_MODES)}")
    if docs == "pad":
        return PaddedSampler(dataset, block_size, batch_size, seed, vocab_size)
    return BatchSampler(dataset, block_size, batch_size, seed, vocab_size, pack=docs == "pack")
