"""Text classification data for python -m gptkernels finetune --task classify: examples, padded batches, metrics.

Two sources, one shape (a list of token-id arrays and a list of class indices per split):

* the default task, present on every machine: snippets of the Python standard library's sources, each labelled with
  the package it comes from (:data:`STDLIB_PACKAGES`, all present in Python 3.10 to 3.12, each with at least one
  val file there). A file goes to val by the default pre-training corpus's own rule (:func:`gptkernels.data.
  file_split`: the SHA-1 of its path relative to the stdlib folder is 0 mod 10), so no val snippet was seen by the
  default ``train`` run or is trained on here. A snippet is a run of whole lines of at most :data:`SNIPPET_BYTES`
  bytes (blank lines dropped, a longer line cut); per package and split at most :data:`PER_CLASS` snippets, spread
  evenly over the package's files;
* ``--data train.jsonl`` (and optional ``--val val.jsonl``, else the last 10% of the lines): one JSON object per line
  with "text" (a string) and "label" (a string or an integer). The classes are the train labels, sorted.

Batches: rows padded on the right to the batch's longest example (at most block_size tokens; longer texts are
truncated to their first block_size tokens). A :class:`ClassifyBatch` carries the index of each row's last real token
(the classifier reads its hidden state, as GPT-1 does) and next-token targets with -1 at padding (the auxiliary LM
loss). Train batches are drawn without replacement epoch by epoch from a permutation seeded by (seed, epoch), so a
batch is a pure function of (seed, index) and a checkpoint restores the stream from the number of batches drawn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from gptkernels import data as gkdata

# Packages whose val files (by the hash rule) hold at least 5 kB of source in Python 3.10, 3.11 and 3.12.
STDLIB_PACKAGES = ("concurrent", "curses", "email", "encodings", "idlelib", "multiprocessing", "wsgiref", "xml")
SNIPPET_BYTES = 128
PER_CLASS = {"train": 400, "val": 80}
IGNORE = gkdata.IGNORE


class ClassifyDataError(gkdata.DataError):
    """Classification data that cannot be used; the message names the file (and line)."""


@dataclass
class Examples:
    """One split: token ids per example and their class indices."""

    tokens: list  # list of (n_i,) int64 arrays
    labels: np.ndarray  # (N,) int64 class indices

    def __len__(self):
        return len(self.labels)


@dataclass
class ClassifyTask:
    train: Examples
    val: Examples
    classes: list[str]
    description: str
    source: str  # "stdlib" or the --data path
    files: dict | None = None  # stdlib: split -> the files (relative to the stdlib folder) its snippets come from


# ---------------------------------------------------------------------------------------------------- sources
def stdlib_snippets(path: str, limit: int = SNIPPET_BYTES) -> list[bytes]:
    """The file's non-blank lines grouped into runs of at most ``limit`` bytes (a longer line alone, cut)."""
    with open(path, "rb") as f:
        lines = [line for line in f.read().splitlines(keepends=True) if line.strip()]
    out, cur = [], b""
    for line in lines:
        if cur and len(cur) + len(line) > limit:
            out.append(cur)
            cur = b""
        cur += line[:limit]
    if cur:
        out.append(cur)
    return out


def stdlib_task(packages=STDLIB_PACKAGES, per_class=None, encode=None) -> ClassifyTask:
    """The default task: which stdlib package a snippet comes from. encode: bytes -> token ids (default: the bytes,
    vocab 256)."""
    per_class = per_class or PER_CLASS
    encode = encode or _bytes
    root = gkdata.stdlib_root()
    splits = {"train": ([], []), "val": ([], [])}
    files = {"train": [], "val": []}
    for c, pkg in enumerate(packages):
        folder = os.path.join(root, pkg)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"default task: the standard library has no package {pkg!r} at {folder!r}")
        per_split = {"train": [], "val": []}
        for path in gkdata.py_files(folder):
            split = gkdata.file_split(path, root)
            per_split[split].extend(stdlib_snippets(path))
            files[split].append(os.path.relpath(path, root).replace(os.sep, "/"))
        for split, snippets in per_split.items():
            if not snippets:
                raise ClassifyDataError(f"default task: package {pkg!r} has no {split} file in {root}")
            n = min(per_class[split], len(snippets))
            for i in np.linspace(0, len(snippets) - 1, n).round().astype(int):  # spread over the package's files
                splits[split][0].append(encode(snippets[i]))
                splits[split][1].append(c)
    train, val = (Examples(t, np.array(y, dtype=np.int64)) for t, y in (splits["train"], splits["val"]))
    desc = (f"stdlib package of a snippet (<= {SNIPPET_BYTES} bytes of whole lines), {len(packages)} classes; "
            f"train {len(train)} snippets from {len(files['train'])} files, val {len(val)} from "
            f"{len(files['val'])} files "
            f"(files whose path hashes to 0 mod 10, as the pre-training corpus's val)")
    return ClassifyTask(train, val, list(packages), desc, "stdlib", files)


def _bytes(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).astype(np.int64)


def read_jsonl(path: str, option: str = "--data") -> list[tuple[str, str, int]]:
    """(text, label as a string, line number) per line; raises ClassifyDataError naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option}: no such file: {path!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{option} {path}, line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ClassifyDataError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ClassifyDataError(f"{where}: expected an object with \"text\" and \"label\", got "
                                        f"{type(obj).__name__}")
            for key in ("text", "label"):
                if key not in obj:
                    raise ClassifyDataError(f"{where}: missing field {key!r} (each line needs \"text\" and "
                                            f"\"label\")")
            if not isinstance(obj["text"], str) or not obj["text"]:
                raise ClassifyDataError(f"{where}: \"text\" must be a non-empty string")
            label = obj["label"]
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ClassifyDataError(f"{where}: \"label\" must be a string or an integer, got {label!r}")
            rows.append((obj["text"], str(label), n))
    if not rows:
        raise ClassifyDataError(f"{option} {path}: empty (no examples); expected one JSON object per line with "
                                f"\"text\" and \"label\"")
    return rows


def jsonl_task(path: str, val_path: str | None = None, encode=None, classes: list[str] | None = None
               ) -> ClassifyTask:
    """--data train.jsonl [--val val.jsonl]. classes: a checkpoint's classes (every label must be one of them);
    default: the train labels, sorted. A val label that is not a class raises, naming the file and line."""
    encode = encode or (lambda s: _bytes(s.encode("utf-8")))
    rows = read_jsonl(path, "--data")
    if val_path is not None:
        val_rows, val_option, val_file = read_jsonl(val_path, "--val"), "--val", val_path
    else:
        n_val = max(1, len(rows) // 10) if len(rows) > 1 else 0
        rows, val_rows, val_option, val_file = rows[:len(rows) - n_val], rows[len(rows) - n_val:], "--data", path
        if not val_rows:
            raise ClassifyDataError(f"--data {path}: one example: too few to hold out a val split; give --val")
    known = classes is not None
    classes = list(classes) if known else sorted({label for _, label, _ in rows})
    index = {c: i for i, c in enumerate(classes)}

    def split(rs, option, file):
        for _, label, n in rs:
            if label not in index:
                what = "the checkpoint's" if known else f"the train labels of {path}"
                raise ClassifyDataError(f"{option} {file}, line {n}: unknown label {label!r}; {what}: "
                                        f"{', '.join(classes)}")
        return Examples([encode(t) for t, _, _ in rs], np.array([index[lab] for _, lab, _ in rs], dtype=np.int64))

    train = split(rows, "--data", path)
    val = split(val_rows, val_option, val_file)
    desc = (f"{path}: {len(train)} train examples, {len(classes)} classes; val {len(val)} from "
            f"{val_path if val_path else 'the last 10% of the lines'}")
    return ClassifyTask(train, val, classes, desc, path)


# ---------------------------------------------------------------------------------------------------- batches
@dataclass
class ClassifyBatch:
    x: torch.Tensor  # (b, T) int64 token ids, padded on the right with pad_id
    labels: torch.Tensor  # (b,) int64 class indices
    last: torch.Tensor  # (b,) int64 index of each row's last real token
    lm_targets: torch.Tensor  # (b, T) int64 next-token targets, IGNORE at padding and after each row's last token
    tokens: int  # real tokens in the global batch (what tokens/s counts)


def collate(tokens: list, labels, block_size: int, pad_id: int, device="cpu") -> ClassifyBatch:
    """Rows padded to the longest (<= block_size; longer texts keep their first block_size tokens)."""
    seqs = [t[:block_size] for t in tokens]
    T = max(len(s) for s in seqs)
    x = np.full((len(seqs), T), pad_id, dtype=np.int64)
    y = np.full((len(seqs), T), IGNORE, dtype=np.int64)
    for r, s in enumerate(seqs):
        x[r, :len(s)] = s
        y[r, :len(s) - 1] = s[1:]
    last = np.array([len(s) - 1 for s in seqs], dtype=np.int64)
    arrays = gkdata._to_device((x, np.asarray(labels, dtype=np.int64), last, y), device)
    return ClassifyBatch(*arrays, int(sum(len(s) for s in seqs)))


class ClassifySampler:
    """Train batches without replacement (a permutation per epoch, seeded by (seed, epoch)); val batches in order.

    ``get_batch(split, index, rank, world, device)``: this rank's rows of global batch ``index``.
    """

    def __init__(self, task: ClassifyTask, block_size: int, batch_size: int, seed: int, vocab_size: int,
                 pad_id: int = 0):
        for name in ("train", "val"):
            ex = getattr(task, name)
            if len(ex) == 0:
                raise ClassifyDataError(f"{task.source}: the {name} split has no examples")
            top = max(int(t.max()) for t in ex.tokens if len(t))
            if top >= vocab_size:
                raise ClassifyDataError(f"{task.source}: token id {top} >= the model's vocab size {vocab_size}")
            if any(len(t) == 0 for t in ex.tokens):
                raise ClassifyDataError(f"{task.source}: an example of the {name} split has no tokens")
        self.task, self.block_size, self.batch_size, self.seed, self.pad_id = task, block_size, batch_size, seed, pad_id
        self.n_classes = len(task.classes)
        self._perm = {}

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            if len(self._perm) >= 2:
                self._perm.pop(next(iter(self._perm)))
            self._perm[epoch] = np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.task.train))
        return self._perm[epoch]

    def val_batches(self) -> int:
        return -(-len(self.task.val) // self.batch_size)

    def get_batch(self, split: str, index: int, rank: int = 0, world: int = 1, device="cpu") -> ClassifyBatch:
        B = self.batch_size
        if split == "train":
            n = len(self.task.train)
            epoch, j = np.divmod(index * B + np.arange(B), n)
            pick = np.array([self._epoch_perm(int(e))[i] for e, i in zip(epoch, j)])
            ex = self.task.train
        else:
            ex = self.task.val
            pick = np.arange(index * B, min((index + 1) * B, len(ex)))
        b = -(-len(pick) // world)
        mine = pick[rank * b:(rank + 1) * b]
        batch = collate([ex.tokens[i] for i in mine], ex.labels[mine], self.block_size, self.pad_id, device)
        batch.tokens = int(sum(min(len(ex.tokens[i]), self.block_size) for i in pick))
        return batch


# ---------------------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred, target, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: row = true class, column = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(target), np.asarray(pred)), 1)
    return cm


def metrics(pred, target, n_classes: int) -> dict:
    """accuracy, and macro-F1: the mean per-class F1 over the classes that occur as a target or a prediction (a class
    neither true nor predicted anywhere has no F1; one that is predicted but never true, or the reverse, has F1 0)."""
    cm = confusion_matrix(pred, target, n_classes)
    tp = np.diag(cm).astype(np.float64)
    true, predicted = cm.sum(1), cm.sum(0)
    seen = (true + predicted) > 0
    f1 = np.divide(2 * tp, true + predicted, out=np.zeros(n_classes), where=seen)
    return {"accuracy": float(tp.sum() / max(1, cm.sum())), "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0}


def majority_baseline(train_labels, val_labels, n_classes: int) -> dict:
    """Accuracy and macro-F1 on val of always predicting the most frequent train class."""
    top = int(np.bincount(np.asarray(train_labels), minlength=n_classes).argmax())
    out = metrics(np.full(len(val_labels), top), val_labels, n_classes)
    out["class"] = top
    return out


def format_confusion(cm: np.ndarray, classes: list[str]) -> str:
    """The confusion matrix as text: a row per true class, a column per predicted class."""
    w = max(5, *(len(c) for c in classes))
    short = [c[:6] for c in classes]
    cw = max(6, *(len(str(v)) for v in cm.flat))
    corner = "true \\ pred"
    w = max(w, len(corner))
    lines = [f"{corner:>{w}} " + " ".join(f"{s:>{cw}}" for s in short)]
    for c, row in zip(classes, cm):
        lines.append(f"{c:>{w}} " + " ".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)
