"""Next-token sampling with Hugging Face's logits processors and warpers, reproducible with a torch.Generator.

Order of application (transformers' ``GenerationMixin._get_logits_processor``): the processors that read the token
history first, then, when sampling, the warpers:

    repetition_penalty      tokens already in the history: positive logits / penalty, negative ones * penalty
    no_repeat_ngram_size    -inf on every token that would complete an n-gram already in the history
    ---- greedy (temperature 0) takes the argmax here; sampling goes on ----
    temperature             logits / temperature
    top_k                   -inf below the k-th largest logit
    top_p                   -inf on the least likely tokens whose total probability is <= 1 - top_p
    min_p                   -inf on tokens whose probability < min_p * the top token's probability

Each warper keeps at least one token (min_tokens_to_keep = 1). Logits are (B, V) and each row has its own history
``seq`` (B, L): the full sequence so far, prompt included, as HF's ``input_ids``. The processed logits are fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------ processors
def apply_repetition_penalty(logits, seq, penalty: float):
    """logits: (B, V), seq: (B, L) token ids in [0, V). Every token that occurs in its row of seq has a positive
    logit divided by penalty and a negative one multiplied by it (penalty > 1 makes repeats less likely, whatever the
    sign). HF's RepetitionPenaltyLogitsProcessor."""
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, seq, True)  # (B, V)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def ban_repeated_ngrams(logits, seq, ngram_size: int):
    """logits: (B, V), seq: (B, L) token ids in [0, V). -inf on every token t whose row ends with the n-1 tokens of
    an n-gram (n = ngram_size) that occurs in the row followed by t: no n-gram repeats. n = 1 bans every token seen.
    HF's NoRepeatNGramLogitsProcessor."""
    n = ngram_size
    B, L = seq.shape
    if L < n:  # no complete n-gram in the history yet
        return logits
    grams = seq.unfold(1, n, 1)  # (B, L - n + 1, n): every n-gram of every row
    tail = seq[:, L - n + 1:]  # (B, n - 1): what the next token extends
    hit = (grams[..., :-1] == tail[:, None, :]).all(dim=-1)  # (B, L - n + 1); n = 1: all() of nothing is True
    # amax, not a plain scatter: a token that ends a hit and also a miss must stay banned (scatter order is undefined).
    banned = torch.zeros(logits.shape, device=logits.device).scatter_reduce_(1, grams[..., -1], hit.float(), "amax")
    return logits.masked_fill(banned > 0, _NEG_INF)


def top_k_filter(logits, top_k: int):
    """-inf on the logits below each row's top_k-th largest (ties with it are kept). HF's TopKLogitsWarper."""
    if top_k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, _NEG_INF)


def top_p_filter(logits, top_p: float):
    """Nucleus: -inf on the least likely tokens while their total probability stays <= 1 - top_p, so the most likely
    tokens that remain hold more than top_p of it; the most likely token always stays. HF's TopPLogitsWarper: the
    probabilities are summed in its order (ascending), so rounding puts the cut at the same token."""
    if top_p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)  # (B, V)
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = tail_mass <= 1 - top_p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), _NEG_INF)


def min_p_filter(logits, min_p: float):
    """-inf on tokens whose probability is below min_p times the row's top probability. HF's MinPLogitsWarper. The
    top token always stays (no explicit keep needed): min_p <= 1 and rounding is monotone, so min_p * top <= top."""
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), _NEG_INF)


# --------------------------------------------------------------------------------------------------- sampling
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Sampling:
    """Validated sampling settings; build once, then :meth:`sample` (or :meth:`process`) every step.

    temperature: >= 0; 0 (below 1e-8) is greedy: argmax after the history processors, no warper runs.
    top_k: int >= 1 or None. top_p: in (0, 1] or None. min_p: in [0, 1] or None.
    repetition_penalty: > 0 or None (1.0: no change). no_repeat_ngram_size: int >= 1 or None.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None

    def __post_init__(self):
        t, k, p, m, r, n = (self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                            self.no_repeat_ngram_size)
        if not _is_number(t) or not t >= 0 or math.isinf(t):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if k is not None and (not _is_int(k) or k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {k!r}")
        if p is not None and (not _is_number(p) or not 0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")
        if m is not None and (not _is_number(m) or not 0.0 <= m <= 1.0):
            raise ValueError(f"min_p must be in [0, 1] or None, got {m!r}")
        if r is not None and (not _is_number(r) or not r > 0 or math.isinf(r)):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = off) or None, got {r!r}")
        if n is not None and (not _is_int(n) or n < 1):
            raise ValueError(f"no_repeat_ngram_size must be an int >= 1 or None, got {n!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-8

    @property
    def needs_history(self) -> bool:
        return (self.repetition_penalty not in (None, 1.0)) or self.no_repeat_ngram_size is not None

    def process(self, logits, seq=None):
        """logits (B, V) -> fp32 (B, V) after the processors and, unless greedy, the warpers (module docstring)."""
        logits = logits.float()
        if self.needs_history:
            if seq is None or seq.dim() != 2 or seq.shape[0] != logits.shape[0]:
                got = None if seq is None else tuple(seq.shape)
                raise ValueError(f"repetition_penalty / no_repeat_ngram_size need the token history seq "
                                 f"({logits.shape[0]}, L), got {got}")
            seq = seq.to(logits.device)
            if self.repetition_penalty not in (None, 1.0):
                logits = apply_repetition_penalty(logits, seq, self.repetition_penalty)
            if self.no_repeat_ngram_size is not None:
                logits = ban_repeated_ngrams(logits, seq, self.no_repeat_ngram_size)
        if self.greedy:
            return logits
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.top_k is not None:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p is not None:
            logits = top_p_filter(logits, self.top_p)
        if self.min_p is not None:
            logits = min_p_filter(logits, self.min_p)
        return logits

    def sample(self, logits, seq=None, generator: torch.Generator | None = None):
        """logits: (B, V), seq: (B, L) the history (needed by the history processors). Returns (B, 1) int64 ids."""
        logits = self.process(logits, seq)
        if self.no_repeat_ngram_size is not None and not bool(torch.isfinite(logits).any(dim=-1).all()):
            # Only the n-gram ban can remove every token (each warper keeps one); HF would go on with token 0
            # (greedy) or fail in multinomial (sampling). One host sync per step, only with the ban on.
            raise ValueError(f"no_repeat_ngram_size {self.no_repeat_ngram_size} bans every token of the vocabulary "
                             f"({logits.shape[-1]}) for some row; use a larger size or a shorter generation")
        if self.greedy:
            return logits.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(logits, dim=-1)
        if generator is not None and generator.device != probs.device:
            # Draw on the generator's device so a CPU generator gives the same tokens for CPU and GPU runs.
            return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
        return torch.multinomial(probs, 1, generator=generator)


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None, *, seq=None, min_p: float | None = None,
                repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None):
    """logits: (B, V), seq: (B, L) the token history (prompt + generated; needed by repetition_penalty and
    no_repeat_ngram_size). Returns (B, 1) int64 token ids drawn with ``generator`` (argmax when temperature is 0).
    The arguments and their order of application are those of :class:`Sampling` (see the module docstring)."""
    return Sampling(temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size).sample(
        logits, seq, generator)
