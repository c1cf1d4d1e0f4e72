"""python -m gptkernels generate: continue a prompt with a GPT on gptkernels and print the text.

    python -m gptkernels generate --model tiny --prompt "Hello" --max-new-tokens 64       # random weights
    python -m gptkernels generate --ckpt runs/<run> --prompt "ROMEO:" --temperature 0.8 --top-k 40
    python -m gptkernels generate --hf ./gpt2 --prompt-ids 464,3290 --temperature 0      # greedy
    python -m gptkernels generate --ckpt runs/<run> --min-p 0.05 --repetition-penalty 1.2 --no-repeat-ngram-size 3

Sampling follows Hugging Face's generate (gptkernels/sample.py): --repetition-penalty and --no-repeat-ngram-size act
on the whole text, prompt included, then --temperature, --top-k, --top-p and --min-p, in that order.

Weights: --model PRESET (random init from --seed), --hf PATH (a local Hugging Face GPT-2, GPT-1 or GPT-Neo
folder), or --ckpt PATH
(the ckpt.pt that python -m gptkernels train writes, or its run folder; any torch.save dict with the state_dict
under "model" and GPTConfig.to_dict() under "config" works). Text: with a byte-level vocab (256) the prompt is the
UTF-8 bytes of --prompt and the output is decoded with errors="replace". Other vocabularies take token ids
(--prompt-ids 1,2,3), or text when the --hf folder holds a tokenizer (transformers). The last line reports tokens/s
and which gptkernels backend ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EOT_GPT2 = 50256  # GPT-2's <|endoftext|>, the usual empty prompt for its 50257-token vocab
# Keys other trainers use for the same two things (nanoGPT: model / model_args; plain loops: state_dict).
_STATE_KEYS = ("model", "model_state_dict", "state_dict")
_CONFIG_KEYS = ("config", "model_config", "model_args")
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers
# GPTConfig fields that train sets apart from the preset (--block-size, --vocab-size, --dropout): a checkpoint of
# preset P may differ from P in these and still be "--model P".
_NOT_PRESET = ("block_size", "vocab_size", "dropout")
# Sampling arguments that the CLI takes under a flag of the same name.
_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size")


class GenerateError(ValueError):
    """A request that cannot run (bad options, unreadable checkpoint); the CLI prints it without a traceback."""


# ------------------------------------------------------------------------------------------------ loading
def _strip_prefixes(state_dict):
    out = {}
    for k, v in state_dict.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def check_preset(name, config, source):
    """GenerateError unless config (of the weights in source) is the architecture of preset name: the fields that
    train takes from the preset, all but _NOT_PRESET. The message names both and the preset that does match."""
    from gptkernels.model import PRESETS, GPTConfig

    try:
        want = GPTConfig.preset(name)
    except ValueError as e:
        raise GenerateError(f"--model: {e}") from None
    arch = [f for f in GPTConfig.__dataclass_fields__ if f not in _NOT_PRESET]
    diff = [f for f in arch if getattr(config, f) != getattr(want, f)]
    if not diff:
        return
    same = [p for p, c in PRESETS.items() if all(getattr(config, f) == getattr(c, f) for f in arch)]
    raise GenerateError(
        f"{source} holds a different model than --model {name}: "
        + ", ".join(f"{f} {getattr(config, f)!r} (--model {name}: {getattr(want, f)!r})" for f in diff)
        + (f"; it is the {same[0]} preset" if same else "") + "; leave --model out to use the weights' own config")


def _state_dict_mismatch(ours, sd) -> str:
    """Why sd does not load into a model whose state dict is ours, in one line (torch's message spans lines)."""
    missing = [k for k in ours if sd.get(k) is None]
    unexpected = [k for k in sd if k not in ours]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
              if sd.get(k) is not None and tuple(sd[k].shape) != tuple(v.shape)]
    parts = [f"{what} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape file vs config", shapes))
             if keys]
    return "; ".join(parts)


def load_checkpoint(path, backend=None, preset=None):
    """A GPT from a training checkpoint file or run folder (loaded with weights_only=True on the CPU). Returns
    (model, info). With preset (an explicit --model), the checkpoint's config must be that preset's architecture."""
    from gptkernels.model import GPT, GPTConfig
    from gptkernels.train import CKPT_HINT, CheckpointError, checkpoint_path, torch_load

    try:
        path = checkpoint_path(path, "--ckpt")
        obj = torch_load(path, "--ckpt")
    except (FileNotFoundError, CheckpointError) as e:
        hf = os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
        raise GenerateError(str(e) + ("; it holds a config.json: a Hugging Face folder loads with --hf" if hf
                                      else "")) from None
    if not isinstance(obj, dict):
        raise GenerateError(f"--ckpt {path!r}: expected a dict with 'model' and 'config', got {type(obj).__name__}; "
                            f"{CKPT_HINT}")
    sd = next((obj[k] for k in _STATE_KEYS if isinstance(obj.get(k), dict)), None)
    cfg = next((obj[k] for k in _CONFIG_KEYS if isinstance(obj.get(k), dict)), None)
    if sd is None or cfg is None:
        raise GenerateError(
            f"--ckpt {path!r}: expected the weights under one of {', '.join(map(repr, _STATE_KEYS))} and the "
            f"GPTConfig dict under one of {', '.join(map(repr, _CONFIG_KEYS))}; the file has keys "
            f"{', '.join(map(repr, sorted(map(str, obj))))}")
    known = set(GPTConfig.__dataclass_fields__)
    try:
        config = GPTConfig(**{k: v for k, v in cfg.items() if k in known})
    except (TypeError, ValueError) as e:
        raise GenerateError(f"--ckpt {path!r}: bad config {cfg!r}: {e}") from e
    if preset is not None:
        check_preset(preset, config, f"--ckpt {path!r}")
    model = GPT(config, backend=backend)
    ours = model.state_dict()
    sd = {k: v for k, v in _strip_prefixes(sd).items() if not (k.endswith(".attn.bias") and k not in ours)}
    sd.setdefault("lm_head.weight", sd.get("transformer.wte.weight"))  # tied: some writers store it once
    why = _state_dict_mismatch(ours, sd)
    try:
        if why:
            raise RuntimeError(why)
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise GenerateError(f"--ckpt {path!r}: the weights do not fit its config {config}: "
                            f"{why or ' '.join(str(e).split())}") from e
    extra = sorted(set(cfg) - known)
    info = {"iter": obj.get("iter", obj.get("step")), "ignored_config_keys": extra, "path": path}
    return model, info


def load_model(model=None, hf=None, ckpt=None, backend=None, seed=0):
    """(GPT on the CPU, source description, tokenizer or None) from one of a preset (default tiny), --hf or --ckpt.
    A preset named together with --hf or --ckpt must be the architecture of those weights."""
    from gptkernels.model import GPT, GPTConfig

    if hf is not None and ckpt is not None:
        raise GenerateError("give one of --hf and --ckpt, not both")
    if ckpt is not None:
        m, info = load_checkpoint(ckpt, backend, preset=model)
        src = f"checkpoint {info['path']}" + (f" (iter {info['iter']})" if info["iter"] is not None else "")
        return m, src, None
    if hf is not None:
        try:
            m = GPT.from_hf(hf, backend=backend)
        except (FileNotFoundError, ImportError, ValueError) as e:
            raise GenerateError(f"--hf {os.fspath(hf)!r}: {str(e).removeprefix('from_hf: ')}") from e
        if model is not None:
            check_preset(model, m.config, f"--hf {os.fspath(hf)!r}")
        return m, f"hf {os.fspath(hf)}", _hf_tokenizer(hf)
    model = model or "tiny"
    try:
        config = GPTConfig.preset(model)
    except ValueError as e:
        raise GenerateError(str(e)) from e
    torch.manual_seed(seed)
    return GPT(config, backend=backend), f"{model} preset, random weights (seed {seed})", None


def _hf_tokenizer(path):
    """The tokenizer saved in a Hugging Face folder, or None (no tokenizer files, or no transformers)."""
    path = os.fspath(path)
    # Checked first: recent transformers return an empty GPT-2 tokenizer for a folder that has none.
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # unreadable tokenizer files: token ids remain the interface
        return None
    return tok if len(tok) > 1 else None


# ------------------------------------------------------------------------------------------------- tokens
def encode_prompt(text, ids, vocab_size, tokenizer=None) -> list[int]:
    """Token ids of the prompt: --prompt-ids as given, else the UTF-8 bytes of text (vocab 256), else the tokenizer.
    No prompt at all starts from a newline (byte vocab) or <|endoftext|> (GPT-2 vocab)."""
    if text is not None and ids is not None:
        raise GenerateError("give one of --prompt and --prompt-ids, not both")
    if ids is not None:
        try:
            out = [int(t) for t in ids.replace(" ", "").split(",") if t]
        except ValueError as e:
            raise GenerateError(f"--prompt-ids must be comma-separated integers, got {ids!r}") from e
    elif text is not None:
        if vocab_size == 256:
            out = list(text.encode("utf-8"))
        elif tokenizer is not None:
            out = list(tokenizer.encode(text))
        else:
            raise GenerateError(f"--prompt text needs a byte-level model (vocab 256) or an --hf folder with a "
                                f"tokenizer; this model has vocab {vocab_size}: give token ids with --prompt-ids")
    else:
        out = [10] if vocab_size == 256 else [EOT_GPT2 if vocab_size > EOT_GPT2 else 0]
    if not out:
        raise GenerateError("the prompt is empty; give at least one token")
    bad = [t for t in out if not 0 <= t < vocab_size]
    if bad:
        raise GenerateError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return out


def decode_tokens(ids, vocab_size, tokenizer=None) -> str:
    if vocab_size == 256:
        return bytes(ids).decode("utf-8", errors="replace")
    if tokenizer is not None:
        return tokenizer.decode(ids)
    return ",".join(map(str, ids))


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser):
    src = parser.add_argument_group("weights (one of)")
    src.add_argument("--model", default=None, help="preset with random weights (default tiny); with --ckpt or --hf, "
                     "checks that the weights are this preset")
    src.add_argument("--hf", default=None, metavar="PATH",
                     help="a local Hugging Face GPT-2, GPT-1 (openai-gpt) or GPT-Neo "
                     "folder (no download)")
    src.add_argument("--ckpt", default=None, metavar="PATH", help="a checkpoint written by python -m gptkernels "
                     "train: its ckpt.pt or the run folder")
    parser.add_argument("--prompt", default=None, help="prompt text (byte-level vocab, or an --hf tokenizer)")
    parser.add_argument("--prompt-ids", default=None, metavar="IDS", help="prompt token ids, e.g. 464,3290")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="keep the smallest set reaching probability p")
    parser.add_argument("--min-p", type=float, default=None, help="keep tokens at least min-p times as likely as the "
                        "most likely one (after --temperature)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="divide the positive logits of tokens "
                        "already in the text (prompt included) by this, multiply the negative ones (> 1 discourages "
                        "repeats)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N", help="never repeat an "
                        "N-gram of the text (prompt included)")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt, run as one batch")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (and random-weight init)")
    parser.add_argument("--no-cache", action="store_true", help="rerun the whole context every step (no KV cache)")
    parser.add_argument("--backend", default=None, help="cuda, triton, cpu, torch (default: auto, or "
                        "GPTKERNELS_BACKEND)")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--quantize", default=None, choices=("int8", "int4"),
                        help="weight-only quantization of the linear layers (int8 per channel, int4 groups of 128; "
                        "lm_head stays float)")
    parser.add_argument("--calibrate", default=None, choices=("absmax", "mse"),
                        help="with --quantize: each group's scale from its largest weight (absmax, the default) or "
                        "the clip ratio with the least squared error (mse)")


def generate_text(args) -> dict:
    """Run one generation for parsed args; returns {"texts", "ids", "seconds", "tokens_per_s", "backend", ...}."""
    from gptkernels import _runtime
    from gptkernels._dispatch import BACKENDS, BackendUnavailableError
    from gptkernels.profile import MODEL_OPS, backend_summary, backends_used
    from gptkernels.sample import Sampling

    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise GenerateError("need --max-new-tokens >= 0 and --num-samples >= 1")
    sampling = {k: getattr(args, k, None) for k in _SAMPLING_FLAGS}
    try:
        Sampling(**sampling)  # before the model loads: a bad value fails in a moment
    except ValueError as e:
        msg = str(e)
        name = next((k for k in _SAMPLING_FLAGS if msg.startswith(k + " ")), None)  # "<name> must be ..."
        raise GenerateError(f"--{name.replace('_', '-')}{msg[len(name):]}" if name else msg) from None
    if args.backend is not None and args.backend not in BACKENDS:
        raise GenerateError(f"--backend {args.backend!r}: choose one of {', '.join(BACKENDS)} (or leave it out: auto)")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise GenerateError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: no CUDA device is visible on this machine")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, source, tok = load_model(args.model, args.hf, args.ckpt, args.backend, args.seed)
    model = model.to(device=device, dtype=dtype).eval()
    if getattr(args, "quantize", None):
        from gptkernels.profile import QUANTIZED
        from gptkernels.quantize import quantize

        rep = quantize(model, *QUANTIZED[args.quantize], calibrate=getattr(args, "calibrate", None))
        source += (f", {args.quantize}: {len(rep.quantized)} layers, {rep.bytes_before / 1e6:.1f} -> "
                   f"{rep.bytes_after / 1e6:.1f} MB")
    V = model.config.vocab_size
    prompt = encode_prompt(args.prompt, args.prompt_ids, V, tok)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)  # (S, T)
    gen = torch.Generator().manual_seed(args.seed)  # on the CPU: the same draws for CPU and GPU runs
    t0 = time.perf_counter()
    try:
        out = model.generate(idx, args.max_new_tokens, generator=gen, use_cache=not args.no_cache, **sampling)
    except (ValueError, BackendUnavailableError) as e:  # block_size exceeded, bad sampling arguments, a backend
        raise GenerateError(str(e)) from e  # that cannot run here: the message says which
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    ids = out.tolist()
    n_new = args.num_samples * args.max_new_tokens
    # The ops this run called: a decode step (decode_attention) runs only with the cache and 2+ new tokens.
    decoded = not args.no_cache and args.max_new_tokens >= 2
    backends = backends_used(tuple(op for op in MODEL_OPS if decoded or op != "decode_attention"))
    ran = backend_summary(backends) if backends else "none (no op ran)"
    if args.backend is None and "(from GPTKERNELS_BACKEND)" in _runtime.backend_text():
        ran += " (from GPTKERNELS_BACKEND)"
    return {
        "texts": [decode_tokens(row, V, tok) for row in ids],
        "ids": ids,
        "prompt_len": len(prompt),
        "new_tokens": n_new,
        "seconds": seconds,
        "tokens_per_s": n_new / seconds if seconds > 0 else float("inf"),
        "backend": ran,
        "backends": backends,
        "source": source,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": _runtime.threads_text() if device.type == "cpu" else None,
    }


def run(args) -> int:
    try:
        r = generate_text(args)
    except GenerateError as e:
        msg = " ".join(str(e).split())  # one line, whatever a wrapped library message holds
        print(f"gptkernels generate: error: {msg}", file=sys.stderr)
        return 2
    for i, text in enumerate(r["texts"]):
        if len(r["texts"]) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    cache = "no cache" if args.no_cache else "KV cache"
    threads = f", {r['threads']}" if r["threads"] else ""
    print(f"--- {r['new_tokens']} new tokens in {r['seconds']:.3f} s: {r['tokens_per_s']:.1f} tokens/s "
          f"(prefill included, {cache}) | backend: {r['backend']} | {r['device']} {r['dtype']}{threads} | "
          f"{r['source']}")
    return 0


def main(argv=None) -> int:
    """python -m gptkernels.generate: the same as python -m gptkernels generate."""
    from gptkernels.cli import main as cli_main

    return cli_main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
