"""Fine-tune a GPT: python -m gptkernels finetune.

With no arguments it runs offline on CPU in about two minutes: it classifies snippets of the Python standard library
by the package they come from (8 classes; see gptkernels/classify_data.py), starting from the newest checkpoint of
the default ``python -m gptkernels train`` run under runs/ (or from random weights when there is none, and says so),
and prints the val accuracy and macro-F1 against the majority-class baseline.

Start (one of): --init-from a checkpoint of ours (a ckpt.pt or its run folder; a finetune checkpoint gives its GPT
body), --hf FOLDER (a saved Hugging Face GPT-2, GPT-1 or GPT-Neo), or --model PRESET (random weights, the
comparison run). Default: the default train run's checkpoint if one exists, else random weights of the mini preset.

Tasks:
    classify (default): GPT-1's recipe: the final hidden state of each text's last token -> a linear head (score);
        loss = CE(class) + --aux-lm x the LM loss on the same text (default 0.5). --data train.jsonl with one
        {"text": ..., "label": ...} per line, --val val.jsonl (default: the last 10% of --data); rows padded on the
        right, texts truncated to --block-size tokens. Each evaluation reports val loss, accuracy and macro-F1.
    lm: continue pre-training on a text file or .bin (train's --data; default: the stdlib corpus).

Everything else is train's (gptkernels/training/loop.py): AdamW, warmup + cosine, clipping, accumulation, progress
bar, log.jsonl (eval rows add accuracy, macro_f1 and baseline_accuracy for classify), atomic ckpt.pt, exact
--resume, DDP (there the auxiliary LM loss is each rank's mean over its own tokens, averaged over the ranks, so it
can differ from one process's, whose mean weighs every token of the batch alike). --freeze embeddings | N keeps the
token and position embeddings (and the LM head tied to them) or the first N blocks fixed. --eval-only with
--init-from a finetune checkpoint prints accuracy, macro-F1, the baseline and the confusion matrix on the val split.
"""

from __future__ import annotations

import contextlib
import glob
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gptkernels import classify_data as cdata
from gptkernels import data as gkdata
from gptkernels.classify import GPTClassifier, freeze
from gptkernels.model import GPT, PRESETS, GPTConfig
from gptkernels.training import loop
from gptkernels.training.args import COMMON_DEFAULTS, TrainConfigError, module_main, namespace, resolve, run_command
from gptkernels.training.args import add_arguments as add_train_arguments
from gptkernels.training.checkpoint import CKPT_NAME, CheckpointError, checkpoint_path, load_checkpoint, set_rng_state
from gptkernels.training.dist import Dist, resolve_device
from gptkernels.training.schedule import lr_summary

TASKS = ("classify", "lm")
# CPU: 150 steps of 32 snippets (<= 128 bytes) on mini, 7 evaluations of 610 snippets: 82 s wall with 1 thread on the
# 2-core EPYC VM at load 1.3 (126 s at load 4.5); pre-trained, val accuracy 0.411 against a 0.131 baseline.
DEFAULTS = {
    "cpu": dict(batch_size=32, grad_accum=1, steps=150, lr=5e-4, warmup=15, eval_every=25, eval_steps=8,
                log_every=10, ckpt_every=0, dtype="fp32"),
    "cuda": dict(batch_size=32, grad_accum=1, steps=1000, lr=1e-4, warmup=100, eval_every=250, eval_steps=20,
                 log_every=10, ckpt_every=500, dtype="bf16"),
}
FT_DEFAULTS = dict(task="classify", aux_lm=0.5)
RANDOM_HINT = ("python -m gptkernels train --threads 1 writes one under runs/ (about 3 to 5 minutes on 2 CPU cores); "
               "or pass --init-from, --hf or --model")


def add_arguments(p) -> None:
    add_train_arguments(p, data_help="classify: a .jsonl file, one {\"text\": ..., \"label\": ...} per line "
                        "(default: the stdlib package task); lm: train's --data (default: the stdlib corpus)")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--task", choices=TASKS, help="classify (default) or lm (continued pre-training)")
    g.add_argument("--init-from", metavar="PATH", help="start from a checkpoint of ours: a ckpt.pt or its run folder "
                   "(default: the newest default train run's under runs/, else random weights)")
    g.add_argument("--hf", metavar="FOLDER", help="start from a saved Hugging Face GPT-2, GPT-1 or GPT-Neo")
    g.add_argument("--val", metavar="FILE", help="classify: the val .jsonl (default: the last 10%% of --data)")
    g.add_argument("--aux-lm", type=float, help="classify: weight of the auxiliary LM loss (default 0.5; 0: none)")
    g.add_argument("--freeze", metavar="WHAT", help="embeddings (token and position embeddings, and the LM head tied "
                   "to them) or N (the first N blocks)")
    g.add_argument("--eval-only", action="store_true", default=None, help="evaluate --init-from's classifier on the "
                   "val split: accuracy, macro-F1, the baseline and the confusion matrix; no training")


@dataclass
class Start:
    """Where the weights come from."""

    config: GPTConfig
    state: dict | None  # GPT state dict, None: random
    model: str  # the --model value the run records: a preset, or "hf"
    text: str
    tokenizer: object = None


def finetune(args_or_config=None, **overrides) -> dict:
    """Fine-tune with the given options (an argparse.Namespace, a dict of option names, or keywords, e.g.
    finetune(model="tiny", steps=10)); missing ones take the defaults.

    Returns train's metrics (steps, train_loss, val_loss, eval (the last evaluation's metrics), tokens_per_s, mfu,
    elapsed, out_dir, log, checkpoint, plot, config), for classify also baseline (the majority class's accuracy and
    macro-F1) and classes; with eval_only: accuracy, macro_f1, baseline, confusion, classes, val_loss.
    Raises TrainConfigError, CheckpointError, gptkernels.data.DataError (ValueErrors) or FileNotFoundError for bad
    arguments, checkpoints and data, naming the option (and the file and line for data).
    """
    ns = namespace(args_or_config, overrides, add_arguments, "finetune")
    dist = Dist()
    device = resolve_device(ns, dist)
    dist.init(device)
    try:
        if ns.eval_only:
            return _eval_only(ns, device)
        return _finetune(ns, dist, device)
    finally:
        dist.close()


# --------------------------------------------------------------------------------------------------- start
def _gpt_state(state: dict) -> dict:
    """The GPT body of a checkpoint's model: a train or lm checkpoint as it is, a classifier's without "gpt."."""
    if any(k.startswith("gpt.") for k in state):
        return {k[4:]: v for k, v in state.items() if k.startswith("gpt.")}
    return state


def _describe(cfg: GPTConfig) -> str:
    return (f"{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block {cfg.block_size}, "
            f"vocab {cfg.vocab_size}")


def default_checkpoint(root: str = "runs") -> str | None:
    """The newest runs/*/ckpt.pt of a default train run (train's checkpoint of the mini preset on the stdlib
    corpus, bytes), or None."""
    for path in sorted(glob.glob(os.path.join(root, "*", CKPT_NAME)), key=os.path.getmtime, reverse=True):
        try:
            ckpt = load_checkpoint(path, option="--init-from")
        except (CheckpointError, OSError):
            continue
        a = ckpt.get("args", {})
        if "task" not in ckpt and a.get("model") == "mini" and a.get("data") is None and a.get("docs") == "concat":
            return path
    return None


def _start(ns) -> Start:
    given = [o for o, v in (("--init-from", ns.init_from), ("--hf", ns.hf)) if v]
    if len(given) > 1:
        raise TrainConfigError(f"{given[0]} and {given[1]}: give one starting point")
    if ns.hf:
        if ns.model is not None:
            raise TrainConfigError(f"--model {ns.model} and --hf: the Hugging Face model fixes the architecture; "
                                   f"drop --model")
        from gptkernels.generate import _hf_tokenizer

        try:
            gpt = GPT.from_hf(ns.hf)
        except ValueError as e:
            raise TrainConfigError(f"--hf {ns.hf}: {str(e).removeprefix('from_hf: ')}") from None
        return Start(gpt.config, gpt.state_dict(), "hf", f"Hugging Face {ns.hf}", _hf_tokenizer(ns.hf))
    path = ns.init_from
    if path is None and ns.model is None:
        path = default_checkpoint()
        if path is None:
            cfg = GPTConfig.preset("mini")
            return Start(cfg, None, "mini", f"random weights (mini): no default train checkpoint under runs/; "
                         f"{RANDOM_HINT}")
    if path is None:
        if ns.model not in PRESETS:
            raise TrainConfigError(f"--model {ns.model!r}: unknown preset; known: {', '.join(PRESETS)}")
        try:
            cfg = GPTConfig.preset(ns.model, **({"block_size": ns.block_size} if ns.block_size else {}),
                                   vocab_size=ns.vocab_size or gkdata.BYTE_VOCAB, dropout=ns.dropout or 0.0)
        except ValueError as e:
            raise TrainConfigError(f"--model {ns.model}: bad configuration: {e}") from None
        return Start(cfg, None, ns.model, f"random weights ({ns.model}, for comparison)")
    path = checkpoint_path(path, "--init-from")
    ckpt = load_checkpoint(path, option="--init-from")
    cfg = GPTConfig(**ckpt["config"])
    theirs = ckpt["args"].get("model")
    if ns.model is not None and ns.model != theirs:
        preset = PRESETS.get(ns.model)
        mine = f" ({preset.n_layer} layers, {preset.n_embd} wide)" if preset else ""
        raise TrainConfigError(f"--model {ns.model}{mine} does not match the checkpoint {path}: a {theirs} model "
                               f"({_describe(cfg)}); drop --model to fine-tune the checkpoint's")
    how = "given" if ns.init_from else "the newest default train run"
    return Start(cfg, _gpt_state(ckpt["model"]), theirs, f"{path} ({how}; step {ckpt['step']})")


def _encoder(config: GPTConfig, tokenizer, option: str):
    """text -> token ids for the model: bytes for a byte-level model, else the Hugging Face tokenizer."""
    if config.vocab_size == gkdata.BYTE_VOCAB:
        return None, gkdata.BYTE_EOT
    if tokenizer is None:
        raise TrainConfigError(f"{option}: the model has vocab {config.vocab_size}, not bytes, and no tokenizer "
                               f"(--hf folders with tokenizer files have one); classify needs one")

    def encode(text):
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return np.asarray(tokenizer.encode(text), dtype=np.int64)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return encode, pad or 0


def _classify_task(args, encode, classes=None) -> cdata.ClassifyTask:
    if args.data is None:
        if args.val is not None:
            raise TrainConfigError("--val without --data: the default task has its own val split")
        return cdata.stdlib_task(encode=encode)
    return cdata.jsonl_task(args.data, args.val, encode=encode, classes=classes)


# ------------------------------------------------------------------------------------------------ fine-tune
def _finetune(ns, dist: Dist, device: torch.device) -> dict:
    start = None
    if not ns.resume:
        start = _start(ns)
        ns.model = start.model
        if ns.block_size is None:
            ns.block_size = start.config.block_size
    defaults = {**DEFAULTS[device.type], **COMMON_DEFAULTS, **FT_DEFAULTS}
    args, ckpt, ckpt_path = resolve(ns, dist, device, defaults, presets=(*PRESETS, "hf"))
    if args.task not in TASKS:
        raise TrainConfigError(f"--task {args.task!r}: must be one of {', '.join(TASKS)}")
    if ckpt is not None and ckpt.get("task", {}).get("kind", "lm") != args.task:
        raise TrainConfigError(f"--task {args.task}: the checkpoint {ckpt_path} is a {ckpt['task']['kind']} run")
    save_path = os.path.join(args.out_dir, CKPT_NAME)
    if ckpt is None and os.path.exists(save_path):
        raise TrainConfigError(f"--out-dir {args.out_dir!r} already holds a checkpoint ({CKPT_NAME}); continue it with "
                               f"--resume or choose another --out-dir")
    if start is None:  # resumed: the architecture from the checkpoint, the weights restored below
        tok = None
        if args.hf:
            from gptkernels.generate import _hf_tokenizer

            tok = _hf_tokenizer(args.hf)
        start = Start(GPTConfig(**ckpt["config"]), None, args.model, f"resumed from {ckpt_path}", tok)
    config = start.config
    T = args.block_size
    if T > config.block_size:
        raise TrainConfigError(f"--block-size {args.block_size}: the model has {config.block_size} positions")
    if not (isinstance(args.aux_lm, (int, float)) and 0 <= args.aux_lm < float("inf")):
        raise TrainConfigError(f"--aux-lm {args.aux_lm!r}: must be a number >= 0 (0: no auxiliary LM loss)")
    if args.freeze is not None and args.freeze != "embeddings":
        if not (str(args.freeze).isdigit() and 1 <= int(args.freeze) <= config.n_layer):
            raise TrainConfigError(f"--freeze {args.freeze!r}: give embeddings or a number of blocks in "
                                   f"[1, {config.n_layer}]")

    torch.manual_seed(args.seed)  # the same head initialization on every rank
    extra, baseline, classes = {}, None, None
    if args.task == "classify":
        encode, pad_id = _encoder(config, start.tokenizer, "--hf" if args.hf else "--init-from")
        task = _classify_task(args, encode, ckpt["task"]["classes"] if ckpt is not None else None)
        classes = task.classes
        sampler = cdata.ClassifySampler(task, T, args.batch_size, args.seed, config.vocab_size, pad_id)
        raw = GPTClassifier(config, len(classes), backend=args.backend)
        body = raw.gpt
        baseline = cdata.majority_baseline(task.train.labels, task.val.labels, len(classes))
        extra = {"task": {"kind": "classify", "classes": classes, "pad_id": pad_id, "aux_lm": args.aux_lm}}
        data_line = f"data: {task.description}"
        source = task.source
    else:
        dataset = gkdata.load(args.data, args.corpus_bytes, docs=args.docs != "concat")
        if dataset.vocab_size == gkdata.BYTE_VOCAB and config.vocab_size != gkdata.BYTE_VOCAB:
            raise TrainConfigError(f"--data {dataset.source}: text is read as bytes (vocab 256), but the model's vocab "
                                   f"is {config.vocab_size}; give a .bin of its token ids")
        sampler = gkdata.make_sampler(dataset, args.docs, T, args.batch_size, args.seed, config.vocab_size)
        raw = body = GPT(config, backend=args.backend)
        extra = {"task": {"kind": "lm"}}
        data_line = f"data: {dataset.description}: train {len(dataset.train):,} tokens, val {len(dataset.val):,}"
        source = dataset.source
    if start.state is not None:
        body.load_state_dict(start.state)
    frozen = freeze(body, args.freeze) if args.freeze is not None else []
    raw = raw.to(device)
    optimizer = raw.configure_optimizer(args.lr, args.weight_decay, (0.9, 0.95), device.type)
    step, batches, prev_elapsed = 0, 0, 0.0
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, batches, prev_elapsed = ckpt["step"], ckpt["data"]["batches_drawn"], ckpt["elapsed"]
        set_rng_state(ckpt["rng"], device)
        del ckpt

    B, A, W = args.batch_size, args.grad_accum, dist.world
    flops_per_token = body.flops_per_token(T)
    total = sum(p.numel() for p in raw.parameters())
    trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    banner = [f"start: {start.text}",
              f"model {args.model}: {_describe(config)}: {total / 1e6:.2f}M params (head and position embedding "
              f"included), {trainable / 1e6:.2f}M trainable" + (f" ({len(frozen)} tensors frozen: --freeze "
                                                                f"{args.freeze})" if frozen else ""),
              f"task {args.task}" + (f": {len(classes)} classes, loss = CE + {args.aux_lm:g} x LM" if classes else ""),
              data_line,
              f"batch: {B} x <= {T} tokens x {A} accum; {args.steps} steps; {lr_summary(args)}"]
    if baseline is not None:
        banner.append(f"majority-class baseline (always {classes[baseline['class']]}): val accuracy "
                      f"{baseline['accuracy']:.3f}, macro-F1 {baseline['macro_f1']:.3f}")

    if args.task == "classify":
        def step_loss(model, b):
            return model(b.x, b.last, b.labels, b.lm_targets, args.aux_lm)[1]

        def evaluate(model, amp):
            out = _predict(model, sampler, device, amp)
            return {"val_loss": out["val_loss"], "accuracy": out["accuracy"], "macro_f1": out["macro_f1"],
                    "baseline_accuracy": baseline["accuracy"]}

        def eval_text(m):
            return f" | accuracy {m['accuracy']:.3f} (baseline {m['baseline_accuracy']:.3f}) | macro-F1 " \
                   f"{m['macro_f1']:.3f}"
    else:
        def step_loss(model, b):
            return model(b.x, b.y, **b.model_kwargs())[1]

        def evaluate(model, amp):
            total = torch.zeros((), device=device)
            for k in range(args.eval_steps):  # the same val batches every time: evals are comparable
                b = sampler.get_batch("val", k, dist.rank, W, device)
                with amp():
                    total += model(b.x, b.y, **b.model_kwargs())[1].float()
            return {"val_loss": dist.mean(total / args.eval_steps).item()}

        def eval_text(m):
            return ""

    job = loop.Job("finetune", args, raw, optimizer, sampler, step_loss, evaluate, config.to_dict(), flops_per_token,
                   B * T * A, source, banner, eval_text=eval_text, checkpoint_extra=extra,
                   plot_title=f"finetune {args.task}: {args.model} ({config.n_layer}L {config.n_embd}C) on {source}",
                   step=step, batches=batches, prev_elapsed=prev_elapsed, resumed_from=ckpt_path)
    result = loop.run(job, dist, device)
    if baseline is not None and result["eval"] and dist.master:
        m = result["eval"]
        print(f"val accuracy {m['accuracy']:.3f} vs majority-class baseline {baseline['accuracy']:.3f}; macro-F1 "
              f"{m['macro_f1']:.3f} vs {baseline['macro_f1']:.3f}", flush=True)
    result.update(baseline=baseline, classes=classes)
    return result


def _predict(model, sampler, device, amp) -> dict:
    """Class predictions on the whole val split: val_loss (mean CE), accuracy, macro_f1, pred, target."""
    preds, targets, loss_sum = [], [], 0.0
    for k in range(sampler.val_batches()):
        b = sampler.get_batch("val", k, 0, 1, device)
        with amp():
            logits, _ = model(b.x, b.last)
        loss_sum += F.cross_entropy(logits.float(), b.labels, reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
        targets.append(b.labels.cpu())
    pred, target = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    out = cdata.metrics(pred, target, sampler.n_classes)
    out.update(val_loss=loss_sum / len(target), pred=pred, target=target)
    return out


def _eval_only(ns, device: torch.device) -> dict:
    if ns.init_from is None:
        raise TrainConfigError("--eval-only: give --init-from, a finetune classify checkpoint (ckpt.pt or its folder)")
    path = checkpoint_path(ns.init_from, "--init-from")
    ckpt = load_checkpoint(path, option="--init-from")
    task_info = ckpt.get("task", {})
    if task_info.get("kind") != "classify":
        raise TrainConfigError(f"--eval-only: {path} is not a finetune classify checkpoint (it has no classifier "
                               f"head); evaluate an LM's val loss with python -m gptkernels train's evals")
    config = GPTConfig(**ckpt["config"])
    saved = ckpt["args"]
    for name in ("data", "val", "hf", "block_size"):
        if getattr(ns, name) is None:
            setattr(ns, name, saved.get(name))
    tok = None
    if ns.hf:
        from gptkernels.generate import _hf_tokenizer

        tok = _hf_tokenizer(ns.hf)
    encode, pad_id = _encoder(config, tok, "--init-from")
    classes = task_info["classes"]
    task = _classify_task(ns, encode, classes)
    T = ns.block_size or config.block_size
    sampler = cdata.ClassifySampler(task, T, ns.batch_size or 32, 0, config.vocab_size, pad_id)
    backend = None if ns.backend in (None, "auto") else ns.backend
    model = GPTClassifier(config, len(classes), backend=backend)
    model.load_state_dict(ckpt["model"])
    model = model.to(device).eval()
    with torch.no_grad():
        out = _predict(model, sampler, device, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
                       if ns.dtype == "bf16" else contextlib.nullcontext())
    baseline = cdata.majority_baseline(task.train.labels, task.val.labels, len(classes))
    cm = cdata.confusion_matrix(out["pred"], out["target"], len(classes))
    print(f"gptkernels finetune --eval-only: {path} (step {ckpt['step']}) on {task.description}")
    print(f"val: {len(task.val)} examples | accuracy {out['accuracy']:.3f} | macro-F1 {out['macro_f1']:.3f} | "
          f"loss {out['val_loss']:.4f}")
    print(f"majority-class baseline (always {classes[baseline['class']]}): accuracy {baseline['accuracy']:.3f} | "
          f"macro-F1 {baseline['macro_f1']:.3f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    print(cdata.format_confusion(cm, classes), flush=True)
    return {"accuracy": out["accuracy"], "macro_f1": out["macro_f1"], "val_loss": out["val_loss"],
            "baseline": baseline, "confusion": cm, "classes": classes}


# ---------------------------------------------------------------------------------------------------------- CLI
def run(args) -> int:
    """python -m gptkernels finetune: fine-tune with parsed arguments; a user mistake prints one line and returns 2."""
    return run_command("finetune", finetune, args)


def main(argv=None) -> int:
    """python -m gptkernels.finetune (and torchrun -m): the same as python -m gptkernels finetune."""
    return module_main("finetune", argv)


if __name__ == "__main__":
    raise SystemExit(main())
