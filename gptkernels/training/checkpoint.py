"""Checkpoints: where one is (a file or a run folder), reading one safely (weights_only) with errors that say what
the file is, and writing one atomically (a temp file in the same folder, fsync, os.replace)."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile

import torch

CKPT_NAME = "ckpt.pt"
CKPT_FORMAT = 1


class CheckpointError(ValueError):
    """A file that is no usable checkpoint; the message names the option, says what the file is and what a checkpoint
    looks like."""


def find_checkpoint(ns) -> str:
    target = ns.resume
    if target is True or target == "auto":
        if ns.out_dir:
            target = ns.out_dir
        else:
            found = sorted(glob.glob(os.path.join("runs", "*", CKPT_NAME)), key=os.path.getmtime)
            if not found:
                raise FileNotFoundError("--resume: no PATH given, no --out-dir, and no runs/*/ckpt.pt here")
            target = found[-1]
    return checkpoint_path(target, "--resume")


# What the errors say a checkpoint is.
CKPT_HINT = (f"a checkpoint is the {CKPT_NAME} that python -m gptkernels train writes into its run folder (a "
             f"torch.save dict with keys format, step, model, optimizer, config, args, rng, data, elapsed); give that "
             f"file or the run folder")


def checkpoint_path(target, option: str = "--resume") -> str:
    """The checkpoint file of ``target``: a ckpt.pt (any file name), or a run folder holding ckpt.pt. Raises
    FileNotFoundError naming ``option``."""
    target = os.fspath(target)
    if os.path.isdir(target):
        path = os.path.join(target, CKPT_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{option}: no checkpoint at {path!r}: the folder {target!r} has no {CKPT_NAME} "
                                    f"(train writes it every --ckpt-every steps and at the end)")
        return path
    if not os.path.isfile(target):
        raise FileNotFoundError(f"{option}: no checkpoint at {target!r}: no such file or folder")
    return target


def _file_kind(path: str) -> str | None:
    """What a file that torch.load cannot read is, from its first bytes; None for a zip archive or a pickle (the two
    torch.save formats), where torch's own error says more."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
        text = b"\0" not in head
    except UnicodeDecodeError as e:
        text = e.start >= len(head) - 3  # a character cut at the 4096-byte boundary
    return "a text file" if text else "a binary file, neither a zip archive (torch.save's format) nor a pickle"


def torch_load(path: str, option: str = "--resume", map_location="cpu"):
    """torch.load(weights_only=True) of a checkpoint; a file it cannot read raises CheckpointError, which says what the
    file is and what a checkpoint looks like (not torch's advice to load with weights_only=False)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        kind = _file_kind(path)
        if kind is not None:
            raise CheckpointError(f"{option} {path!r} is {kind}, not a checkpoint; {CKPT_HINT}") from None
        msg = str(e)
        # weights_only refusals are paragraphs; the line after "WeightsUnpickler error:" names what was refused.
        detail = msg.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in msg else msg
        detail = next((line.strip() for line in detail.splitlines() if line.strip()), type(e).__name__)
        detail = detail.split(". ", 1)[0].rstrip(".")  # the first sentence: what failed, not how to load it anyway
        raise CheckpointError(f"{option} {path!r}: torch.load(weights_only=True) cannot read it ({detail}); "
                              f"{CKPT_HINT}") from None


def load_checkpoint(path: str, map_location="cpu", option: str = "--resume") -> dict:
    """A trainer checkpoint, loaded with weights_only=True (tensors, dicts, lists and primitives only)."""
    ckpt = torch_load(path, option, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{option}: {path!r} is not a gptkernels trainer checkpoint (format {CKPT_FORMAT}); "
                              f"{CKPT_HINT}")
    return ckpt


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace: a reader sees the old or the new file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a checkpoint is as readable as the log next to it
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
