"""Token streams for the trainer, and deterministic, resumable batches drawn from them.

Three sources, one shape (a 1-D array of token ids per split):

* the default corpus, present on every machine: the ``.py`` sources of this Python's standard library, read in
  sorted path order (test folders left out) up to ``max_bytes``, byte-level (vocab 256). A file goes to val when the
  SHA-1 of its relative path is 0 mod 10, so the split does not depend on the cap or on the other files;
* ``--data FILE.txt`` (any file that is not ``.bin``): its bytes, vocab 256, the last 10% as val;
* ``--data FILE.bin``: uint16 token ids (GPT-2 BPE, nanoGPT's format), memory-mapped, vocab 50257, the last 10% as
  val; or a folder holding ``train.bin`` and ``val.bin``.

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


def stdlib_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> Dataset:
    """The standard library's .py files (sorted, test folders skipped) as bytes, capped at max_bytes in total."""
    root = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"default corpus: the standard library folder {root!r} does not exist; pass --data")
    parts = {"train": [], "val": []}
    total = nfiles = 0
    for path in _py_files(root):
        if total + os.path.getsize(path) + 1 > max_bytes:
            continue  # not break: the cap keeps the files that fit, whatever the size of one big file
        with open(path, "rb") as f:
            text = f.read()
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        split = "val" if int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10 == 0 else "train"
        parts[split].append(text + b"\n")
        total += len(text) + 1
        nfiles += 1
    train, val = (np.frombuffer(b"".join(parts[s]), dtype=np.uint8) for s in ("train", "val"))
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    desc = (f"Python {py} stdlib .py sources ({root}), {nfiles} files, {total / 1e6:.1f} MB, byte-level (vocab 256); "
            f"val = files whose path hashes to 0 mod 10")
    return Dataset(train, val, BYTE_VOCAB, desc, "stdlib")


def _py_files(root: str):
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


def load(data: str | None, max_bytes: int = DEFAULT_MAX_BYTES) -> Dataset:
    return stdlib_corpus(max_bytes) if data is None else load_file(data)


class BatchSampler:
    """Random windows of block_size + 1 tokens, the same for a given (seed, split, index) on every machine.

    ``get(split, index, rank, world)`` returns this rank's rows of global batch ``index``: x, y (B // world, T) int64.
    """

    def __init__(self, dataset: Dataset, block_size: int, batch_size: int, seed: int, vocab_size: int):
        for split in ("train", "val"):
            n = len(getattr(dataset, split))
            if n < block_size + 1:
                raise DataError(f"--block-size {block_size}: the {split} split of {dataset.source} has only {n} "
                                 f"tokens, fewer than block_size + 1; use a smaller --block-size or "
                                 f"{'a larger --corpus-bytes' if dataset.source == 'stdlib' else 'more --data'}")
        self.data, self.block_size, self.batch_size, self.seed = dataset, block_size, batch_size, seed
        self.vocab_size = vocab_size

    def get(self, split: str, index: int, rank: int = 0, world: int = 1, device="cpu"):
        tokens = getattr(self.data, split)
        T = self.block_size
        rng = np.random.default_rng([self.seed, _SPLITS[split], index])
        starts = rng.integers(0, len(tokens) - T, size=self.batch_size)  # the global batch; high is exclusive
        b = self.batch_size // world
        batch = np.stack([tokens[s: s + T + 1] for s in starts])  # the global batch, read once
        # Checked over the whole global batch, so every rank raises together (one rank exiting alone would leave
        # the others waiting in the next all-reduce).
        top = int(batch.max())
        rows = batch[rank * b:(rank + 1) * b].astype(np.int64)
        if top >= self.vocab_size:
            raise DataError(f"--data {self.data.source}: token id {top} >= vocab size {self.vocab_size} "
                             f"(set --vocab-size to the tokenizer's vocabulary)")
        rows = torch.from_numpy(rows)  # (b, T + 1)
        x, y = rows[:, :-1], rows[:, 1:]
        if torch.device(device).type == "cuda":
            x, y = x.contiguous().pin_memory(), y.contiguous().pin_memory()
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x.contiguous(), y.contiguous()
