"""Inference latency of a GPT, side by side: the eager reference, gptkernels, torch.compile.

For each provider the same weights run the same greedy generation: one prefill of a (B, prompt_len) prompt, then
new_tokens - 1 decode steps of (B, 1) against a KV cache (the first new token comes from the prefill, as in
GPT.generate). Reported per provider: prefill latency, per-token decode latency p50/p90/p99, decode tokens/s at the
median step (batch / decode p50), peak memory, which gptkernels backend ran, and the speedup over eager measured in
the same run (eager's p50 / the provider's: the ratio of the two tok/s).

    python -m gptkernels profile --model gpt2 --batch 1 --prompt-len 128 --new-tokens 128
    python -m gptkernels profile --model tiny --providers eager,gptkernels --json out.json --trace trace.json
    python -m gptkernels profile --model gpt2 --device cuda --cuda-graphs     # adds "<provider>+graphs" rows

Providers: eager = GPT(config, backend="torch"); gptkernels = GPT(config) (automatic backends); compile =
torch.compile of the gptkernels model (a failure to compile becomes the row's error, not a crash). With
--cuda-graphs every provider also gets a row whose decode step (batch B, one token, static input buffer and static
cache, greedy argmax included) is captured once in a CUDA graph and replayed per token.

Timing: warmup runs first (the compile cost is reported as warmup_s), then --repeats runs of every provider,
interleaved so that load from other work on the machine hits all providers alike. Each step is timed alone: CUDA
events on GPU (read after one synchronize at the end of a run), time.perf_counter on CPU (the CPU kernels are
synchronous). Prefill is the median over repeats; decode percentiles pool every step of every repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch

from gptkernels import _runtime

PROVIDERS = ("eager", "gptkernels", "compile")
# Weight-only quantized gptkernels models (gptkernels.quantize: the linear layers, lm_head kept float):
# provider -> (bits, group_size). Not in the default set; --quantize or --providers adds them.
QUANTIZED = {"int8": (8, None), "int4": (4, 128)}
# What a quantized model runs instead of fused_mlp: quantized_linear for every projection, bias_gelu between.
QUANTIZED_OPS = ("layer_norm", "scaled_dot_product_attention", "decode_attention", "quantized_linear", "bias_gelu")
# Third-party weight-only quantization on the eager model, for comparison (optional: needs torchao installed).
# provider -> the torchao config class; the lm_head stays float as in QUANTIZED.
TORCHAO = {"torchao-int8": "Int8WeightOnlyConfig"}
GRAPHS_SUFFIX = "+graphs"
# The ops a GPT forward dispatches; their last() entry tells which backend ran.
MODEL_OPS = ("layer_norm", "scaled_dot_product_attention", "decode_attention", "fused_mlp")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class ProfileError(ValueError):
    """A request the profiler cannot run (bad options); the CLI prints it without a traceback."""


# ------------------------------------------------------------------------------------------------- timing
class _StepTimer:
    """Times each step of a run: CUDA events (no synchronize between steps) or perf_counter on CPU."""

    def __init__(self, device: torch.device, steps: int):
        self.cuda = device.type == "cuda"
        if self.cuda:  # created up front: event creation stays out of the timed region
            self.events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                           for _ in range(steps)]
        else:
            self.t = [(0.0, 0.0)] * steps
        self.i = 0

    @contextlib.contextmanager
    def step(self):
        i = self.i
        self.i += 1
        if self.cuda:
            self.events[i][0].record()
            yield
            self.events[i][1].record()
        else:
            t0 = time.perf_counter()
            yield
            self.t[i] = (t0, time.perf_counter())

    def ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.events[: self.i]]
        return [(b - a) * 1e3 for a, b in self.t[: self.i]]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ runners
class _Runner:
    """One provider: a model, its KV cache, and the greedy prefill / decode step (optionally CUDA-graphed)."""

    def __init__(self, name, model, batch, prompt_len, new_tokens, graphs=False):
        self.name, self.model, self.graphs = name, model, graphs
        self.fwd = model  # what is called: the module, or its torch.compile wrapper
        self.batch, self.prompt_len, self.new_tokens = batch, prompt_len, new_tokens
        self.cache = None
        self.graph = None
        self.backends = None
        self.warmup_s = None

    def make_cache(self):
        base = getattr(self.model, "_orig_mod", self.model)
        self.cache = base.make_cache(self.batch, self.prompt_len + self.new_tokens)
        return self.cache

    def prefill(self, prompt):
        logits, _ = self.fwd(prompt, cache=self.cache, last_only=True)
        return logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)

    def step(self, tok):
        logits, _ = self.fwd(tok, cache=self.cache, last_only=True)
        return logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)

    def capture(self, first_tok, warmup_steps=3):
        """Capture one decode step into a CUDA graph. Call right after a prefill: the cache holds the prompt.

        The graph reads its token from ``self.static_tok`` and writes the next greedy token back into it, so a
        replay per token is the whole decode loop. Warmup steps run on a side stream first (as the CUDA graphs
        docs require: lazy initialisation, Triton JIT and cuBLAS workspaces must happen outside the capture); they
        write cache positions that the captured step overwrites, and ``pos`` is rewound to the prompt length.
        """
        cache = self.cache
        start = cache.length
        self.static_tok = first_tok.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            tok = self.static_tok
            for _ in range(max(1, min(warmup_steps, self.new_tokens - 1))):
                tok = self.step(tok)
        torch.cuda.current_stream().wait_stream(s)
        cache.pos.fill_(start)
        cache.length = start
        self.graph = torch.cuda.CUDAGraph()
        reserved = torch.cuda.memory_reserved()
        with torch.cuda.graph(self.graph):
            self.static_tok.copy_(self.step(self.static_tok))
        # The step's activations live in the graph's private pool, reserved at capture: replays allocate nothing,
        # so max_memory_allocated during a timed run cannot see them. Counted into the row's peak instead.
        self.graph_pool_bytes = max(0, torch.cuda.memory_reserved() - reserved)
        # Capture ran the Python of one step (cache.length += 1) but no kernel: pos still holds the prompt length.
        cache.sync_length()

    def run(self, prompt, timer: _StepTimer | None = None):
        """One greedy generation. Returns (prefill_ms, decode_ms list, tokens (B, new_tokens) on the device)."""
        device = prompt.device
        timer = timer or _StepTimer(device, self.new_tokens)
        if self.cache is None:
            self.make_cache()
        self.cache.reset()
        out = torch.empty(self.batch, self.new_tokens, dtype=torch.long, device=device)
        with timer.step():
            tok = self.prefill(prompt)
        out[:, :1] = tok
        if self.graphs and self.graph is None:
            self.capture(tok)
        if self.graph is not None:
            self.static_tok.copy_(tok)
            for i in range(1, self.new_tokens):
                with timer.step():
                    self.graph.replay()
                out[:, i:i + 1] = self.static_tok
            self.cache.sync_length()
        else:
            for i in range(1, self.new_tokens):
                with timer.step():
                    tok = self.step(tok)
                out[:, i:i + 1] = tok
        ms = timer.ms()
        return ms[0], ms[1:], out


def backends_used(ops=MODEL_OPS):
    """{op: [backend, why]} of the last call of each of ``ops`` (default: the ops a GPT forward dispatches)."""
    from gptkernels import _dispatch

    return {op: list(_dispatch.last(op)) for op in ops if _dispatch.last(op) is not None}


def backend_summary(backends: dict) -> str:
    names = {b for b, _ in backends.values()}
    if len(names) == 1:
        return names.pop()
    return ",".join(f"{op}={b}" for op, (b, _) in backends.items())


# ------------------------------------------------------------------------------------------------- memory
def _peak_cpu_alloc_bytes(fn) -> int:
    """Peak bytes held by the c10 CPU allocator while fn() runs (above what was held before it).

    The autograd profiler in its legacy (non-Kineto) mode with profile_memory records every CPU allocation and free,
    in order per thread; the peak is the largest running sum. torch.profiler records the same through Kineto, which
    on a machine without a GPU prints profiler_start/stop and a failed GPU-count probe to the terminal.
    """
    from torch.autograd import ProfilerConfig, ProfilerState, _disable_profiler_legacy, _enable_profiler_legacy

    config = ProfilerConfig(ProfilerState.CPU, False, True, False, False, False,  # shapes, memory, stack, flops, mods
                            torch._C._profiler._ExperimentalConfig())
    _enable_profiler_legacy(config)
    try:
        fn()
    finally:
        records = _disable_profiler_legacy()
    # A stable sort by start time keeps each thread's own order where two events share a microsecond.
    events = sorted((e for thread in records for e in thread if e.kind() == "memory_alloc"), key=lambda e: e.start_us())
    peak = held = 0
    for e in events:
        held += e.cpu_memory_usage()
        peak = max(peak, held)
    return peak


def _weight_tensors(model):
    """Every parameter and buffer once (the tied lm_head / wte weight counts once): a quantized model's weights are
    buffers (qweight, scales, bias)."""
    seen = set()
    for t in (*model.parameters(), *model.buffers()):
        if _ptr(t) not in seen:
            seen.add(_ptr(t))
            yield t


def _ptr(t) -> int:
    """The storage address that identifies a shared (tied) weight; a wrapper tensor subclass (e.g. torchao's quantized
    weights) has no storage of its own (data_ptr 0, or an error) and is identified by the object."""
    try:
        return t.data_ptr() or id(t)
    except RuntimeError:
        return id(t)


def _nbytes(t) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's int8 weight: int8 data + scales) counts its inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _param_bytes(model) -> int:
    return sum(_nbytes(t) for t in _weight_tensors(model))


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, less the embedding tables a step only
    gathers B rows of (wpe; wte too unless lm_head shares it, as GPT's does, and reads it in full)."""
    gathered = {_ptr(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    gathered -= {_ptr(m.weight) for m in model.modules()
                 if not isinstance(m, torch.nn.Embedding) and isinstance(getattr(m, "weight", None), torch.Tensor)}
    return sum(_nbytes(t) for t in _weight_tensors(model) if _ptr(t) not in gathered)


# Every provider's model and KV cache stay allocated for the whole run (a CUDA graph holds the cache's addresses), so
# the measured part is what one run allocates on top: activations, logits, workspaces.
CPU_MEM_METHOD = ("weights + KV cache + peak CPU-allocator bytes above them during one extra, untimed prefill + decode "
                  "run (autograd profiler, profile_memory); not RSS, which keeps freed malloc memory")
CUDA_MEM_METHOD = ("weights + KV cache + (torch.cuda.max_memory_allocated - memory_allocated before the run), the "
                   "largest over the timed runs; +graphs rows add the graph's private pool (memory_reserved growth "
                   "during capture), which replays use without allocating")

WEIGHT_BW_METHOD = ("weight_bytes_per_token = bytes of the weights a decode step reads (every parameter and buffer "
                    "once, less embedding tables it only gathers rows of; quantized layers: qweight + scales + bias) "
                    "/ batch; weight_gbps = those bytes / decode p50 time per token; pct_copy_ceiling = weight_gbps "
                    "/ the copy ceiling measured in the same run (gptkernels.bench.roofline, quick: 2 x 64 MiB on "
                    "CPU, p20). The KV cache and activations are not counted; on CPU weights that fit in cache can "
                    "pass 100%")


# ----------------------------------------------------------------------------------------------- building
def _resolve_device_dtype(device, dtype):
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ProfileError(f"--device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProfileError("--device cuda: no CUDA device is visible on this machine")
    if device.type == "cuda":
        # Streams, graph capture, events and synchronize() act on the *current* device: make it the target one,
        # or --device cuda:1 would time (and capture) an idle cuda:0.
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ProfileError(f"--dtype {dtype!r} not supported; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return device, dtype


def load_weights(model="gpt2", hf=None, block_size=None, seed=0):
    """(config, state_dict, description): Hugging Face weights from a local folder, or random GPT-2 init."""
    from gptkernels.model import GPT, GPTConfig

    if hf is not None:
        if block_size is not None:
            raise ProfileError("--block-size changes the position table; it cannot be combined with --hf")
        try:
            m = GPT.from_hf(hf)
        except (FileNotFoundError, ImportError, ValueError) as e:
            raise ProfileError(f"--hf {os.fspath(hf)!r}: {e}") from e
        return m.config, m.state_dict(), f"hf:{os.fspath(hf)}"
    if isinstance(model, GPTConfig):
        config = model if block_size is None else GPTConfig(**{**model.to_dict(), "block_size": block_size})
    else:
        try:
            config = GPTConfig.preset(model, **({} if block_size is None else {"block_size": block_size}))
        except ValueError as e:
            raise ProfileError(str(e)) from e
    torch.manual_seed(seed)
    return config, GPT(config, backend="torch").state_dict(), f"random init (seed {seed})"


def _build(provider, config, state_dict, device, dtype, calibrate=None):
    from gptkernels.model import GPT

    base = provider.removesuffix(GRAPHS_SUFFIX)
    model = GPT(config, backend="torch" if base in ("eager", *TORCHAO) else None)
    model.load_state_dict(state_dict)
    model = model.to(device=device, dtype=dtype).eval()
    if base in QUANTIZED:
        from gptkernels.quantize import quantize

        quantize(model, *QUANTIZED[base], calibrate=calibrate)
    if base in TORCHAO:
        _torchao_quantize(model, TORCHAO[base])
    if base == "compile":
        return model, torch.compile(model)
    return model, model


def _torchao_quantize(model, config_name):
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise ProfileError(f"the torchao providers need torchao (pip install torchao): {e}") from e
    tq.quantize_(model, getattr(tq, config_name)(),
                 filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")


def _percentile(xs, q):
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else None


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


# ------------------------------------------------------------------------------------------------ profile
def profile(model="gpt2", batch=1, prompt_len=128, new_tokens=128, providers=PROVIDERS, device=None, dtype=None,
            repeats=3, warmup=1, cuda_graphs=False, trace=None, trace_provider=None, seed=0, hf=None,
            block_size=None, json_path=None, threads=None, argv=None, log=None, calibrate=None) -> dict:
    """Profile greedy generation for each provider; returns the result dict (also written to json_path).

    model: a preset name or a GPTConfig (random weights), unless hf names a local Hugging Face GPT-2 / GPT-1 /
        GPT-Neo folder.
    providers: any of "eager", "gptkernels", "compile"; cuda_graphs adds a "<provider>+graphs" row for each.
    trace: a path for a torch.profiler Chrome/Perfetto trace of one prefill and a few decode steps of
        trace_provider (default: gptkernels if profiled, else the first provider).
    threads: torch.set_num_threads for the run (the CPU kernels' OpenMP pool follows it); None keeps the default.
    calibrate: the int8 / int4 rows' scale choice, as gptkernels.quantize (None: absmax; "mse").
    log: a callable for progress lines (None: silent).
    """
    if threads is not None and threads < 1:
        raise ProfileError(f"--threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _profile(model, batch, prompt_len, new_tokens, providers, device, dtype, repeats, warmup, cuda_graphs,
                        trace, trace_provider, seed, hf, block_size, json_path, argv, log, calibrate)
    finally:
        torch.set_num_threads(before)


def _profile(model, batch, prompt_len, new_tokens, providers, device, dtype, repeats, warmup, cuda_graphs, trace,
             trace_provider, seed, hf, block_size, json_path, argv, log, calibrate=None):
    from gptkernels.bench.env import fingerprint

    say = log or (lambda msg: None)
    device, dtype = _resolve_device_dtype(device, dtype)
    providers = list(providers)
    bad = [p for p in providers if p not in PROVIDERS and p not in QUANTIZED and p not in TORCHAO]
    if bad or not providers:
        raise ProfileError(f"unknown provider(s) {', '.join(bad) or '(none given)'}; "
                           f"choose from {', '.join((*PROVIDERS, *QUANTIZED, *TORCHAO))}")
    if calibrate not in (None, "absmax", "mse"):
        raise ProfileError(f"--calibrate must be absmax or mse, got {calibrate!r}")
    if cuda_graphs:
        if device.type != "cuda":
            raise ProfileError(f"--cuda-graphs needs a CUDA device; this run is on {device} (CUDA graphs capture GPU "
                               f"kernel launches, there is nothing to capture on the CPU)")
        providers += [p + GRAPHS_SUFFIX for p in providers]
    if batch < 1 or prompt_len < 1 or new_tokens < 2 or repeats < 1 or warmup < 0:
        raise ProfileError("need batch >= 1, prompt_len >= 1, new_tokens >= 2 (at least one decode step), "
                           "repeats >= 1, warmup >= 0")
    if trace_provider is not None and trace_provider not in providers:
        raise ProfileError(f"--trace-provider {trace_provider!r} is not among the providers: {', '.join(providers)}")
    config, state_dict, weights = load_weights(model, hf, block_size, seed)
    if prompt_len + new_tokens > config.block_size:
        hint = "" if hf else f" (random weights: --block-size {prompt_len + new_tokens} makes room)"
        raise ProfileError(f"prompt_len {prompt_len} + new_tokens {new_tokens} exceeds the model's block_size "
                           f"{config.block_size}{hint}")
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=gen).to(device)

    rows, runners = {}, {}
    for p in providers:
        row = rows[p] = {"provider": p, "status": "ok", "error": None}
        try:
            model_, fwd = _build(p, config, state_dict, device, dtype, calibrate)
            r = runners[p] = _Runner(p, model_, batch, prompt_len, new_tokens, graphs=p.endswith(GRAPHS_SUFFIX))
            r.fwd = fwd
            r.make_cache()
            say(f"warming up {p} ...")
            t0 = time.perf_counter()
            with torch.no_grad():
                # A graph is captured in the first run, and compile compiles there: neither may be timed.
                for _ in range(max(warmup, 1) if r.graphs or p.startswith("compile") else warmup):
                    r.run(prompt)
            _sync(device)
            r.warmup_s = time.perf_counter() - t0
        except Exception as e:  # a provider that cannot run is a row with its reason, not a crash
            row.update(status="failed", error=f"{type(e).__name__}: {e}".strip()[:2000])
            runners.pop(p, None)
            say(f"{p} failed: {row['error'].splitlines()[0]}")

    samples = {p: {"prefill": [], "decode": [], "mem": 0} for p in runners}
    tokens, stable = {}, {}  # greedy tokens of the last repeat; whether every repeat gave the same
    with torch.no_grad():
        for rep in range(repeats):
            for p, r in runners.items():
                try:
                    if device.type == "cuda":
                        _sync(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    pre, dec, out = r.run(prompt)
                    # Read right after the provider ran (a compiled model replays the record, see _dispatch).
                    r.backends = backends_used(QUANTIZED_OPS if p.removesuffix(GRAPHS_SUFFIX) in QUANTIZED
                                               else MODEL_OPS)
                    if device.type == "cuda":
                        used = torch.cuda.max_memory_allocated(device) - base + getattr(r, "graph_pool_bytes", 0)
                        samples[p]["mem"] = max(samples[p]["mem"], used)
                    samples[p]["prefill"].append(pre)
                    samples[p]["decode"] += dec
                    out = out.cpu()
                    stable[p] = stable.get(p, True) and (p not in tokens or torch.equal(tokens[p], out))
                    tokens[p] = out
                except Exception as e:
                    rows[p].update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
            say(f"repeat {rep + 1}/{repeats} done")
        from gptkernels.bench.roofline import measure

        say("measuring the copy ceiling ...")
        ceiling = measure(device, quick=True)
        for p in list(runners):
            if rows[p]["status"] != "ok":
                runners.pop(p)
        if device.type == "cpu":
            for p, r in runners.items():
                try:
                    samples[p]["mem"] = _peak_cpu_alloc_bytes(lambda r=r: r.run(prompt))
                except Exception as e:  # the timings stand without it; the row says why memory is missing
                    samples[p]["mem"] = None
                    rows[p]["peak_mem_error"] = f"{type(e).__name__}: {e}"[:500]

    ref = tokens.get("eager")
    for p, r in runners.items():
        s, row = samples[p], rows[p]
        dec = s["decode"]
        mean = float(np.mean(dec))
        weights_b, kv_b = _param_bytes(r.model), r.cache.nbytes()
        read_b = weight_bytes_per_step(r.model)
        gbps = read_b / (_percentile(dec, 50) * 1e-3) / 1e9  # per step = per token (B tokens, B x the bytes / B)
        # A graph row against the same model run step by step: the same kernels, so the same tokens.
        base = p.removesuffix(GRAPHS_SUFFIX)
        match_step = bool(torch.equal(tokens[p], tokens[base])) if p != base and base in tokens else None
        row.update({
            "backend": backend_summary(r.backends),
            "backends": r.backends,
            "prefill_ms": _r(np.median(s["prefill"])),
            "prefill_ms_all": [_r(x) for x in s["prefill"]],
            "decode_ms_p50": _r(_percentile(dec, 50)),
            "decode_ms_p90": _r(_percentile(dec, 90)),
            "decode_ms_p99": _r(_percentile(dec, 99)),
            "decode_ms_mean": _r(mean),
            "decode_steps_timed": len(dec),
            # B tokens come out of each decode step; at the median step, the measurement speedup_decode_vs_eager uses.
            "tokens_per_s": _r(batch * 1e3 / _percentile(dec, 50), 2),
            "e2e_tokens_per_s": _r(batch * new_tokens * 1e3 / (np.median(s["prefill"]) + mean * (new_tokens - 1)),
                                   2),
            "peak_mem_mb": None if s["mem"] is None else _r((weights_b + kv_b + s["mem"]) / 2**20, 2),
            "weights_mb": _r(weights_b / 2**20, 2),
            "kv_cache_mb": _r(kv_b / 2**20, 2),
            "activations_peak_mb": None if s["mem"] is None else _r(s["mem"] / 2**20, 2),
            "weight_bytes_per_token": _r(read_b / batch, 1),
            "weight_gbps": _r(gbps, 3),
            "pct_copy_ceiling": _r(100 * gbps / ceiling["copy_gbps"], 1),
            "warmup_s": _r(r.warmup_s, 3),
            "tokens_match_eager": None if ref is None else bool(torch.equal(tokens[p], ref)),
            "tokens_match_step_by_step": match_step,
            "tokens_same_every_repeat": stable[p],
            "tokens": tokens[p][0].tolist(),
        })
    eager = rows.get("eager")
    for row in rows.values():
        ok = row["status"] == "ok" and eager is not None and eager["status"] == "ok"
        row["speedup_prefill_vs_eager"] = _r(eager["prefill_ms"] / row["prefill_ms"], 3) if ok else None
        row["speedup_decode_vs_eager"] = _r(eager["decode_ms_p50"] / row["decode_ms_p50"], 3) if ok else None

    result = {
        "kind": "gptkernels.profile",
        "model": os.fspath(hf) if hf else (model if isinstance(model, str) else "custom"),
        "config": config.to_dict(),
        "weights": weights,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decode_steps_per_run": new_tokens - 1,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "repeats": repeats,
        "warmup_runs": warmup,
        "cuda_graphs": cuda_graphs,
        "calibrate": calibrate,
        "decoding": "greedy (argmax), KV cache; a decode step = forward of (B, 1) + argmax",
        "timing": ("cuda events per step, one synchronize per run" if device.type == "cuda"
                   else "time.perf_counter per step (CPU kernels are synchronous)"),
        "peak_mem_method": CUDA_MEM_METHOD if device.type == "cuda" else CPU_MEM_METHOD,
        "weight_bandwidth_method": WEIGHT_BW_METHOD,
        "ceiling": {k: ceiling[k] for k in ("copy_gbps", "copy_bytes", "copy_ms", "copy_formula", "timer")},
        "env": fingerprint(device, argv),
        "rows": [rows[p] for p in providers],
        "trace": None,
    }
    if trace:
        tp = trace_provider or ("gptkernels" if "gptkernels" in runners else next(iter(runners), None))
        if tp not in runners:
            raise ProfileError(f"--trace: provider {tp!r} did not run (ran: {', '.join(runners) or 'none'})")
        write_trace(runners[tp], prompt, trace)
        result["trace"] = {"path": os.fspath(trace), "provider": tp}
    if json_path:
        d = os.path.dirname(os.fspath(json_path))
        if d:
            os.makedirs(d, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


def write_trace(runner: _Runner, prompt, path, decode_steps=4):
    """A torch.profiler Chrome/Perfetto trace (open in ui.perfetto.dev) of one prefill and a few decode steps."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    device = prompt.device
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = min(decode_steps, runner.new_tokens - 1)
    with torch.no_grad(), torch_profile(activities=acts, record_shapes=True) as prof:
        runner.cache.reset()
        with record_function("prefill"):
            tok = runner.prefill(prompt)
        if runner.graph is not None:
            runner.static_tok.copy_(tok)
        for i in range(steps):
            with record_function(f"decode_step_{i}"):
                if runner.graph is not None:
                    runner.graph.replay()
                else:
                    tok = runner.step(tok)
        _sync(device)
    if runner.graph is not None:
        runner.cache.sync_length()
    d = os.path.dirname(os.fspath(path))
    if d:
        os.makedirs(d, exist_ok=True)
    prof.export_chrome_trace(os.fspath(path))


# ---------------------------------------------------------------------------------------------------- CLI
def format_table(result: dict) -> str:
    head = (f"{result['model']}  batch {result['batch']}  prompt {result['prompt_len']}  new {result['new_tokens']}  "
            f"{result['dtype']} on {result['env']['device_name'] or result['device']}  ({result['weights']}, "
            f"{result['repeats']} repeat{'s' if result['repeats'] != 1 else ''}, "
            f"{_runtime.threads_text(result['env']['torch_threads'])})")
    cols = ("provider", "backend", "prefill ms", "decode p50", "p90", "p99", "p50 tok/s", "peak MB", "wt MB/tok",
            "% copy BW", "x eager pre", "x eager dec", "same tokens")
    lines = [head, "  ".join(f"{c:>11}" if i > 1 else f"{c:<16}" if i == 0 else f"{c:<8}" for i, c in enumerate(cols))]

    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"

    for row in result["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['provider']:<16}  failed: {row['error'].splitlines()[0] if row['error'] else '?'}")
            continue
        same = "-" if row["tokens_match_eager"] is None else ("yes" if row["tokens_match_eager"] else "NO")
        vals = (f(row["prefill_ms"]), f(row["decode_ms_p50"]), f(row["decode_ms_p90"]), f(row["decode_ms_p99"]),
                f(row["tokens_per_s"], 1), f(row["peak_mem_mb"], 1), f(row["weight_bytes_per_token"] / 1e6, 3),
                f(row["pct_copy_ceiling"], 1), f(row["speedup_prefill_vs_eager"], 2),
                f(row["speedup_decode_vs_eager"], 2), same)
        lines.append(f"{row['provider']:<16}  {row['backend']:<8}  " + "  ".join(f"{v:>11}" for v in vals))
    lines.append(f"peak memory: {result['peak_mem_method']}")
    lines.append(f"% copy BW: weight bytes per token / decode p50 per token, against the copy ceiling of this run, "
                 f"{result['ceiling']['copy_gbps']:.1f} GB/s (KV cache not counted)")
    if result.get("trace"):
        lines.append(f"trace ({result['trace']['provider']}): {result['trace']['path']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default="gpt2", help="preset for random weights (default gpt2); see GPTConfig")
    parser.add_argument("--hf", default=None, metavar="PATH",
                     help="a local Hugging Face GPT-2, GPT-1 (openai-gpt) or GPT-Neo "
                     "folder (no download)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="override the preset's block_size (random weights), to fit prompt + new tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (>= 2)")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all), plus int8 / int4: "
                        "gptkernels with weight-only quantized linear layers, and torchao-int8: torchao's int8 "
                        "weight-only quantization of the eager model, for comparison (needs torchao)")
    parser.add_argument("--quantize", default=None, metavar="int8,int4",
                        help="add rows for weight-only quantized models (int8 per channel, int4 groups of 128; "
                        "lm_head stays float)")
    parser.add_argument("--calibrate", default=None, choices=("absmax", "mse"),
                        help="the quantized rows' scales: absmax (default) or mse (per-group clip search)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per provider (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per provider first (default 1)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also replay each provider's decode step from a CUDA graph (CUDA only)")
    parser.add_argument("--trace", default=None, metavar="PATH",
                        help="write a torch.profiler Chrome/Perfetto trace of one prefill + 4 decode steps")
    parser.add_argument("--trace-provider", default=None, help="provider to trace (default gptkernels)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    parser.add_argument("--seed", type=int, default=0, help="weights (random init) and prompt seed")


def run(args) -> int:
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    providers += [q.strip() for q in (args.quantize or "").split(",") if q.strip() and q.strip() not in providers]
    argv = getattr(args, "argv", None)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = f" ({_runtime.threads_text(args.threads)})" if device.startswith("cpu") else ""
    print(f"gptkernels profile: device {device}{threads}, gptkernels backend {_runtime.backend_text()}",
          file=sys.stderr, flush=True)
    try:
        result = profile(args.model, args.batch, args.prompt_len, args.new_tokens, providers, args.device,
                         args.dtype, args.repeats, args.warmup, args.cuda_graphs, args.trace, args.trace_provider,
                         args.seed, args.hf, args.block_size, args.json, args.threads, argv=argv,
                         log=lambda m: print(m, file=sys.stderr, flush=True), calibrate=args.calibrate)
    except ProfileError as e:
        print(f"gptkernels profile: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        print(f"json: {args.json}")
    return 0 if all(r["status"] == "ok" for r in result["rows"]) else 1


def main(argv=None) -> int:
    """python -m gptkernels.profile: the same as python -m gptkernels profile."""
    from gptkernels.cli import main as cli_main

    return cli_main(["profile", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
