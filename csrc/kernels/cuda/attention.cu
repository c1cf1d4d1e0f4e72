// CUDA attention: forward, FlashAttention-2 backward and split-K decode. Semantics: AttnSpec in ../common.h (which
// keys a row sees, softcap, ALiBi, the NaN rule) and attention.cuh; docs/attention_contract.md for the ops.
//
// Design: a block owns a tile of output rows; each warp owns 16 of them (a "strip") end to end: its slice of the
// scores, its rows' softmax statistics, its slice of the accumulator. Only the streamed operand tiles (K and V
// in forward and dQ, Q and dO in dK/dV) are shared by the block, so the only block-wide barriers are the two
// around each tile load.
//
// The products are warp-level: C (16 x N, fp32 in shared memory) = A (16 x K) . B^T or += A . B. For fp16/bf16
// they are WMMA 16x16x16 tensor-core ops (fp32 accumulation) whose fragments go through shared memory with
// load/store_matrix_sync only, so nothing here depends on the unspecified fragment layouts. For fp32 they are
// SIMT loops (no TF32): lane (rg, cg) = (lane / 8, lane % 8) owns rows rg + 4i and columns cg + 8u, which with
// row pitches = 4 (mod 32) floats reads shared memory without bank conflicts.
//
// The softmax and pointwise steps run with two lanes per row (lane = 2 * row + half, columns half, half + 2, ...),
// combining the halves with one shuffle. Scores, the running max and lse stay in the natural-log domain and each
// exponent is multiplied by log2(e) once, exp2f((s - m) * log2e): folding log2(e) into the scale and the lse (as
// before) rounded every term by an error proportional to its magnitude, which fp32 gradients showed. Invisible
// keys are skipped or set to p = dS = 0 before any exponential, so a NaN row (lse NaN) cannot leak into the keys
// it does not see; a row with no visible key gives out = 0, lse = -inf and zero gradients, and NaN or inf in a
// visible score gives NaN (rows are told apart by whether a visible key was met, never by l > 0).
//
// Accumulators (O, dQ, dK, dV) live in shared memory as fp32 and are updated by read-modify-write through
// load/store_matrix_sync (the online-softmax rescale of O is a per-row SIMT pass over the warp's own strip).
//
// Occupancy is set by shared memory (50-150 KB per block: at most 4 blocks of 2-4 warps per SM), not registers, so
// __launch_bounds__(threads, 1) gives ptxas the registers it wants: with the implicit default it capped some
// kernels at 64-96 registers and spilled (ptxas -v, CUDA 13.0, sm_80/sm_90); with it, no kernel spills.
#include "attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "../attention_rng.h"
#include "common.cuh"

namespace gptkernels {
namespace {

using namespace nvcuda;

// kLog2e, kLn2, kWarp, kMaxGrid: common.cuh.
// The opt-in shared memory limit of sm_80 (163 KB); every configuration below fits it.
constexpr size_t kSmemLimitSm80 = 166912;

// ---- element types -----------------------------------------------------------------------------------------------

// to_f / from_f: convert.cuh (through common.cuh).

// 16 bytes of T.
template <typename T>
struct Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  union {
    uint4 u;
    T x[kN];
  };
};

// ---- tile configurations -------------------------------------------------------------------------------------------
//
// DMAX: the head dim padded to 32, 64, 128 or 256 (smem pitch); loops run to Dk = round_up(D, 16) <= DMAX.
// Forward / decode: BM query rows (BM / 16 warps) x BN keys per tile. dQ: BM query rows x BN keys per tile.
// dK/dV: BN key rows (BN / 16 warps) x BM queries per step. Shared memory per block (bytes, from the *_smem
// functions below): every D <= 128 configuration fits the 99 KB opt-in limit of sm_86 / sm_89 (largest: fp16/bf16
// D=64 dQ, 98304); D = 256 needs up to 145.5 KB (fp16/bf16) and 149.4 KB (fp32), within sm_80's 163 KB and
// sm_90's 227 KB. The fp32 tiles are smaller because each element takes twice the space.

template <typename T, int DMAX>
struct Cfg;

#define GK_ATTN_CFG(T_, DMAX_, FM, FN, QM, QN, KN, KM)                                             \
  template <>                                                                                     \
  struct Cfg<T_, DMAX_> {                                                                         \
    static constexpr int kFwdM = FM, kFwdN = FN, kDqM = QM, kDqN = QN, kKvN = KN, kKvM = KM;      \
  };
//          T              DMAX fwd M/N  dQ M/N  dKdV keys/queries
GK_ATTN_CFG(__half,         32, 64, 64, 64, 64, 64, 64)
GK_ATTN_CFG(__half,         64, 64, 64, 64, 64, 64, 32)
GK_ATTN_CFG(__half,        128, 64, 32, 32, 32, 32, 32)
GK_ATTN_CFG(__half,        256, 64, 32, 32, 32, 32, 32)
GK_ATTN_CFG(__nv_bfloat16,  32, 64, 64, 64, 64, 64, 64)
GK_ATTN_CFG(__nv_bfloat16,  64, 64, 64, 64, 64, 64, 32)
GK_ATTN_CFG(__nv_bfloat16, 128, 64, 32, 32, 32, 32, 32)
GK_ATTN_CFG(__nv_bfloat16, 256, 64, 32, 32, 32, 32, 32)
GK_ATTN_CFG(float,          32, 64, 64, 64, 64, 64, 64)
GK_ATTN_CFG(float,          64, 64, 64, 64, 32, 64, 16)
GK_ATTN_CFG(float,         128, 64, 16, 32, 16, 32, 16)
GK_ATTN_CFG(float,         256, 32, 32, 32, 16, 32, 8)
#undef GK_ATTN_CFG


// Shared-memory pitches (elements). Operand tiles of T: DMAX + 8 halves or DMAX + 4 floats (16-byte rows; for fp32
// = 4 mod 32 floats, conflict-free SIMT reads). fp32 scores / accumulators: N + 4. 16-bit P / dS: N + 8.
template <typename T, int DMAX>
__host__ __device__ constexpr int ld_op() {
  return sizeof(T) == 2 ? DMAX + 8 : DMAX + 4;
}
__host__ __device__ constexpr int ld_acc(int dmax) { return dmax + 4; }
__host__ __device__ constexpr int ld_s(int n) { return n + 4; }
template <typename T>
__host__ __device__ constexpr int ld_p(int n) {
  return sizeof(T) == 2 ? n + 8 : n + 4;
}

// Bytes of each kernel's dynamic shared memory (region order as carved in the kernels; every region size is a
// multiple of 32 bytes, so WMMA pointers stay 32-byte aligned).
template <typename T, int DMAX>
constexpr size_t fwd_smem() {
  constexpr int M = Cfg<T, DMAX>::kFwdM, N = Cfg<T, DMAX>::kFwdN;
  return size_t(M + 2 * N) * ld_op<T, DMAX>() * sizeof(T) + size_t(M) * ld_acc(DMAX) * 4 + size_t(M) * ld_s(N) * 4 +
         (sizeof(T) == 2 ? size_t(M) * ld_p<T>(N) * 2 : 0);
}
template <typename T, int DMAX>
constexpr size_t dq_smem() {
  constexpr int M = Cfg<T, DMAX>::kDqM, N = Cfg<T, DMAX>::kDqN;
  return size_t(2 * M + 2 * N) * ld_op<T, DMAX>() * sizeof(T) + size_t(M) * ld_acc(DMAX) * 4 +
         2 * size_t(M) * ld_s(N) * 4 + (sizeof(T) == 2 ? size_t(M) * ld_p<T>(N) * 2 : 0);
}
template <typename T, int DMAX>
constexpr size_t dkdv_smem() {
  constexpr int N = Cfg<T, DMAX>::kKvN, M = Cfg<T, DMAX>::kKvM;
  return size_t(2 * N + 2 * M) * ld_op<T, DMAX>() * sizeof(T) + 2 * size_t(N) * ld_acc(DMAX) * 4 +
         2 * size_t(N) * ld_s(M) * 4 + (sizeof(T) == 2 ? 2 * size_t(N) * ld_p<T>(M) * 2 : 0) + size_t(M) * 16;
}

// ---- tile loads ----------------------------------------------------------------------------------------------------

// Rows [0, nrows) of a row-major (rows, D) matrix at src into dst (pitch ld), columns [0, Dk): rows >= nvalid and
// columns >= D are zero. 16-byte vectors (D % 8 == 0, 16-byte aligned src). All threads of the block take part.
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int64_t nvalid, int nrows, int D, int Dk) {
  constexpr int kV = Vec16<T>::kN;
  const int cpr = Dk / kV;
  for (int idx = threadIdx.x; idx < nrows * cpr; idx += blockDim.x) {
    const int r = idx / cpr, c = (idx % cpr) * kV;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < nvalid && c < D) val = *reinterpret_cast<const uint4*>(src + int64_t(r) * D + c);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
  }
}

// Zero rows [0, nrows) x columns [0, Dk) of an fp32 tile.
__device__ __forceinline__ void zero_acc(float* dst, int ld, int nrows, int Dk) {
  const int cpr = Dk / 4;
  for (int idx = threadIdx.x; idx < nrows * cpr; idx += blockDim.x) {
    const int r = idx / cpr, c = (idx % cpr) * 4;
    *reinterpret_cast<float4*>(dst + r * ld + c) = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// Row r (16-row strip of the calling warp) of an fp32 tile, times `mul`, as T into dst[0, D); two lanes per row,
// one 16-byte store per chunk.
template <typename T>
__device__ __forceinline__ void store_row_pair(T* dst, const float* src, float mul, int D, int half) {
  constexpr int kV = Vec16<T>::kN;
  for (int c = half * kV; c < D; c += 2 * kV) {
    Vec16<T> v;
#pragma unroll
    for (int e = 0; e < kV; ++e) v.x[e] = from_f<T>(src[c + e] * mul);
    *reinterpret_cast<uint4*>(dst + c) = v.u;
  }
}

// ---- warp products -----------------------------------------------------------------------------------------------
//
// C (16 x N fp32, pitch ldc) = A (16 x Kd, pitch lda) . B^T, B (N x Kd, pitch ldb); Kd = Dk at run time (<= KMAX).

template <typename T, int N, int KMAX>
__device__ __forceinline__ void warp_nt(const T* A, int lda, const T* B, int ldb, int Kd, float* C, int ldc) {
  if constexpr (sizeof(T) == 2) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[N / 16];
#pragma unroll
    for (int n = 0; n < N / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
#pragma unroll
    for (int k = 0; k < KMAX; k += 16) {
      if (k < Kd) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, A + k, lda);
#pragma unroll
        for (int n = 0; n < N / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // B^T (Kd x N) is B read column-major
          wmma::load_matrix_sync(b, B + n * 16 * ldb + k, ldb);
          wmma::mma_sync(acc[n], a, b, acc[n]);
        }
      }
    }
#pragma unroll
    for (int n = 0; n < N / 16; ++n) wmma::store_matrix_sync(C + n * 16, acc[n], ldc, wmma::mem_row_major);
  } else {
    const int lane = threadIdx.x & (kWarp - 1), rg = lane >> 3, cg = lane & 7;
    constexpr int NU = N / 8;
    float acc[4][NU];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int u = 0; u < NU; ++u) acc[i][u] = 0.f;
    // k in order from 0 with fmaf: the fp32 delta kernel sums dout * out the same way, so a row that sees one
    // key gets dP == delta bit for bit (dS exactly 0).
    for (int k = 0; k < Kd; ++k) {
      float a[4], b[NU];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = A[(rg + 4 * i) * lda + k];
#pragma unroll
      for (int u = 0; u < NU; ++u) b[u] = B[(cg + 8 * u) * ldb + k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int u = 0; u < NU; ++u) acc[i][u] = fmaf(a[i], b[u], acc[i][u]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int u = 0; u < NU; ++u) C[(rg + 4 * i) * ldc + cg + 8 * u] = acc[i][u];
  }
}

// C (16 x Nc fp32, pitch ldc) += A (16 x KD, pitch lda) . B (KD x Nc, pitch ldb); Nc = Dk at run time (<= NMAX).
template <typename T, int KD, int NMAX>
__device__ __forceinline__ void warp_nn_acc(const T* A, int lda, const T* B, int ldb, float* C, int ldc, int Nc) {
  if constexpr (sizeof(T) == 2) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[KD / 16];
#pragma unroll
    for (int k = 0; k < KD / 16; ++k) wmma::load_matrix_sync(a[k], A + k * 16, lda);
#pragma unroll
    for (int n = 0; n < NMAX; n += 16) {
      if (n < Nc) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, C + n, ldc, wmma::mem_row_major);
#pragma unroll
        for (int k = 0; k < KD / 16; ++k) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(b, B + k * 16 * ldb + n, ldb);
          wmma::mma_sync(acc, a[k], b, acc);
        }
        // In place: whatever lane loaded an element of this tile has done so before any lane stores it (the
        // fragment mapping is unspecified, so do not rely on load and store mapping a lane to the same elements).
        __syncwarp();
        wmma::store_matrix_sync(C + n, acc, ldc, wmma::mem_row_major);
      }
    }
  } else {
    const int lane = threadIdx.x & (kWarp - 1), rg = lane >> 3, cg = lane & 7;
    constexpr int CW = NMAX < 64 ? NMAX : 64;  // columns per pass
    constexpr int NU = CW / 8;
    for (int n0 = 0; n0 < Nc; n0 += CW) {
      float acc[4][NU];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          const int col = n0 + cg + 8 * u;
          acc[i][u] = col < Nc ? C[(rg + 4 * i) * ldc + col] : 0.f;
        }
#pragma unroll 4
      for (int k = 0; k < KD; ++k) {
        float a[4], b[NU];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = A[(rg + 4 * i) * lda + k];
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          const int col = n0 + cg + 8 * u;
          b[u] = col < Nc ? B[k * ldb + col] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int u = 0; u < NU; ++u) acc[i][u] = fmaf(a[i], b[u], acc[i][u]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          const int col = n0 + cg + 8 * u;
          if (col < Nc) C[(rg + 4 * i) * ldc + col] = acc[i][u];
        }
    }
  }
}

// ---- the attention spec on the device ------------------------------------------------------------------------------

// AttnSpec (../common.h) as the kernels read it, plus 1 / softcap (a multiply per score instead of a division).
struct Spec {
  int64_t offset, left, right;  // pos_i = i + offset; left / right < 0: unbounded
  float softcap, inv_softcap;   // softcap <= 0: none
  const float* alibi;           // nullptr: none; slope of (b, h) at alibi[b * alibi_sb + h]
  int64_t alibi_sb;
};

Spec device_spec(const AttnSpec& s) {
  Spec d{};
  d.offset = s.offset;
  d.left = s.left;
  d.right = s.right;
  d.softcap = s.softcap > 0.f ? s.softcap : 0.f;
  d.inv_softcap = s.softcap > 0.f ? 1.f / s.softcap : 0.f;
  d.alibi = s.alibi;
  d.alibi_sb = s.alibi_sb;
  return d;
}

// Key j (0 <= j < Tk, checked by the caller) is visible to the query at position pos.
__device__ __forceinline__ bool visible(const Spec& s, int64_t pos, int64_t j) {
  return (s.left < 0 || j >= pos - s.left) && (s.right < 0 || j <= pos + s.right);
}

// The keys [lo, hi) of [kb, ke) that can be visible to a query at a position in [pos_lo, pos_hi] (the device twin
// of attn_key_range; hi <= lo means none). Tiles outside it are never loaded.
__device__ __forceinline__ void key_range(const Spec& s, int64_t pos_lo, int64_t pos_hi, int64_t kb, int64_t ke,
                                          int64_t* lo, int64_t* hi) {
  *lo = s.left < 0 ? kb : max(kb, pos_lo - s.left);
  *hi = s.right < 0 ? ke : min(ke, pos_hi + s.right + 1);
}

// The query rows [lo, hi) of [0, Tq) that can see a key of [j_lo, j_hi]: key j is visible to pos only if
// j - right <= pos <= j + left.
__device__ __forceinline__ void query_range(const Spec& s, int64_t j_lo, int64_t j_hi, int64_t Tq, int64_t* lo,
                                            int64_t* hi) {
  *lo = s.right < 0 ? 0 : min(Tq, max(int64_t(0), j_lo - s.right - s.offset));
  *hi = s.left < 0 ? Tq : min(Tq, max(*lo, j_hi + s.left - s.offset + 1));
}

// The score s_ij of a visible (pos, j) from its dot product qk = <q_i, k_j>, in the natural-log domain: scale (a
// non-finite product becomes NaN), softcap, ALiBi (slope: this (b, h)'s), then the mask entry at mij (nullptr: no mask). Returns false when that
// entry is -inf, which hides the key whatever the score. *th = tanh(scale * qk / softcap) (0 without softcap): the
// backward's dS is multiplied by the softcap's derivative 1 - th^2. tanhf, not tanh.approx: fp32 needs its accuracy.
__device__ __forceinline__ bool score(const Spec& sp, float qk, float scale, float slope, int64_t pos, int64_t j,
                                      const float* mij, float* s, float* th) {
  float x = qk * scale;
  // A non-finite dot product poisons its row (+-inf -> NaN): neither softcap's tanh nor a weight of exp(-inf) = 0
  // may hide an inf input. x * 0 is 0 for finite x, NaN for +-inf and NaN (no flag of ours lets nvcc fold it).
  x = fmaf(x, 0.f, x);
  float t = 0.f;
  if (sp.softcap > 0.f) {
    t = tanhf(x * sp.inv_softcap);
    x = sp.softcap * t;
  }
  if (sp.alibi) x = fmaf(-slope, float(pos > j ? pos - j : j - pos), x);
  if (mij) {
    const float mv = *mij;
    if (mv == -INFINITY) return false;
    x += mv;
  }
  *s = x;
  *th = t;
  return true;
}

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

// ---- forward and decode ------------------------------------------------------------------------------------------

struct FwdParams {
  const void *q, *k, *v;
  const float* mask;
  int64_t smb, smh, smi, smj;
  void* out;
  float* lse;
  int64_t B, H, Hkv, Tq, Tk, D;  // decode: Tq = Tn, Tk = Tmax
  float scale;
  Spec spec;  // decode: right = 0, positions from seqlens (offset unused), no softcap, no ALiBi
  bool dropout;
  uint32_t drop_threshold;
  float inv_keep;
  uint64_t seed;
  // decode mode: blocks are (b, kv head, row block, split); rows are the group's (head, token) pairs.
  bool decode;
  const int32_t* seqlens;
  int64_t splits, row_blocks;
  float *opart, *lpart;  // (B*H*Tn, splits, D) and (B*H*Tn, splits)
};

template <typename T, int DMAX>
__global__ void __launch_bounds__(Cfg<T, DMAX>::kFwdM / 16 * kWarp, 1) attention_fwd_kernel(const FwdParams p) {
  constexpr int BM = Cfg<T, DMAX>::kFwdM, BN = Cfg<T, DMAX>::kFwdN;
  constexpr int LDT = ld_op<T, DMAX>(), LDA = ld_acc(DMAX), LDS = ld_s(BN), LDP = ld_p<T>(BN);
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + BM * LDT;
  T* Vs = Ks + BN * LDT;
  float* Os = reinterpret_cast<float*>(Vs + BN * LDT);
  float* Ss = Os + BM * LDA;
  T* Ps = sizeof(T) == 2 ? reinterpret_cast<T*>(Ss + BM * LDS) : reinterpret_cast<T*>(Ss);  // fp32: in place

  const int D = int(p.D), Dk = (D + 15) / 16 * 16;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, half = lane & 1;
  const int r = warp * 16 + (lane >> 1);  // this lane pair's row in the block

  // Which rows and keys. pmin, pmax: the positions of the block's first and last rows.
  int64_t b, h, i0 = 0, row0, nrows, kb, ke, pmin, pmax, kv_rows, split = 0;
  int64_t kvh;
  if (!p.decode) {
    const int64_t nqt = (p.Tq + BM - 1) / BM, BH = p.B * p.H;
    const int64_t bh = int64_t(blockIdx.x) % BH, qt = nqt - 1 - int64_t(blockIdx.x) / BH;  // heavy tiles first
    b = bh / p.H;
    h = bh % p.H;
    kvh = h / (p.H / p.Hkv);
    i0 = qt * BM;
    row0 = bh * p.Tq + i0;
    nrows = min(int64_t(BM), p.Tq - i0);
    kb = 0;
    ke = p.Tk;
    pmin = i0 + p.spec.offset;
    pmax = pmin + nrows - 1;
    kv_rows = p.Tk;
  } else {
    const int64_t G = p.H / p.Hkv, R = G * p.Tq;
    split = int64_t(blockIdx.x) % p.splits;
    const int64_t rb = (int64_t(blockIdx.x) / p.splits) % p.row_blocks;
    const int64_t bg = int64_t(blockIdx.x) / (p.splits * p.row_blocks);
    b = bg / p.Hkv;
    kvh = bg % p.Hkv;
    h = 0;  // per row below
    row0 = (b * p.H + kvh * G) * p.Tq + rb * BM;  // the group's (head, token) rows are consecutive
    nrows = min(int64_t(BM), R - rb * BM);
    const int64_t L = min(max(int64_t(p.seqlens[b]), int64_t(0)), p.Tk);
    const int64_t chunk = (L + p.splits - 1) / p.splits;
    kb = min(L, split * chunk);
    ke = min(L, kb + chunk);
    pmin = L - p.Tq;
    pmax = L - 1;
    kv_rows = p.Tk;
  }
  const bool row_valid = r < nrows;
  // This row's position, mask row, ALiBi slope and dropout key.
  int64_t pos;
  const float* mrow = nullptr;
  float slope = 0.f;
  uint64_t rowkey = 0;
  if (!p.decode) {
    const int64_t i = i0 + r;
    pos = pmin + r;
    if (p.mask && row_valid) mrow = p.mask + b * p.smb + h * p.smh + i * p.smi;
    if (p.spec.alibi) slope = p.spec.alibi[b * p.spec.alibi_sb + h];
    if (p.dropout) rowkey = attn_dropout_row_key(p.seed, b, h, i);
  } else {
    const int64_t idx = (row0 % p.Tq) + r;  // row0 % Tn == (rb * BM) % Tn: token of row 0
    pos = pmax + 1 - p.Tq + (idx % p.Tq);
  }
  int64_t kmin, kmax;
  key_range(p.spec, pmin, pmax, kb, ke, &kmin, &kmax);

  const T* kvk = static_cast<const T*>(p.k) + (b * p.Hkv + kvh) * kv_rows * p.D;
  const T* kvv = static_cast<const T*>(p.v) + (b * p.Hkv + kvh) * kv_rows * p.D;
  load_tile(Qs, LDT, static_cast<const T*>(p.q) + row0 * p.D, nrows, BM, D, Dk);
  zero_acc(Os, LDA, BM, Dk);

  const bool warp_active = warp * 16 < nrows;
  float m = -INFINITY, l = 0.f;  // this row's running max and sum
  bool seen = false;             // this lane has met a visible key: l == 0 then means scores of -inf, not "masked"
  for (int64_t j0 = kmin; j0 < kmax; j0 += BN) {
    __syncthreads();  // the previous tile's K/V reads are done (first pass: Q and O are in place)
    load_tile(Ks, LDT, kvk + j0 * p.D, kmax - j0, BN, D, Dk);
    load_tile(Vs, LDT, kvv + j0 * p.D, kmax - j0, BN, D, Dk);
    __syncthreads();
    if (!warp_active) continue;
    warp_nt<T, BN, DMAX>(Qs + warp * 16 * LDT, LDT, Ks, LDT, Dk, Ss + warp * 16 * LDS, LDS);
    __syncwarp();
    // Two passes over this lane's half of the row (scores stay in shared memory, not registers): the scores
    // (-inf where invisible) and their max, then the exponentials. Natural-log domain, times log2(e) once per
    // exponent: folding log2(e) into the scale rounds each score by an error that grows with its magnitude.
    float mx = -INFINITY;
    float* srow = Ss + r * LDS;
#pragma unroll 8
    for (int u = 0; u < BN / 2; ++u) {
      const int c = half + 2 * u;
      const int64_t j = j0 + c;
      float x = -INFINITY, th;
      if (j < kmax && visible(p.spec, pos, j) &&
          score(p.spec, srow[c], p.scale, slope, pos, j, mrow ? mrow + j * p.smj : nullptr, &x, &th))
        seen = true;
      srow[c] = x;
      mx = fmaxf(mx, x);  // ignores NaN; a NaN score reaches l through its exponential
    }
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
    const float m_new = fmaxf(m, mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing above -inf yet: exp2(-inf - 0) = 0
    const float alpha = exp2f((m - m_use) * kLog2e);
    float sum = 0.f;
    T* prow = Ps + r * LDP;
#pragma unroll 8
    for (int u = 0; u < BN / 2; ++u) {
      const int c = half + 2 * u;
      float e = exp2f((srow[c] - m_use) * kLog2e);
      sum += e;
      if (p.dropout) e = attn_dropout_keep(rowkey, j0 + c, p.drop_threshold) ? e * p.inv_keep : 0.f;
      prow[c] = from_f<T>(e);  // fp32: overwrites this lane's own score in place
    }
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    float* orow = Os + r * LDA;
    for (int c = half; c < Dk; c += 2) orow[c] *= alpha;
    __syncwarp();
    warp_nn_acc<T, BN, DMAX>(Ps + warp * 16 * LDP, LDP, Vs, LDT, Os + warp * 16 * LDA, LDA, Dk);
  }
  __syncthreads();  // with no key tile at all, O's zeros came from other warps' threads
  seen = __shfl_xor_sync(kFullMask, int(seen), 1) != 0 || seen;
  if (!row_valid) return;
  // No visible key: out = 0, lse = -inf. Otherwise a NaN or +inf score has made l NaN, and visible scores that are
  // all -inf leave l == 0 (exp(s - lse) = 0/0): both give out = lse = NaN. The test is `seen`, never l > 0, which
  // would turn a NaN sum into a masked row.
  const float inv_l = seen ? 1.f / l : 0.f;
  const float lse = !seen ? -INFINITY : l == 0.f ? nan_f() : m + logf(l);
  const float* orow = Os + r * LDA;
  if (!p.decode) {
    store_row_pair(static_cast<T*>(p.out) + (row0 + r) * p.D, orow, inv_l, D, half);
    if (half == 0) p.lse[row0 + r] = lse;
  } else {
    const int64_t prow = (row0 + r) * p.splits + split;
    float* dst = p.opart + prow * p.D;
    for (int c = half * 4; c < D; c += 8)
      *reinterpret_cast<float4*>(dst + c) =
          make_float4(orow[c] * inv_l, orow[c + 1] * inv_l, orow[c + 2] * inv_l, orow[c + 3] * inv_l);
    if (half == 0) p.lpart[prow] = lse;
  }
}

// Decode merge: one warp per (b, h, t) row combines its splits' partial outputs with the log-sum-exp. A split's
// lse is -inf when it saw no key (skipped) and NaN when its scores were (the row's output is NaN then).
template <typename T>
__global__ void decode_merge_kernel(const float* opart, const float* lpart, T* out, int64_t rows, int64_t splits,
                                    int D) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const float* l = lpart + row * splits;
  float m = -INFINITY;
  bool nan = false;
  for (int64_t s = 0; s < splits; ++s) {
    m = fmaxf(m, l[s]);  // ignores NaN
    nan = nan || l[s] != l[s];
  }
  if (nan) m = nan_f();
  float wsum = 0.f;
  if (m != -INFINITY)
    for (int64_t s = 0; s < splits; ++s) wsum += exp2f((l[s] - m) * kLog2e);
  const float inv = m != -INFINITY ? 1.f / wsum : 0.f;  // finite m: wsum >= 1 (its own split)
  for (int c = lane; c < D; c += kWarp) {
    float acc = 0.f;
    if (m != -INFINITY)
      for (int64_t s = 0; s < splits; ++s) {
        if (l[s] == -INFINITY) continue;
        acc += exp2f((l[s] - m) * kLog2e) * opart[(row * splits + s) * D + c];
      }
    out[row * D + c] = from_f<T>(acc * inv);
  }
}

// ---- backward ------------------------------------------------------------------------------------------------------

struct BwdParams {
  const void *dout, *q, *k, *v, *out;
  const float* lse;
  const float* mask;
  int64_t smb, smh, smi, smj;
  void *dq, *dk, *dv;
  float* delta;  // (B, H, Tq) fp32 workspace
  int64_t B, H, Hkv, Tq, Tk, D;
  float scale;
  Spec spec;
  bool dropout;
  uint32_t drop_threshold;
  float inv_keep;
  uint64_t seed;
};

// delta_i = sum_d dout_i * out_i, one thread per row, in order with fmaf (see warp_nt's SIMT path).
template <typename T>
__global__ void attention_delta_kernel(const T* dout, const T* out, float* delta, int64_t rows, int D) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  constexpr int kV = Vec16<T>::kN;
  const T* a = dout + row * D;
  const T* o = out + row * D;
  float acc = 0.f;
  for (int c = 0; c < D; c += kV) {
    Vec16<T> x, y;
    x.u = *reinterpret_cast<const uint4*>(a + c);
    y.u = *reinterpret_cast<const uint4*>(o + c);
#pragma unroll
    for (int e = 0; e < kV; ++e) acc = fmaf(to_f(x.x[e]), to_f(y.x[e]), acc);
  }
  delta[row] = acc;
}

// dQ: one block per (query tile, b, h); warps own 16 query rows; loops over the key tiles the rows see.
template <typename T, int DMAX>
__global__ void __launch_bounds__(Cfg<T, DMAX>::kDqM / 16 * kWarp, 1) attention_dq_kernel(const BwdParams p) {
  constexpr int BM = Cfg<T, DMAX>::kDqM, BN = Cfg<T, DMAX>::kDqN;
  constexpr int LDT = ld_op<T, DMAX>(), LDA = ld_acc(DMAX), LDS = ld_s(BN), LDP = ld_p<T>(BN);
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* dOs = Qs + BM * LDT;
  T* Ks = dOs + BM * LDT;
  T* Vs = Ks + BN * LDT;
  float* dQs = reinterpret_cast<float*>(Vs + BN * LDT);
  float* Ss = dQs + BM * LDA;
  float* dPs = Ss + BM * LDS;
  T* dSs = sizeof(T) == 2 ? reinterpret_cast<T*>(dPs + BM * LDS) : reinterpret_cast<T*>(dPs);  // fp32: in place

  const int D = int(p.D), Dk = (D + 15) / 16 * 16;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, half = lane & 1;
  const int r = warp * 16 + (lane >> 1);
  const int64_t nqt = (p.Tq + BM - 1) / BM, BH = p.B * p.H;
  const int64_t bh = int64_t(blockIdx.x) % BH, qt = nqt - 1 - int64_t(blockIdx.x) / BH;
  const int64_t b = bh / p.H, h = bh % p.H, kvh = h / (p.H / p.Hkv);
  const int64_t i0 = qt * BM, row0 = bh * p.Tq + i0, nrows = min(int64_t(BM), p.Tq - i0);
  const bool row_valid = r < nrows;
  const int64_t i = i0 + r, pos = i + p.spec.offset;
  // lse == -inf only for a row with no visible key (zero gradients); a NaN lse makes the row's visible dS NaN.
  const float lse = row_valid ? p.lse[row0 + r] : -INFINITY;
  const float dlt = row_valid ? p.delta[row0 + r] : 0.f;
  const float* mrow = p.mask && row_valid ? p.mask + b * p.smb + h * p.smh + i * p.smi : nullptr;
  const float slope = p.spec.alibi ? p.spec.alibi[b * p.spec.alibi_sb + h] : 0.f;
  const uint64_t rowkey = p.dropout ? attn_dropout_row_key(p.seed, b, h, i) : 0;

  int64_t kmin, kmax;
  key_range(p.spec, i0 + p.spec.offset, i0 + nrows - 1 + p.spec.offset, 0, p.Tk, &kmin, &kmax);
  const T* kb = static_cast<const T*>(p.k) + (b * p.Hkv + kvh) * p.Tk * p.D;
  const T* vb = static_cast<const T*>(p.v) + (b * p.Hkv + kvh) * p.Tk * p.D;
  load_tile(Qs, LDT, static_cast<const T*>(p.q) + row0 * p.D, nrows, BM, D, Dk);
  load_tile(dOs, LDT, static_cast<const T*>(p.dout) + row0 * p.D, nrows, BM, D, Dk);
  zero_acc(dQs, LDA, BM, Dk);
  const bool warp_active = warp * 16 < nrows;
  for (int64_t j0 = kmin; j0 < kmax; j0 += BN) {
    __syncthreads();
    load_tile(Ks, LDT, kb + j0 * p.D, kmax - j0, BN, D, Dk);
    load_tile(Vs, LDT, vb + j0 * p.D, kmax - j0, BN, D, Dk);
    __syncthreads();
    if (!warp_active) continue;
    warp_nt<T, BN, DMAX>(Qs + warp * 16 * LDT, LDT, Ks, LDT, Dk, Ss + warp * 16 * LDS, LDS);
    warp_nt<T, BN, DMAX>(dOs + warp * 16 * LDT, LDT, Vs, LDT, Dk, dPs + warp * 16 * LDS, LDS);
    __syncwarp();
    const float* srow = Ss + r * LDS;
    const float* dprow = dPs + r * LDS;
    T* dsrow = dSs + r * LDP;
#pragma unroll
    for (int u = 0; u < BN / 2; ++u) {
      const int c = half + 2 * u;
      const int64_t j = j0 + c;
      float ds = 0.f, x, th;
      // Invisible keys get p = dS = 0 before any exponential: exp2(-inf - NaN) would be NaN.
      if (lse != -INFINITY && j < kmax && visible(p.spec, pos, j) &&
          score(p.spec, srow[c], p.scale, slope, pos, j, mrow ? mrow + j * p.smj : nullptr, &x, &th)) {
        const float pr = exp2f((x - lse) * kLog2e);  // s - lse in the natural domain, one rounding of the product
        float dpv = dprow[c];
        if (p.dropout) dpv = attn_dropout_keep(rowkey, j, p.drop_threshold) ? dpv * p.inv_keep : 0.f;
        ds = pr * (dpv - dlt);
        if (p.spec.softcap > 0.f) ds *= fmaf(-th, th, 1.f);
      }
      dsrow[c] = from_f<T>(ds);  // fp32: overwrites this lane's own dP in place
    }
    __syncwarp();
    warp_nn_acc<T, BN, DMAX>(dSs + warp * 16 * LDP, LDP, Ks, LDT, dQs + warp * 16 * LDA, LDA, Dk);
  }
  __syncthreads();  // with no key tile at all, dQ's zeros came from other warps' threads
  if (row_valid) store_row_pair(static_cast<T*>(p.dq) + (row0 + r) * p.D, dQs + r * LDA, p.scale, D, half);
}

// dK, dV: one block per (key tile, b, kv head); warps own 16 key rows; loops over the group's query heads and the
// query tiles that see the keys. Scores are computed transposed (S^T = K Q^T), so each lane pair owns a key row.
template <typename T, int DMAX>
__global__ void __launch_bounds__(Cfg<T, DMAX>::kKvN / 16 * kWarp, 1) attention_dkdv_kernel(const BwdParams p) {
  constexpr int BN = Cfg<T, DMAX>::kKvN, BM = Cfg<T, DMAX>::kKvM;
  constexpr int LDT = ld_op<T, DMAX>(), LDA = ld_acc(DMAX), LDS = ld_s(BM), LDP = ld_p<T>(BM);
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + BN * LDT;
  T* Qs = Vs + BN * LDT;
  T* dOs = Qs + BM * LDT;
  float* dKs = reinterpret_cast<float*>(dOs + BM * LDT);
  float* dVs = dKs + BN * LDA;
  float* Sts = dVs + BN * LDA;
  float* dPts = Sts + BN * LDS;
  T* Pts = sizeof(T) == 2 ? reinterpret_cast<T*>(dPts + BN * LDS) : reinterpret_cast<T*>(Sts);
  T* dSts = sizeof(T) == 2 ? Pts + BN * LDP : reinterpret_cast<T*>(dPts);
  float* lses = sizeof(T) == 2 ? reinterpret_cast<float*>(dSts + BN * LDP) : dPts + BN * LDS;
  float* deltas = lses + BM;
  uint64_t* rowkeys = reinterpret_cast<uint64_t*>(deltas + BM);  // 8-byte aligned: BM is even

  const int D = int(p.D), Dk = (D + 15) / 16 * 16;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, half = lane & 1;
  const int r = warp * 16 + (lane >> 1);  // key row of this lane pair
  const int64_t BHkv = p.B * p.Hkv;
  const int64_t bg = int64_t(blockIdx.x) % BHkv, kt = int64_t(blockIdx.x) / BHkv;  // first key tiles are heaviest
  const int64_t b = bg / p.Hkv, g = bg % p.Hkv, G = p.H / p.Hkv;
  const int64_t j0 = kt * BN, nkeys = min(int64_t(BN), p.Tk - j0);
  const int64_t j = j0 + r;
  const bool key_valid = r < nkeys;

  load_tile(Ks, LDT, static_cast<const T*>(p.k) + (bg * p.Tk + j0) * p.D, nkeys, BN, D, Dk);
  load_tile(Vs, LDT, static_cast<const T*>(p.v) + (bg * p.Tk + j0) * p.D, nkeys, BN, D, Dk);
  zero_acc(dKs, LDA, BN, Dk);
  zero_acc(dVs, LDA, BN, Dk);
  // Query rows that can see a key of [j0, j0 + nkeys).
  int64_t qlo, qhi;
  query_range(p.spec, j0, j0 + nkeys - 1, p.Tq, &qlo, &qhi);
  const bool warp_active = warp * 16 < nkeys;

  for (int64_t h = g * G; h < (g + 1) * G; ++h) {
    const int64_t rowh = (b * p.H + h) * p.Tq;
    const float* mh = p.mask ? p.mask + b * p.smb + h * p.smh : nullptr;
    const float slope = p.spec.alibi ? p.spec.alibi[b * p.spec.alibi_sb + h] : 0.f;
    for (int64_t i0 = qlo; i0 < qhi; i0 += BM) {
      const int64_t nq = min(int64_t(BM), p.Tq - i0);
      __syncthreads();  // the previous step's reads of Q, dO and the row statistics are done
      load_tile(Qs, LDT, static_cast<const T*>(p.q) + (rowh + i0) * p.D, nq, BM, D, Dk);
      load_tile(dOs, LDT, static_cast<const T*>(p.dout) + (rowh + i0) * p.D, nq, BM, D, Dk);
      for (int c = threadIdx.x; c < BM; c += blockDim.x) {
        const bool ok = c < nq;
        lses[c] = ok ? p.lse[rowh + i0 + c] : -INFINITY;
        deltas[c] = ok ? p.delta[rowh + i0 + c] : 0.f;
        if (p.dropout) rowkeys[c] = attn_dropout_row_key(p.seed, b, h, i0 + c);
      }
      __syncthreads();
      if (!warp_active) continue;
      warp_nt<T, BM, DMAX>(Ks + warp * 16 * LDT, LDT, Qs, LDT, Dk, Sts + warp * 16 * LDS, LDS);
      warp_nt<T, BM, DMAX>(Vs + warp * 16 * LDT, LDT, dOs, LDT, Dk, dPts + warp * 16 * LDS, LDS);
      __syncwarp();
      const float* srow = Sts + r * LDS;
      const float* dprow = dPts + r * LDS;
      T* prow = Pts + r * LDP;
      T* dsrow = dSts + r * LDP;
#pragma unroll
      for (int u = 0; u < BM / 2; ++u) {
        const int c = half + 2 * u;
        const int64_t i = i0 + c, pos = i + p.spec.offset;
        const float lse = lses[c];
        float pd = 0.f, ds = 0.f, x, th;
        // As in dQ: invisible pairs get p = dS = 0 before any exponential, whatever the row's lse.
        if (key_valid && lse != -INFINITY && visible(p.spec, pos, j) &&
            score(p.spec, srow[c], p.scale, slope, pos, j, mh ? mh + i * p.smi + j * p.smj : nullptr, &x, &th)) {
          const float pr = exp2f((x - lse) * kLog2e);
          float dpv = dprow[c];
          pd = pr;
          if (p.dropout) {
            const float z = attn_dropout_keep(rowkeys[c], j, p.drop_threshold) ? p.inv_keep : 0.f;
            pd = pr * z;
            dpv *= z;
          }
          ds = pr * (dpv - deltas[c]);
          if (p.spec.softcap > 0.f) ds *= fmaf(-th, th, 1.f);
        }
        prow[c] = from_f<T>(pd);  // fp32: in place over S^T / dP^T (this lane's own elements)
        dsrow[c] = from_f<T>(ds);
      }
      __syncwarp();
      warp_nn_acc<T, BM, DMAX>(Pts + warp * 16 * LDP, LDP, dOs, LDT, dVs + warp * 16 * LDA, LDA, Dk);
      warp_nn_acc<T, BM, DMAX>(dSts + warp * 16 * LDP, LDP, Qs, LDT, dKs + warp * 16 * LDA, LDA, Dk);
    }
  }
  __syncthreads();
  if (!key_valid) return;
  store_row_pair(static_cast<T*>(p.dk) + (bg * p.Tk + j) * p.D, dKs + r * LDA, p.scale, D, half);
  store_row_pair(static_cast<T*>(p.dv) + (bg * p.Tk + j) * p.D, dVs + r * LDA, 1.f, D, half);
}

// ---- host side ---------------------------------------------------------------------------------------------------

int dmax_for(int64_t D) { return D <= 32 ? 32 : D <= 64 ? 64 : D <= 128 ? 128 : 256; }

bool valid_dim(int64_t D) { return D % 8 == 0 && D >= 16 && D <= 256; }

template <typename T, int DMAX>
constexpr size_t max_smem() {
  size_t a = fwd_smem<T, DMAX>(), b = dq_smem<T, DMAX>(), c = dkdv_smem<T, DMAX>();
  return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

template <typename T, int DMAX>
constexpr bool fits_sm80() {
  return fwd_smem<T, DMAX>() <= kSmemLimitSm80 && dq_smem<T, DMAX>() <= kSmemLimitSm80 &&
         dkdv_smem<T, DMAX>() <= kSmemLimitSm80;
}
template <typename T, int DMAX>
constexpr bool fits_99k() {
  return max_smem<T, DMAX>() <= 101376;
}
static_assert(fits_sm80<__half, 256>() && fits_sm80<__nv_bfloat16, 256>() && fits_sm80<float, 256>(),
              "an attention tile configuration exceeds sm_80's shared memory");
static_assert(fits_99k<__half, 32>() && fits_99k<__half, 64>() && fits_99k<__half, 128>() &&
                  fits_99k<__nv_bfloat16, 32>() && fits_99k<__nv_bfloat16, 64>() && fits_99k<__nv_bfloat16, 128>() &&
                  fits_99k<float, 32>() && fits_99k<float, 64>() && fits_99k<float, 128>(),
              "a D <= 128 attention tile configuration exceeds sm_86's 99 KB of shared memory");

// Dynamic shared memory above the 48 KB default needs the opt-in attribute; beyond the device's opt-in limit the
// launch cannot run.
template <typename Kernel>
cudaError_t prepare(Kernel kernel, size_t smem) {
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (smem > size_t(optin)) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
}

template <typename T, int DMAX>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream) {
  constexpr int BM = Cfg<T, DMAX>::kFwdM;
  int64_t blocks;
  if (!p.decode) {
    blocks = (p.Tq + BM - 1) / BM * p.B * p.H;
  } else {
    blocks = p.B * p.Hkv * p.row_blocks * p.splits;
  }
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  const size_t smem = fwd_smem<T, DMAX>();
  cudaError_t err = prepare(attention_fwd_kernel<T, DMAX>, smem);
  if (err != cudaSuccess) return err;
  attention_fwd_kernel<T, DMAX><<<unsigned(blocks), BM / 16 * kWarp, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int DMAX>
cudaError_t run_bwd(const BwdParams& p, cudaStream_t stream) {
  constexpr int QM = Cfg<T, DMAX>::kDqM, KN = Cfg<T, DMAX>::kKvN;
  const int64_t rows = p.B * p.H * p.Tq;
  const int64_t dq_blocks = (p.Tq + QM - 1) / QM * p.B * p.H;
  const int64_t kv_blocks = (p.Tk + KN - 1) / KN * p.B * p.Hkv;
  if ((rows + 255) / 256 > kMaxGrid || dq_blocks > kMaxGrid || kv_blocks > kMaxGrid) return cudaErrorInvalidValue;
  attention_delta_kernel<T><<<unsigned((rows + 255) / 256), 256, 0, stream>>>(
      static_cast<const T*>(p.dout), static_cast<const T*>(p.out), p.delta, rows, int(p.D));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t kv_smem = dkdv_smem<T, DMAX>();
  err = prepare(attention_dkdv_kernel<T, DMAX>, kv_smem);
  if (err != cudaSuccess) return err;
  attention_dkdv_kernel<T, DMAX><<<unsigned(kv_blocks), KN / 16 * kWarp, kv_smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t dq_smem_bytes = dq_smem<T, DMAX>();
  err = prepare(attention_dq_kernel<T, DMAX>, dq_smem_bytes);
  if (err != cudaSuccess) return err;
  attention_dq_kernel<T, DMAX><<<unsigned(dq_blocks), QM / 16 * kWarp, dq_smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int DMAX>
cudaError_t run_decode(FwdParams p, cudaStream_t stream) {
  constexpr int BM = Cfg<T, DMAX>::kFwdM;
  p.row_blocks = (p.H / p.Hkv * p.Tq + BM - 1) / BM;
  cudaError_t err = run_fwd<T, DMAX>(p, stream);
  if (err != cudaSuccess) return err;
  const int64_t rows = p.B * p.H * p.Tq;
  constexpr int kWarps = 4;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  decode_merge_kernel<T><<<unsigned(blocks), kWarps * kWarp, 0, stream>>>(p.opart, p.lpart, static_cast<T*>(p.out),
                                                                          rows, p.splits, int(p.D));
  return cudaGetLastError();
}

// Calls F<T, DMAX>::run(args...) for the dtype and the padded head dim.
#define GK_ATTN_DISPATCH(dtype, D, FN, ...)                                     \
  [&]() -> cudaError_t {                                                        \
    const int dm_ = dmax_for(D);                                                \
    switch (dtype) {                                                            \
      case DType::kFloat32:                                                     \
        if (dm_ == 32) return FN<float, 32>(__VA_ARGS__);                       \
        if (dm_ == 64) return FN<float, 64>(__VA_ARGS__);                       \
        if (dm_ == 128) return FN<float, 128>(__VA_ARGS__);                     \
        return FN<float, 256>(__VA_ARGS__);                                     \
      case DType::kFloat16:                                                     \
        if (dm_ == 32) return FN<__half, 32>(__VA_ARGS__);                      \
        if (dm_ == 64) return FN<__half, 64>(__VA_ARGS__);                      \
        if (dm_ == 128) return FN<__half, 128>(__VA_ARGS__);                    \
        return FN<__half, 256>(__VA_ARGS__);                                    \
      case DType::kBFloat16:                                                    \
        if (dm_ == 32) return FN<__nv_bfloat16, 32>(__VA_ARGS__);               \
        if (dm_ == 64) return FN<__nv_bfloat16, 64>(__VA_ARGS__);               \
        if (dm_ == 128) return FN<__nv_bfloat16, 128>(__VA_ARGS__);             \
        return FN<__nv_bfloat16, 256>(__VA_ARGS__);                             \
    }                                                                           \
    return cudaErrorInvalidValue;                                               \
  }()

bool valid_heads(int64_t B, int64_t H, int64_t Hkv) { return B >= 0 && H >= 0 && Hkv >= 1 && H % Hkv == 0; }

}  // namespace

size_t attention_cuda_smem_bytes(DType dtype, int64_t D) {
  if (!valid_dim(D)) return 0;
  const int dm = dmax_for(D);
  switch (dtype) {
    case DType::kFloat32:
      return dm == 32 ? max_smem<float, 32>() : dm == 64 ? max_smem<float, 64>()
                                              : dm == 128 ? max_smem<float, 128>() : max_smem<float, 256>();
    case DType::kFloat16:
      return dm == 32 ? max_smem<__half, 32>() : dm == 64 ? max_smem<__half, 64>()
                                               : dm == 128 ? max_smem<__half, 128>() : max_smem<__half, 256>();
    case DType::kBFloat16:
      return dm == 32    ? max_smem<__nv_bfloat16, 32>()
             : dm == 64  ? max_smem<__nv_bfloat16, 64>()
             : dm == 128 ? max_smem<__nv_bfloat16, 128>()
                         : max_smem<__nv_bfloat16, 256>();
  }
  return 0;
}

cudaError_t launch_attention_fwd(DType dtype, const void* q, const void* k, const void* v, const float* mask,
                                 int64_t smb, int64_t smh, int64_t smi, int64_t smj, void* out, float* lse,
                                 int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, float scale,
                                 const AttnSpec& spec, float dropout_p, uint64_t seed, cudaStream_t stream) {
  if (!valid_dim(D) || !valid_heads(B, H, Hkv) || Tq < 0 || Tk < 0 || !(dropout_p >= 0.f && dropout_p < 1.f))
    return cudaErrorInvalidValue;
  if (B * H * Tq == 0) return cudaSuccess;
  FwdParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.mask = mask;
  p.smb = smb;
  p.smh = smh;
  p.smi = smi;
  p.smj = smj;
  p.out = out;
  p.lse = lse;
  p.B = B;
  p.H = H;
  p.Hkv = Hkv;
  p.Tq = Tq;
  p.Tk = Tk;
  p.D = D;
  p.scale = scale;
  p.spec = device_spec(spec);
  p.dropout = dropout_p > 0.f;
  p.drop_threshold = attn_dropout_threshold(dropout_p);
  p.inv_keep = 1.0f / (1.0f - dropout_p);
  p.seed = seed;
  p.decode = false;
  return GK_ATTN_DISPATCH(dtype, D, run_fwd, p, stream);
}

size_t attention_bwd_workspace_bytes(int64_t B, int64_t H, int64_t Tq) { return size_t(B * H * Tq) * sizeof(float); }

cudaError_t launch_attention_bwd(DType dtype, const void* dout, const void* q, const void* k, const void* v,
                                 const void* out, const float* lse, const float* mask, int64_t smb, int64_t smh,
                                 int64_t smi, int64_t smj, void* dq, void* dk, void* dv, float* workspace,
                                 int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, float scale,
                                 const AttnSpec& spec, float dropout_p, uint64_t seed, cudaStream_t stream) {
  if (!valid_dim(D) || !valid_heads(B, H, Hkv) || Tq < 0 || Tk < 0 || !(dropout_p >= 0.f && dropout_p < 1.f))
    return cudaErrorInvalidValue;
  if (B * H * Tq * Tk == 0) {  // no (query, key) pair: zero gradients
    const size_t elsize = dtype == DType::kFloat32 ? 4 : 2;
    const size_t nq = size_t(B * H * Tq * D) * elsize, nk = size_t(B * Hkv * Tk * D) * elsize;
    cudaError_t err = cudaSuccess;
    if (nq > 0) err = cudaMemsetAsync(dq, 0, nq, stream);
    if (err == cudaSuccess && nk > 0) err = cudaMemsetAsync(dk, 0, nk, stream);
    if (err == cudaSuccess && nk > 0) err = cudaMemsetAsync(dv, 0, nk, stream);
    return err;
  }
  BwdParams p{};
  p.dout = dout;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  p.mask = mask;
  p.smb = smb;
  p.smh = smh;
  p.smi = smi;
  p.smj = smj;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.delta = workspace;
  p.B = B;
  p.H = H;
  p.Hkv = Hkv;
  p.Tq = Tq;
  p.Tk = Tk;
  p.D = D;
  p.scale = scale;
  p.spec = device_spec(spec);
  p.dropout = dropout_p > 0.f;
  p.drop_threshold = attn_dropout_threshold(dropout_p);
  p.inv_keep = 1.0f / (1.0f - dropout_p);
  p.seed = seed;
  return GK_ATTN_DISPATCH(dtype, D, run_bwd, p, stream);
}

int decode_attention_num_splits(int64_t B, int64_t H, int64_t Hkv, int64_t Tn, int64_t Tmax, int64_t D,
                                int64_t num_splits, int sm_count) {
  (void)D;
  if (Hkv < 1 || Tmax < 1) return 1;
  const int64_t max_splits = (Tmax + 63) / 64;
  int64_t s = num_splits;
  if (s <= 0) {
    const int64_t row_blocks = (H / Hkv * Tn + 63) / 64;
    const int64_t blocks = B * Hkv * row_blocks;
    const int64_t want = 2 * int64_t(sm_count > 0 ? sm_count : 1);
    s = blocks >= want ? 1 : (want + blocks - 1) / blocks;
    s = s < (Tmax + 255) / 256 ? s : (Tmax + 255) / 256;  // at least 256 keys per split
    s = s < 128 ? s : 128;
  }
  s = s < max_splits ? s : max_splits;
  return int(s < 1 ? 1 : s);
}

size_t decode_attention_workspace_bytes(int64_t B, int64_t H, int64_t Tn, int64_t D, int splits) {
  return size_t(B * H * Tn) * size_t(splits) * size_t(D + 1) * sizeof(float);
}

cudaError_t launch_decode_attention(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                                    const int32_t* seqlens, void* out, float* workspace, int64_t B, int64_t H,
                                    int64_t Hkv, int64_t Tn, int64_t Tmax, int64_t D, float scale, int splits,
                                    cudaStream_t stream) {
  if (!valid_dim(D) || !valid_heads(B, H, Hkv) || Tn < 0 || Tmax < 0 || splits < 1) return cudaErrorInvalidValue;
  if (B * H * Tn == 0) return cudaSuccess;
  FwdParams p{};
  p.q = q;
  p.k = k_cache;
  p.v = v_cache;
  p.mask = nullptr;
  p.out = out;
  p.B = B;
  p.H = H;
  p.Hkv = Hkv;
  p.Tq = Tn;
  p.Tk = Tmax;
  p.D = D;
  p.scale = scale;
  AttnSpec causal;  // right = 0; the kernel takes the positions from seqlens
  causal.right = 0;
  p.spec = device_spec(causal);
  p.dropout = false;
  p.inv_keep = 1.f;
  p.decode = true;
  p.seqlens = seqlens;
  p.splits = splits;
  p.opart = workspace;
  p.lpart = workspace + B * H * Tn * int64_t(splits) * D;
  return GK_ATTN_DISPATCH(dtype, D, run_decode, p, stream);
}

}  // namespace gptkernels
