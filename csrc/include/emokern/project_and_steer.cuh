// emokern/project_and_steer.cuh -- CUDA kernels of the fused project-and-steer op (decode regime).
//
// Framework-agnostic: raw pointers, strides in elements, no torch headers. csrc/cuda/project_and_steer_cuda.cu
// binds it to the emokern::project and emokern::project_and_steer_ ops; emokern/ops/reference.py is the spec.
//
// Design
// ------
// At decode a step carries few tokens (N <= 64, usually 1..8) and the vector bank V is comparatively large
// (K = 171, d = 4096: 1.4 MB in bf16, 2.8 MB in fp32) while h is tiny (8 KB per bf16 token). The op is therefore
// a pair of skinny GEMMs whose cost is the time to stream V through the SMs twice (once per GEMM) plus launch
// and memory latency; FLOPs hardly matter. Everything below is arranged so that every SM has a slice of V in
// flight at once, even for N = 1:
//
//   1. project_kernel: P = h V^T. The grid splits K (16 rows per block, 4 per warp), d (d_splits chunks) and N
//      (tiles of NB <= 8 tokens). Each lane streams 16-byte vectors of its warp's 4 V rows over the block's d
//      chunk and dots them with the tile's h rows (h is tiny and L1/L2 resident, shared by the block's warps).
//      The 4*NB partial sums are reduced across the warp with a "transposing" butterfly (each exchange step
//      halves the number of live values, so 4*NB sums cost ~4*NB shuffles instead of 5*4*NB) and added into
//      P_out with atomicAdd when d is split (the launcher zeroes P_out first), or stored when it is not.
//      The d split is what creates parallelism at N = 1: K alone gives 11 blocks, K x d_splits gives ~176.
//
//   2. update_kernel: h[n] += sum_k delta[n,k] V[k] for steered tokens, delta = clamp(a + b P, lo, hi) - P.
//      The reduction is now over K, so splitting K across blocks would need a cross-block sum before h can be
//      rounded (once) to its dtype. Instead each block owns a narrow column tile (4 vectors = 64 bytes of
//      each V row: 32 bf16/fp16 or 16 fp32 columns -> d / 32 = 128 blocks for bf16 d = 4096) and splits K
//      across its 256 threads (64 rows in parallel, 4 lanes per row). It first computes delta for its tokens
//      (all K, or K chunks if NT*K is too large for shared memory) into shared memory, streams its V column
//      tile once for all NT tokens, reduces over the K-split lanes (transposing butterfly) and warps (shared
//      memory), and stores only steered rows, each element rounded once from fp32. The V prefetch is issued
//      before the delta prologue so that the DRAM latency of V overlaps the (L2) latency of P and the tables.
//      For larger N a block walks several column tiles and reuses its delta, which bounds the redundant
//      prologue work (every block of an N tile recomputes the same delta).
//
// P is accumulated in fp32 from the *input* h: kernel 1 finishes (stream order) before kernel 2 writes h, and
// kernel 2 reads P back from P_out, so the P that steers is exactly the P that is returned. With d_splits > 1
// the atomics make the last bits of P (and so of h) depend on the order of arrival: results are within fp32
// rounding of the reference, not bitwise reproducible run to run. (d_splits == 1, e.g. large N, is.)
//
// No host synchronisation, allocation or host reads of device data: the launchers only enqueue a memset and
// kernels on the given stream, so the op can be captured in a CUDA graph. row values outside [0, R) are treated
// as "not steered" on the device, so a bad index can never read the tables out of bounds.
//
// Large N (prefill) is correct but not what this is tuned for (no tensor cores; V is re-read per token tile);
// the Triton backend serves it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace emokern {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- project kernel shape ----
constexpr int kProjWarps = 4;
constexpr int kProjThreads = kProjWarps * 32;
constexpr int kProjRowsPerWarp = 4;  // V rows per warp: 4 independent 16-byte loads in flight per lane per step
constexpr int kProjRowsPerBlock = kProjWarps * kProjRowsPerWarp;

// ---- update kernel shape ----
constexpr int kUpdThreads = 256;
constexpr int kUpdWarps = kUpdThreads / 32;
constexpr int kUpdColVecs = 4;                         // 16-byte vectors per V row per block: 64-byte segments
constexpr int kUpdRowLanes = kUpdThreads / kUpdColVecs;  // V rows read in parallel by a block
constexpr int kUpdPrefetch = 4;                        // rows per thread loaded before the delta prologue
constexpr int kUpdDeltaFloats = 8192;                  // 32 KB of dynamic shared memory for delta at most

// Blocks the launchers aim for: about two resident blocks per SM, one wave (update_kernel is register-capped
// so that two of its 256-thread blocks do fit on an SM).
constexpr int kBlocksPerSm = 2;

template <typename T>
struct Vec {
  static constexpr int kWidth = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
};

// torch builds with __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, so convert explicitly.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One 16-byte load (p must be 16-byte aligned), widened to fp32. Only used on read-only data (V always; h in
// the project kernel, which does not write it), hence the non-coherent path.
__device__ __forceinline__ void load_vec16(const float* p, float (&out)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
__device__ __forceinline__ void load_vec16(const __half* p, float (&out)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load_vec16(const __nv_bfloat16* p, float (&out)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Transposing warp reduction. v[0..M) holds per-lane partials; the lanes to be summed over are those that differ
// only in lane bits OFF, OFF/2, ..., LOW (powers of two). At each bit the pair of lanes splits the live values:
// the lane with the bit clear keeps (and sums) the lower half, the other the upper half. Once one value is left
// the remaining bits are a plain butterfly. Afterwards each lane holds xpose_slots<M, LOW>() complete sums in
// v[0..slots), at the positions given by xpose_slot(). Cost: about M shuffles instead of M * log2(lanes).
template <int M, int LOW>
__host__ __device__ constexpr int xpose_slots() {
  int m = M;
  for (int off = 16; off >= LOW; off >>= 1) {
    if (m >= 2) m >>= 1;
  }
  return m;
}

template <int OFF, int LOW, int M, int S>
__device__ __forceinline__ void xpose_reduce(float (&v)[S], int lane) {
  static_assert((M & (M - 1)) == 0 && M <= S, "live count must be a power of two within the array");
  if constexpr (OFF >= LOW) {
    if constexpr (M >= 2) {
      constexpr int H = M / 2;
      const bool upper = (lane & OFF) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = upper ? v[i] : v[i + H];
        const float keep = upper ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, OFF);
      }
      xpose_reduce<OFF / 2, LOW, H>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], OFF);
      xpose_reduce<OFF / 2, LOW, 1>(v, lane);
    }
  }
}

// Where xpose_reduce<16, LOW, M> left this lane's sums: v[i] is the total of original index base + i. Lanes that
// differ only in butterfly bits hold identical copies; only the one with those bits clear is the writer.
template <int M, int LOW>
__device__ __forceinline__ void xpose_slot(int lane, int& base, bool& writer) {
  int m = M;
  base = 0;
  writer = true;
#pragma unroll
  for (int off = 16; off >= LOW; off >>= 1) {
    if (m >= 2) {
      m >>= 1;
      if (lane & off) base += m;
    } else if (lane & off) {
      writer = false;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Kernel 1: P (+)= h V^T over one (16 V rows) x (d chunk) x (NB tokens) tile per block.
//
// Grid: x = ceil(K / 16), y = d_splits, z = token tiles (grid-strided, so any N fits in gridDim.z <= 65535).
// chunk is a multiple of 32 * VEC: in the ALIGNED path every lane's vector is either wholly inside [d0, d1)
// or wholly outside (d is then a multiple of VEC too).
// ALIGNED: V, h 16-byte aligned, d and the h row stride multiples of VEC. Otherwise every load is scalar and
// bounds-checked, with lane-interleaved columns so warps still read contiguous memory.
// accumulate: d is split across blocks, so partial sums are atomically added into a zeroed P.
template <typename T, int NB, bool ALIGNED>
__global__ void __launch_bounds__(kProjThreads)
    project_kernel(const T* __restrict__ h, int64_t ldh, const T* __restrict__ V, float* __restrict__ P,
                   int64_t ldp, int64_t N, int K, int d, int chunk, bool accumulate) {
  constexpr int VEC = Vec<T>::kWidth;
  constexpr int KW = kProjRowsPerWarp;
  constexpr int M = KW * NB;  // partial sums per lane, index kk * NB + n
  constexpr int SLOTS = xpose_slots<M, 1>();

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int k0 = (blockIdx.x * kProjWarps + warp) * KW;
  if (k0 >= K) return;  // whole warp leaves together: no shuffle or barrier is left waiting
  const int d0 = blockIdx.y * chunk;
  const int d1 = min(d, d0 + chunk);
  const int64_t n_tiles = (N + NB - 1) / NB;

  int slot_base;
  bool writer;
  xpose_slot<M, 1>(lane, slot_base, writer);

  for (int64_t tile = blockIdx.z; tile < n_tiles; tile += gridDim.z) {
    const int64_t n0 = tile * NB;
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; ++i) acc[i] = 0.f;

    for (int step = d0; step < d1; step += 32 * VEC) {
      float v[KW][VEC];
      if constexpr (ALIGNED) {
        const int j = step + lane * VEC;
        const bool in = j < d1;
#pragma unroll
        for (int kk = 0; kk < KW; ++kk) {
          if (in && k0 + kk < K) {
            load_vec16(V + static_cast<int64_t>(k0 + kk) * d + j, v[kk]);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[kk][e] = 0.f;
          }
        }
#pragma unroll
        for (int n = 0; n < NB; ++n) {
          if (in && n0 + n < N) {
            float x[VEC];
            load_vec16(h + (n0 + n) * ldh + j, x);
#pragma unroll
            for (int kk = 0; kk < KW; ++kk) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[kk * NB + n] = fmaf(v[kk][e], x[e], acc[kk * NB + n]);
            }
          }
        }
      } else {
        // Element e of this lane is column step + lane + 32 * e: the dot product does not care which columns a
        // lane owns, only that V and h agree, and this keeps each warp load contiguous.
#pragma unroll
        for (int kk = 0; kk < KW; ++kk) {
          const bool row_in = k0 + kk < K;
          const T* vrow = V + static_cast<int64_t>(row_in ? k0 + kk : 0) * d;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const int j = step + lane + 32 * e;
            v[kk][e] = (row_in && j < d1) ? to_float(vrow[j]) : 0.f;
          }
        }
#pragma unroll
        for (int n = 0; n < NB; ++n) {
          if (n0 + n < N) {
            const T* hrow = h + (n0 + n) * ldh;
            float x[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const int j = step + lane + 32 * e;
              x[e] = j < d1 ? to_float(hrow[j]) : 0.f;
            }
#pragma unroll
            for (int kk = 0; kk < KW; ++kk) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[kk * NB + n] = fmaf(v[kk][e], x[e], acc[kk * NB + n]);
            }
          }
        }
      }
    }

    xpose_reduce<16, 1, M>(acc, lane);
    if (writer) {
#pragma unroll
      for (int i = 0; i < SLOTS; ++i) {
        const int idx = slot_base + i;
        const int kk = idx / NB;
        const int n = idx % NB;
        if (k0 + kk < K && n0 + n < N) {
          float* dst = P + (n0 + n) * ldp + (k0 + kk);
          if (accumulate) {
            atomicAdd(dst, acc[i]);
          } else {
            *dst = acc[i];
          }
        }
      }
    }
  }
}

// Zeroes an (N, K) fp32 matrix with row stride ldp, for when P_out is not one contiguous range.
__global__ void __launch_bounds__(256) zero_rows_kernel(float* __restrict__ P, int64_t ldp, int64_t N, int K) {
  const int64_t total = N * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    P[(i / K) * ldp + (i % K)] = 0.f;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Kernel 2: h[n, cols] += sum_k delta[n, k] V[k, cols] for the steered tokens of an NT-token tile, over the
// column tiles [ct_begin, ct_end) of this block; each column tile is kUpdColVecs vectors (C = 4 * VEC columns).
//
// Grid: x = column-tile groups (tiles_per_block column tiles each), y = token tiles (grid-strided).
// Thread t reads V rows k = t / 4 + 64 i, vector t % 4 of the column tile, for all NT tokens.
// Dynamic shared memory: NT * kc_max floats of delta; K is processed in chunks of kc_max rows (one chunk unless
// NT * K exceeds kUpdDeltaFloats). ALIGNED: V 16-byte aligned and d a multiple of VEC (h is only touched with
// scalar accesses, so its alignment does not matter).
template <typename T, int NT, bool ALIGNED>
__global__ void __launch_bounds__(kUpdThreads, kBlocksPerSm)
    update_kernel(T* h, int64_t ldh, const T* __restrict__ V, const int32_t* __restrict__ row,
                  const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ lo,
                  const float* __restrict__ hi, int64_t R, const float* __restrict__ P, int64_t ldp, int64_t N,
                  int K, int d, int kc_max, int tiles_per_block) {
  constexpr int VEC = Vec<T>::kWidth;
  constexpr int CV = kUpdColVecs;
  constexpr int C = CV * VEC;
  constexpr int KS = kUpdRowLanes;
  constexpr int KU = kUpdPrefetch;
  constexpr int M = NT * VEC;  // accumulators per thread, index n * VEC + e
  constexpr int SLOTS = xpose_slots<M, CV>();
  static_assert((CV & (CV - 1)) == 0 && CV <= 32, "the K-split lanes must be the high lane bits");

  extern __shared__ float s_delta[];  // [NT][kc_max]: consecutive k in consecutive banks
  __shared__ float s_red[kUpdWarps][CV][M];
  __shared__ int s_row[NT];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int cv = lane & (CV - 1);
  const int kr = tid / CV;

  const int64_t n_col_tiles = (d + C - 1) / C;
  const int64_t ct_begin = static_cast<int64_t>(blockIdx.x) * tiles_per_block;
  const int64_t ct_end = ct_begin + tiles_per_block < n_col_tiles ? ct_begin + tiles_per_block : n_col_tiles;
  const int64_t n_tiles = (N + NT - 1) / NT;

  int slot_base;
  bool writer;
  xpose_slot<M, CV>(lane, slot_base, writer);

  // Loads this thread's part of V row k (absolute) for the column tile starting at col0, zero outside d.
  auto load_row = [&](int k, int col0, float (&out)[VEC]) {
    const T* vrow = V + static_cast<int64_t>(k) * d;
    const int c = col0 + cv * VEC;
    if constexpr (ALIGNED) {
      if (c < d) {  // d % VEC == 0 here, so the vector is wholly in range
        load_vec16(vrow + c, out);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[e] = 0.f;
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = c + e < d ? to_float(vrow[c + e]) : 0.f;
    }
  };

  for (int64_t tile = blockIdx.y; tile < n_tiles; tile += gridDim.y) {
    const int64_t n0 = tile * NT;
    __syncthreads();  // the previous tile's final phase has finished reading s_row and s_red
    if (tid < NT) {
      int r = -1;
      if (n0 + tid < N) {
        const int32_t raw = row[n0 + tid];
        // Out-of-range indices are "not steered": the Python side validates outside capture, the device
        // must still never index the tables with them.
        r = (raw >= 0 && static_cast<int64_t>(raw) < R) ? raw : -1;
      }
      s_row[tid] = r;
    }
    __syncthreads();
    bool any = false;
#pragma unroll
    for (int n = 0; n < NT; ++n) any |= s_row[n] >= 0;
    if (!any) continue;  // block-uniform (everyone read the same s_row): nothing to store, skip V entirely

    bool delta_resident = false;  // delta of all K already in s_delta (single chunk): reuse across column tiles
    for (int64_t ct = ct_begin; ct < ct_end; ++ct) {
      const int col0 = static_cast<int>(ct * C);
      float acc[M];
#pragma unroll
      for (int i = 0; i < M; ++i) acc[i] = 0.f;

      for (int kc0 = 0; kc0 < K; kc0 += kc_max) {
        const int kcn = min(kc_max, K - kc0);
        // Issue the first V loads before the delta prologue: they do not depend on it.
        float v[KU][VEC];
#pragma unroll
        for (int u = 0; u < KU; ++u) {
          const int k = kr + u * KS;
          if (k < kcn) {
            load_row(kc0 + k, col0, v[u]);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[u][e] = 0.f;
          }
        }
        if (!delta_resident) {
          __syncthreads();  // every thread has finished reading the previous chunk's delta
          for (int i = tid; i < NT * kcn; i += kUpdThreads) {
            const int n = i / kcn;
            const int k = i - n * kcn;
            const int r = s_row[n];
            float dl = 0.f;
            if (r >= 0) {
              const float p = P[(n0 + n) * ldp + kc0 + k];
              const int64_t t = static_cast<int64_t>(r) * K + kc0 + k;
              const float x = a[t] + b[t] * p;
              // min/max written out so that a NaN projection propagates, as torch.clamp does.
              float q = x < lo[t] ? lo[t] : x;
              q = q > hi[t] ? hi[t] : q;
              dl = q - p;
            }
            s_delta[n * kc_max + k] = dl;
          }
          __syncthreads();
          delta_resident = kc_max >= K;
        }
#pragma unroll
        for (int u = 0; u < KU; ++u) {
          const int k = kr + u * KS;
          if (k < kcn) {
#pragma unroll
            for (int n = 0; n < NT; ++n) {
              const float dn = s_delta[n * kc_max + k];
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[n * VEC + e] = fmaf(dn, v[u][e], acc[n * VEC + e]);
            }
          }
        }
        for (int k = kr + KU * KS; k < kcn; k += KS) {  // only when a chunk has more than 256 rows
          float w[VEC];
          load_row(kc0 + k, col0, w);
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            const float dn = s_delta[n * kc_max + k];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[n * VEC + e] = fmaf(dn, w[e], acc[n * VEC + e]);
          }
        }
      }

      // Sum over the 8 K-split lanes of each column vector (lane bits 2..4), then over the warps.
      xpose_reduce<16, CV, M>(acc, lane);
      __syncthreads();  // the previous column tile's final phase has finished reading s_red
      if (writer) {
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) s_red[warp][cv][slot_base + i] = acc[i];
      }
      __syncthreads();
      for (int t = tid; t < CV * M; t += kUpdThreads) {
        const int c = t / M;
        const int idx = t - c * M;
        const int n = idx / VEC;
        const int e = idx - n * VEC;
        const int col = col0 + c * VEC + e;
        if (s_row[n] < 0 || col >= d) continue;  // unsteered rows are never stored to
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kUpdWarps; ++w) sum += s_red[w][c][idx];
        T* dst = h + (n0 + n) * ldh + col;
        *dst = from_float<T>(to_float(*dst) + sum);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
constexpr int64_t kMaxGridYZ = 65535;

// Token tile for a given N: the smallest of 1, 2, 4, 8 that covers N, else 8 (register budget).
inline int token_tile(int64_t N) { return N <= 1 ? 1 : N <= 2 ? 2 : N <= 4 ? 4 : 8; }

template <typename T, int NB, bool ALIGNED>
cudaError_t launch_project_tile(const T* h, int64_t ldh, const T* V, float* P, int64_t ldp, int64_t N, int K,
                                int d, int num_sms, cudaStream_t stream) {
  constexpr int step = 32 * Vec<T>::kWidth;  // columns per warp step
  const int64_t k_blocks = ceil_div(K, kProjRowsPerBlock);
  const int64_t n_tiles = ceil_div(N, NB);
  const int64_t z = n_tiles < kMaxGridYZ ? n_tiles : kMaxGridYZ;
  // Split d until the grid has about kBlocksPerSm blocks per SM, but never below one warp step per block.
  const int64_t steps = ceil_div(d, step);
  const int64_t target = static_cast<int64_t>(kBlocksPerSm) * (num_sms > 0 ? num_sms : 1);
  int64_t splits = ceil_div(target, k_blocks * z);
  if (splits > steps) splits = steps;
  if (splits > kMaxGridYZ) splits = kMaxGridYZ;
  if (splits < 1) splits = 1;
  const int64_t chunk_steps = ceil_div(steps, splits);
  splits = ceil_div(steps, chunk_steps);  // drop empty trailing chunks
  const int chunk = static_cast<int>(chunk_steps * step);
  const bool accumulate = splits > 1;
  if (accumulate) {
    // The blocks add into P_out, so it must start at zero.
    if (N == 1 || ldp == K) {
      const cudaError_t err = cudaMemsetAsync(P, 0, static_cast<size_t>(N) * K * sizeof(float), stream);
      if (err != cudaSuccess) return err;
    } else {
      const int64_t total = N * K;
      int64_t blocks = ceil_div(total, 256);
      if (blocks > 4096) blocks = 4096;
      zero_rows_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(P, ldp, N, K);
    }
  }
  const dim3 grid(static_cast<unsigned>(k_blocks), static_cast<unsigned>(splits), static_cast<unsigned>(z));
  project_kernel<T, NB, ALIGNED>
      <<<grid, kProjThreads, 0, stream>>>(h, ldh, V, P, ldp, N, K, d, chunk, accumulate);
  return cudaGetLastError();
}

template <typename T, bool ALIGNED>
cudaError_t launch_project_aligned(const T* h, int64_t ldh, const T* V, float* P, int64_t ldp, int64_t N, int K,
                                   int d, int num_sms, cudaStream_t stream) {
  switch (token_tile(N)) {
    case 1: return launch_project_tile<T, 1, ALIGNED>(h, ldh, V, P, ldp, N, K, d, num_sms, stream);
    case 2: return launch_project_tile<T, 2, ALIGNED>(h, ldh, V, P, ldp, N, K, d, num_sms, stream);
    case 4: return launch_project_tile<T, 4, ALIGNED>(h, ldh, V, P, ldp, N, K, d, num_sms, stream);
    default: return launch_project_tile<T, 8, ALIGNED>(h, ldh, V, P, ldp, N, K, d, num_sms, stream);
  }
}

template <typename T, int NT, bool ALIGNED>
cudaError_t launch_update_tile(T* h, int64_t ldh, const T* V, const int32_t* row, const float* a, const float* b,
                               const float* lo, const float* hi, int64_t R, const float* P, int64_t ldp, int64_t N,
                               int K, int d, int num_sms, cudaStream_t stream) {
  constexpr int C = kUpdColVecs * Vec<T>::kWidth;
  const int64_t n_col_tiles = ceil_div(d, C);
  const int64_t n_tiles = ceil_div(N, NT);
  const int64_t y = n_tiles < kMaxGridYZ ? n_tiles : kMaxGridYZ;
  // One column tile per block at small N (most parallelism for streaming V); at larger N several, so that the
  // per-block delta prologue is amortised while the grid still fills the GPU about once.
  const int64_t target = static_cast<int64_t>(kBlocksPerSm) * (num_sms > 0 ? num_sms : 1);
  int64_t tiles_per_block = ceil_div(n_col_tiles * y, target);
  if (tiles_per_block > n_col_tiles) tiles_per_block = n_col_tiles;
  if (tiles_per_block < 1) tiles_per_block = 1;
  const int64_t x = ceil_div(n_col_tiles, tiles_per_block);
  const int kc_max = K < kUpdDeltaFloats / NT ? K : kUpdDeltaFloats / NT;
  const size_t smem = static_cast<size_t>(NT) * kc_max * sizeof(float);
  const dim3 grid(static_cast<unsigned>(x), static_cast<unsigned>(y));
  update_kernel<T, NT, ALIGNED><<<grid, kUpdThreads, smem, stream>>>(
      h, ldh, V, row, a, b, lo, hi, R, P, ldp, N, K, d, kc_max, static_cast<int>(tiles_per_block));
  return cudaGetLastError();
}

template <typename T, bool ALIGNED>
cudaError_t launch_update_aligned(T* h, int64_t ldh, const T* V, const int32_t* row, const float* a,
                                  const float* b, const float* lo, const float* hi, int64_t R, const float* P,
                                  int64_t ldp, int64_t N, int K, int d, int num_sms, cudaStream_t stream) {
  switch (token_tile(N)) {
    case 1: return launch_update_tile<T, 1, ALIGNED>(h, ldh, V, row, a, b, lo, hi, R, P, ldp, N, K, d, num_sms, stream);
    case 2: return launch_update_tile<T, 2, ALIGNED>(h, ldh, V, row, a, b, lo, hi, R, P, ldp, N, K, d, num_sms, stream);
    case 4: return launch_update_tile<T, 4, ALIGNED>(h, ldh, V, row, a, b, lo, hi, R, P, ldp, N, K, d, num_sms, stream);
    default: return launch_update_tile<T, 8, ALIGNED>(h, ldh, V, row, a, b, lo, hi, R, P, ldp, N, K, d, num_sms, stream);
  }
}

// Zeroes P when there is nothing to project over (d == 0).
inline cudaError_t zero_projection(float* P, int64_t ldp, int64_t N, int K, cudaStream_t stream) {
  if (N == 1 || ldp == K) return cudaMemsetAsync(P, 0, static_cast<size_t>(N) * K * sizeof(float), stream);
  int64_t blocks = ceil_div(N * K, 256);
  if (blocks > 4096) blocks = 4096;
  zero_rows_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(P, ldp, N, K);
  return cudaGetLastError();
}

}  // namespace detail

// P[n, k] = sum_j h[n, j] V[k, j] in fp32, for all N tokens.
//   h: (N, d) T, unit column stride, row stride ldh (elements). V: (K, d) T, contiguous.
//   P: (N, K) fp32, unit column stride, row stride ldp (elements).
//   num_sms: multiprocessor count of the device, used only to size the grid.
// Enqueues on stream only; returns the first launch error (the caller should still check after it).
template <typename T>
cudaError_t launch_project(const T* h, int64_t ldh, const T* V, float* P, int64_t ldp, int64_t N, int K, int d,
                           int num_sms, cudaStream_t stream) {
  using namespace detail;
  if (N <= 0 || K <= 0) return cudaSuccess;
  if (d <= 0) return zero_projection(P, ldp, N, K, stream);
  constexpr int VEC = Vec<T>::kWidth;
  const bool aligned = aligned16(V) && aligned16(h) && d % VEC == 0 && (N <= 1 || ldh % VEC == 0);
  return aligned ? launch_project_aligned<T, true>(h, ldh, V, P, ldp, N, K, d, num_sms, stream)
                 : launch_project_aligned<T, false>(h, ldh, V, P, ldp, N, K, d, num_sms, stream);
}

// launch_project, then for every token n with 0 <= row[n] < R (r = row[n]):
//   q = clamp(a[r, k] + b[r, k] P[n, k], lo[r, k], hi[r, k]);  h[n, :] += sum_k (q - P)[n, k] V[k, :]
// with fp32 accumulation and one rounding to T. Other tokens' rows of h are not written.
//   row: (N,) int32. a, b, lo, hi: (R, K) fp32 contiguous. h is read by the first kernel and updated in place
//   by the second (stream order makes the projection see the input h).
template <typename T>
cudaError_t launch_project_and_steer(T* h, int64_t ldh, const T* V, const int32_t* row, const float* a,
                                     const float* b, const float* lo, const float* hi, int64_t R, float* P,
                                     int64_t ldp, int64_t N, int K, int d, int num_sms, cudaStream_t stream) {
  using namespace detail;
  cudaError_t err = launch_project<T>(h, ldh, V, P, ldp, N, K, d, num_sms, stream);
  if (err != cudaSuccess || N <= 0 || K <= 0 || d <= 0 || R <= 0) return err;
  constexpr int VEC = Vec<T>::kWidth;
  const bool aligned = aligned16(V) && d % VEC == 0;
  return aligned ? launch_update_aligned<T, true>(h, ldh, V, row, a, b, lo, hi, R, P, ldp, N, K, d, num_sms, stream)
                 : launch_update_aligned<T, false>(h, ldh, V, row, a, b, lo, hi, R, P, ldp, N, K, d, num_sms, stream);
}

}  // namespace cuda
}  // namespace emokern
