// Torch-facing FFN ops.
//  - Elementwise epilogues: bias + activation (GELU tanh/erf, ReLU) and SwiGLU's silu(g) * u, fwd and bwd, registered
//    as gptkernels::bias_gelu_fwd / bias_gelu_bwd / silu_mul_fwd / silu_mul_bwd for CPU and CUDA; fused_mlp and
//    swiglu run their GEMMs in ATen around these.
//  - cuBLASLt GEMMs with fused epilogues for the GPT-2 MLP on CUDA (gptkernels::mlp_fc_gelu_lt, mlp_linear_lt,
//    mlp_dgelu_lt): GELU_AUX_BIAS (fc: act and the saved pre-activation in one GEMM), BIAS with beta = 1 on the
//    residual (proj), DGELU_BGRAD (the grad GEMM dy @ W_proj writes dpre and db_fc). cuBLASLt's GELU is the tanh
//    approximation, so gptkernels/ops/mlp.py routes only activation="gelu_tanh" here.
// Fakes live in gptkernels/ops/mlp.py.
#include "../kernels/cpu/mlp.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>

#include "common.h"
#include "eager.h"
#ifdef GPTKERNELS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>  // at::cuda::getCurrentCUDABlasLtHandle (torch >= 2.0)
#include <cublasLt.h>

#include "../kernels/cuda/mlp.cuh"
#endif

namespace gptkernels {
namespace {

Act to_act(const std::string& s) {
  if (s == "gelu_tanh") return Act::kGeluTanh;
  if (s == "gelu") return Act::kGeluErf;
  if (s == "relu") return Act::kRelu;
  TORCH_CHECK(false, "activation: must be one of gelu_tanh, gelu, relu; got '", s, "'");
  return Act::kGeluTanh;
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": shape ", t.sizes(), " must match ", ref_name, " ", ref.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": dtype must match ", ref_name);
  TORCH_CHECK(t.device() == ref.device(), name, ": must be on ", ref.device());
}

// Rows of a (..., N) tensor: numel / N, except that N == 0 leaves the leading dims' product.
at::Tensor check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  const int64_t N = x.size(-1);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias: shape must be (", N, ",), got ", bias->sizes());
  TORCH_CHECK(bias->device() == x.device(), "bias: must be on ", x.device());
  return as_f32_vector(*bias);
}

}  // namespace

at::Tensor bias_gelu_fwd(const at::Tensor& x_, const std::optional<at::Tensor>& bias, const std::string& activation) {
  TORCH_CHECK(x_.dim() >= 1, "x: must have at least 1 dim");
  const Act act = to_act(activation);
  const DType dt = to_kernel_dtype(x_.scalar_type(), "x");
  const at::Tensor b = check_bias(bias, x_);
  // Kernels take rows with stride N; a non-contiguous input is copied here on purpose.
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(-1), M = rows_of(x);
  at::Tensor y = at::empty_like(x);
  if (M == 0 || N == 0) return y;
  if (x.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda(launch_bias_gelu_fwd(dt, act, x.data_ptr(), opt_float_ptr(b), y.data_ptr(), M, N,
                                    c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "launch_bias_gelu_fwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    prefault_output(y.data_ptr(), y.nbytes());
    bias_gelu_fwd_cpu(dt, act, x.data_ptr(), opt_float_ptr(b), y.data_ptr(), M, N);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dy_, const at::Tensor& x_,
                                                             const std::optional<at::Tensor>& bias,
                                                             const std::string& activation, bool want_dbias,
                                                             bool want_y) {
  TORCH_CHECK(x_.dim() >= 1, "x: must have at least 1 dim");
  const Act act = to_act(activation);
  const DType dt = to_kernel_dtype(x_.scalar_type(), "x");
  check_like(dy_, x_, "dy", "x");
  const at::Tensor b = check_bias(bias, x_);
  // A gradient can arrive expanded (stride 0) or transposed; the kernels want contiguous rows.
  const at::Tensor dy = dy_.contiguous();
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(-1), M = rows_of(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor db = want_dbias ? at::empty({N}, f32) : at::empty({0}, f32);
  at::Tensor y = want_y ? at::empty_like(x) : at::empty({0}, x.options());
  if (M == 0 || N == 0) {  // dbias: a sum over no rows is zero (N == 0: all empty)
    db.zero_();
    return {dx, db, y};
  }
  float* db_p = want_dbias ? db.data_ptr<float>() : nullptr;
  void* y_p = want_y ? y.data_ptr() : nullptr;
  if (x.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const int sms = sm_count(x.get_device());
    const size_t ws_bytes = bias_gelu_bwd_workspace_bytes(M, N, sms);
    at::Tensor ws = at::empty({int64_t((ws_bytes + sizeof(float) - 1) / sizeof(float))}, f32);
    check_cuda(
        launch_bias_gelu_bwd(dt, act, dy.data_ptr(), x.data_ptr(), opt_float_ptr(b), dx.data_ptr(), db_p, y_p,
                             ws.data_ptr<float>(), M, N, sms, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
        "launch_bias_gelu_bwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    prefault_output(dx.data_ptr(), dx.nbytes());
    bias_gelu_bwd_cpu(dt, act, dy.data_ptr(), x.data_ptr(), opt_float_ptr(b), dx.data_ptr(), db_p, y_p, M, N);
  }
  return {dx, db, y};
}

at::Tensor silu_mul_fwd(const at::Tensor& g_, const at::Tensor& u_) {
  const DType dt = to_kernel_dtype(g_.scalar_type(), "g");
  check_like(u_, g_, "u", "g");
  const at::Tensor g = g_.contiguous(), u = u_.contiguous();
  at::Tensor p = at::empty_like(g);
  const int64_t n = g.numel();
  if (n == 0) return p;
  if (g.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(g.device());
    check_cuda(launch_silu_mul_fwd(dt, g.data_ptr(), u.data_ptr(), p.data_ptr(), n,
                                   c10::cuda::getCurrentCUDAStream(g.get_device()).stream()),
               "launch_silu_mul_fwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    silu_mul_fwd_cpu(dt, g.data_ptr(), u.data_ptr(), p.data_ptr(), n);
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> silu_mul_bwd(const at::Tensor& dp_, const at::Tensor& g_,
                                                            const at::Tensor& u_, bool want_p) {
  const DType dt = to_kernel_dtype(g_.scalar_type(), "g");
  check_like(u_, g_, "u", "g");
  check_like(dp_, g_, "dp", "g");
  const at::Tensor dp = dp_.contiguous(), g = g_.contiguous(), u = u_.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(g);
  at::Tensor p = want_p ? at::empty_like(g) : at::empty({0}, g.options());
  const int64_t n = g.numel();
  if (n == 0) return {dg, du, p};
  void* p_p = want_p ? p.data_ptr() : nullptr;
  if (g.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(g.device());
    check_cuda(launch_silu_mul_bwd(dt, dp.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), p_p, n,
                                   c10::cuda::getCurrentCUDAStream(g.get_device()).stream()),
               "launch_silu_mul_bwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    silu_mul_bwd_cpu(dt, dp.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), p_p, n);
  }
  return {dg, du, p};
}

// ------------------------------------------------------------------------------------------------ eager entries
namespace {

// Autograd of the eager bias_gelu: saves x and bias, as BiasGeluFunction in gptkernels/ops/mlp.py. Inputs
// (x, bias, activation); bias is optional.
struct BiasGeluFn : public torch::autograd::Function<BiasGeluFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const std::optional<at::Tensor>& bias, const std::string& activation) {
    ctx->save_for_backward({x, bias.value_or(at::Tensor())});
    ctx->saved_data["act"] = activation;
    return {bias_gelu_fwd(x, bias, activation)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &bias = s[1];
    auto [dx, db, y] =
        bias_gelu_bwd(grads[0], x, opt(bias), ctx->saved_data["act"].toStringRef(), bias.defined(), false);
    return {dx, bias.defined() ? db.to(bias.scalar_type()) : at::Tensor(), at::Tensor()};
  }
};

bool is_gemm_operand(const at::Tensor& w, const at::Tensor& x, int64_t rows, int64_t cols) {
  return w.dim() == 2 && w.size(0) == rows && w.size(1) == cols && w.scalar_type() == x.scalar_type() &&
         w.device() == x.device();
}

bool is_vector(const std::optional<at::Tensor>& b, const at::Tensor& x, int64_t n) {
  return !has_tensor(b) ||
         (b->dim() == 1 && b->size(0) == n && b->scalar_type() == x.scalar_type() && b->device() == x.device());
}

}  // namespace

EagerOut bias_gelu_eager(const at::Tensor& x, const std::optional<at::Tensor>& bias, const std::string& activation) {
  if (!eager_plain(x) || !eager_plain(bias) || !eager_no_modes() || (has_tensor(bias) && !bias->is_floating_point()))
    return std::nullopt;
  if (at::GradMode::is_enabled() && (x.requires_grad() || needs_grad(bias)))
    return BiasGeluFn::apply(x, bias, activation);
  return std::vector<at::Tensor>{bias_gelu_fwd(x, bias, activation)};
}

// The ATen-GEMM path of fused_mlp / swiglu without autograd (inference, decode): the same calls as the no-grad
// forward of FusedMLPFunction / SwiGLUFunction in gptkernels/ops/mlp.py, so the same numerics. With grad, or any
// argument form not covered here, the Python path runs.
EagerOut fused_mlp_eager(const at::Tensor& x, const at::Tensor& w_fc, const std::optional<at::Tensor>& b_fc,
                         const at::Tensor& w_proj, const std::optional<at::Tensor>& b_proj,
                         const std::string& activation, const std::optional<at::Tensor>& residual) {
  if (!eager_plain(x) || !eager_plain(w_fc) || !eager_plain(b_fc) || !eager_plain(w_proj) || !eager_plain(b_proj) ||
      !eager_plain(residual) || !eager_no_modes() || x.dim() < 1)
    return std::nullopt;
  if (at::GradMode::is_enabled() && (x.requires_grad() || w_fc.requires_grad() || needs_grad(b_fc) ||
                                     w_proj.requires_grad() || needs_grad(b_proj) || needs_grad(residual)))
    return std::nullopt;
  const int64_t c = x.size(-1), hid = w_fc.dim() == 2 ? w_fc.size(0) : -1;
  if (c < 1 || !is_gemm_operand(w_fc, x, hid, c) || !is_gemm_operand(w_proj, x, c, hid) || !is_vector(b_fc, x, hid) ||
      !is_vector(b_proj, x, c))
    return std::nullopt;
  if (has_tensor(residual) && (residual->sizes() != x.sizes() || residual->scalar_type() != x.scalar_type() ||
                               residual->device() != x.device()))
    return std::nullopt;
  to_kernel_dtype(x.scalar_type(), "x");
  const at::Tensor x2 = x.reshape({-1, c});  // (M, C)
  // The fc bias rides in the GEMM (addmm): pre is rounded once, as eager nn.Linear rounds it.
  const at::Tensor pre = has_tensor(b_fc) ? at::addmm(*b_fc, x2, w_fc.t()) : at::mm(x2, w_fc.t());  // (M, H)
  const at::Tensor a = bias_gelu_fwd(pre, std::nullopt, activation);                                // (M, H)
  at::Tensor y;
  if (has_tensor(residual)) {
    y = at::addmm(residual->reshape({-1, c}), a, w_proj.t());  // (M, C), residual added by the GEMM
    if (has_tensor(b_proj)) y.add_(*b_proj);
  } else if (has_tensor(b_proj)) {
    y = at::addmm(*b_proj, a, w_proj.t());
  } else {
    y = at::mm(a, w_proj.t());
  }
  return std::vector<at::Tensor>{y.view(x.sizes())};
}

EagerOut swiglu_eager(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down) {
  if (!eager_plain(x) || !eager_plain(w_gate) || !eager_plain(w_up) || !eager_plain(w_down) || !eager_no_modes() ||
      x.dim() < 1)
    return std::nullopt;
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || w_gate.requires_grad() || w_up.requires_grad() || w_down.requires_grad()))
    return std::nullopt;
  const int64_t c = x.size(-1), hid = w_gate.dim() == 2 ? w_gate.size(0) : -1;
  if (c < 1 || !is_gemm_operand(w_gate, x, hid, c) || !is_gemm_operand(w_up, x, hid, c) ||
      !is_gemm_operand(w_down, x, c, hid))
    return std::nullopt;
  to_kernel_dtype(x.scalar_type(), "x");
  const at::Tensor x2 = x.reshape({-1, c});                                         // (M, C)
  const at::Tensor p = silu_mul_fwd(at::mm(x2, w_gate.t()), at::mm(x2, w_up.t()));  // (M, H)
  return std::vector<at::Tensor>{at::mm(p, w_down.t()).view(x.sizes())};
}

// ------------------------------------------------------------------------------------------- cuBLASLt epilogues
// Layout: torch tensors are row-major, cuBLASLt is column-major. A row-major (R, C) matrix with row stride ld is a
// column-major (C, R) matrix with leading dimension ld, so every product is computed transposed:
//   y (M, N) = x (M, K) @ W^T, W (N, K)   <=>   y^T (N x M, ld N) = op_T(W^T as K x N, ld = W row stride) @ x^T
// The output's column-major rows are therefore the features N: the bias (length = D rows) is the nn.Linear bias,
// the aux matrix (pre) is N x M with ld N, and DGELU_BGRAD's bias gradient sums over the tokens M.
namespace {

#ifdef GPTKERNELS_WITH_CUDA
void check_lt(cublasStatus_t st, const char* what) {
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, what, " failed: cuBLAS status ", static_cast<int>(st));
}

cudaDataType lt_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return CUDA_R_32F;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      TORCH_CHECK_TYPE(false, "cuBLASLt epilogue GEMM: dtype must be float32, float16 or bfloat16, got ", t);
  }
  return CUDA_R_32F;
}

// cuBLASLt picks kernels by the alignment it sees; 16-byte-aligned pointers and leading dimensions get the vectorized
// ones. An operand that is not (a sliced or transposed view, a stride-0 dy) is copied once here, on purpose: cheaper
// than a slow GEMM. A fresh caching-allocator tensor is 512-byte aligned.
at::Tensor lt_operand(const at::Tensor& t) {
  const int64_t es = t.element_size();
  const bool rows_ok = t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= t.size(1) &&
                       t.stride(0) >= 1 && (t.stride(0) * es) % 16 == 0;
  const bool ptr_ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (rows_ok && ptr_ok) return t;
  at::Tensor c = t.contiguous();
  if (c.data_ptr() == t.data_ptr() || (c.size(1) * es) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) {
    // Still misaligned (an offset view, or a width that is not a 16-byte multiple): a padded fresh copy keeps every
    // row 16-byte aligned. ld = width rounded up.
    const int64_t pad = 16 / es;
    const int64_t ld = (t.size(1) + pad - 1) / pad * pad;
    at::Tensor buf = at::empty({t.size(0), ld}, t.options());
    return buf.narrow(1, 0, t.size(1)).copy_(t);
  }
  return c;
}

at::Tensor lt_vector(const at::Tensor& v, at::ScalarType dt) {
  at::Tensor c = v.to(dt).contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

template <typename T, typename Destroy>
struct LtHandle {
  T h = nullptr;
  Destroy destroy;
  explicit LtHandle(Destroy d) : destroy(d) {}
  ~LtHandle() {
    if (h) destroy(h);
  }
  LtHandle(const LtHandle&) = delete;
  LtHandle& operator=(const LtHandle&) = delete;
};

// One cuBLASLt GEMM with its epilogue (run_lt): D (col-major m x n, ld ldd) = op(A) @ op(B) (+ C with beta = 1).
struct LtGemm {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* A = nullptr;
  int64_t lda = 0;
  const void* B = nullptr;
  int64_t ldb = 0;
  const void* C = nullptr;  // nullptr: beta = 0
  int64_t ldc = 0;
  void* D = nullptr;
  int64_t ldd = 0;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // bias (BIAS, GELU_AUX_BIAS) or bias gradient output (DGELU_BGRAD)
  void* aux = nullptr;         // GELU input: written by GELU_AUX*, read by DGELU*
  int64_t ld_aux = 0;
};

// The largest power of two (<= 256) that divides the address: what cuBLASLt may assume about an operand. Its
// heuristic otherwise assumes 256 bytes and may pick a kernel that faults on a 16-byte-aligned operand (a
// misaligned-address fault poisons the CUDA context for the rest of the process).
uint32_t ptr_alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a == 0) return 256;
  const uintptr_t low = a & (~a + 1);  // lowest set bit
  return low >= 256 ? 256u : static_cast<uint32_t>(low);
}

// Everything the heuristic's answer depends on: the descriptors (shapes, layouts, transposes, epilogue, dtype,
// whether C is read), the operands' alignments, the workspace it may use and the device.
struct LtKey {
  int64_t m, n, k, lda, ldb, ldc, ldd, ld_aux;
  uint64_t ws_bytes;
  int32_t device, dtype, epilogue;
  uint32_t align_a, align_b, align_c, align_d;
  uint8_t trans_a, trans_b, has_c, has_bias;
  bool operator==(const LtKey& o) const { return std::memcmp(this, &o, sizeof(LtKey)) == 0; }
};
// No padding bytes, so memcmp and the byte hash see only the fields.
static_assert(std::has_unique_object_representations_v<LtKey>, "LtKey must have no padding");
struct LtKeyHash {
  size_t operator()(const LtKey& k) const {
    const auto* p = reinterpret_cast<const unsigned char*>(&k);
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the key's bytes
    for (size_t i = 0; i < sizeof(LtKey); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};
struct LtPlan {
  bool found;
  cublasLtMatmulAlgo_t algo;
  int status;
};

// D (col-major m x n, ld ldd) = op(A) @ op(B) (+ C with beta = 1) through one epilogue. Returns false (and says why)
// when the heuristic finds no algorithm or the dtype is fp32; throws on any other cuBLAS error. The heuristic's
// answer is cached per LtKey (the query is host work on every call otherwise); the workspace is PyTorch's own cuBLASLt
// workspace for this handle and stream, allocated once by the caching allocator.
bool run_lt(const LtGemm& g, at::ScalarType st, const at::Tensor& like, std::string* why) {
  if (st == at::kFloat) {
    // cuBLASLt's fp32 GELU epilogue accuracy is not documented and our fp32 bound is 1e-5: fp32 never runs here.
    if (why) *why = "float32 does not run on cuBLASLt epilogues (their fp32 accuracy is undocumented)";
    return false;
  }
  const cudaDataType dt = lt_dtype(st);
  const int dev = like.get_device();
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  void* ws = at::cuda::getCUDABlasLtWorkspace();
  const size_t ws_bytes = at::cuda::getCUDABlasLtWorkspaceSize();

  LtHandle<cublasLtMatmulDesc_t, decltype(&cublasLtMatmulDescDestroy)> op(&cublasLtMatmulDescDestroy);
  check_lt(cublasLtMatmulDescCreate(&op.h, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  check_lt(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "TRANSA");
  check_lt(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "TRANSB");
  check_lt(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue, sizeof(g.epilogue)),
           "EPILOGUE");
  if (g.bias) {
    check_lt(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)),
             "BIAS_POINTER");
  }
  if (g.aux) {
    check_lt(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux)),
             "EPILOGUE_AUX_POINTER");
    check_lt(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &g.ld_aux, sizeof(g.ld_aux)),
             "EPILOGUE_AUX_LD");
  }
  using Layout = LtHandle<cublasLtMatrixLayout_t, decltype(&cublasLtMatrixLayoutDestroy)>;
  Layout la(&cublasLtMatrixLayoutDestroy), lb(&cublasLtMatrixLayoutDestroy), lc(&cublasLtMatrixLayoutDestroy),
      ld(&cublasLtMatrixLayoutDestroy);
  // Stored shapes (before op): A is m x k (k x m when transposed), B is k x n (n x k when transposed).
  check_lt(cublasLtMatrixLayoutCreate(&la.h, dt, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda), "layout A");
  check_lt(cublasLtMatrixLayoutCreate(&lb.h, dt, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb), "layout B");
  check_lt(cublasLtMatrixLayoutCreate(&lc.h, dt, g.m, g.n, g.C ? g.ldc : g.ldd), "layout C");
  check_lt(cublasLtMatrixLayoutCreate(&ld.h, dt, g.m, g.n, g.ldd), "layout D");

  LtKey key{};
  key.m = g.m, key.n = g.n, key.k = g.k, key.lda = g.lda, key.ldb = g.ldb, key.ldc = g.C ? g.ldc : g.ldd;
  key.ldd = g.ldd, key.ld_aux = g.aux ? g.ld_aux : 0, key.ws_bytes = ws_bytes;
  key.device = dev, key.dtype = static_cast<int32_t>(dt), key.epilogue = static_cast<int32_t>(g.epilogue);
  key.align_a = ptr_alignment(g.A), key.align_b = ptr_alignment(g.B);
  key.align_c = ptr_alignment(g.C ? g.C : g.D), key.align_d = ptr_alignment(g.D);
  key.trans_a = g.trans_a, key.trans_b = g.trans_b, key.has_c = g.C != nullptr, key.has_bias = g.bias != nullptr;

  static std::mutex cache_mu;
  static std::unordered_map<LtKey, LtPlan, LtKeyHash> cache;
  LtPlan plan{};
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(cache_mu);
    const auto it = cache.find(key);
    if (it != cache.end()) plan = it->second, cached = true;
  }
  if (!cached) {
    LtHandle<cublasLtMatmulPreference_t, decltype(&cublasLtMatmulPreferenceDestroy)> pref(
        &cublasLtMatmulPreferenceDestroy);
    check_lt(cublasLtMatmulPreferenceCreate(&pref.h), "cublasLtMatmulPreferenceCreate");
    const uint64_t ws64 = ws_bytes;
    check_lt(
        cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws64, sizeof(ws64)),
        "PREF_MAX_WORKSPACE_BYTES");
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_a},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_b},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_d}};
    for (const auto& [attr, bytes] : aligns) {
      check_lt(cublasLtMatmulPreferenceSetAttribute(pref.h, attr, &bytes, sizeof(bytes)), "PREF_MIN_ALIGNMENT");
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t hs =
        cublasLtMatmulAlgoGetHeuristic(handle, op.h, la.h, lb.h, lc.h, ld.h, pref.h, 1, &result, &found);
    plan.found = hs == CUBLAS_STATUS_SUCCESS && found > 0;
    plan.algo = result.algo;
    plan.status = static_cast<int>(hs);
    std::lock_guard<std::mutex> lock(cache_mu);
    cache.emplace(key, plan);
  }
  if (!plan.found) {
    if (why) {
      *why = "cublasLtMatmulAlgoGetHeuristic found no algorithm (status " + std::to_string(plan.status) +
             ", m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) + ", epilogue " +
             std::to_string(static_cast<int>(g.epilogue)) + ")";
    }
    return false;
  }
  const float alpha = 1.f, beta = g.C ? 1.f : 0.f;
  check_lt(cublasLtMatmul(handle, op.h, &alpha, g.A, la.h, g.B, lb.h, &beta, g.C ? g.C : g.D, lc.h, g.D, ld.h,
                          &plan.algo, ws, ws_bytes, stream),
           "cublasLtMatmul");
  return true;
}

void check_shape_like(const at::Tensor& t, const at::Tensor& ref, at::IntArrayRef shape, const char* fn,
                      const char* name) {
  TORCH_CHECK(t.sizes() == shape, fn, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " dtype must be ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, " must be on ", ref.device());
}

// cuBLASLt reads exactly n bias elements from the pointer: anything else must be refused here, not read past.
void check_lt_bias(const char* fn, const at::Tensor& bias, int64_t n, const at::Tensor& x) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == n, fn, ": bias must have shape (", n, "), got ", bias.sizes());
  TORCH_CHECK(bias.device() == x.device(), fn, ": bias is on ", bias.device(), " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(bias.scalar_type()), fn, ": bias must be a floating-point tensor");
}

void check_lt_inputs(const char* fn, const at::Tensor& x, const at::Tensor& w, int64_t k_dim_of_w) {
  TORCH_CHECK(x.is_cuda(), fn, ": runs on CUDA tensors (cuBLASLt)");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, fn, ": x and w must be 2-D, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.size(k_dim_of_w) == x.size(1), fn, ": w ", w.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type(), fn, ": x and w must share a dtype");
  TORCH_CHECK(x.device() == w.device(), fn, ": x and w must be on one device");
}
#endif

}  // namespace

// (act, pre): pre = x @ w^T + bias, act = gelu_tanh(pre); one cuBLASLt GEMM with GELU_AUX_BIAS (GELU_AUX without a
// bias). x (M, K), w (H, K) nn.Linear layout, bias (H,) or None; H % 8 == 0 (the aux matrix's ld).
std::tuple<at::Tensor, at::Tensor> mlp_fc_gelu_lt(const at::Tensor& x_, const at::Tensor& w_,
                                                  const std::optional<at::Tensor>& bias) {
#ifdef GPTKERNELS_WITH_CUDA
  const char* fn = "mlp_fc_gelu_lt";
  check_lt_inputs(fn, x_, w_, 1);
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t M = x_.size(0), K = x_.size(1), H = w_.size(0);
  TORCH_CHECK(H % 8 == 0, fn, ": H = ", H, " must be a multiple of 8 (cuBLASLt's GELU aux leading dimension)");
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor act = at::empty({M, H}, x_.options()), pre = at::empty({M, H}, x_.options());
  if (M == 0 || H == 0) return {act, pre};
  if (K == 0) {
    pre.zero_();
    if (has_bias) pre.add_(*bias);
    return {bias_gelu_fwd(pre, std::nullopt, "gelu_tanh"), pre};
  }
  const at::Tensor x = lt_operand(x_), w = lt_operand(w_);
  if (has_bias) check_lt_bias(fn, *bias, H, x_);
  const at::Tensor b = has_bias ? lt_vector(*bias, x_.scalar_type()) : at::Tensor();
  LtGemm g;
  g.trans_a = true;  // W^T: w row-major (H, K) is column-major K x H
  g.m = H, g.n = M, g.k = K;
  g.A = w.data_ptr(), g.lda = w.stride(0);
  g.B = x.data_ptr(), g.ldb = x.stride(0);
  g.D = act.data_ptr(), g.ldd = H;
  g.epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
  g.bias = has_bias ? b.data_ptr() : nullptr;
  g.aux = pre.data_ptr(), g.ld_aux = H;
  std::string why;
  if (run_lt(g, x_.scalar_type(), x_, &why)) return {act, pre};
  TORCH_WARN_ONCE(fn, ": ", why, "; running ATen addmm + the gptkernels GELU kernel instead");
  pre = has_bias ? at::addmm(b, x_, w_.t()) : at::mm(x_, w_.t());
  return {bias_gelu_fwd(pre, std::nullopt, "gelu_tanh"), pre};
#else
  (void)x_, (void)w_, (void)bias;
  TORCH_CHECK(false, "mlp_fc_gelu_lt: gptkernels was built without CUDA");
  return {};
#endif
}

// y = x @ w^T + bias + residual: cuBLASLt with the BIAS epilogue (DEFAULT without a bias) and beta = 1 on C =
// residual. x (M, K), w (N, K), bias (N,) or None, residual (M, N) or None.
at::Tensor mlp_linear_lt(const at::Tensor& x_, const at::Tensor& w_, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual) {
#ifdef GPTKERNELS_WITH_CUDA
  const char* fn = "mlp_linear_lt";
  check_lt_inputs(fn, x_, w_, 1);
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t M = x_.size(0), K = x_.size(1), N = w_.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_shape_like(*residual, x_, {M, N}, fn, "residual");
  if (has_bias) check_lt_bias(fn, *bias, N, x_);
  at::Tensor y = at::empty({M, N}, x_.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor b = has_bias ? lt_vector(*bias, x_.scalar_type()) : at::Tensor();
  if (K > 0) {
    const at::Tensor x = lt_operand(x_), w = lt_operand(w_);
    const at::Tensor r = has_res ? lt_operand(*residual) : at::Tensor();
    LtGemm g;
    g.trans_a = true;
    g.m = N, g.n = M, g.k = K;
    g.A = w.data_ptr(), g.lda = w.stride(0);
    g.B = x.data_ptr(), g.ldb = x.stride(0);
    if (has_res) g.C = r.data_ptr(), g.ldc = r.stride(0);
    g.D = y.data_ptr(), g.ldd = N;
    g.epilogue = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    g.bias = has_bias ? b.data_ptr() : nullptr;
    std::string why;
    if (run_lt(g, x_.scalar_type(), x_, &why)) return y;
    TORCH_WARN_ONCE(fn, ": ", why, "; running ATen addmm instead");
  }
  y = has_res ? at::addmm(*residual, x_, w_.t()) : at::mm(x_, w_.t());
  if (has_bias) y.add_(b);
  return y;
#else
  (void)x_, (void)w_, (void)bias, (void)residual;
  TORCH_CHECK(false, "mlp_linear_lt: gptkernels was built without CUDA");
  return {};
#endif
}

// (dpre, dbias): dpre = (dy @ w) * gelu_tanh'(pre), dbias = sum over rows of dpre (in dpre's dtype, as cuBLASLt's
// BGRAD writes it) when want_dbias, else empty; cuBLASLt DGELU_BGRAD (DGELU without dbias). dy (M, N), w (N, H)
// (W_proj, nn.Linear layout), pre (M, H) saved by mlp_fc_gelu_lt; H % 8 == 0.
std::tuple<at::Tensor, at::Tensor> mlp_dgelu_lt(const at::Tensor& dy_, const at::Tensor& w_, const at::Tensor& pre_,
                                                bool want_dbias) {
#ifdef GPTKERNELS_WITH_CUDA
  const char* fn = "mlp_dgelu_lt";
  check_lt_inputs(fn, dy_, w_, 0);
  const c10::cuda::CUDAGuard guard(dy_.device());
  const int64_t M = dy_.size(0), N = dy_.size(1), H = w_.size(1);
  TORCH_CHECK(H % 8 == 0, fn, ": H = ", H, " must be a multiple of 8 (cuBLASLt's GELU aux leading dimension)");
  check_shape_like(pre_, dy_, {M, H}, fn, "pre");
  at::Tensor dpre = at::empty({M, H}, dy_.options());
  at::Tensor db = want_dbias ? at::empty({H}, dy_.options()) : at::empty({0}, dy_.options());
  if (M == 0 || H == 0) {
    db.zero_();
    return {dpre, db};
  }
  if (N > 0) {
    // The aux input must be H x M with ld H (a multiple of 8) and 16-byte aligned: pre is our own contiguous output,
    // anything else is copied.
    at::Tensor pre = pre_.is_contiguous() && reinterpret_cast<uintptr_t>(pre_.data_ptr()) % 16 == 0
                         ? pre_
                         : pre_.clone(at::MemoryFormat::Contiguous);
    const at::Tensor dy = lt_operand(dy_), w = lt_operand(w_);
    LtGemm g;
    g.trans_a = false;  // W_proj row-major (N, H) is column-major H x N: already the m x k operand
    g.m = H, g.n = M, g.k = N;
    g.A = w.data_ptr(), g.lda = w.stride(0);
    g.B = dy.data_ptr(), g.ldb = dy.stride(0);
    g.D = dpre.data_ptr(), g.ldd = H;
    g.epilogue = want_dbias ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
    g.bias = want_dbias ? db.data_ptr() : nullptr;
    g.aux = pre.data_ptr(), g.ld_aux = H;
    std::string why;
    if (run_lt(g, dy_.scalar_type(), dy_, &why)) return {dpre, db};
    TORCH_WARN_ONCE(fn, ": ", why, "; running ATen mm + the gptkernels GELU-backward kernel instead");
  }
  auto [dx, dbf, unused] = bias_gelu_bwd(at::mm(dy_, w_), pre_, std::nullopt, "gelu_tanh", want_dbias, false);
  (void)unused;
  return {dx, want_dbias ? dbf.to(dy_.scalar_type()) : db};
#else
  (void)dy_, (void)w_, (void)pre_, (void)want_dbias;
  TORCH_CHECK(false, "mlp_dgelu_lt: gptkernels was built without CUDA");
  return {};
#endif
}

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, str activation) -> Tensor y");
  m.def(
      "bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, str activation, bool want_dbias, bool want_y) "
      "-> (Tensor dx, Tensor dbias, Tensor y)");
  m.def("silu_mul_fwd(Tensor g, Tensor u) -> Tensor p");
  m.def("silu_mul_bwd(Tensor dp, Tensor g, Tensor u, bool want_p) -> (Tensor dg, Tensor du, Tensor p)");
  m.def("mlp_fc_gelu_lt(Tensor x, Tensor w, Tensor? bias) -> (Tensor act, Tensor pre)");
  m.def("mlp_linear_lt(Tensor x, Tensor w, Tensor? bias, Tensor? residual) -> Tensor y");
  m.def("mlp_dgelu_lt(Tensor dy, Tensor w, Tensor pre, bool want_dbias) -> (Tensor dpre, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(gptkernels, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd);
  m.impl("silu_mul_fwd", &silu_mul_fwd);
  m.impl("silu_mul_bwd", &silu_mul_bwd);
}

#ifdef GPTKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd);
  m.impl("silu_mul_fwd", &silu_mul_fwd);
  m.impl("silu_mul_bwd", &silu_mul_bwd);
  m.impl("mlp_fc_gelu_lt", &mlp_fc_gelu_lt);
  m.impl("mlp_linear_lt", &mlp_linear_lt);
  m.impl("mlp_dgelu_lt", &mlp_dgelu_lt);
}
#endif

}  // namespace gptkernels
