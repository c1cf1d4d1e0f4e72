"""Triton's native variable-length attention: attention_varlen_fwd/bwd, whose kernels read cu_seqlens, and
flash_attn_varlen_func(backend="triton") on top of them.

Every case packs sequences of random-ish lengths (0 and 1 included, Tq != Tk per sequence, more than one 16-row tile)
and checks out, lse and dq/dk/dv against attention_ref (gptkernels/ops/attention.py) run in fp64 on each sequence
alone. On CPU the kernels run in the Triton interpreter (tiny fp32/fp16 shapes; bf16 tl.dot is wrong in the
interpreter); on a GPU the same cases run compiled.
"""

import contextlib
import math

import pytest
import torch
from conftest import HAS_CUDA, INTERPRET, assert_close

pytest.importorskip("triton")

from test_attention_triton_spec import spec_attention  # noqa: E402  (naive attention in the input dtype)

import gptkernels as gk  # noqa: E402  (after the skip: importing it may import triton)
from gptkernels.ops._common import registered_op  # noqa: E402
from gptkernels.ops.attention import attention_ref  # noqa: E402
from gptkernels.triton import attention as tl_attn  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not HAS_CUDA and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")

# (lengths q, lengths k): an empty query sequence with keys, an empty key sequence with queries (rows that see
# nothing), a one-token sequence, Tq > Tk and Tq < Tk (bottom-right alignment per sequence), 17 rows (two tiles).
LQ, LK = [5, 0, 17, 1, 9], [7, 3, 17, 4, 0]


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def packed_inputs(lq, lk, H, Hkv, D, dtype, alibi=None, nseq=None):
    """q (total_q, H, D), k, v (total_k, Hkv, D), dout, and slopes: "seq" (nseq, H), "head" (H,) or None."""
    q = torch.randn(sum(lq), H, D, device=DEVICE).to(dtype)
    k = torch.randn(sum(lk), Hkv, D, device=DEVICE).to(dtype)
    v = torch.randn(sum(lk), Hkv, D, device=DEVICE).to(dtype)
    dout = torch.randn(sum(lq), H, D, device=DEVICE).to(dtype)
    slopes = None
    if alibi == "seq":
        slopes = torch.rand(len(lq), H, device=DEVICE) * 0.5 + 0.05
    elif alibi == "head":
        slopes = torch.rand(H, device=DEVICE) * 0.5 + 0.05
    return q, k, v, dout, slopes


@contextlib.contextmanager
def poisoned_allocations():
    """Meanwhile torch.empty and torch.empty_like return NaN-filled float tensors: the launchers' outputs and
    buffers start poisoned, so an element that no program writes fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def run_ours(q, k, v, dout, lq, lk, slopes, scale, left, right, softcap, dropout_p=0.0, seed=0, max_len=None):
    """attention_varlen_fwd and _bwd on poisoned allocations; max_len: (max_q, max_k), default the longest."""
    cq, ck = cu(lq), cu(lk)
    mq, mk = max_len or (max(lq), max(lk))
    args = (slopes, scale, left, right, True, softcap, dropout_p, seed)
    with poisoned_allocations():
        out, lse = tl_attn.attention_varlen_fwd(q, k, v, cq, ck, mq, mk, *args)
        dq, dk, dv = tl_attn.attention_varlen_bwd(dout, q, k, v, out, lse, cq, ck, mq, mk, *args)
    return out, lse, dq, dk, dv


def _slope(slopes, b):
    return None if slopes is None else slopes if slopes.dim() == 1 else slopes[b]


def run_ref(dtype, q, k, v, dout, lq, lk, slopes, scale, left, right, softcap, keep=None, dropout_p=0.0,
            naive=False):
    """Each sequence alone, concatenated: attention_ref (fp32/fp64 math), or naive attention in dtype itself
    (naive=True: the 16-bit yardstick), and the gradients with the shared dout. keep: per-sequence (H, Tq, Tk)
    dropout masks. Returns (out, lse (H, total_q), dq, dk, dv)."""
    q, k, v = (t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v))
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    outs, lses = [], []
    for b in range(len(lq)):
        qb, kb, vb = (t.transpose(0, 1) for t in (q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]))
        slope = _slope(slopes, b)
        slope = None if slope is None else slope.cpu().to(dtype)
        if naive:
            H = qb.shape[0]
            o, lse = spec_attention(qb[None], kb[None], vb[None], None, None if slope is None else slope.expand(1, H),
                                    scale, left, right, True, softcap)
            o, lse = o[0], lse[0]
        else:
            o, lse = attention_ref(qb, kb, vb, None, dropout_p, scale=scale, window_size=(left, right),
                                   bottom_right=True, softcap=softcap, alibi_slopes=slope,
                                   dropout_mask=None if keep is None else keep[b], return_lse=True)
        outs.append(o.transpose(0, 1))
        lses.append(lse)
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, (q, k, v), dout.cpu().to(dtype))
    return (out.detach(), torch.cat(lses, 1).detach(), *grads)


def check_lse(lse, ref):
    """-inf exactly on the reference's empty rows, the fp32 bound elsewhere."""
    lse, ref = lse.cpu().double(), ref.cpu().double()
    empty = ref == -math.inf
    assert torch.equal(lse == -math.inf, empty), "lse: -inf rows differ from the reference's empty rows"
    assert_close(lse[~empty], ref[~empty], name="lse")


# ------------------------------------------------------------------------------------------------ fp32 cases
def C(name, H=2, Hkv=2, D=16, left=-1, right=-1, softcap=0.0, alibi=None):
    return pytest.param(H, Hkv, D, left, right, softcap, alibi, id=name)


FP32_CASES = [
    C("plain"),
    C("causal-gqa-d40", H=4, Hkv=2, D=40, right=0),
    C("window-mqa", H=4, Hkv=1, left=3, right=1),
    C("softcap-alibi-seq-causal", right=0, softcap=1.5, alibi="seq"),
    C("alibi-head-left-only-d40", D=40, left=4, alibi="head"),
    C("everything-gqa-d40", H=4, Hkv=2, D=40, left=5, right=2, softcap=2.0, alibi="seq"),
]


@pytest.mark.parametrize("H, Hkv, D, left, right, softcap, alibi", FP32_CASES)
def test_varlen_fp32(H, Hkv, D, left, right, softcap, alibi):
    q, k, v, dout, slopes = packed_inputs(LQ, LK, H, Hkv, D, torch.float32, alibi)
    scale = D**-0.5
    ours = run_ours(q, k, v, dout, LQ, LK, slopes, scale, left, right, softcap)
    ref = run_ref(torch.float64, q, k, v, dout, LQ, LK, slopes, scale, left, right, softcap)
    assert ours[0].shape == q.shape and ours[1].shape == (H, sum(LQ)) and ours[1].dtype == torch.float32
    check_lse(ours[1], ref[1])
    for name, i in (("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        assert_close(ours[i], ref[i], name=name)
    # Exact zeros, not rounding noise: rows that see nothing (sequence 4 has no key) and keys no row sees
    # (sequence 1 has no query).
    cq, ck = cu(LQ).tolist(), cu(LK).tolist()
    assert (ours[0][cq[4]:cq[5]] == 0).all() and (ours[2][cq[4]:cq[5]] == 0).all()
    assert (ours[3][ck[1]:ck[2]] == 0).all() and (ours[4][ck[1]:ck[2]] == 0).all()


def test_varlen_noncontiguous_inputs_and_expanded_dout():
    """q, k, v as slices of one packed qkv tensor (row stride 3 H D), dout expanded with stride 0 (y.sum())."""
    H, D = 2, 16
    qkv = torch.randn(sum(LQ), 3, H, D, device=DEVICE)
    kv_extra = torch.randn(sum(LK), 2, H, D, device=DEVICE)
    q, k, v = qkv[:, 0], kv_extra[:, 0], kv_extra[:, 1]
    dout = torch.ones(1, 1, 1, device=DEVICE).expand(sum(LQ), H, D)
    ours = run_ours(q, k, v, dout, LQ, LK, None, 0.3, -1, 0, 0.0)
    ref = run_ref(torch.float64, q, k, v, dout, LQ, LK, None, 0.3, -1, 0, 0.0)
    for name, i in (("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        assert_close(ours[i], ref[i], name=name)


# ---------------------------------------------------------------------------------------------- fp16 cases
FP16_CASES = [
    C("causal-gqa-d40", H=4, Hkv=2, D=40, right=0),
    C("softcap-alibi-window", left=4, right=0, softcap=1.5, alibi="seq"),
]


@pytest.mark.parametrize("H, Hkv, D, left, right, softcap, alibi", FP16_CASES)
def test_varlen_fp16(H, Hkv, D, left, right, softcap, alibi):
    """The flash-attention rule: error vs fp64 within 2x that of naive attention in fp16 (+ the floors)."""
    q, k, v, dout, slopes = packed_inputs(LQ, LK, H, Hkv, D, torch.float16, alibi)
    scale = D**-0.5
    ours = run_ours(q, k, v, dout, LQ, LK, slopes, scale, left, right, softcap)
    ref = run_ref(torch.float64, q, k, v, dout, LQ, LK, slopes, scale, left, right, softcap)
    eager = run_ref(torch.float16, q, k, v, dout, LQ, LK, slopes, scale, left, right, softcap, naive=True)
    assert ours[0].dtype == torch.float16 and ours[2].dtype == torch.float16
    for name, i in (("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        assert_close(ours[i], ref[i], eager[i], name=name)


# --------------------------------------------------------------------------------------- sequence isolation
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's, in the interpreter
def test_nan_stays_in_its_sequence():
    """NaN in q, k and v of the tokens that border sequence 1 (the last of sequence 0, the first of sequence 2): a
    program that read across a sequence boundary would carry it into sequence 1. Sequence 1 must equal the
    reference computed on it alone; sequences 0 and 2 get NaN (the NaN rule), sequence 3 stays finite."""
    lq, lk = [7, 17, 5, 3], [9, 17, 6, 3]
    H, Hkv, D = 4, 2, 16
    q, k, v, dout, _ = packed_inputs(lq, lk, H, Hkv, D, torch.float32)
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    for t, c in ((q, cq), (k, ck), (v, ck)):
        t[c[1] - 1] = math.nan  # last token of sequence 0
        t[c[2]] = math.nan  # first token of sequence 2
    out, lse, dq, dk, dv = run_ours(q, k, v, dout, lq, lk, None, 0.25, -1, -1, 0.0)
    rows, keys = slice(cq[1], cq[2]), slice(ck[1], ck[2])
    ref = run_ref(torch.float64, q[rows], k[keys], v[keys], dout[rows], [lq[1]], [lk[1]], None, 0.25, -1, -1, 0.0)
    for name, t, r in (("out", out[rows], ref[0]), ("lse", lse[:, rows], ref[1]), ("dq", dq[rows], ref[2]),
                       ("dk", dk[keys], ref[3]), ("dv", dv[keys], ref[4])):
        assert_close(t, r, name=f"sequence 1 {name}")
    for name, t, c in (("out", out, cq), ("dq", dq, cq), ("dk", dk, ck), ("dv", dv, ck)):
        assert torch.isnan(t[c[0]:c[1]]).any() and torch.isnan(t[c[2]:c[3]]).any(), f"{name}: NaN rule"
        assert torch.isfinite(t[c[3]:c[4]]).all(), f"{name}: sequence 3 must stay finite"


def test_max_seqlen_above_every_length():
    """max_seqlen larger than any sequence (as a caller may pass a bucket size): whole tiles of the grid exit at
    once, and every element is still written (run_ours poisons the allocations)."""
    lq, lk = [1, 17, 0, 2], [3, 0, 17, 2]
    q, k, v, dout, _ = packed_inputs(lq, lk, 2, 1, 16, torch.float32)
    ours = run_ours(q, k, v, dout, lq, lk, None, 0.25, -1, 0, 0.0, max_len=(40, 50))
    ref = run_ref(torch.float64, q, k, v, dout, lq, lk, None, 0.25, -1, 0, 0.0)
    check_lse(ours[1], ref[1])
    for name, i in (("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        assert_close(ours[i], ref[i], name=name)


# --------------------------------------------------------------------------------------------------- dropout
DROP_LQ, DROP_LK = [9, 9, 13, 1], [12, 12, 16, 5]  # every Tk <= D: one forward with one-hot v reveals every keep


def revealed_keep(q, k, lq, lk, p, seed, right):
    """The forward's keep decisions, per sequence (H, Tq, Tk): with v[key j of sequence b] = e_j, out[i, h, j] is
    p_ij keep_ij / (1 - p). Returns (keep masks, revealed weights)."""
    total_k, Hkv, D = k.shape
    ck = cu(lk).tolist()
    v = torch.zeros(total_k, Hkv, D, device=DEVICE)
    for b in range(len(lk)):
        v[ck[b]:ck[b + 1], :, :lk[b]] = torch.eye(lk[b], device=DEVICE)[:, None, :]
    with poisoned_allocations():
        out, _ = tl_attn.attention_varlen_fwd(q, k, v, cu(lq), cu(lk), max(lq), max(lk), None, D**-0.5, -1, right,
                                              True, 0.0, p, seed)
    cq = cu(lq).tolist()
    weights = [out[cq[b]:cq[b + 1], :, :lk[b]].transpose(0, 1).double().cpu() for b in range(len(lq))]
    return [w != 0 for w in weights], weights


@pytest.mark.parametrize("right", [-1, 0], ids=["", "causal"])
def test_dropout_keep_rate_scale_and_backward(right):
    """Keep rate Bernoulli(1 - p) within 5 sigma; kept weights scaled by exactly 1/(1 - p); the decision depends on
    the sequence (two sequences with identical tokens) and the head; forward and every gradient equal the fp64
    reference that applies the revealed keep masks, so the backward regenerated the forward's decisions."""
    p, seed, H, D = 0.3, 1234, 4, 16
    q, k, v, dout, _ = packed_inputs(DROP_LQ, DROP_LK, H, 2, D, torch.float32)
    q[9:18], k[12:24] = q[:9], k[:12]  # sequence 1 repeats sequence 0
    keep, weights = revealed_keep(q, k, DROP_LQ, DROP_LK, p, seed, right)
    cq, ck = cu(DROP_LQ).tolist(), cu(DROP_LK).tolist()
    n, kept_total = 0, 0
    for b in range(len(DROP_LQ)):
        # The softmax itself: attention_ref with v = identity.
        prob = attention_ref(q[cq[b]:cq[b + 1]].transpose(0, 1).double().cpu(),
                             k[ck[b]:ck[b + 1]].transpose(0, 1).double().cpu(),
                             torch.eye(DROP_LK[b], dtype=torch.float64).expand(2, -1, -1), scale=D**-0.5,
                             window_size=(-1, right), bottom_right=True)
        vis = prob > 0
        n += vis.sum().item()
        kept_total += keep[b][vis].sum().item()
        kept = keep[b] & vis
        assert_close(weights[b][kept], prob[kept] / (1 - p), name=f"sequence {b} kept weights")
        assert not keep[b][~vis].any(), "a key that is not visible cannot be revealed as kept"
    rate = kept_total / n
    assert abs(rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), f"keep rate {rate:.4f} over {n} weights"
    assert not torch.equal(keep[0], keep[1]), "identical sequences 0 and 1 must get different masks"
    assert not torch.equal(keep[2][0], keep[2][1]), "heads must get different masks"
    ours = run_ours(q, k, v, dout, DROP_LQ, DROP_LK, None, D**-0.5, -1, right, 0.0, p, seed)
    ref = run_ref(torch.float64, q, k, v, dout, DROP_LQ, DROP_LK, None, D**-0.5, -1, right, 0.0, keep=keep,
                  dropout_p=p)
    for name, i in (("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        assert_close(ours[i], ref[i], name=f"dropout {name}")


def test_dropout_same_seed_same_result():
    q, k, v, dout, _ = packed_inputs(DROP_LQ, DROP_LK, 2, 2, 16, torch.float32)
    a = run_ours(q, k, v, dout, DROP_LQ, DROP_LK, None, 0.25, -1, 0, 0.0, 0.25, 77)
    b = run_ours(q, k, v, dout, DROP_LQ, DROP_LK, None, 0.25, -1, 0, 0.0, 0.25, 77)
    c = run_ours(q, k, v, dout, DROP_LQ, DROP_LK, None, 0.25, -1, 0, 0.0, 0.25, 78)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]), "a different seed must drop different weights"


# ------------------------------------------------------------------------------------------------ public API
def test_flash_attn_varlen_func_runs_native_and_says_so():
    """backend="triton" runs the varlen kernels (explain() says so), with int64 offsets, GQA, ALiBi and
    return_attn_probs, and matches the reference; the cpu backend still pads or loops, and says which."""
    lq, lk = [5, 0, 17, 1], [7, 3, 17, 4]
    H, Hkv, D = 4, 2, 16
    q, k, v, dout, slopes = packed_inputs(lq, lk, H, Hkv, D, torch.float32, "seq")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cq, ck = cu(lq).long(), cu(lk).long()
    out, lse, none = gk.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=True, window_size=(6, -1),
                                               softcap=1.5, alibi_slopes=slopes, return_attn_probs=True,
                                               backend="triton")
    backend, why = gk.last("flash_attn_varlen_func")
    assert backend == "triton" and "native varlen" in why, why
    assert none is None and lse.shape == (H, sum(lq))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = run_ref(torch.float64, q, k, v, dout, lq, lk, slopes, D**-0.5, 6, 0, 1.5)
    check_lse(lse, ref[1])
    for name, t, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref[0], *ref[2:])):
        assert_close(t, r, name=name)
    if DEVICE == "cpu":
        gk.flash_attn_varlen_func(q.detach(), k.detach(), v.detach(), cq, ck, max(lq), max(lk), causal=True,
                                  backend="cpu")
        backend, why = gk.last("flash_attn_varlen_func")
        assert backend == "cpu" and ("padded to max_seqlen" in why or "one dense call per sequence" in why), why


def test_opcheck():
    lq, lk = [5, 0, 17], [7, 3, 12]
    q, k, v, dout, slopes = packed_inputs(lq, lk, 2, 1, 16, torch.float32, "seq")
    fwd, bwd = (registered_op(n, "triton") for n in ("attention_varlen_fwd", "attention_varlen_bwd"))
    for al, left, right, cap, p in ((None, -1, 0, 0.0, 0.2), (slopes, 3, 1, 1.5, 0.0)):
        args = (q, k, v, cu(lq), cu(lk), max(lq), max(lk), al, 0.25, left, right, True, cap, p, 7)
        out, lse = fwd(*args)
        torch.library.opcheck(fwd, args)
        torch.library.opcheck(bwd, (dout, q, k, v, out, lse, *args[3:]))


def test_torch_compile_fullgraph():
    """flash_attn_varlen_func(backend="triton") traces into one graph through the custom ops and their fakes."""
    torch._dynamo.reset()
    lq, lk = [5, 17, 1], [7, 17, 4]
    q, k, v, dout, _ = packed_inputs(lq, lk, 2, 2, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cq, ck = cu(lq), cu(lk)

    def block(q, k, v):
        return gk.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=True, backend="triton") * 2

    ref = block(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    out = torch.compile(block, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert_close(out, ref, name="compiled out")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, name="compiled grad")
