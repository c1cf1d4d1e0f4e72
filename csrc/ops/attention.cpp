// Torch-facing attention ops (docs/attention_contract.md): checks, contiguous copies on purpose, the mask's
// broadcast strides, allocation, and the call into the CPU or CUDA kernels. Registered as
// gptkernels::attention_fwd / attention_bwd / decode_attention for the CPU and CUDA dispatch keys; their fake
// implementations and the autograd wiring live in gptkernels/ops/attention.py.
#include "../kernels/cpu/attention.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common.h"
#include "eager.h"
#ifdef GPTKERNELS_WITH_CUDA
#include "../kernels/cuda/attention.cuh"
#endif

namespace gptkernels {
namespace {

struct Dims {
  int64_t B, H, Hkv, Tq, Tk, D;
};

// q (B, H, Tq, D), k and v (B, Hkv, Tk, D): same dtype and device, H % Hkv == 0, D within the backend's limits.
Dims check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* kn, const char* vn) {
  TORCH_CHECK(q.dim() == 4, "q: must be 4-D (B, H, Tq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, kn, ": must be 4-D (B, Hkv, Tk, D), got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), vn, ": shape ", v.sizes(), " must match ", kn, " ", k.sizes());
  to_kernel_dtype(q.scalar_type(), "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, ", kn, ", ", vn,
                   ": dtypes must be equal, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "q, ", kn, ", ", vn,
              ": must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.is_cpu() || q.is_cuda(), "q: device must be cpu or cuda, got ", q.device());
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == d.B, kn, ": batch ", k.size(0), " must match q's ", d.B);
  TORCH_CHECK(k.size(3) == d.D, kn, ": head dim ", k.size(3), " must match q's ", d.D);
  TORCH_CHECK((d.H == 0 && d.Hkv == 0) || (d.Hkv >= 1 && d.H % d.Hkv == 0), "q heads (", d.H,
              ") must be a multiple of ", kn, " heads (", d.Hkv, ")");
  if (q.is_cuda()) {
    TORCH_CHECK(d.D % 8 == 0 && d.D >= 16 && d.D <= 256, "cuda: head_dim ", d.D,
                " not supported; supported: 16..256 step 8");
  } else {
    TORCH_CHECK(d.D >= 1 && d.D <= 256, "cpu: head_dim ", d.D, " not supported; supported: 1..256");
  }
  return d;
}

// The visibility and score modifiers of one call (kernels/common.h's AttnSpec); alibi is (B or 1, H) fp32 slopes.
struct SpecArg {
  AttnSpec spec;
  at::Tensor alibi;  // keeps the storage alive during the call
};

SpecArg spec_arg(const std::optional<at::Tensor>& alibi, const at::Tensor& q, const Dims& d, int64_t window_left,
                 int64_t window_right, bool bottom_right, double softcap, double dropout_p) {
  TORCH_CHECK(window_left >= -1, "window_left: must be >= -1 (-1: no left limit), got ", window_left);
  TORCH_CHECK(window_right >= -1, "window_right: must be >= -1 (-1: no right limit; 0: causal), got ", window_right);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "softcap: must be finite and >= 0 (0: none), got ", softcap);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: must be in [0, 1), got ", dropout_p);
  SpecArg a;
  a.spec.offset = bottom_right ? d.Tk - d.Tq : 0;
  a.spec.left = window_left;
  a.spec.right = window_right;
  a.spec.softcap = float(softcap);
  if (alibi.has_value() && alibi->defined()) {
    const at::Tensor& t = *alibi;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "alibi: dtype must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), "alibi: must be on ", q.device(), ", got ", t.device());
    TORCH_CHECK(t.dim() == 2 && (t.size(0) == 1 || t.size(0) == d.B) && t.size(1) == d.H,
                "alibi: shape must be (B, H) or (1, H) = (", d.B, ", ", d.H, "), got ", t.sizes());
    a.alibi = t.stride(1) == 1 ? t : t.contiguous();
    a.spec.alibi = a.alibi.data_ptr<float>();
    a.spec.alibi_sb = a.alibi.size(0) == 1 ? 0 : a.alibi.stride(0);
  }
  return a;
}

// A tensor the kernels can read as dense rows: contiguous, on purpose (a gradient may arrive with stride 0, a
// head-split view transposed), and for CUDA 16-byte aligned (the kernels move 16-byte vectors; a contiguous
// view at an odd storage offset is copied).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.is_cuda() && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// The additive mask's strides in the (B, H, Tq, Tk) view: mask.expand(...) gives stride 0 on broadcast dims, so a
// (1, 1, Tq, Tk) mask is read from its Tq*Tk floats and never materialized.
struct MaskArg {
  at::Tensor t;  // keeps the storage alive during the call
  const float* ptr = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
};

MaskArg mask_arg(const std::optional<at::Tensor>& mask, const at::Tensor& q, const Dims& d) {
  MaskArg m;
  if (!mask.has_value() || !mask->defined()) return m;
  const at::Tensor& t = *mask;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "mask: dtype must be float32 (additive; convert boolean masks ",
                   "first), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "mask: must be on ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, "mask: must be 4-D, broadcastable to (B, H, Tq, Tk), got shape ", t.sizes());
  const int64_t target[4] = {d.B, d.H, d.Tq, d.Tk};
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK(t.size(i) == 1 || t.size(i) == target[i], "mask: shape ", t.sizes(),
                " is not broadcastable to (B, H, Tq, Tk) = (", d.B, ", ", d.H, ", ", d.Tq, ", ", d.Tk, ")");
  const at::Tensor e = t.expand({d.B, d.H, d.Tq, d.Tk});
  m.t = t;
  m.ptr = t.data_ptr<float>();
  m.sb = e.stride(0);
  m.sh = e.stride(1);
  m.si = e.stride(2);
  m.sj = e.stride(3);
  return m;
}

#ifdef GPTKERNELS_WITH_CUDA
// The kernels for (dtype, D) need more shared memory than some GPUs give a block (sm_86 / sm_89: 99 KB).
void check_cuda_smem(const at::Tensor& q, int64_t D) {
  const size_t need = attention_cuda_smem_bytes(to_kernel_dtype(q.scalar_type(), "q"), D);
  int have = 0;
  check_cuda(cudaDeviceGetAttribute(&have, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()),
             "cudaDeviceGetAttribute");
  TORCH_CHECK(need <= size_t(have), "cuda: head_dim ", D, " ", q.scalar_type(), " needs ", need,
              " bytes of shared memory per block; this GPU allows ", have);
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                 const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& alibi, double scale,
                                                 int64_t window_left, int64_t window_right, bool bottom_right,
                                                 double softcap, double dropout_p, int64_t seed) {
  const Dims d = check_qkv(q_, k_, v_, "k", "v");
  const SpecArg sa = spec_arg(alibi, q_, d, window_left, window_right, bottom_right, softcap, dropout_p);
  const MaskArg m = mask_arg(mask, q_, d);
  const DType dt = to_kernel_dtype(q_.scalar_type(), "q");
  at::Tensor out = at::empty({d.B, d.H, d.Tq, d.D}, q_.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Tq}, q_.options().dtype(at::kFloat));
  if (d.B * d.H * d.Tq == 0) return {out, lse};
  if (d.Tk == 0) {  // every row fully masked
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor q = dense(q_), k = dense(k_), v = dense(v_);
  if (q.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    check_cuda_smem(q, d.D);
    check_cuda(launch_attention_fwd(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), m.ptr, m.sb, m.sh, m.si, m.sj,
                                    out.data_ptr(), lse.data_ptr<float>(), d.B, d.H, d.Hkv, d.Tq, d.Tk, d.D,
                                    float(scale), sa.spec, float(dropout_p), uint64_t(seed),
                                    c10::cuda::getCurrentCUDAStream(q.get_device()).stream()),
               "launch_attention_fwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    attention_fwd_cpu(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), m.ptr, m.sb, m.sh, m.si, m.sj, out.data_ptr(),
                      lse.data_ptr<float>(), d.B, d.H, d.Hkv, d.Tq, d.Tk, d.D, float(scale), sa.spec,
                      float(dropout_p), uint64_t(seed));
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout_, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const at::Tensor& out_, const at::Tensor& lse_,
                                                             const std::optional<at::Tensor>& mask,
                                                             const std::optional<at::Tensor>& alibi, double scale,
                                                             int64_t window_left, int64_t window_right,
                                                             bool bottom_right, double softcap, double dropout_p,
                                                             int64_t seed) {
  const Dims d = check_qkv(q_, k_, v_, "k", "v");
  const SpecArg sa = spec_arg(alibi, q_, d, window_left, window_right, bottom_right, softcap, dropout_p);
  TORCH_CHECK(dout_.sizes() == q_.sizes(), "dout: shape ", dout_.sizes(), " must match q ", q_.sizes());
  TORCH_CHECK(out_.sizes() == q_.sizes(), "out: shape ", out_.sizes(), " must match q ", q_.sizes());
  TORCH_CHECK_TYPE(dout_.scalar_type() == q_.scalar_type() && out_.scalar_type() == q_.scalar_type(),
                   "dout, out: dtype must be q's ", q_.scalar_type(), ", got ", dout_.scalar_type(), ", ",
                   out_.scalar_type());
  TORCH_CHECK(lse_.dim() == 3 && lse_.size(0) == d.B && lse_.size(1) == d.H && lse_.size(2) == d.Tq,
              "lse: shape must be (B, H, Tq) = (", d.B, ", ", d.H, ", ", d.Tq, "), got ", lse_.sizes());
  TORCH_CHECK_TYPE(lse_.scalar_type() == at::kFloat, "lse: dtype must be float32, got ", lse_.scalar_type());
  TORCH_CHECK(dout_.device() == q_.device() && out_.device() == q_.device() && lse_.device() == q_.device(),
              "dout, out, lse: must be on ", q_.device());
  const MaskArg m = mask_arg(mask, q_, d);
  const DType dt = to_kernel_dtype(q_.scalar_type(), "q");
  at::Tensor dq = at::empty({d.B, d.H, d.Tq, d.D}, q_.options());
  at::Tensor dk = at::empty({d.B, d.Hkv, d.Tk, d.D}, k_.options());
  at::Tensor dv = at::empty({d.B, d.Hkv, d.Tk, d.D}, k_.options());
  if (d.B * d.H * d.Tq * d.Tk == 0) {  // no (query, key) pair: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor q = dense(q_), k = dense(k_), v = dense(v_), dout = dense(dout_), out = dense(out_);
  const at::Tensor lse = lse_.contiguous();
  if (q.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    check_cuda_smem(q, d.D);
    const size_t ws_bytes = attention_bwd_workspace_bytes(d.B, d.H, d.Tq);
    at::Tensor ws = at::empty({int64_t((ws_bytes + sizeof(float) - 1) / sizeof(float))}, lse.options());
    check_cuda(launch_attention_bwd(dt, dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                    lse.data_ptr<float>(), m.ptr, m.sb, m.sh, m.si, m.sj, dq.data_ptr(), dk.data_ptr(),
                                    dv.data_ptr(), ws.data_ptr<float>(), d.B, d.H, d.Hkv, d.Tq, d.Tk, d.D, float(scale),
                                    sa.spec, float(dropout_p), uint64_t(seed),
                                    c10::cuda::getCurrentCUDAStream(q.get_device()).stream()),
               "launch_attention_bwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    attention_bwd_cpu(dt, dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                      lse.data_ptr<float>(), m.ptr, m.sb, m.sh, m.si, m.sj, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                      d.B, d.H, d.Hkv, d.Tq, d.Tk, d.D, float(scale), sa.spec, float(dropout_p), uint64_t(seed));
  }
  return {dq, dk, dv};
}

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k_cache_, const at::Tensor& v_cache_,
                            const at::Tensor& cache_seqlens, double scale, int64_t num_splits) {
  const Dims d = check_qkv(q_, k_cache_, v_cache_, "k_cache", "v_cache");  // Tq = Tn, Tk = Tmax
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == d.B, "cache_seqlens: shape must be (B,) = (", d.B,
              ",), got ", cache_seqlens.sizes());
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong,
                   "cache_seqlens: dtype must be int32 or int64, got ", cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.device() == q_.device(), "cache_seqlens: must be on ", q_.device(), ", got ",
              cache_seqlens.device());
  const DType dt = to_kernel_dtype(q_.scalar_type(), "q");
  at::Tensor out = at::empty({d.B, d.H, d.Tq, d.D}, q_.options());
  if (d.B * d.H * d.Tq == 0) return out;
  if (d.Tk == 0) {  // no cache (and so no valid L_b): nothing to attend to
    out.zero_();
    return out;
  }
  const at::Tensor q = dense(q_), k = dense(k_cache_), v = dense(v_cache_);
  if (q.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    check_cuda_smem(q, d.D);
    // Values are read on the device (checking them here would synchronize); the kernels clamp to [0, Tmax].
    const at::Tensor lens = cache_seqlens.to(at::kInt).contiguous();
    const int splits =
        decode_attention_num_splits(d.B, d.H, d.Hkv, d.Tq, d.Tk, d.D, num_splits, sm_count(q.get_device()));
    const size_t ws_bytes = decode_attention_workspace_bytes(d.B, d.H, d.Tq, d.D, splits);
    at::Tensor ws = at::empty({int64_t((ws_bytes + sizeof(float) - 1) / sizeof(float))}, q.options().dtype(at::kFloat));
    check_cuda(launch_decode_attention(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), lens.data_ptr<int32_t>(),
                                       out.data_ptr(), ws.data_ptr<float>(), d.B, d.H, d.Hkv, d.Tq, d.Tk, d.D,
                                       float(scale), splits, c10::cuda::getCurrentCUDAStream(q.get_device()).stream()),
               "launch_decode_attention");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    const at::Tensor lens = cache_seqlens.to(at::kLong).contiguous();
    const int64_t* lp = lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < d.B; ++b)
      TORCH_CHECK(lp[b] >= 1 && lp[b] <= d.Tk, "cache_seqlens[", b, "] = ", lp[b], " is outside [1, Tmax = ", d.Tk,
                  "]");
    decode_attention_cpu(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), lp, out.data_ptr(), d.B, d.H, d.Hkv, d.Tq, d.Tk,
                         d.D, float(scale), num_splits);
  }
  return out;
}

namespace {

// Autograd of the eager entry: the saves and glue calls of AttentionFunction in gptkernels/ops/attention.py (dropout
// 0: a call with dropout takes the Python path, which draws the seed; SDPA's top-left alignment, no softcap or
// ALiBi). Inputs (q, k, v, mask, scale, window_left, window_right).
struct AttentionFn : public torch::autograd::Function<AttentionFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& mask, double scale, int64_t left,
                                                int64_t right, bool bottom_right, double softcap) {
    auto [out, lse] = attention_fwd(q, k, v, mask, std::nullopt, scale, left, right, bottom_right, softcap, 0.0, 0);
    ctx->save_for_backward({q, k, v, out, lse, mask.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["left"] = left;
    ctx->saved_data["right"] = right;
    ctx->saved_data["bottom_right"] = bottom_right;
    ctx->saved_data["softcap"] = softcap;
    return {out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv] = attention_bwd(
        grads[0], s[0], s[1], s[2], s[3], s[4], opt(s[5]), std::nullopt, ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["left"].toInt(), ctx->saved_data["right"].toInt(), ctx->saved_data["bottom_right"].toBool(),
        ctx->saved_data["softcap"].toDouble(), 0.0, 0);
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// out of q (B, H, Tq, D), k, v (B, Hkv, Tk, D): through AttentionFn when a gradient is wanted, else forward alone.
at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, double scale, int64_t left, int64_t right,
                              bool bottom_right, double softcap) {
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad()))
    return AttentionFn::apply(q, k, v, mask, scale, left, right, bottom_right, softcap)[0];
  return std::get<0>(attention_fwd(q, k, v, mask, std::nullopt, scale, left, right, bottom_right, softcap, 0.0, 0));
}

}  // namespace

EagerOut attention_eager(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const std::optional<at::Tensor>& attn_mask, std::optional<double> scale, bool is_causal,
                         bool enable_gqa, std::optional<int64_t> window) {
  if (!eager_plain(query) || !eager_plain(key) || !eager_plain(value) || !eager_plain(attn_mask) || !eager_no_modes())
    return std::nullopt;
  // The Python checks beyond the glue's: >= 3 dims with equal leading dims, heads differ only with enable_gqa, a
  // finite scale, window >= 1, a bool or float mask that needs no gradient.
  const int64_t nd = query.dim();
  if (nd < 3 || key.dim() != nd || value.dim() != nd) return std::nullopt;
  const auto lead = query.sizes().slice(0, nd - 3);
  if (key.sizes().slice(0, nd - 3) != lead || value.sizes().slice(0, nd - 3) != lead) return std::nullopt;
  const int64_t H = query.size(-3), Tq = query.size(-2), D = query.size(-1);
  if (key.size(-3) != H && key.size(-3) != 1 && !enable_gqa) return std::nullopt;  // one kv head broadcasts
  if (key.size(-1) != D || value.size(-1) != D) return std::nullopt;  // Ev != E: the torch backend
  if ((scale && !std::isfinite(*scale)) || (window && *window < 1)) return std::nullopt;
  int64_t B = 1;
  for (const int64_t s : lead) B *= s;
  // (B, H, T, D) views for 3-D and 4-D inputs, as the Python path's reshape.
  const at::Tensor q = query.reshape({B, H, Tq, D});
  const at::Tensor k = key.reshape({B, key.size(-3), key.size(-2), key.size(-1)});
  const at::Tensor v = value.reshape({B, value.size(-3), value.size(-2), value.size(-1)});
  at::Tensor m;
  if (has_tensor(attn_mask)) {
    const at::Tensor& am = *attn_mask;
    if (am.scalar_type() != at::kBool && !am.is_floating_point()) return std::nullopt;
    if (at::GradMode::is_enabled() && am.requires_grad()) return std::nullopt;
    if (am.dim() > 4 || (am.dim() == 4 && lead.size() > 1)) return std::nullopt;  // a batch-flattening copy: Python
    std::vector<int64_t> shape4(size_t(4 - am.dim()), 1);
    shape4.insert(shape4.end(), am.sizes().begin(), am.sizes().end());
    m = additive_mask_f32(am.reshape(shape4));
  }
  const double sc = scale ? *scale : 1.0 / std::sqrt(double(D));
  const int64_t right = is_causal || window.has_value() ? 0 : -1;
  const int64_t left = window ? *window - 1 : -1;
  const at::Tensor out = attention_autograd(q, k, v, opt(m), sc, left, right, false, 0.0);
  return std::vector<at::Tensor>{out.reshape(query.sizes())};
}

EagerOut flash_attn_eager(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                          double softcap) {
  if (!eager_plain(q) || !eager_plain(k) || !eager_plain(v) || !eager_no_modes()) return std::nullopt;
  // FlashAttention's layout (B, T, H, E); anything the Python checks would reject, or that only the torch backend
  // runs (Ev != E), returns to the Python path.
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return std::nullopt;
  const int64_t B = q.size(0), H = q.size(2), E = q.size(3), Hkv = k.size(2);
  if (k.size(0) != B || k.size(3) != E || v.sizes() != k.sizes()) return std::nullopt;
  if (Hkv != H && (Hkv < 1 || H % Hkv != 0)) return std::nullopt;
  if (window_left < -1 || window_right < -1 || !std::isfinite(softcap) || softcap < 0) return std::nullopt;
  if (softmax_scale && !std::isfinite(*softmax_scale)) return std::nullopt;
  const double sc = softmax_scale ? *softmax_scale : 1.0 / std::sqrt(double(E));
  const at::Tensor out = attention_autograd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), std::nullopt,
                                            sc, window_left, causal ? 0 : window_right, true, softcap);
  return std::vector<at::Tensor>{out.transpose(1, 2).contiguous()};
}

EagerOut decode_attention_eager(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& cache_seqlens, std::optional<double> scale) {
  if (!eager_plain(q) || !eager_plain(k_cache) || !eager_plain(v_cache) || !eager_plain(cache_seqlens) ||
      !eager_no_modes() || q.dim() != 4 || (scale && !std::isfinite(*scale)))
    return std::nullopt;
  if (cache_seqlens.is_cpu() && q.is_cpu() && cache_seqlens.dim() == 1 && k_cache.dim() == 4) {
    // Each length includes the Tn new tokens (the glue checks only >= 1); free to read on the CPU. Out of range:
    // the Python path raises the documented error.
    const int64_t lo = std::max<int64_t>(q.size(2), 1), hi = k_cache.size(2), n = cache_seqlens.size(0);
    const int64_t st = cache_seqlens.stride(0);
    auto in_range = [&](const auto* p) {
      for (int64_t i = 0; i < n; ++i)
        if (int64_t(p[i * st]) < lo || int64_t(p[i * st]) > hi) return false;
      return true;
    };
    if (cache_seqlens.scalar_type() == at::kInt && !in_range(cache_seqlens.data_ptr<int32_t>())) return std::nullopt;
    if (cache_seqlens.scalar_type() == at::kLong && !in_range(cache_seqlens.data_ptr<int64_t>())) return std::nullopt;
  }
  const double sc = scale ? *scale : 1.0 / std::sqrt(double(q.size(-1)));
  return std::vector<at::Tensor>{decode_attention(q, k_cache, v_cache, cache_seqlens, sc, 0)};
}

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? alibi, float scale, int window_left, "
      "int window_right, bool bottom_right, float softcap, float dropout_p, int seed) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, Tensor? alibi, "
      "float scale, int window_left, int window_right, bool bottom_right, float softcap, float dropout_p, "
      "int seed) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float scale, "
      "int num_splits) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptkernels, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("decode_attention", &decode_attention);
}

#ifdef GPTKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("decode_attention", &decode_attention);
}
#endif

}  // namespace gptkernels
