/*
TokenWeave's comm point as CUDA kernels: AllReduce + residual add + RMSNorm in one kernel, and the
same add + RMSNorm without communication (world size 1, or after NCCL's all-reduce).

What it computes (bf16 in and out, fp32 math, HF transformers' RMSNorm):
    r  = bf16( float(sum over ranks of partial) + float(residual) )     residual <- r
    x  = bf16( float(w) * float( bf16( float(r) * rsqrt(mean(float(r)^2) + eps) ) ) )
The variance is taken from the bf16-rounded r, exactly like running HF's RMSNorm on the stored
residual.

Kernels:
  fused_add_rmsnorm                 local (no communication): x holds the already-summed partial,
                                    in place on x [T, H] and residual [T, H].
  fused_allreduce_add_rmsnorm<P2P>  buf [Tp, H] is a view into torch symmetric memory with the same
  fused_allreduce_add_rmsnorm<MULTIMEM>  layout on every rank. Rank r owns rows [r*Tp/N, (r+1)*Tp/N):
                                    it reduces them over all ranks, adds its residual slice
                                    [Tp/N, H], normalizes, and writes the normalized rows into every
                                    rank's buf. So it is a reduce-scatter, a 1/N-sized add+RMSNorm
                                    and an all-gather of the normalized rows, in one pass.
  P2P reads the row's 16-byte vectors from all N peers' buffers over NVLink and stores to each
  peer; MULTIMEM does one multimem.ld_reduce and one multimem.st on the multicast address (which
  only ever arrives as an argument, from torch symmetric memory). Everything else is shared.
  Every row is computed by exactly one rank, so all ranks end with bitwise identical x; P2P sums
  the ranks in the fixed order 0..N-1 in fp32. MULTIMEM's sum is done by the switch in fp32 and
  returned rounded to bf16, so it can differ from P2P by the rounding of the sum.
  resident_ctas (host)              how many CTAs of the p2p kernel a GPU holds at once: ranks that
                                    spin on each other from one GPU (comm.VirtualRanks) must all fit.
The local kernel starts early behind the kernel before it (programmatic dependent launch, see
common.cuh): in a decode step it sits between the fast path's kernels.

Build:
  JIT, as the project uses it:     python build_ext.py      (torch.utils.cpp_extension, sm_90a)
  standalone kernel check (CI):    nvcc -c -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
                                        -DTW_NO_TORCH multimem_ops.cu -o /dev/null
  SASS check:                      python build_ext.py --sass

Memory ordering. Each CTA b meets the CTA b of every peer twice, through our own symmetric flag
array flags[MAX_CTAS][N] (uint32, zeroed once at allocation; one array per stream that may run
these kernels concurrently). To signal peer p, CTA b moves p's flags[b][my_rank] 0 -> 1 with a
CAS, spinning while it is still 1 (p has not consumed our previous signal yet); to wait for p, it
moves its own flags[b][p] 1 -> 0. A signal is never lost and every wait consumes exactly one, so
the k-th wait pairs with the k-th signal whatever the CTA counts of earlier calls were (as long
as all ranks launch the same count per call), and no reset or epoch counter is needed.
  * Exit barrier: release / acquire at system scope. The release (after __syncthreads, which
    orders every thread's stores of the CTA before it) makes our stores into peer p's buffer, and
    the completion of our loads of p's partials, visible to p before p's kernel can finish; the
    acquire makes p's stores into our buffer visible to us and to everything after this kernel on
    our stream. Hence: when the kernel completes on a rank, every peer has finished reading this
    rank's partials and writing its rows into this rank's buffer, and the buffer may be reused.
  * Entry barrier: relaxed (no fence). It only has to tell us that peer p's kernel has started.
    p's partials were written by kernels that completed before p's kernel started, and kernel
    completion makes a kernel's writes visible system-wide (that is what cross-device event
    synchronization relies on too); our loads of p's memory go to p's memory side over NVLink, so
    they see them. The hazards in the other direction are covered too: p only reads its own buf
    rows (before this kernel, in stream order) and our loads of a row precede our stores to the
    same row on each peer in the same thread (same thread<->element mapping in both phases).
    A release fence here would stall every CTA once per call for nothing.
  * Multimem accesses go through the same NVLink fabric and are ordered by the same fences.
Every spin loop reads %globaltimer and, after timeout_ns, prints which rank, CTA, peer and barrier
timed out and traps, instead of hanging the job when a peer has died.
*/
#include "common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace tw {

constexpr int MAX_CTAS = 64;      // flags are [MAX_CTAS][N] per rank
constexpr int MAX_PEERS = 8;
constexpr int MAX_THREADS = 1024;
// Vectors (16 bytes, 8 bf16) per thread: 1 with up to 1024 threads (H <= 8192, the hot path), else
// 4 or 8 with up to 512 threads, which leaves 128 registers per thread for the peers' loads in
// flight and the packed row (at 1024 threads and 64 registers, 2 or 4 vectors spill).
constexpr int WIDE_THREADS = 512;
constexpr int MAX_VPT = 8;
constexpr int MAX_HIDDEN = MAX_VPT * WIDE_THREADS * 8;  // 32768

enum class Transport { LOCAL, P2P, MULTIMEM };

// Passed by value: the peer pointers live in the kernel's parameter space, no device array needed.
struct PeerPtrs {
  void* ptr[MAX_PEERS];
};

struct Params {
  uint4* buf;                // this rank's rows: [rows_total, H] as 16-byte vectors (local: x)
  uint4* residual;           // [rows, H]: this rank's slice (local: all rows)
  const uint4* weight;       // [H]
  PeerPtrs bufs;             // bufs.ptr[i] = the same view in rank i's mapping
  PeerPtrs flags;            // flags.ptr[i] = rank i's uint32 [MAX_CTAS][n] flag array
  void* multicast;           // the same view's multicast address (MULTIMEM only)
  int rank, n;               // this rank, world size
  int rows;                  // rows to normalize here: Tp/N (local: T)
  int nvec;                  // H / 8
  float eps;
  unsigned long long timeout_ns;
};

// ---------------------------------------------------------------------------------------------
// Flags and barriers.

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

enum class Order { RELAXED, RELEASE, ACQUIRE };

// System scope: the flag may live on another GPU, and the ordering must reach it.
template <Order O>
__device__ __forceinline__ uint32_t cas_sys(uint32_t* addr, uint32_t expected, uint32_t desired) {
  uint32_t old;
  if constexpr (O == Order::RELEASE) {
    asm volatile("atom.release.sys.global.cas.b32 %0, [%1], %2, %3;"
                 : "=r"(old) : "l"(addr), "r"(expected), "r"(desired) : "memory");
  } else if constexpr (O == Order::ACQUIRE) {
    asm volatile("atom.acquire.sys.global.cas.b32 %0, [%1], %2, %3;"
                 : "=r"(old) : "l"(addr), "r"(expected), "r"(desired) : "memory");
  } else {
    asm volatile("atom.relaxed.sys.global.cas.b32 %0, [%1], %2, %3;"
                 : "=r"(old) : "l"(addr), "r"(expected), "r"(desired) : "memory");
  }
  return old;
}

// Kept out of line: the spin loops stay small, and printf's stack lives only here.
__device__ __noinline__ void barrier_timed_out(int rank, int peer, const char* barrier,
                                               const char* what) {
  printf("tokenweave fused_allreduce_add_rmsnorm: rank %d CTA %d timed out at the %s barrier %s "
         "peer %d; the peer may have died, or the ranks launched different sizes or CTA counts. "
         "Trapping.\n",
         rank, static_cast<int>(blockIdx.x), barrier, what, peer);
  __trap();
}

// ptr[i] with a run-time i, without making the compiler copy the parameters to local memory.
__device__ __forceinline__ void* select(const PeerPtrs& peers, int i) {
  void* out = peers.ptr[0];
#pragma unroll
  for (int k = 1; k < MAX_PEERS; ++k)
    if (i == k) out = peers.ptr[k];
  return out;
}

// One thread per peer meets CTA blockIdx.x of that peer: it signals the peer, then waits for it.
template <Order SIGNAL, Order WAIT>
__device__ __forceinline__ void barrier(const Params& p, const char* name) {
  __syncthreads();  // exit: every thread's stores of this CTA precede the release below
  const int peer = threadIdx.x;
  if (peer < p.n && peer != p.rank) {
    uint32_t* theirs = static_cast<uint32_t*>(select(p.flags, peer)) + blockIdx.x * p.n + p.rank;
    uint32_t* mine = static_cast<uint32_t*>(select(p.flags, p.rank)) + blockIdx.x * p.n + peer;
    const unsigned long long start = globaltimer();
    while (cas_sys<SIGNAL>(theirs, 0u, 1u) != 0u) {
      if (globaltimer() - start > p.timeout_ns) barrier_timed_out(p.rank, peer, name, "signalling");
    }
    while (cas_sys<WAIT>(mine, 1u, 0u) != 1u) {
      if (globaltimer() - start > p.timeout_ns) barrier_timed_out(p.rank, peer, name, "waiting for");
    }
  }
  __syncthreads();  // exit: the acquire above precedes every thread's later accesses
}

// ---------------------------------------------------------------------------------------------
// Loads and stores: the only code that differs between transports. `vec` indexes 16-byte vectors
// of the buffer; the same thread loads and stores the same vector (see the header). NP is the
// number of peers the code is specialized for (the actual p.n may be smaller), so that a 4-GPU
// group holds 4, not 8, loads in flight per vector in registers.

template <Transport T>
__host__ __device__ constexpr int loads_per_vec(int np) { return T == Transport::P2P ? np : 1; }

template <Transport T, int NP>
__device__ __forceinline__ void issue_loads(const Params& p, size_t vec, uint4 (&in)[NP]) {
  if constexpr (T == Transport::LOCAL) {
    in[0] = p.buf[vec];
  } else if constexpr (T == Transport::P2P) {
#pragma unroll
    for (int i = 0; i < NP; ++i)
      if (i < p.n) in[i] = static_cast<const uint4*>(select(p.bufs, i))[vec];
  } else {
    const uint4* addr = static_cast<const uint4*>(p.multicast) + vec;
    asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2 {%0, %1, %2, %3}, [%4];"
                 : "=r"(in[0].x), "=r"(in[0].y), "=r"(in[0].z), "=r"(in[0].w) : "l"(addr) : "memory");
  }
}

// acc = the sum of the loaded vectors, in fixed rank order 0..N-1: reproducible sums.
template <int NP>
__device__ __forceinline__ void sum_loads(const Params& p, const uint4 (&in)[NP], float acc[8]) {
  unpack8(in[0], acc);
#pragma unroll
  for (int i = 1; i < NP; ++i) {
    if (i < p.n) {
      float f[8];
      unpack8(in[i], f);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] += f[k];
    }
  }
}

template <Transport T>
__device__ __forceinline__ void store(const Params& p, size_t vec, const uint4& v) {
  if constexpr (T == Transport::LOCAL) {
    p.buf[vec] = v;
  } else if constexpr (T == Transport::P2P) {
#pragma unroll
    for (int i = 0; i < MAX_PEERS; ++i)
      if (i < p.n) static_cast<uint4*>(p.bufs.ptr[i])[vec] = v;
  } else {
    // .v4.f32 only names the 16-byte width: the bits are bf16 pairs, copied unchanged.
    uint4* addr = static_cast<uint4*>(p.multicast) + vec;
    asm volatile("multimem.st.relaxed.sys.global.v4.f32 [%0], {%1, %2, %3, %4};"
                 :: "l"(addr), "f"(__uint_as_float(v.x)), "f"(__uint_as_float(v.y)),
                    "f"(__uint_as_float(v.z)), "f"(__uint_as_float(v.w))
                 : "memory");
  }
}

// ---------------------------------------------------------------------------------------------
// ROWS rows at a time: reduce, add the residual, RMSNorm, scale, store.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Every warp reduces the per-warp sums itself, so all threads get the same bits with two barriers
// for all ROWS sums together.
template <int ROWS>
__device__ __forceinline__ void block_sum(float (&v)[ROWS]) {
  __shared__ float warp_sums[ROWS][MAX_THREADS / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < ROWS; ++i) v[i] = warp_sum(v[i]);
  __syncthreads();  // the previous rows' readers are done with warp_sums
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < ROWS; ++i) warp_sums[i][warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < ROWS; ++i) v[i] = warp_sum(lane < blockDim.x / 32 ? warp_sums[i][lane] : 0.f);
}

// Rows row0 + i * stride (buffer) and res0 + i * stride (residual), i < ROWS, those with
// res0 + i * stride < p.rows. All loads of all ROWS rows are issued before the first sum: the
// NVLink round trips of ROWS x NP x VPT 16-byte loads per thread overlap, and one block reduction
// serves all the rows. That, not the arithmetic, is what sets the speed at a few CTAs.
template <Transport T, int NP, int VPT, int ROWS>
__device__ __forceinline__ void add_rmsnorm_rows(const Params& p, int row0, int res0, int stride,
                                                 const uint4 (&w)[VPT]) {
  constexpr int L = loads_per_vec<T>(NP);
  uint4 in[ROWS][L], res[ROWS][VPT];  // in: the prefetched loads (one vector per thread only)
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int col = threadIdx.x + v * blockDim.x;
      if (res0 + i * stride < p.rows && col < p.nvec) {
        if constexpr (VPT == 1)  // wider rows hold too many vectors: load those just before use
          issue_loads<T, L>(p, static_cast<size_t>(row0 + i * stride) * p.nvec + col, in[i]);
        res[i][v] = p.residual[static_cast<size_t>(res0 + i * stride) * p.nvec + col];
      }
    }
  }
  // r stays packed as bf16: it is rounded anyway, and that halves the registers it needs.
  float sumsq[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    sumsq[i] = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int col = threadIdx.x + v * blockDim.x;
      if (res0 + i * stride < p.rows && col < p.nvec) {
        float acc[8], f[8];
        if constexpr (VPT == 1) {
          sum_loads<L>(p, in[i], acc);
        } else {
          uint4 late[L];
          issue_loads<T, L>(p, static_cast<size_t>(row0 + i * stride) * p.nvec + col, late);
          sum_loads<L>(p, late, acc);
        }
        unpack8(res[i][v], f);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] += f[k];
        res[i][v] = pack8(acc);
        p.residual[static_cast<size_t>(res0 + i * stride) * p.nvec + col] = res[i][v];
        unpack8(res[i][v], f);  // the variance uses the bf16-rounded r, as HF does
#pragma unroll
        for (int k = 0; k < 8; ++k) sumsq[i] += f[k] * f[k];
      }
    }
  }
  block_sum<ROWS>(sumsq);
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const float inv_rms = rsqrtf(sumsq[i] / static_cast<float>(p.nvec * 8) + p.eps);
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int col = threadIdx.x + v * blockDim.x;
      if (res0 + i * stride < p.rows && col < p.nvec) {
        float f[8], wf[8];
        unpack8(res[i][v], f);
        unpack8(VPT == 1 ? w[0] : __ldg(p.weight + col), wf);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          // HF: normalize in fp32, cast to bf16, then multiply by the weight (rounded again).
          f[k] = wf[k] * __bfloat162float(__float2bfloat16_rn(f[k] * inv_rms));
        }
        store<T>(p, static_cast<size_t>(row0 + i * stride) * p.nvec + col, pack8(f));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels.

template <int VPT>
constexpr int max_threads() { return VPT == 1 ? MAX_THREADS : WIDE_THREADS; }

// The weight is the same for every row: with one vector per thread it stays in registers; wider
// rows need those registers for their loads and read it per row (from L1).
template <int VPT>
__device__ __forceinline__ void load_weight(const Params& p, uint4 (&w)[VPT]) {
  if constexpr (VPT == 1) {
    if (threadIdx.x < p.nvec) w[0] = __ldg(p.weight + threadIdx.x);
  }
}

template <int VPT>
__global__ void __launch_bounds__(max_threads<VPT>()) fused_add_rmsnorm_kernel(const Params p) {
  uint4 w[VPT];
  load_weight<VPT>(p, w);
  pdl_wait();
  pdl_launch_dependents();
  for (int row = blockIdx.x; row < p.rows; row += gridDim.x)
    add_rmsnorm_rows<Transport::LOCAL, 1, VPT, 1>(p, row, row, 0, w);
}

// CTA b handles owned rows b, b + G, b + 2G, ... (G = gridDim.x), ROWS at a time; G is the same
// on all ranks, and every CTA takes part in both barriers even when it owns no row, because its
// peers wait for it.
template <Transport T, int NP, int VPT, int ROWS>
__global__ void __launch_bounds__(max_threads<VPT>()) fused_allreduce_add_rmsnorm_kernel(const Params p) {
  uint4 w[VPT];
  load_weight<VPT>(p, w);
  barrier<Order::RELAXED, Order::RELAXED>(p, "entry");
  const int G = gridDim.x;
  for (int j = blockIdx.x; j < p.rows; j += ROWS * G)
    add_rmsnorm_rows<T, NP, VPT, ROWS>(p, p.rank * p.rows + j, j, G, w);
  barrier<Order::RELEASE, Order::ACQUIRE>(p, "exit");
}

// ---------------------------------------------------------------------------------------------
// Host launchers (no torch): they pick vectors per thread, so that a block never exceeds 1024
// threads, and rows in flight, so that the loads fit in registers; and instantiate every variant.

inline int vectors_per_thread(int nvec) {
  return nvec <= MAX_THREADS ? 1 : nvec <= 4 * WIDE_THREADS ? 4 : 8;
}

inline int threads_per_block(int nvec) {
  const int vpt = vectors_per_thread(nvec);
  return ((nvec + vpt - 1) / vpt + 31) / 32 * 32;
}

// Both launchers only refuse (cudaErrorInvalidValue) what the kernels cannot handle; the torch
// bindings check all of it first, with clearer messages. Launch errors are left for the caller's
// cudaGetLastError().
cudaError_t launch_fused_add_rmsnorm(const Params& p, cudaStream_t stream) {
  if (p.rows < 1 || p.nvec < 1 || p.nvec * 8 > MAX_HIDDEN) return cudaErrorInvalidValue;
  const dim3 grid(p.rows), block(threads_per_block(p.nvec));
  switch (vectors_per_thread(p.nvec)) {
    case 1: return launch_pdl(fused_add_rmsnorm_kernel<1>, grid, block, 0, stream, p);
    case 4: return launch_pdl(fused_add_rmsnorm_kernel<4>, grid, block, 0, stream, p);
    default: return launch_pdl(fused_add_rmsnorm_kernel<8>, grid, block, 0, stream, p);
  }
}

// The kernel instance for these sizes, handed to f: the launcher and the occupancy query share the
// choice. Two rows in flight where the loads of both fit in registers at 1024 threads (one vector
// per thread, at most 4 peers or multimem's single load); one row otherwise.
template <Transport T, int NP, typename F>
void with_fused_kernel(int nvec, F&& f) {
  switch (vectors_per_thread(nvec)) {
    case 1: f(fused_allreduce_add_rmsnorm_kernel<T, NP, 1, (NP <= 4 ? 2 : 1)>); break;
    case 4: f(fused_allreduce_add_rmsnorm_kernel<T, NP, 4, 1>); break;
    default: f(fused_allreduce_add_rmsnorm_kernel<T, NP, 8, 1>); break;
  }
}

template <typename F>
void with_fused_kernel(const Params& p, F&& f) {
  if (p.multicast != nullptr)
    with_fused_kernel<Transport::MULTIMEM, 1>(p.nvec, f);
  else if (p.n == 2)
    with_fused_kernel<Transport::P2P, 2>(p.nvec, f);
  else if (p.n <= 4)
    with_fused_kernel<Transport::P2P, 4>(p.nvec, f);
  else
    with_fused_kernel<Transport::P2P, MAX_PEERS>(p.nvec, f);
}

// Every rank must call this with the same n_ctas, rows and nvec: CTA b meets CTA b of each peer.
cudaError_t launch_fused_allreduce_add_rmsnorm(const Params& p, int n_ctas, cudaStream_t stream) {
  if (n_ctas < 1 || n_ctas > MAX_CTAS || p.n < 2 || p.n > MAX_PEERS || p.rank < 0 ||
      p.rank >= p.n || p.rows < 1 || p.nvec < 1 || p.nvec * 8 > MAX_HIDDEN)
    return cudaErrorInvalidValue;
  const dim3 grid(n_ctas), block(threads_per_block(p.nvec));
  with_fused_kernel(p, [&](auto kernel) { kernel<<<grid, block, 0, stream>>>(p); });
  return cudaSuccess;
}

// CTAs of the p2p kernel for this hidden size and world size that the current GPU holds at once
// (occupancy x SMs): ranks that spin on each other from one GPU must all fit (comm.VirtualRanks).
int resident_ctas(int nvec, int n) {
  Params p{};
  p.nvec = nvec;
  p.n = n;
  int per_sm = 0, device = 0, sms = 0;
  with_fused_kernel(p, [&](auto kernel) {
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads_per_block(nvec), 0);
  });
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return per_sm * sms;
}

}  // namespace tw

// ---------------------------------------------------------------------------------------------
// Torch bindings: check (see common.cuh), then launch.
#ifndef TW_NO_TORCH
#include <map>
#include <string>
#include <vector>

namespace {

using tw::check_tensor;

// x [..., H]: a hidden size the kernels take, as 16-byte vectors.
std::string check_hidden(const char* op, const at::Tensor& x) {
  const int64_t H = x.dim() ? x.size(-1) : 0;
  if (H % 8 || H < 8 || H > tw::MAX_HIDDEN)
    return std::string(op) + ": the hidden size must be a multiple of 8 (16-byte vectors) in [8, " +
           std::to_string(tw::MAX_HIDDEN) + "], got " + std::to_string(H);
  return "";
}

// The fields every launch fills the same way: the rows (buf), the residual, the weight, the sizes.
tw::Params params(const at::Tensor& buf, const at::Tensor& residual, const at::Tensor& weight,
                  int64_t rows, double eps) {
  tw::Params p{};
  p.buf = static_cast<uint4*>(buf.data_ptr());
  p.residual = static_cast<uint4*>(residual.data_ptr());
  p.weight = static_cast<const uint4*>(weight.data_ptr());
  p.rows = static_cast<int>(rows);
  p.nvec = static_cast<int>(buf.size(-1) / 8);
  p.eps = static_cast<float>(eps);
  return p;
}

std::string fused_add_rmsnorm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps) {
  const char* op = "fused_add_rmsnorm";
  TW_TRY(check_hidden(op, x));
  TW_TRY(check_tensor(op, "x", x, at::kBFloat16, x.device()));
  TW_TRY(check_tensor(op, "residual", residual, at::kBFloat16, x.device()));
  TW_TRY(check_tensor(op, "weight", weight, at::kBFloat16, x.device()));
  if (residual.sizes() != x.sizes() || weight.dim() != 1 || weight.size(0) != x.size(-1))
    return std::string(op) + ": residual must have x's shape " + tw::shape(x) + " and weight [" +
           std::to_string(x.size(-1)) + "], got " + tw::shape(residual) + " and " + tw::shape(weight);
  const int64_t rows = x.numel() / x.size(-1);
  if (rows == 0) return "";
  const c10::cuda::CUDAGuard guard(x.device());
  return tw::cuda_error(op, tw::launch_fused_add_rmsnorm(params(x, residual, weight, rows, eps),
                                                         c10::cuda::getCurrentCUDAStream()));
}

std::string fused_allreduce_add_rmsnorm(at::Tensor buf, std::vector<int64_t> peer_bufs,
                                        int64_t multicast_ptr, std::vector<int64_t> peer_flags,
                                        int64_t rank, at::Tensor residual, at::Tensor weight,
                                        double eps, int64_t n_ctas, double timeout_s) {
  const char* op = "fused_allreduce_add_rmsnorm";
  const std::string fail = std::string(op) + ": ";
  if (buf.dim() != 2) return fail + "buf must be [rows, hidden], got " + tw::shape(buf);
  TW_TRY(check_hidden(op, buf));
  TW_TRY(check_tensor(op, "buf", buf, at::kBFloat16, buf.device()));
  TW_TRY(check_tensor(op, "residual", residual, at::kBFloat16, buf.device()));
  TW_TRY(check_tensor(op, "weight", weight, at::kBFloat16, buf.device()));
  const int64_t n = static_cast<int64_t>(peer_bufs.size()), Tp = buf.size(0), H = buf.size(1);
  if (n < 2 || n > tw::MAX_PEERS || static_cast<int64_t>(peer_flags.size()) != n || rank < 0 || rank >= n ||
      peer_bufs[rank] != reinterpret_cast<int64_t>(buf.data_ptr()))
    return fail + "need 2 to " + std::to_string(tw::MAX_PEERS) + " ranks with one buffer and one flag address each, "
           "and peer_bufs[rank] == buf.data_ptr() (got " + std::to_string(n) + " buffers, " +
           std::to_string(peer_flags.size()) + " flags, rank " + std::to_string(rank) + ")";
  for (int64_t i = 0; i < n; ++i)
    if (!peer_bufs[i] || peer_bufs[i] % 16 || !peer_flags[i] || peer_flags[i] % 4 || multicast_ptr % 16)
      return fail + "peer and multicast addresses must be 16-byte aligned, flags 4-byte aligned";
  if (Tp % n)
    return fail + "the row count " + std::to_string(Tp) + " must be a multiple of the world size " +
           std::to_string(n) + " (pad the tokens)";
  if (residual.dim() != 2 || residual.size(0) != Tp / n || residual.size(1) != H || weight.dim() != 1 ||
      weight.size(0) != H)
    return fail + "residual must be this rank's slice [" + std::to_string(Tp / n) + ", " + std::to_string(H) +
           "] and weight [" + std::to_string(H) + "], got " + tw::shape(residual) + " and " + tw::shape(weight);
  if (n_ctas < 1 || n_ctas > tw::MAX_CTAS || !(timeout_s > 0))
    return fail + "n_ctas must be in [1, " + std::to_string(tw::MAX_CTAS) + "] (got " + std::to_string(n_ctas) +
           ") and timeout_s positive";
  if (Tp == 0) return "";
  tw::Params p = params(buf, residual, weight, Tp / n, eps);
  for (int64_t i = 0; i < n; ++i) {
    p.bufs.ptr[i] = tw::as_ptr(peer_bufs[i]);
    p.flags.ptr[i] = tw::as_ptr(peer_flags[i]);
  }
  p.multicast = tw::as_ptr(multicast_ptr);
  p.rank = static_cast<int>(rank);
  p.n = static_cast<int>(n);
  p.timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  const c10::cuda::CUDAGuard guard(buf.device());
  return tw::cuda_error(op, tw::launch_fused_allreduce_add_rmsnorm(p, static_cast<int>(n_ctas),
                                                                   c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "TokenWeave's comm point: fused (AllReduce +) residual add + RMSNorm (bf16, sm_90a)";
  m.def("fused_add_rmsnorm", &fused_add_rmsnorm,
        "In place: residual = bf16(x + residual); x = rmsnorm(residual) * weight",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("fused_allreduce_add_rmsnorm", &fused_allreduce_add_rmsnorm,
        "In place on the symmetric buf [Tp, H]: all-reduce, add this rank's residual slice "
        "[Tp/N, H], RMSNorm, times weight; every rank's buf ends with the normalized rows. "
        "peer_bufs[i]: this view's address in rank i's mapping; multicast_ptr: its multicast "
        "address, or 0 for the p2p transport; peer_flags[i]: rank i's zeroed int32 flag array "
        "of max_ctas * N entries, used by nothing else. Every rank must call it with the same "
        "shapes and n_ctas.",
        py::arg("buf"), py::arg("peer_bufs"), py::arg("multicast_ptr"), py::arg("peer_flags"),
        py::arg("rank"), py::arg("residual"), py::arg("weight"), py::arg("eps"),
        py::arg("n_ctas"), py::arg("timeout_s"));
  m.def("resident_ctas", [](int64_t hidden, int64_t world) {
    return tw::resident_ctas(static_cast<int>(hidden / 8), static_cast<int>(world));
  }, "CTAs of the p2p fused kernel (this hidden and world size) the current GPU holds at once",
        py::arg("hidden"), py::arg("world"));
  m.def("limits", [] {
    return std::map<std::string, int>{{"max_ctas", tw::MAX_CTAS}, {"max_peers", tw::MAX_PEERS},
                                      {"max_hidden", tw::MAX_HIDDEN}};
  }, "The kernels' limits");
}
#endif  // TW_NO_TORCH
