/*
TokenWeave kernels: AllReduce + residual add + RMSNorm in one kernel, the local add + RMSNorm, and
what a decode step needs (RoPE + cache write, decode attention, small-batch GEMMs).

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
  rope_kv_cache                     the attention prologue of a step, one launch instead of ~10:
                                    RoPE (rotate-half, HF's bf16 rounding of each product and of
                                    the sum) on q in place in qkv [T, (nh + 2 nkv) hd], on k into
                                    k_cache[kv_rows[t]], and v copied into v_cache[kv_rows[t]].
  decode_attention                  one query per sequence (decode) against its range of the KV
                                    cache, on the tensor cores, long sequences split over the keys
                                    and merged by their log-sum-exp (see below).
  silu_mul                          SwiGLU's activation, silu(gate) * up, in one pass.
  gemv                              a decode step's GEMMs (up to 8 tokens) as one stream over the
                                    weights; optionally with SwiGLU's activation in its epilogue.
  gemv_rope                         qkv's gemv with rope_kv_cache in its epilogue: one kernel from
                                    a decode step's x to rotated q and the cache write.
  argmax                            greedy sampling: each row's first index of its largest logit.
  All but the comm kernel (and down's gemv, see launch_gemv) start early behind the kernel
  before them (programmatic dependent launch, see launch_pdl).

Build:
  JIT, as the project uses it:     python build_ext.py      (torch.utils.cpp_extension, sm_90a)
  standalone kernel check (CI):    nvcc -c -gencode=arch=compute_90a,code=sm_90a -DTW_NO_TORCH \
                                        multimem_ops.cu -o /dev/null
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
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
// bf16 <-> fp32 on packed words. A bf16 is the top half of an fp32, so widening is a shift.

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16;
}

__device__ __forceinline__ void unpack8(const uint4& v, float f[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = bf16_lo(w[i]);
    f[2 * i + 1] = bf16_hi(w[i]);
  }
}

__device__ __forceinline__ uint4 pack8(const float f[8]) {
  return make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]),
                    pack_bf16x2(f[6], f[7]));
}

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (PDL). The kernels of a decode step (all but the comm kernel and
// down's gemv) are launched with launch_pdl: a kernel's CTAs may start, and set up, while the
// kernel before it in the stream finishes, and the launch latency between them is hidden. After
// pdl_wait the previous kernel has completed and its writes are visible. pdl_launch_dependents,
// only ever after pdl_wait, lets the next kernel launch once every CTA of this one has called it or
// exited: so at most two kernels are in flight, the next one's CTAs only take the SMs that this
// one's last CTAs leave, and when a kernel starts, every kernel but the one just before it has
// completed. So before pdl_wait a kernel may read anything but what that one kernel writes: a norm
// weight, and in decode attention the step's metadata and the keys of earlier steps. Where the
// launch was plain, or the previous kernel is not ours (cuBLAS, torch), both are harmless.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;"); }

// pdl false: a plain launch of the same kernel (it starts when the one before has completed).
template <typename... Args>
cudaError_t launch_maybe_pdl(bool pdl, void (*kernel)(Args...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, const Args&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

template <typename... Args>
cudaError_t launch_pdl(void (*kernel)(Args...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       const Args&... args) {
  return launch_maybe_pdl(true, kernel, grid, block, smem, stream, args...);
}

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

// ---------------------------------------------------------------------------------------------
// RoPE and the KV-cache write. A thread takes two neighbouring pairs (i, i+1) and (i + hd/2,
// i + 1 + hd/2) of one head, as bf16x2 words, or one 16-byte vector of v: one item each, so that a
// decode step of a few tokens spreads over many CTAs (blockIdx.y) instead of looping in one.

struct RopeParams {
  __nv_bfloat16* qkv;              // [T, (nh + 2 nkv) hd]
  const __nv_bfloat16* rope;       // [max_len, 2, hd]: cos, sin of every position
  const int* positions;            // [T]
  const int* kv_rows;              // [T]: the cache row of each token
  __nv_bfloat16* k_cache;          // [rows, nkv, hd]
  __nv_bfloat16* v_cache;
  int tokens, nh, nkv, hd;
};

// transformers in bf16: q * cos + rotate_half(q) * sin, each product and the sum rounded to bf16.
__device__ __forceinline__ float rope_one(float x, float partner, float c, float s) {
  const float a = __bfloat162float(__float2bfloat16_rn(x * c));
  const float b = __bfloat162float(__float2bfloat16_rn(partner * s));
  return a + b;  // rounded by the caller's store
}

constexpr int ROPE_THREADS = 128;

__host__ __device__ constexpr int rope_items(const RopeParams& p) {
  return (p.nh + p.nkv) * p.hd / 4 + p.nkv * p.hd / 8;   // bf16x2 pairs of q and k, then v's vectors
}

__global__ void __launch_bounds__(ROPE_THREADS) rope_kv_cache_kernel(const RopeParams p) {
  pdl_wait();
  pdl_launch_dependents();
  const int t = blockIdx.x, half = p.hd / 2, width = (p.nh + 2 * p.nkv) * p.hd;
  const int j = blockIdx.y * ROPE_THREADS + threadIdx.x, pairs = (p.nh + p.nkv) * half / 2;
  if (j >= rope_items(p)) return;
  __nv_bfloat16* x = p.qkv + static_cast<size_t>(t) * width;
  const size_t kv = static_cast<size_t>(p.kv_rows[t]) * p.nkv * p.hd;
  if (j >= pairs) {   // v: copied into the cache
    const int k = j - pairs;
    reinterpret_cast<uint4*>(p.v_cache + kv)[k] = reinterpret_cast<const uint4*>(x + (p.nh + p.nkv) * p.hd)[k];
    return;
  }
  const __nv_bfloat16* cs = p.rope + static_cast<size_t>(p.positions[t]) * 2 * p.hd;
  const int head = 2 * j / half, i = 2 * j % half;
  __nv_bfloat162* lo = reinterpret_cast<__nv_bfloat162*>(x + head * p.hd + i);
  __nv_bfloat162* hi = reinterpret_cast<__nv_bfloat162*>(x + head * p.hd + i + half);
  const float2 a = __bfloat1622float2(*lo), b = __bfloat1622float2(*hi);
  // Each element reads its own cos and sin (HF's table repeats the first half, but nothing needs it to).
  const auto at = [&](int k) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(cs + k)); };
  const float2 c = at(i), s = at(p.hd + i), c2 = at(i + half), s2 = at(p.hd + i + half);
  // rotate_half pairs x_i with -x_{i + hd/2} and x_{i + hd/2} with x_i.
  const __nv_bfloat162 out_lo = __floats2bfloat162_rn(rope_one(a.x, -b.x, c.x, s.x), rope_one(a.y, -b.y, c.y, s.y));
  const __nv_bfloat162 out_hi =
      __floats2bfloat162_rn(rope_one(b.x, a.x, c2.x, s2.x), rope_one(b.y, a.y, c2.y, s2.y));
  if (head < p.nh) {  // q: in place
    *lo = out_lo;
    *hi = out_hi;
  } else {            // k: into the cache
    __nv_bfloat16* k = p.k_cache + kv + (head - p.nh) * p.hd;
    *reinterpret_cast<__nv_bfloat162*>(k + i) = out_lo;
    *reinterpret_cast<__nv_bfloat162*>(k + i + half) = out_hi;
  }
}

cudaError_t launch_rope_kv_cache(const RopeParams& p, cudaStream_t stream) {
  if (p.tokens < 1 || p.hd % 8 || p.nh < 1 || p.nkv < 1) return cudaErrorInvalidValue;
  const dim3 grid(p.tokens, (rope_items(p) + ROPE_THREADS - 1) / ROPE_THREADS);
  return launch_pdl(rope_kv_cache_kernel, grid, dim3(ROPE_THREADS), 0, stream, p);
}

// ---------------------------------------------------------------------------------------------
// SwiGLU's activation: out [T, I] = silu(gate) * up from gate_up [T, 2I] (gate, then up), rounded as
// torch rounds F.silu(gate) * up in bf16: silu in fp32 to bf16, then the product in fp32 to bf16.
// One thread per 16-byte vector of out.

__global__ void silu_mul_kernel(const uint4* gate_up, uint4* out, int tokens, int nvec) {
  pdl_wait();
  pdl_launch_dependents();
  const size_t j = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= static_cast<size_t>(tokens) * nvec) return;
  const size_t t = j / nvec, i = j % nvec;
  float g[8], u[8];
  unpack8(gate_up[t * 2 * nvec + i], g);
  unpack8(gate_up[t * 2 * nvec + nvec + i], u);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float silu = __bfloat162float(__float2bfloat16_rn(g[k] / (1.0f + expf(-g[k]))));
    g[k] = silu * u[k];
  }
  out[j] = pack8(g);
}

cudaError_t launch_silu_mul(const uint4* gate_up, uint4* out, int tokens, int nvec, cudaStream_t stream) {
  if (tokens < 1 || nvec < 1) return cudaErrorInvalidValue;
  const size_t n = static_cast<size_t>(tokens) * nvec;
  return launch_pdl(silu_mul_kernel, dim3(static_cast<unsigned>((n + 255) / 256)), dim3(256), 0, stream, gate_up, out,
                    tokens, nvec);
}

// ---------------------------------------------------------------------------------------------
// Decode attention: the newest token of each sequence (one query) against all of its keys, which
// lie in one contiguous range of cache rows. A step reads every live key and value once, so the
// kernel is memory bound and is built to stream: CTA (slice, kv head h, sequence b) takes one slice
// of b's keys for all G = nh / nkv query heads that share h, so each key and value is read once
// for the G heads (GQA). A sequence's keys are cut into slices by its own length alone (at least
// 256 keys a slice, at most 16 slices), never by the batch: a sequence's output does not depend on
// what else is in the step, so graph replays, eager steps and any batch give the same bits.
// Tiles of 64 keys stream through shared memory (cp.async, 2 or 4 tiles in flight);
// each of the 4 warps takes 16 keys of a tile on the tensor cores (mma m16n8k16, bf16 in, fp32
// accumulate): S = Q K^T with the G heads as rows 0..G-1 of the 16-row A operand (the others
// zero), an online softmax in registers, then O += P V with S's accumulators reused as P's A
// operand (FlashAttention-2's layout trick). The warps merge their (max, sum, O) in shared memory.
// A sequence of one slice writes its output there; otherwise each CTA writes its slice's normalized
// O and log-sum-exp in fp32, and decode_combine_kernel merges the slices in slice order.
// Numerics as FlashAttention-2: fp32 scores, P rounded to bf16 for the PV product, its row sum in
// fp32.

namespace attn {
constexpr int HD = 128;                    // head dim (Llama, Qwen2.5, Mixtral)
constexpr int TILE = 64;                   // keys per stage
constexpr int WARPS = 4, THREADS = 32 * WARPS;
constexpr int MAX_G = 8;                   // query heads per kv head: rows 0..7 of the mma's A
constexpr int ROW = HD + 8;                // a key's smem row in bf16: 272 bytes, so that the 8
                                           // rows one ldmatrix phase reads fall in distinct banks
constexpr int STAGE = 2 * TILE * ROW;      // K then V tile, bf16 elements
// Tiles in flight: 2 where several CTAs share an SM (34 KB a stage, 3 CTAs an SM); 4 where the
// grid is one CTA an SM or less (small batches), so that one CTA keeps enough bytes in flight.
// Only the loads' timing depends on it, never the arithmetic: the bits are the same.
constexpr int smem_bytes(int stages) { return stages * STAGE * 2; }
constexpr int SLICE_KEYS = 256;           // a slice has at least this many keys ...
constexpr int MAX_SLICES = 16;             // ... and a sequence at most this many slices
static_assert(HD == THREADS, "the merge gives each thread one dimension");
}  // namespace attn

struct DecodeParams {
  const __nv_bfloat16* q;          // [B, nh, hd], rows q_stride elements apart (a view of qkv)
  const __nv_bfloat16* k_cache;    // [rows, nkv, hd]
  const __nv_bfloat16* v_cache;
  const int* kv_starts;            // [B]: the cache row of each sequence's position 0
  const int* kv_lens;              // [B]: keys each query sees (its own included), >= 1
  __nv_bfloat16* out;              // [B, nh, hd]
  float* part_o;                   // [slices, B, nh, hd] (slices > 1)
  float* part_lse;                 // [slices, B, nh], log2 units
  int batch, nh, nkv, q_stride;
  int slices;                      // grid.x: the most slices any sequence of the batch may have
  float scale_log2;                // softmax scale * log2(e): the softmax runs on exp2
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (src must still be mapped).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Four 8x8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8. Plain: lane l
// gets (row l/4, columns 2(l%4), 2(l%4)+1) of each; .trans: (rows 2(l%4), 2(l%4)+1, column l/4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// d (16x8 fp32) += a (16x16 bf16) b (16x8 bf16). Lane l = 4 g + t holds a's (row g, k 2t..2t+1) in
// a0, (row g + 8, k 2t..2t+1) in a1, (row g, k 2t+8..2t+9) in a2 and (row g + 8, k 2t+8..2t+9) in a3;
// b0: (k 2t..2t+1, column g), b1: (k 2t+8..2t+9, column g); d0, d1: (row g, columns 2t, 2t+1),
// d2, d3: (row g + 8, columns 2t, 2t+1).
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
               "{%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// The same with rows 8..15 of a zero (d2, d3 stay zero): attention's G <= 8 query heads.
__device__ __forceinline__ void mma_rows8(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  mma_16816(d, a0, 0u, a2, 0u, b0, b1);
}

// Slices of a sequence of len keys (>= 1): a function of len only (see above).
__host__ __device__ constexpr int slices_for(int len) {
  const int slices = (len + attn::SLICE_KEYS - 1) / attn::SLICE_KEYS;
  return slices < 1 ? 1 : slices < attn::MAX_SLICES ? slices : attn::MAX_SLICES;
}

template <int G, int STAGES>
__global__ void __launch_bounds__(attn::THREADS) decode_attention_kernel(const DecodeParams p) {
  using namespace attn;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  // This CTA's keys [begin, end): slice `split` of the sequence's keys, in whole tiles.
  const int len = p.kv_lens[b], slices = slices_for(len);
  if (split >= slices) return;
  const int chunk = ((len + slices - 1) / slices + TILE - 1) / TILE * TILE;
  const int begin = split * chunk, end = min(len, begin + chunk);
  const int tiles = (end - begin + TILE - 1) / TILE;
  const size_t head0 = (static_cast<size_t>(p.kv_starts[b]) * p.nkv + h) * HD;

  // A thread copies the same 16 bytes (col) of rows r, r + PASS, r + 2 PASS, ... of every tile, K and
  // V, so that a copy's address is one multiply-add from its key: index math per copy would be most
  // of the loop's instructions.
  constexpr int PASS = THREADS / (HD / 8);   // rows a pass of the CTA copies
  static_assert(TILE % PASS == 0, "whole passes a tile");
  const int r = threadIdx.x / (HD / 8), col = threadIdx.x % (HD / 8) * 8;
  const unsigned key_bytes = static_cast<unsigned>(p.nkv * HD * sizeof(__nv_bfloat16));   // a cache row
  const char* k_col = reinterpret_cast<const char*>(p.k_cache + head0 + col);
  const char* v_col = reinterpret_cast<const char*>(p.v_cache + head0 + col);
  auto load_tile = [&](int tile, int stage) {
    __nv_bfloat16* ks = smem + stage * STAGE + r * ROW + col;
#pragma unroll
    for (int i = 0; i < TILE / PASS; ++i) {
      const int key = begin + tile * TILE + r + i * PASS;
      const size_t at = static_cast<size_t>(static_cast<unsigned>(key < end ? key : begin)) * key_bytes;
      cp_async16(ks + i * PASS * ROW, k_col + at, key < end);
      cp_async16(ks + (TILE + i * PASS) * ROW, v_col + at, key < end);
    }
  };
  // One commit group per tile, empty past the last, so that waiting for all but STAGES - 2 groups
  // always means the current tile has landed.
  // PDL: the step's metadata and the keys of earlier steps are no output of the kernel before this
  // one (qkv's, which writes only this step's key, len - 1), so the first tiles load before
  // pdl_wait, up to the one that holds that key.
  bool waited = false;
  const auto wait = [&] {
    pdl_wait();
    pdl_launch_dependents();
    waited = true;
  };
#pragma unroll
  for (int t = 0; t < STAGES - 1; ++t) {
    if (!waited && begin + (t + 1) * TILE > len - 1) wait();
    if (t < tiles) load_tile(t, t);
    cp_async_commit();
  }
  if (!waited) wait();

  // q's A fragments for the whole head dim: 8 k-steps of 16, rows g < G are the G query heads.
  uint32_t qa[HD / 16][2];
  const uint32_t* qrow = reinterpret_cast<const uint32_t*>(
      p.q + static_cast<size_t>(b) * p.q_stride + static_cast<size_t>(h * G + (g < G ? g : 0)) * HD);
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    qa[kk][0] = g < G ? qrow[kk * 8 + t4] : 0u;
    qa[kk][1] = g < G ? qrow[kk * 8 + t4 + 4] : 0u;
  }

  float o[HD / 8][4] = {};        // row g of O: columns 8n + 2t, 8n + 2t + 1 in o[n][0..1]
  float m = -INFINITY, l = 0.f;   // running max (log2 units) and this lane's part of the row sum
  for (int tile = 0; tile < tiles; ++tile) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();             // this tile has landed, and every warp is done with the previous one,
    if (tile + STAGES - 1 < tiles)   // whose stage the load below refills
      load_tile(tile + STAGES - 1, (tile + STAGES - 1) % STAGES);
    cp_async_commit();
    const __nv_bfloat16* ks = smem + (tile % STAGES) * STAGE + warp * 16 * ROW;   // this warp's 16 keys
    const __nv_bfloat16* vs = ks + TILE * ROW;
    float s[2][4] = {};          // S for keys 0..7 and 8..15 of the warp's 16
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t kb[4];            // matrices: keys 0-7 | dims 0-7, 8-15; keys 8-15 | dims 0-7, 8-15
      ldmatrix_x4(kb, ks + ((lane / 16) * 8 + lane % 8) * ROW + kk * 16 + (lane / 8) % 2 * 8);
      mma_rows8(s[0], qa[kk][0], qa[kk][1], kb[0], kb[1]);
      mma_rows8(s[1], qa[kk][0], qa[kk][1], kb[2], kb[3]);
    }
    const int key0 = begin + tile * TILE + warp * 16 + 2 * t4;
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[j][e] = key0 + 8 * j + e < end ? s[j][e] * p.scale_log2 : -INFINITY;
        mx = fmaxf(mx, s[j][e]);
      }
    // The 4 lanes of row g hold its 16 scores.
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float base = m_new == -INFINITY ? 0.f : m_new;   // all masked so far: keep exp2 finite
    const float alpha = exp2f(m - base);
    float pr[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) pr[j][e] = exp2f(s[j][e] - base);
    l = l * alpha + (pr[0][0] + pr[0][1] + pr[1][0] + pr[1][1]);
    m = m_new;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      o[n][0] *= alpha;
      o[n][1] *= alpha;
    }
    const uint32_t pa0 = pack_bf16x2(pr[0][0], pr[0][1]), pa2 = pack_bf16x2(pr[1][0], pr[1][1]);
#pragma unroll
    for (int nd = 0; nd < HD / 16; ++nd) {
      uint32_t vb[4];            // matrices: keys 0-7, 8-15 | dims 0-7; keys 0-7, 8-15 | dims 8-15
      ldmatrix_x4_trans(vb, vs + ((lane / 8) % 2 * 8 + lane % 8) * ROW + nd * 16 + (lane / 16) * 8);
      mma_rows8(o[2 * nd], pa0, pa2, vb[0], vb[1]);
      mma_rows8(o[2 * nd + 1], pa0, pa2, vb[2], vb[3]);
    }
  }
  cp_async_wait<0>();            // only empty groups are left; then the tiles' memory is free
  __syncthreads();

  // Merge the 4 warps (shared memory is free now): thread d owns dimension d of every head. The CTAs
  // of a wave reach this epilogue together, so its latency is the kernel's: red_o's rows are padded,
  // so that a warp's stores (8 rows at once) spread over 4 bank groups, not 1, and the G heads merge
  // side by side, without a branch between them, so that their loads and exp2s overlap.
  constexpr int RED_ROW = HD + 8;
  static_assert((WARPS * MAX_G * RED_ROW + 2 * WARPS * MAX_G) * sizeof(float) <= STAGES * STAGE * sizeof(__nv_bfloat16),
                "the merge fits in the tiles' shared memory");
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  float* red_o = reinterpret_cast<float*>(smem_raw);       // [WARPS][MAX_G][RED_ROW]
  float* red_m = red_o + WARPS * MAX_G * RED_ROW;          // [WARPS][MAX_G]
  float* red_l = red_m + WARPS * MAX_G;
  if (g < G) {
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      red_o[(warp * MAX_G + g) * RED_ROW + 8 * n + 2 * t4] = o[n][0];
      red_o[(warp * MAX_G + g) * RED_ROW + 8 * n + 2 * t4 + 1] = o[n][1];
    }
    if (t4 == 0) {
      red_m[warp * MAX_G + g] = m;
      red_l[warp * MAX_G + g] = l;
    }
  }
  __syncthreads();
  const int d = threadIdx.x;
  float M[G], L[G], O[G];
#pragma unroll
  for (int gg = 0; gg < G; ++gg) {
    M[gg] = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) M[gg] = fmaxf(M[gg], red_m[w * MAX_G + gg]);
    const float base = M[gg] == -INFINITY ? 0.f : M[gg];   // no key at all: every weight is exp2(-inf) = 0
    L[gg] = O[gg] = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float c = exp2f(red_m[w * MAX_G + gg] - base);
      L[gg] += red_l[w * MAX_G + gg] * c;
      O[gg] += red_o[(w * MAX_G + gg) * RED_ROW + d] * c;
    }
  }
  const size_t slice_rows = static_cast<size_t>(p.batch) * p.nh;   // rows of one slice in part_o
#pragma unroll
  for (int gg = 0; gg < G; ++gg) {
    const size_t row = static_cast<size_t>(b) * p.nh + h * G + gg;
    const float val = L[gg] > 0.f ? O[gg] / L[gg] : 0.f;
    if (slices == 1) {
      p.out[row * HD + d] = __float2bfloat16_rn(val);
    } else {
      p.part_o[(split * slice_rows + row) * HD + d] = val;
      if (d == gg) p.part_lse[split * slice_rows + row] = L[gg] > 0.f ? M[gg] + log2f(L[gg]) : -INFINITY;
    }
  }
}

// The slices of each (sequence, query head) row weighted by their share of the softmax sum,
// exp2(lse_s - max lse), in slice order. Thread (row, i) takes dims 4i..4i+3 of a row, 8 rows a CTA,
// so that every load is 16 bytes. Slots past this sequence's slices, and the last slices of a
// sequence whose slices round up to whole tiles (O = 0, lse = -inf), weigh 0. A kernel of its own:
// merging in the last CTA of each sequence (a counter, a fence) cost more than this launch, at
// batch 1 and at batch 128 (H200). S: the slots a thread holds, at least the grid's p.slices, so
// that a short context's merge keeps 4 slices in registers (32 a thread), not 16 (93).
constexpr int COMBINE_ROWS = 8, COMBINE_THREADS = COMBINE_ROWS * attn::HD / 4;

template <int S>
__global__ void __launch_bounds__(COMBINE_THREADS) decode_combine_kernel(const DecodeParams p) {
  using namespace attn;
  pdl_wait();
  pdl_launch_dependents();
  const size_t row = static_cast<size_t>(blockIdx.x) * COMBINE_ROWS + threadIdx.x / (HD / 4);
  const size_t slice_rows = static_cast<size_t>(p.batch) * p.nh;
  const int i = threadIdx.x % (HD / 4);
  if (row >= slice_rows) return;
  const int slices = slices_for(p.kv_lens[row / p.nh]);
  if (slices == 1) return;   // written by the attention kernel itself
  float4 o[S];
  float lse[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const bool live = s < slices;   // s < p.slices too: part_o holds p.slices slices
    o[s] = live ? reinterpret_cast<const float4*>(p.part_o + (s * slice_rows + row) * HD)[i]
                : make_float4(0.f, 0.f, 0.f, 0.f);
    lse[s] = live ? p.part_lse[s * slice_rows + row] : -INFINITY;
  }
  float M = lse[0];   // slice 0 is never empty
#pragma unroll
  for (int s = 1; s < S; ++s) M = fmaxf(M, lse[s]);
  float L = 0.f;
  float4 O = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const float c = exp2f(lse[s] - M);
    L += c;
    O.x += c * o[s].x;
    O.y += c * o[s].y;
    O.z += c * o[s].z;
    O.w += c * o[s].w;
  }
  reinterpret_cast<uint2*>(p.out + row * HD)[i] =
      make_uint2(pack_bf16x2(O.x / L, O.y / L), pack_bf16x2(O.z / L, O.w / L));
}

template <int STAGES, typename F>
void with_decode_kernel(int group, F&& f) {
  switch (group) {
    case 1: f(decode_attention_kernel<1, STAGES>); break;
    case 2: f(decode_attention_kernel<2, STAGES>); break;
    case 3: f(decode_attention_kernel<3, STAGES>); break;
    case 4: f(decode_attention_kernel<4, STAGES>); break;
    case 5: f(decode_attention_kernel<5, STAGES>); break;
    case 6: f(decode_attention_kernel<6, STAGES>); break;
    case 7: f(decode_attention_kernel<7, STAGES>); break;
    default: f(decode_attention_kernel<8, STAGES>); break;
  }
}

cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream) {
  const int group = p.nkv > 0 ? p.nh / p.nkv : 0;
  if (p.batch < 1 || p.nkv < 1 || p.nh % p.nkv || group < 1 || group > attn::MAX_G || p.slices < 1 ||
      p.slices > attn::MAX_SLICES)
    return cudaErrorInvalidValue;
  // More than 48 KB of dynamic shared memory needs an opt-in, once per kernel instance; the SM count
  // picks the stages (attn::smem_bytes).
  static int sms = 0;
  static const cudaError_t ready = [] {
    int device = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const auto opt_in = [&](auto kernel, int stages) {
      if (e == cudaSuccess)
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, attn::smem_bytes(stages));
    };
    for (int g = 1; g <= attn::MAX_G; ++g) {
      with_decode_kernel<2>(g, [&](auto kernel) { opt_in(kernel, 2); });
      with_decode_kernel<4>(g, [&](auto kernel) { opt_in(kernel, 4); });
    }
    return e;
  }();
  if (ready != cudaSuccess) return ready;
  const dim3 grid(p.slices, p.nkv, p.batch);
  cudaError_t e = cudaSuccess;
  if (static_cast<long long>(p.slices) * p.nkv * p.batch <= sms)
    with_decode_kernel<4>(group, [&](auto k) { e = launch_pdl(k, grid, attn::THREADS, attn::smem_bytes(4), stream, p); });
  else
    with_decode_kernel<2>(group, [&](auto k) { e = launch_pdl(k, grid, attn::THREADS, attn::smem_bytes(2), stream, p); });
  if (e == cudaSuccess && p.slices > 1) {
    const unsigned rows = static_cast<unsigned>(p.batch) * p.nh;
    const unsigned grid = (rows + COMBINE_ROWS - 1) / COMBINE_ROWS;
    const auto kernel = p.slices <= 2 ? decode_combine_kernel<2> : p.slices <= 4 ? decode_combine_kernel<4>
                      : p.slices <= 8 ? decode_combine_kernel<8> : decode_combine_kernel<attn::MAX_SLICES>;
    e = launch_pdl(kernel, grid, COMBINE_THREADS, 0, stream, p);
  }
  return e;
}

// ---------------------------------------------------------------------------------------------
// Decode GEMM: out [M, N] = x [M, K] W^T (+ bias) for a Linear's weight W [N, K] and M <= 8 tokens,
// bf16 in and out, fp32 sums. With so few tokens every weight is used M times and read once: the
// kernel is a stream over W and only has to keep enough bytes in flight. In a decode step cuBLAS
// reads the narrow layers of the 8B shape (qkv, o_proj) at 60-75% of the bandwidth, o_proj through a
// split-K pass and a reduce kernel (bench.py gemm); this kernel has no second pass.
// CTA b takes 16 rows of W, and its 16 warps split K into 64-column chunks (warp w: chunks w, w + 16,
// ...), summed in shared memory in warp order. Within a warp the 16 rows are the A operand of mma
// m16n8k16 and the tokens its B operand (8 columns), both loaded from global memory straight into the
// fragments: lane 4g + t holds columns 8t..8t+7 and 32+8t..32+8t+7 of the chunk of rows g and g + 8,
// and the same columns of token g. So each load instruction reads whole 32-byte sectors (64
// contiguous bytes of each of 8 rows), and the fragment's k-slots hold other columns than the mma's
// nominal ones, but the same columns in A and in B: a dot product does not care which slot a column
// is in. Weights bypass L1 (each is read once); x is read through L1, where every warp of an SM
// finds it. A token's outputs depend on its own x only, the same bits at any M (the mma computes
// each column alone), so a sequence decodes alike whatever else is in the step.
// Epilogues. SWIGLU: W is [gate; up] ([2I, K], as the MLP stacks them). CTA b takes gate rows
// 8b..8b+7 as rows 0..7 and the up rows I + 8b.. as rows 8..15, and writes out [M, I] = silu(gate) *
// up with each GEMM output rounded to bf16 first and then silu_mul's rounding: the bits of gemv,
// then silu_mul. ROPE: W is qkv's [(nh + 2 nkv) hd, K]. CTA b takes rows 8j..8j+7 of one head as
// rows 0..7 and their rotate-half partners hd/2 + 8j.. as rows 8..15, so that a thread holds both
// elements of a pair, and does what rope_kv_cache does with the rounded outputs: q rotated into out
// [M, nh hd], k rotated into k_cache[kv_rows[m]], v into v_cache[kv_rows[m]]: the bits of gemv,
// then rope_kv_cache.

namespace gemv {
// 16 warps a CTA: the narrow layers have few CTAs (o_proj: 256, two an SM), and each warp only a
// few loads in flight, so it takes many warps an SM to keep the ~30 KB an SM in flight that HBM needs.
constexpr int WARPS = 16, THREADS = 32 * WARPS;
constexpr int ROWS = 16;                   // rows of W a CTA
constexpr int CHUNK = 64;                  // columns a warp takes at a time
constexpr int UNROLL = 2;                  // chunks a warp loads at once (4 KB)
constexpr int MAX_M = 8;                   // tokens: the mma's 8 columns
// Three CTAs an SM (__launch_bounds__ below: at most 40 registers), so that qkv's 384 CTAs run in one
// wave. Left to itself ptxas gave the RoPE epilogue 53 registers, two CTAs an SM, and qkv ran 3 us
// slower (H200); at 40 no variant spills.
constexpr int MIN_CTAS = 3;
enum Epilogue { STORE, SWIGLU, ROPE };
}  // namespace gemv

struct GemvParams {
  const __nv_bfloat16* x;          // [M, K], rows ldx elements apart
  const __nv_bfloat16* w;          // [N, K]
  const __nv_bfloat16* bias;       // [N] or null (not with SWIGLU)
  __nv_bfloat16* out;              // [M, N]; [M, N / 2] with SWIGLU; [M, nh hd] with ROPE; rows ldo apart
  int M, N, K, ldx, ldo;
  // ROPE only: as RopeParams, for the M tokens.
  const __nv_bfloat16* rope;       // [max_len, 2, hd]
  const int* positions;            // [M]
  const int* kv_rows;              // [M]
  __nv_bfloat16* k_cache;          // [rows, nkv, hd]
  __nv_bfloat16* v_cache;
  int nh, nkv, hd;
};

// 16 bytes of weights, read once: not kept in L1 (x lives there).
__device__ __forceinline__ uint4 ld_stream(const __nv_bfloat16* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template <int EPI>
__global__ void __launch_bounds__(gemv::THREADS, gemv::MIN_CTAS) gemv_kernel(const GemvParams p) {
  using namespace gemv;
  __shared__ float sums[WARPS][4][32];           // each warp's accumulators, [register][lane]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int cols = EPI == SWIGLU ? p.N / 2 : p.N;   // of W's rows that are outputs
  // The rows of W that are this CTA's rows g and g + 8 (this lane's). Rows past the end are clamped
  // onto the last: computed, never stored. (ROPE: N is a whole number of heads, nothing past the end.)
  // ROPE: CTA b takes pairs 8j.. of head h (b = h hd/16 + j): row h hd + 8j + g = 8b + (hd/2)(b / (hd/16)) + g.
  const int n0 = EPI == SWIGLU ? min(blockIdx.x * 8 + g, cols - 1)
               : EPI == ROPE   ? blockIdx.x * 8 + blockIdx.x / (p.hd / 16) * (p.hd / 2) + g
                               : min(blockIdx.x * ROWS + g, p.N - 1);
  const int n1 = EPI == SWIGLU ? n0 + cols : EPI == ROPE ? n0 + p.hd / 2 : min(blockIdx.x * ROWS + g + 8, p.N - 1);
  const __nv_bfloat16* w0 = p.w + static_cast<size_t>(n0) * p.K + 8 * t;
  const __nv_bfloat16* w1 = p.w + static_cast<size_t>(n1) * p.K + 8 * t;
  const __nv_bfloat16* xg = p.x + static_cast<size_t>(g) * p.ldx + 8 * t;   // token g's row (g < M)
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const int chunks = (p.K + CHUNK - 1) / CHUNK;
  // ROPE: the epilogue's token data (its threads are warps 0 and 1, see below), loaded before the
  // stream over W so that their latency hides behind it. The cos and sin rows depend on the position:
  // loading them here too would hold warps 0 and 1 back a load's latency before they start.
  const int half = p.hd / 2, head = EPI == ROPE ? blockIdx.x / (p.hd / 16) : 0;
  const int em = 2 * t + warp % 2, ei = EPI == ROPE ? blockIdx.x % (p.hd / 16) * 8 + g : 0;  // token, element
  const bool rope_thread = EPI == ROPE && warp < 2 && em < p.M;
  pdl_wait();
  pdl_launch_dependents();
  const int position = rope_thread ? p.positions[em] : 0, kv_row = rope_thread ? p.kv_rows[em] : 0;
  float acc[4] = {};
  for (int c0 = warp; c0 < chunks; c0 += WARPS * UNROLL) {
    uint4 a[UNROLL][4], b[UNROLL][2];            // rows g and g + 8, and token g; columns 8t.., 32 + 8t..
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {           // K % 8 == 0: a vector lies all in K or all out
      const int c = c0 + u * WARPS, k = c * CHUNK;
      const bool lo = c < chunks && k + 8 * t < p.K, hi = c < chunks && k + 32 + 8 * t < p.K;
      a[u][0] = lo ? ld_stream(w0 + k) : zero;
      a[u][1] = hi ? ld_stream(w0 + k + 32) : zero;
      a[u][2] = lo ? ld_stream(w1 + k) : zero;
      a[u][3] = hi ? ld_stream(w1 + k + 32) : zero;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = c0 + u * WARPS, k = c * CHUNK;
      b[u][0] = g < p.M && c < chunks && k + 8 * t < p.K ? __ldg(reinterpret_cast<const uint4*>(xg + k)) : zero;
      b[u][1] = g < p.M && c < chunks && k + 32 + 8 * t < p.K ? __ldg(reinterpret_cast<const uint4*>(xg + k + 32)) : zero;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      mma_16816(acc, a[u][0].x, a[u][2].x, a[u][0].y, a[u][2].y, b[u][0].x, b[u][0].y);
      mma_16816(acc, a[u][0].z, a[u][2].z, a[u][0].w, a[u][2].w, b[u][0].z, b[u][0].w);
      mma_16816(acc, a[u][1].x, a[u][3].x, a[u][1].y, a[u][3].y, b[u][1].x, b[u][1].y);
      mma_16816(acc, a[u][1].z, a[u][3].z, a[u][1].w, a[u][3].w, b[u][1].z, b[u][1].w);
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) sums[warp][r][lane] = acc[r];
  __syncthreads();
  // Thread (r, l) sums register r of lane l over the warps, in warp order: row g(l) + 8 (r / 2) of
  // the CTA, token 2 t(l) + r % 2. With SWIGLU and ROPE, registers 0, 1 (gate; a pair's first
  // element) pair with 2, 3 (up; its partner), and threads r < 2 take both.
  const int r = threadIdx.x / 32, l = threadIdx.x % 32, m = 2 * (l % 4) + r % 2;
  if (r >= (EPI == STORE ? 4 : 2) || m >= p.M) return;
  float s = 0.0f, s2 = 0.0f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    s += sums[w][r][l];
    if (EPI != STORE) s2 += sums[w][r + 2][l];
  }
  if (EPI == SWIGLU) {
    const int n = blockIdx.x * 8 + l / 4;
    if (n >= cols) return;
    const float gate = __bfloat162float(__float2bfloat16_rn(s));
    const float up = __bfloat162float(__float2bfloat16_rn(s2));
    const float silu = __bfloat162float(__float2bfloat16_rn(gate / (1.0f + expf(-gate))));
    p.out[static_cast<size_t>(m) * p.ldo + n] = __float2bfloat16_rn(silu * up);
  } else if (EPI == ROPE) {      // this thread is (warp, lane) = (r, l): m is em, and its ei, position, kv_row
    const int n = head * p.hd + ei;   // elements ei and ei + hd/2 of the head
    if (p.bias) {
      s += __bfloat162float(p.bias[n]);
      s2 += __bfloat162float(p.bias[n + half]);
    }
    const float a = __bfloat162float(__float2bfloat16_rn(s)), b = __bfloat162float(__float2bfloat16_rn(s2));
    float out_lo = a, out_hi = b;
    if (head < p.nh + p.nkv) {
      const __nv_bfloat16* cs = p.rope + static_cast<size_t>(position) * 2 * p.hd;
      out_lo = rope_one(a, -b, __bfloat162float(cs[ei]), __bfloat162float(cs[p.hd + ei]));
      out_hi = rope_one(b, a, __bfloat162float(cs[ei + half]), __bfloat162float(cs[p.hd + ei + half]));
    }
    const size_t kv = static_cast<size_t>(kv_row) * p.nkv * p.hd;
    __nv_bfloat16* lo = head < p.nh            ? p.out + static_cast<size_t>(m) * p.ldo + n
                      : head < p.nh + p.nkv    ? p.k_cache + kv + (head - p.nh) * p.hd + ei
                                               : p.v_cache + kv + (head - p.nh - p.nkv) * p.hd + ei;
    lo[0] = __float2bfloat16_rn(out_lo);
    lo[half] = __float2bfloat16_rn(out_hi);
  } else {
    const int n = blockIdx.x * ROWS + l / 4 + 8 * (r / 2);
    if (n >= p.N) return;
    if (p.bias) s += __bfloat162float(p.bias[n]);
    p.out[static_cast<size_t>(m) * p.ldo + n] = __float2bfloat16_rn(s);
  }
}

// pdl false: for one wave of long CTAs behind a kernel of many waves (down behind gate/up). Launched
// early, its CTAs can only land on the SMs that kernel's last wave frees first, so some SMs likely
// hold three and others one, and the kernel lasts as long as its fullest SM; launched plainly, they
// spread evenly. (The step was measured, not the placement: llama.MLP has the figures.)
cudaError_t launch_gemv(const GemvParams& p, gemv::Epilogue epi, bool pdl, cudaStream_t stream) {
  using namespace gemv;
  if (p.M < 1 || p.M > MAX_M || p.N < 1 || p.K < 8 || p.K % 8 || (epi == SWIGLU && (p.N % 2 || p.bias)) ||
      (epi == ROPE && (p.hd < 16 || p.hd % 16 || p.nh < 1 || p.nkv < 1 || p.N != (p.nh + 2 * p.nkv) * p.hd)))
    return cudaErrorInvalidValue;
  const unsigned grid = epi == SWIGLU ? (p.N / 2 + 7) / 8 : (p.N + ROWS - 1) / ROWS;
  switch (epi) {
    case SWIGLU: return launch_maybe_pdl(pdl, gemv_kernel<SWIGLU>, grid, THREADS, 0, stream, p);
    case ROPE: return launch_maybe_pdl(pdl, gemv_kernel<ROPE>, grid, THREADS, 0, stream, p);
    default: return launch_maybe_pdl(pdl, gemv_kernel<STORE>, grid, THREADS, 0, stream, p);
  }
}

// ---------------------------------------------------------------------------------------------
// Greedy sampling: out[b] = the first index of the largest of logits[b, :V] (bf16, rows ld apart),
// a NaN above every number, as torch.argmax. Each element becomes a 64-bit key: its bf16 bits made
// monotonic in the value (-0 as +0, every NaN as the largest) above the complement of its index.
// The largest key is then the answer, and a max over keys is exact in any order, so the two passes
// below need no fixed order. argmax_parts: CTA (c, b) takes SPAN elements of row b into part[b][c];
// argmax_final: one warp a row takes the max of its parts. torch's own argmax of a few long rows
// runs on a few SMs, and by chunks (engine.argmax) it takes five kernels; at batch 128 x 128K
// logits the chunked one's first pass alone took 33 us (H200), for 33 MB.

namespace argmax {
constexpr int THREADS = 256, VEC = 8, SPAN = THREADS * VEC * 4;   // elements a CTA: 4 vectors a thread
}  // namespace argmax

struct ArgmaxParams {
  const __nv_bfloat16* logits;     // [B, V], rows ld apart
  unsigned long long* part;        // [B, parts]
  int64_t* out;                    // [B]
  int B, V, ld, parts;
};

__device__ __forceinline__ unsigned long long argmax_key(uint32_t bits, int index) {
  bits &= 0xFFFF;
  if (bits == 0x8000) bits = 0;                                  // -0 ties with +0
  const uint32_t order = (bits & 0x7FFF) > 0x7F80 ? 0xFFFF       // NaN
                       : bits & 0x8000 ? ~bits & 0xFFFF : bits | 0x8000;
  return static_cast<unsigned long long>(order) << 32 | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const unsigned long long u = __shfl_xor_sync(0xFFFFFFFFu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

__global__ void __launch_bounds__(argmax::THREADS) argmax_parts_kernel(const ArgmaxParams p) {
  using namespace argmax;
  __shared__ unsigned long long warps[THREADS / 32];
  const int b = blockIdx.y, c = blockIdx.x;
  const __nv_bfloat16* row = p.logits + static_cast<size_t>(b) * p.ld;
  pdl_wait();
  pdl_launch_dependents();
  unsigned long long best = 0;                                   // below every key
#pragma unroll
  for (int i = 0; i < SPAN / (THREADS * VEC); ++i) {
    const int at = c * SPAN + (i * THREADS + threadIdx.x) * VEC;   // V % 8 == 0: a vector is all in or out
    if (at >= p.V) break;
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + at));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const unsigned long long lo = argmax_key(w[k], at + 2 * k), hi = argmax_key(w[k] >> 16, at + 2 * k + 1);
      best = lo > best ? lo : best;
      best = hi > best ? hi : best;
    }
  }
  best = warp_max(best);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x < 32) {
    best = warp_max(threadIdx.x < THREADS / 32 ? warps[threadIdx.x] : 0);
    if (threadIdx.x == 0) p.part[static_cast<size_t>(b) * p.parts + c] = best;
  }
}

__global__ void __launch_bounds__(argmax::THREADS) argmax_final_kernel(const ArgmaxParams p) {
  const int b = blockIdx.x * (argmax::THREADS / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  pdl_wait();
  pdl_launch_dependents();
  if (b >= p.B) return;
  unsigned long long best = 0;
  for (int c = lane; c < p.parts; c += 32) {
    const unsigned long long k = p.part[static_cast<size_t>(b) * p.parts + c];
    best = k > best ? k : best;
  }
  best = warp_max(best);
  if (lane == 0) p.out[b] = 0xFFFFFFFFu - static_cast<uint32_t>(best);
}

int argmax_parts(int V) { return (V + argmax::SPAN - 1) / argmax::SPAN; }

cudaError_t launch_argmax(const ArgmaxParams& p, cudaStream_t stream) {
  if (p.B < 1 || p.V < 1 || p.V % 8 || p.ld % 8 || p.ld < p.V || p.parts != argmax_parts(p.V))
    return cudaErrorInvalidValue;
  constexpr int ROWS = argmax::THREADS / 32;
  cudaError_t e = launch_pdl(argmax_parts_kernel, dim3(p.parts, p.B), dim3(argmax::THREADS), 0, stream, p);
  if (e == cudaSuccess)
    e = launch_pdl(argmax_final_kernel, dim3((p.B + ROWS - 1) / ROWS), dim3(argmax::THREADS), 0, stream, p);
  return e;
}

}  // namespace tw

// ---------------------------------------------------------------------------------------------
// Torch bindings.
#ifndef TW_NO_TORCH
// Narrow headers instead of torch/extension.h and ATen/cuda/CUDAContext.h: a third of the build
// time, no warnings from the C++ frontend's headers, and no need for the cuBLAS/cuSPARSE headers.
// c10::cuda::getCurrentCUDAStream is the stream at::cuda::getCurrentCUDAStream returns.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <map>
#include <optional>
#include <string>

namespace {

// The bindings only unpack and launch: build_ext.py validates every argument first, in Python, with
// messages that say what to do. They never throw and never format with iostreams; they return "" or
// an error string that build_ext.py raises. On H200 machines with torch 2.11, both a C++ exception leaving
// the extension and c10::str (an ostringstream) crashed the process: the number formatting resolved
// to a copy of libstdc++'s iostream code inside this .so and faulted in its locale facet.
std::string cuda_error(const char* op, cudaError_t e) {
  if (e == cudaSuccess) e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string(op) + ": CUDA error: " + cudaGetErrorString(e);
}

void* as_ptr(int64_t addr) { return reinterpret_cast<void*>(static_cast<uintptr_t>(addr)); }

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
  const int64_t rows = x.numel() / x.size(-1);
  if (rows == 0) return "";
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda_error("fused_add_rmsnorm",
                    tw::launch_fused_add_rmsnorm(params(x, residual, weight, rows, eps),
                                                 c10::cuda::getCurrentCUDAStream()));
}

std::string fused_allreduce_add_rmsnorm(at::Tensor buf, std::vector<int64_t> peer_bufs,
                                        int64_t multicast_ptr, std::vector<int64_t> peer_flags,
                                        int64_t rank, at::Tensor residual, at::Tensor weight,
                                        double eps, int64_t n_ctas, double timeout_s) {
  const int64_t n = static_cast<int64_t>(peer_bufs.size());
  if (buf.size(0) == 0) return "";
  tw::Params p = params(buf, residual, weight, buf.size(0) / n, eps);
  for (int64_t i = 0; i < n; ++i) {
    p.bufs.ptr[i] = as_ptr(peer_bufs[i]);
    p.flags.ptr[i] = as_ptr(peer_flags[i]);
  }
  p.multicast = as_ptr(multicast_ptr);
  p.rank = static_cast<int>(rank);
  p.n = static_cast<int>(n);
  p.timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  const c10::cuda::CUDAGuard guard(buf.device());
  return cuda_error("fused_allreduce_add_rmsnorm",
                    tw::launch_fused_allreduce_add_rmsnorm(p, static_cast<int>(n_ctas),
                                                           c10::cuda::getCurrentCUDAStream()));
}

std::string rope_kv_cache(at::Tensor qkv, at::Tensor rope, at::Tensor positions, at::Tensor kv_rows,
                          at::Tensor k_cache, at::Tensor v_cache) {
  if (qkv.size(0) == 0) return "";
  tw::RopeParams p{};
  p.qkv = static_cast<__nv_bfloat16*>(qkv.data_ptr());
  p.rope = static_cast<const __nv_bfloat16*>(rope.data_ptr());
  p.positions = static_cast<const int*>(positions.data_ptr());
  p.kv_rows = static_cast<const int*>(kv_rows.data_ptr());
  p.k_cache = static_cast<__nv_bfloat16*>(k_cache.data_ptr());
  p.v_cache = static_cast<__nv_bfloat16*>(v_cache.data_ptr());
  p.tokens = static_cast<int>(qkv.size(0));
  p.nkv = static_cast<int>(k_cache.size(1));
  p.hd = static_cast<int>(k_cache.size(2));
  p.nh = static_cast<int>(qkv.size(1) / p.hd) - 2 * p.nkv;
  const c10::cuda::CUDAGuard guard(qkv.device());
  return cuda_error("rope_kv_cache", tw::launch_rope_kv_cache(p, c10::cuda::getCurrentCUDAStream()));
}

std::string decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor kv_starts,
                             at::Tensor kv_lens, at::Tensor out, at::Tensor part_o, at::Tensor part_lse,
                             int64_t max_k, double scale) {
  if (q.size(0) == 0) return "";
  tw::DecodeParams p{};
  p.q = static_cast<const __nv_bfloat16*>(q.data_ptr());
  p.k_cache = static_cast<const __nv_bfloat16*>(k_cache.data_ptr());
  p.v_cache = static_cast<const __nv_bfloat16*>(v_cache.data_ptr());
  p.kv_starts = static_cast<const int*>(kv_starts.data_ptr());
  p.kv_lens = static_cast<const int*>(kv_lens.data_ptr());
  p.out = static_cast<__nv_bfloat16*>(out.data_ptr());
  p.part_o = static_cast<float*>(part_o.data_ptr());
  p.part_lse = static_cast<float*>(part_lse.data_ptr());
  p.batch = static_cast<int>(q.size(0));
  p.nh = static_cast<int>(q.size(1));
  p.nkv = static_cast<int>(k_cache.size(1));
  p.q_stride = static_cast<int>(q.stride(0));
  p.slices = tw::slices_for(static_cast<int>(max_k));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const c10::cuda::CUDAGuard guard(q.device());
  return cuda_error("decode_attention", tw::launch_decode_attention(p, c10::cuda::getCurrentCUDAStream()));
}

std::string silu_mul(at::Tensor gate_up, at::Tensor out) {
  if (out.numel() == 0) return "";
  const c10::cuda::CUDAGuard guard(gate_up.device());
  return cuda_error("silu_mul", tw::launch_silu_mul(static_cast<const uint4*>(gate_up.data_ptr()),
                                                    static_cast<uint4*>(out.data_ptr()),
                                                    static_cast<int>(out.size(0)),
                                                    static_cast<int>(out.size(1) / 8),
                                                    c10::cuda::getCurrentCUDAStream()));
}

tw::GemvParams gemv_params(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           const at::Tensor& out) {
  tw::GemvParams p{};
  p.x = static_cast<const __nv_bfloat16*>(x.data_ptr());
  p.w = static_cast<const __nv_bfloat16*>(w.data_ptr());
  p.bias = bias ? static_cast<const __nv_bfloat16*>(bias->data_ptr()) : nullptr;
  p.out = static_cast<__nv_bfloat16*>(out.data_ptr());
  p.M = static_cast<int>(x.size(0));
  p.N = static_cast<int>(w.size(0));
  p.K = static_cast<int>(w.size(1));
  p.ldx = static_cast<int>(x.stride(0));
  p.ldo = static_cast<int>(out.stride(0));
  return p;
}

std::string gemv(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias, at::Tensor out, bool swiglu,
                 bool pdl) {
  if (x.size(0) == 0) return "";
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda_error("gemv", tw::launch_gemv(gemv_params(x, w, bias, out), swiglu ? tw::gemv::SWIGLU : tw::gemv::STORE,
                                            pdl, c10::cuda::getCurrentCUDAStream()));
}

std::string gemv_rope(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias, at::Tensor q, at::Tensor rope,
                      at::Tensor positions, at::Tensor kv_rows, at::Tensor k_cache, at::Tensor v_cache) {
  if (x.size(0) == 0) return "";
  tw::GemvParams p = gemv_params(x, w, bias, q);
  p.rope = static_cast<const __nv_bfloat16*>(rope.data_ptr());
  p.positions = static_cast<const int*>(positions.data_ptr());
  p.kv_rows = static_cast<const int*>(kv_rows.data_ptr());
  p.k_cache = static_cast<__nv_bfloat16*>(k_cache.data_ptr());
  p.v_cache = static_cast<__nv_bfloat16*>(v_cache.data_ptr());
  p.nkv = static_cast<int>(k_cache.size(1));
  p.hd = static_cast<int>(k_cache.size(2));
  p.nh = static_cast<int>(q.size(1) / p.hd);
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda_error("gemv_rope", tw::launch_gemv(p, tw::gemv::ROPE, true, c10::cuda::getCurrentCUDAStream()));
}

std::string argmax(at::Tensor logits, at::Tensor out) {
  if (logits.size(0) == 0) return "";
  const c10::cuda::CUDAGuard guard(logits.device());
  tw::ArgmaxParams p{};
  p.logits = static_cast<const __nv_bfloat16*>(logits.data_ptr());
  p.out = out.data_ptr<int64_t>();
  p.B = static_cast<int>(logits.size(0));
  p.V = static_cast<int>(logits.size(1));
  p.ld = static_cast<int>(logits.stride(0));
  p.parts = tw::argmax_parts(p.V);
  const at::Tensor part = at::empty({p.B, p.parts}, logits.options().dtype(at::kLong));   // stream-ordered
  p.part = reinterpret_cast<unsigned long long*>(part.data_ptr<int64_t>());
  return cuda_error("argmax", tw::launch_argmax(p, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "TokenWeave kernels: fused (AllReduce +) residual add + RMSNorm (bf16, sm_90a)";
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
  m.def("rope_kv_cache", &rope_kv_cache,
        "In place: RoPE on the q heads of qkv [T, (nh + 2 nkv) hd]; k rotated into "
        "k_cache[kv_rows[t]] and v copied into v_cache[kv_rows[t]] ([rows, nkv, hd]); rope "
        "[max_len, 2, hd] holds cos and sin by position; positions and kv_rows int32 [T]",
        py::arg("qkv"), py::arg("rope"), py::arg("positions"), py::arg("kv_rows"), py::arg("k_cache"),
        py::arg("v_cache"));
  m.def("decode_attention", &decode_attention,
        "out [B, nh, hd] <- attention of q [B, nh, hd] (rows may be strided) over keys "
        "kv_starts[b] .. kv_starts[b] + kv_lens[b] - 1 of k_cache and v_cache [rows, nkv, hd]; "
        "kv_starts, kv_lens int32 [B], every kv_lens[b] in [1, max_k]; part_o fp32 "
        "[decode_slices(max_k), B, nh, hd] and part_lse [decode_slices(max_k), B, nh] hold the slices "
        "(unused when decode_slices(max_k) is 1). hd 128, nh / nkv <= 8",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("kv_starts"), py::arg("kv_lens"),
        py::arg("out"), py::arg("part_o"), py::arg("part_lse"), py::arg("max_k"), py::arg("scale"));
  m.def("decode_slices", [](int64_t max_k) { return tw::slices_for(static_cast<int>(max_k)); },
        "The most key slices decode_attention cuts a sequence of up to max_k keys into",
        py::arg("max_k"));
  m.def("silu_mul", &silu_mul,
        "out [T, I] <- bf16(bf16(silu(gate)) * up) for gate_up [T, 2I] = [gate | up]; I % 8 == 0",
        py::arg("gate_up"), py::arg("out"));
  m.def("gemv", &gemv,
        "out [M, N] <- x [M, K] w^T (+ bias [N]) for M <= gemv_max_m tokens (rows of x and out may be "
        "strided, 16-byte aligned); swiglu: w is [gate; up] [2I, K], out [M, I] <- silu(gate) * up; "
        "K % 8 == 0; pdl false: a plain launch instead of a programmatic one (one wave of long CTAs behind "
        "a kernel of many waves)",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("swiglu"), py::arg("pdl") = true);
  m.def("gemv_rope", &gemv_rope,
        "gemv with rope_kv_cache in its epilogue: qkv = x [M, K] w^T (+ bias) for w [(nh + 2 nkv) hd, K], "
        "then q rotated into q [M, nh hd] (rows may be strided), k rotated into k_cache[kv_rows[m]] and v "
        "into v_cache[kv_rows[m]] ([rows, nkv, hd]); rope, positions and kv_rows as rope_kv_cache's; "
        "hd % 16 == 0",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("q"), py::arg("rope"), py::arg("positions"),
        py::arg("kv_rows"), py::arg("k_cache"), py::arg("v_cache"));
  m.def("argmax", &argmax,
        "out [B] (int64) <- the first index of each row's largest value of logits [B, V] (bf16, "
        "contiguous rows, 16-byte aligned, V % 8 == 0), NaN above all, as torch.argmax(-1)",
        py::arg("logits"), py::arg("out"));
  m.def("resident_ctas", [](int64_t hidden, int64_t world) {
    return tw::resident_ctas(static_cast<int>(hidden / 8), static_cast<int>(world));
  }, "CTAs of the p2p fused kernel (this hidden and world size) the current GPU holds at once",
        py::arg("hidden"), py::arg("world"));
  m.def("limits", [] {
    return std::map<std::string, int>{{"max_ctas", tw::MAX_CTAS}, {"max_peers", tw::MAX_PEERS},
                                      {"max_hidden", tw::MAX_HIDDEN}, {"decode_head_dim", tw::attn::HD},
                                      {"decode_max_group", tw::attn::MAX_G},
                                      {"gemv_max_m", tw::gemv::MAX_M}};
  }, "The kernels' limits, which build_ext.py checks arguments against");
}
#endif  // TW_NO_TORCH
