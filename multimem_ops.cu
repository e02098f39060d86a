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
  P2P reads the row's 16-byte vectors from all N peers' buffers over NVLink, through a ring of loads
  in flight in shared memory (the pipeline, below), and stores to each peer; MULTIMEM does one
  multimem.ld_reduce into registers and one multimem.st on the multicast address (which only ever
  arrives as an argument, from torch symmetric memory). Everything else is shared.
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

The p2p pipeline. With a few CTAs the kernel is latency-bound: a CTA that loads a group of rows and
then reduces, normalizes and stores them has nothing in flight for the second half of every group.
So each thread keeps the loads of its next vectors in flight in shared memory while it works on the
current one. A thread's vectors, in order, are its columns of its CTA's rows (row i, vector v);
each takes L = N + 1 loads of 16 bytes, the N peers' copies in rank order and then the residual's.
They go through a ring of S stages, one vector's L loads a stage: vector k's loads are L cp.async
(LDGSTS, cached in L2 only) into stage k % S, committed as one group. Before summing vector k the
thread waits for that group (cp.async.wait_group S - 1: groups are committed in order, one per
vector, S ahead); right after reading the stage it refills it with vector k + S. A thread reads back
only the slots it filled itself, so no CTA barrier guards the data (the block reduction keeps its
own), and the thread that stores an element is the one that loaded it.
The ring is [S][L][512] slots, S = 28 / L stages of L planes of 8 KB (one 16-byte slot for each of
up to 512 threads): 216 KB at 2 or 8 ranks, 200 KB at 4, at most 224 KB of the 227 KB a block may
opt into (cudaFuncAttributeMaxDynamicSharedMemorySize, set once per kernel instance and device); a
launch whose CTAs have fewer vectors than S gets only the stages they fill (a decode step). So
the p2p kernel runs at most 512 threads, with 1, 2, 4 or 8 vectors a thread; at 2 it keeps each
vector's sum of squares apart until the warp sums, so the block reduction's tree, and the bits, are
those of one vector a thread. The kernel is built for each world size: no peer loop has a run-time
bound. Bytes each CTA keeps in flight at hidden 8192:
             before: registers, ROWS x N x 16 B x 1024 threads     now: the ring, S x L x 16 B x 512
    2 ranks  2 x 2 x 16 KB =  64 KB, + 32 KB of residual            9 x 3 x 8 KB = 216 KB, 4.5 rows
    4 ranks  2 x 4 x 16 KB = 128 KB, + 32 KB                        5 x 5 x 8 KB = 200 KB, 2.5 rows
    8 ranks  1 x 8 x 16 KB = 128 KB, + 16 KB                        3 x 9 x 8 KB = 216 KB, 1.5 rows
Before, those bytes were in flight only while the CTA waited for them, none while it reduced,
normalized and stored; above hidden 8192 the peers' loads went one vector at a time (N x 16 B x 512).
Now all but the stage being read are in flight all the time, at every hidden size. The price: every
loaded byte crosses shared memory twice (the copy in, the read out), beside the stores that leave
through L1, so one SM's shared-memory bandwidth, with its issue rate, is what bounds a CTA now.
Why per-thread cp.async and not the bulk copy engine (cp.async.bulk into shared memory, completing
on an mbarrier): bytes in flight are bounded by the ring either way, and so is the shared-memory
traffic; the bulk copy would only save the LDGSTS issue, a few instructions a vector. In exchange it
needs what the per-thread ring does without: an mbarrier per stage with expected bytes and phase
bits, a CTA-wide barrier before a stage may be refilled (a stage one thread's copy filled is read by
all), and copies in the async proxy, which the ordering argument below would have to fence. If the
GPU shows the ring full and the rate still short, that is the next thing to try.

Memory ordering. Each CTA b meets the CTA b of every peer twice, through our own symmetric flag
array flags[MAX_CTAS][N] (uint32, zeroed once at allocation; one array per stream that may run
these kernels concurrently). To signal peer p, CTA b moves p's flags[b][my_rank] 0 -> 1 with a
CAS, spinning while it is still 1 (p has not consumed our previous signal yet); to wait for p, it
moves its own flags[b][p] 1 -> 0. A signal is never lost and every wait consumes exactly one, so
the k-th wait pairs with the k-th signal whatever the CTA counts of earlier calls were (as long
as all ranks launch the same count per call), and no reset or epoch counter is needed.
  * Row ownership. Within a call, row j of every rank's buf is read (from all N) and written (into
    all N) by one CTA of one rank, its owner, and by nobody else. A peer's stores into our buf go
    to rows it owns, which we never load: the ring prefetches only rows of our slice (past its last
    one, the copies are predicated off). The owner stores vector c of row j only after it has read
    vector c of row j from every peer: the storing thread is the one whose cp.async loaded it, it
    waited for those copies (cp.async.wait_group) before reading them, and the stored value is
    computed from what it read. So no store overtakes a load of the same bytes.
  * Exit barrier: release / acquire at system scope. Stores to peers are plain st.global by the
    threads; the release (after __syncthreads, which orders every thread's stores of the CTA before
    it) makes our stores into peer p's buffer, and the completion of our loads of p's partials (each
    thread has waited for all its copies, cp.async.wait_group 0, before the barrier), visible to p
    before p's kernel can finish; the acquire makes p's stores into our buffer visible to us and to
    everything after this kernel on our stream. Hence: when the kernel completes on a rank, every
    peer has finished reading this rank's partials and writing its rows into this rank's buffer, no
    load of the call is in flight anywhere, and the buffer may be reused.
  * Entry barrier: relaxed (no fence). It only has to tell us that peer p's kernel has started; the
    ring's first copies are issued after it. p's partials were written by kernels that completed
    before p's kernel started, and kernel completion makes a kernel's writes visible system-wide
    (that is what cross-device event synchronization relies on too); our loads of p's memory go to
    p's memory side over NVLink, so they see them. In the other direction, p reads its own buf only
    in rows it owns, and our stores go to rows we own. A release fence here would stall every CTA
    once per call for nothing.
  * Shared memory: a thread reads only the slots it fills. It refills a stage after reading it, in
    program order: cp.async is a weak write of the issuing thread in the generic proxy, ordered
    after the same thread's earlier reads of the same bytes (it is unordered only against other
    cp.async). And it refills the stage only after cp.async.wait_group has retired the copies it
    read, since two cp.async are otherwise unordered.
  * Multimem accesses go through the same NVLink fabric and are ordered by the same fences.
Every spin loop reads %globaltimer and, after timeout_ns, prints which rank, CTA, peer and barrier
timed out and traps, instead of hanging the job when a peer has died.
*/
#include "common.cuh"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <set>
#include <utility>

namespace tw {

constexpr int MAX_CTAS = 64;      // flags are [MAX_CTAS][N] per rank
constexpr int MAX_PEERS = 8;
constexpr int MAX_THREADS = 1024;
// Vectors (16 bytes, 8 bf16) per thread. The register path (LOCAL, MULTIMEM): 1 with up to 1024
// threads (H <= 8192, the hot path), else 4 or 8 with up to 512 threads, which leaves 128 registers
// per thread for the loads in flight and the packed row (at 1024 threads and 64 registers, 2 or 4
// vectors spill). The p2p ring: up to 512 threads always, with 1, 2, 4 or 8 vectors (see the header).
constexpr int WIDE_THREADS = 512;
constexpr int MAX_VPT = 8;
constexpr int MAX_HIDDEN = MAX_VPT * WIDE_THREADS * 8;  // 32768
// The p2p ring: 224 KB of the 227 KB of shared memory a block may opt into on H100 and H200 (the
// block reduction's few hundred static bytes fit beside it), in planes of one 16-byte slot for each
// of up to 512 threads.
constexpr int RING_BYTES = 224 * 1024;
constexpr int RING_PLANES = RING_BYTES / (WIDE_THREADS * 16);  // 28

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

template <Transport T, int VPT>
__host__ __device__ constexpr int max_threads() {
  return T != Transport::P2P && VPT == 1 ? MAX_THREADS : WIDE_THREADS;
}

// Stages of the p2p ring: one vector's NP + 1 loads (the peers', the residual's) each.
template <int NP>
__host__ __device__ constexpr int ring_stages() { return RING_PLANES / (NP + 1); }

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
// The arithmetic of a row, the same on every path.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums over the CTA, one per row i < ROWS, of every thread's partial sums v[i][0..P-1]; v[i][0]
// gets the sum. Every warp reduces the per-warp sums itself, so all threads get the same bits, with
// one barrier for all rows. With P = 1 a thread has one partial for all its vectors; with P > 1 one
// per vector, and warp w's sum of its vector j goes to entry j * warps + w, the entry of the warp that
// held those vectors where each thread held one: the tree, so the bits, are the same as there
// (P > 1 only at up to 512 threads: P * warps <= 32 entries).
// Consecutive calls alternate `parity`: a warp writes these entries again two calls later, after the
// next call's barrier, which every warp reaches only once it has read them.
template <int ROWS, int P>
__device__ __forceinline__ void block_sum(float (&v)[ROWS][P], int parity) {
  __shared__ float warp_sums[2][ROWS][MAX_THREADS / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
#pragma unroll
    for (int j = 0; j < P; ++j) v[i][j] = warp_sum(v[i][j]);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
#pragma unroll
      for (int j = 0; j < P; ++j) warp_sums[parity][i][j * warps + warp] = v[i][j];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < ROWS; ++i) v[i][0] = warp_sum(lane < P * warps ? warp_sums[parity][i][lane] : 0.f);
}

// r = bf16(acc + residual), the new residual; sumsq += the squares of r's elements, in order.
__device__ __forceinline__ uint4 add_residual(float (&acc)[8], const uint4& residual, float& sumsq) {
  float f[8];
  unpack8(residual, f);
#pragma unroll
  for (int k = 0; k < 8; ++k) acc[k] += f[k];
  const uint4 r = pack8(acc);
  unpack8(r, f);  // the variance uses the bf16-rounded r, as HF does
#pragma unroll
  for (int k = 0; k < 8; ++k) sumsq += f[k] * f[k];
  return r;
}

__device__ __forceinline__ float inverse_rms(const Params& p, float sumsq) {
  return rsqrtf(sumsq / static_cast<float>(p.nvec * 8) + p.eps);
}

// HF: normalize in fp32, cast to bf16, then multiply by the weight (rounded again).
__device__ __forceinline__ uint4 normalize(const uint4& r, const uint4& w, float inv_rms) {
  float f[8], wf[8];
  unpack8(r, f);
#pragma unroll
  for (int k = 0; k < 8; ++k) f[k] *= inv_rms;
  unpack8(pack8(f), f);
  unpack8(w, wf);
#pragma unroll
  for (int k = 0; k < 8; ++k) f[k] *= wf[k];
  return pack8(f);
}

// The weight is the same for every row. A thread keeps its vectors of it in registers where they
// fit: with one vector a thread, and on the p2p path with 2 or 4 (its loads in flight are in the
// ring). Else r and the loads need those registers (at 8 vectors, r and the weight alone would take
// 64 of the 128), and the weight is read per row, from L1 or L2.
template <Transport T, int VPT>
__host__ __device__ constexpr bool weight_in_registers() {
  return VPT == 1 || (T == Transport::P2P && VPT <= 4);
}

template <Transport T, int VPT>
__device__ __forceinline__ void load_weight(const Params& p, uint4 (&w)[VPT]) {
  if constexpr (weight_in_registers<T, VPT>()) {
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int col = threadIdx.x + v * blockDim.x;
      if (col < p.nvec) w[v] = __ldg(p.weight + col);
    }
  }
}

// Vector `vec` (16 bytes) of the buffer, into every rank's buf (P2P: NP = p.n of them). The thread
// that stores a vector is the one that loaded it (see the header).
template <Transport T, int NP>
__device__ __forceinline__ void store(const Params& p, size_t vec, const uint4& v) {
  if constexpr (T == Transport::LOCAL) {
    p.buf[vec] = v;
  } else if constexpr (T == Transport::P2P) {
    const size_t offset = vec * sizeof(uint4);
#pragma unroll
    for (int i = 0; i < NP; ++i) *reinterpret_cast<uint4*>(static_cast<char*>(p.bufs.ptr[i]) + offset) = v;
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
// The register path (LOCAL, MULTIMEM): one load per vector, of the partials already summed (LOCAL:
// in x; MULTIMEM: by the switch, in fp32, returned rounded to bf16), ROWS rows at a time.

template <Transport T>
__device__ __forceinline__ uint4 load_sum(const Params& p, size_t vec) {
  if constexpr (T == Transport::LOCAL) {
    return p.buf[vec];
  } else {
    uint4 v;
    const uint4* addr = static_cast<const uint4*>(p.multicast) + vec;
    asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(addr) : "memory");
    return v;
  }
}

// Rows row0 + i * stride (buffer) and res0 + i * stride (residual), i < ROWS, those with
// res0 + i * stride < p.rows. All loads of all ROWS rows are issued before the first sum: their
// round trips overlap, and one block reduction serves all the rows.
template <Transport T, int VPT, int ROWS>
__device__ __forceinline__ void add_rmsnorm_rows(const Params& p, int row0, int res0, int stride,
                                                 const uint4 (&w)[VPT], int parity) {
  uint4 in[ROWS], res[ROWS][VPT];  // in: the prefetched loads (one vector per thread only)
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int col = threadIdx.x + v * blockDim.x;
      if (res0 + i * stride < p.rows && col < p.nvec) {
        if constexpr (VPT == 1)  // wider rows hold too many vectors: load those just before use
          in[i] = load_sum<T>(p, static_cast<size_t>(row0 + i * stride) * p.nvec + col);
        res[i][v] = p.residual[static_cast<size_t>(res0 + i * stride) * p.nvec + col];
      }
    }
  }
  // r stays packed as bf16: it is rounded anyway, and that halves the registers it needs.
  float sumsq[ROWS][1];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    sumsq[i][0] = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int col = threadIdx.x + v * blockDim.x;
      if (res0 + i * stride < p.rows && col < p.nvec) {
        float acc[8];
        const size_t vec = static_cast<size_t>(row0 + i * stride) * p.nvec + col;
        unpack8(VPT == 1 ? in[i] : load_sum<T>(p, vec), acc);
        res[i][v] = add_residual(acc, res[i][v], sumsq[i][0]);
        p.residual[static_cast<size_t>(res0 + i * stride) * p.nvec + col] = res[i][v];
      }
    }
  }
  block_sum(sumsq, parity);
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const float inv_rms = inverse_rms(p, sumsq[i][0]);
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int col = threadIdx.x + v * blockDim.x;
      if (res0 + i * stride < p.rows && col < p.nvec)
        store<T, 1>(p, static_cast<size_t>(row0 + i * stride) * p.nvec + col,
                    normalize(res[i][v], weight_in_registers<T, VPT>() ? w[v] : __ldg(p.weight + col), inv_rms));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The p2p path: each thread's ring of loads in flight (see the header).

// A 16-byte cp.async from global memory into shared-memory address `slot`, if `pred`: predicated,
// not branched around, so that a warp issues it as one instruction whichever lanes load.
__device__ __forceinline__ void cp_async16(uint32_t slot, const uint4* src, bool pred) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p cp.async.cg.shared.global [%0], [%1], 16;\n}"
               :: "r"(slot), "l"(src), "r"(static_cast<int>(pred)) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

__device__ __forceinline__ uint4 ld_shared(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}

// All rows of this CTA: rows blockIdx.x + i * gridDim.x of this rank's slice, i < rows. The
// thread's vectors, in order, are k = i * VPT + v (column threadIdx.x + v * blockDim.x of row i);
// vector k's L loads are the NP peers' copies of it and the residual's, in stage k % S. The ring is
// [S][L][512] 16-byte slots, the thread's at index threadIdx.x: a warp's 32 slots are 512 contiguous
// bytes, and the slots of a stage are constant offsets apart. Every loop bound and branch here is
// uniform across the CTA but the column guards, and those only skip arithmetic and predicate copies
// off, never a wait, a commit or a barrier.
template <int NP, int VPT>
__device__ __forceinline__ void allreduce_rows_ring(const Params& p, const uint4 (&w)[VPT]) {
  constexpr int L = NP + 1, S = ring_stages<NP>();
  constexpr int P = VPT == 2 ? 2 : 1;  // partial sums of squares: block_sum's tree is the register path's
  static_assert(S >= 1 && S <= 64, "wait_group counts to 63");
  constexpr uint32_t PLANE = WIDE_THREADS * 16;  // bytes from one slot of a thread to the next
  extern __shared__ uint4 ring[];
  const int T = blockDim.x;
  const uint32_t ring0 = static_cast<uint32_t>(__cvta_generic_to_shared(ring + threadIdx.x));
  const uint32_t ring_end = ring0 + S * L * PLANE;
  const int rows = blockIdx.x < p.rows ? (p.rows - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  const size_t row_step = static_cast<size_t>(gridDim.x) * p.nvec;      // in vectors
  const size_t slice = static_cast<size_t>(p.rank) * p.rows * p.nvec;  // this rank's rows in buf
  bool col_ok[VPT];
#pragma unroll
  for (int v = 0; v < VPT; ++v) col_ok[v] = threadIdx.x + v * T < p.nvec;

  // Vector v of the row whose vector 0 is at `at` in the residual slice (slice + at in buf): its L
  // loads into `stage`, as one cp.async group. The group is committed even with nothing to load
  // (past the CTA's last row, past the row's end): every thread of the CTA commits the same groups,
  // so the wait counts hold for all of them.
  auto fetch = [&](bool row_ok, size_t at, int v, uint32_t stage) {
    const size_t vec = at + v * T;
    const bool ok = row_ok && col_ok[v];
#pragma unroll
    for (int q = 0; q < NP; ++q)
      cp_async16(stage + q * PLANE, static_cast<const uint4*>(p.bufs.ptr[q]) + slice + vec, ok);
    cp_async16(stage + NP * PLANE, p.residual + vec, ok);
    cp_async_commit();
  };

  size_t at = static_cast<size_t>(blockIdx.x) * p.nvec + threadIdx.x;  // row i's vector 0
#pragma unroll
  for (int k = 0; k < S; ++k)
    fetch(k / VPT < rows, at + k / VPT * row_step, k % VPT, ring0 + k * L * PLANE);
  uint32_t stage = ring0;  // the stage of the next vector
  for (int i = 0; i < rows; ++i, at += row_step) {
    uint4 r[VPT];
    float sumsq[1][P] = {};
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      // Groups committed so far: S + i * VPT + v, one per vector. All but the newest S - 1 have
      // landed: those up to this vector's.
      cp_async_wait<S - 1>();
      if (col_ok[v]) {
        float acc[8];
        unpack8(ld_shared(stage), acc);
#pragma unroll
        for (int q = 1; q < NP; ++q) {  // ranks 0..N-1 in order, then the residual
          float f[8];
          unpack8(ld_shared(stage + q * PLANE), f);
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[k] += f[k];
        }
        r[v] = add_residual(acc, ld_shared(stage + NP * PLANE), sumsq[0][P == 1 ? 0 : v]);
        p.residual[at + v * T] = r[v];
      }
      // Refill the stage with the vector S further on: vector (v + S) % VPT of row i + (v + S) / VPT.
      fetch(i + (v + S) / VPT < rows, at + (v + S) / VPT * row_step, (v + S) % VPT, stage);
      stage += L * PLANE;
      if (stage == ring_end) stage = ring0;
    }
    uint4 wrow[VPT];  // the weight, where not in registers: loaded before the barrier, which hides its latency
#pragma unroll
    for (int v = 0; v < VPT; ++v)
      if (!weight_in_registers<Transport::P2P, VPT>() && col_ok[v]) wrow[v] = __ldg(p.weight + threadIdx.x + v * T);
    block_sum(sumsq, i & 1);
    const float inv_rms = inverse_rms(p, sumsq[0][0]);
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      if (col_ok[v])
        store<Transport::P2P, NP>(p, slice + at + v * T,
                                  normalize(r[v], weight_in_registers<Transport::P2P, VPT>() ? w[v] : wrow[v], inv_rms));
    }
  }
  cp_async_wait<0>();  // only empty groups are left: every load of this call has landed
}

// ---------------------------------------------------------------------------------------------
// Kernels.

template <int VPT>
__global__ void __launch_bounds__(max_threads<Transport::LOCAL, VPT>()) fused_add_rmsnorm_kernel(const Params p) {
  uint4 w[VPT];
  load_weight<Transport::LOCAL, VPT>(p, w);
  pdl_wait();
  pdl_launch_dependents();
  for (int row = blockIdx.x, parity = 0; row < p.rows; row += gridDim.x, parity ^= 1)
    add_rmsnorm_rows<Transport::LOCAL, VPT, 1>(p, row, row, 0, w, parity);
}

// CTA b handles owned rows b, b + G, b + 2G, ... (G = gridDim.x); G is the same on all ranks, and
// every CTA takes part in both barriers even when it owns no row, because its peers wait for it.
template <Transport T, int NP, int VPT, int ROWS>
__global__ void __launch_bounds__(max_threads<T, VPT>()) fused_allreduce_add_rmsnorm_kernel(const Params p) {
  uint4 w[VPT];
  load_weight<T, VPT>(p, w);
  barrier<Order::RELAXED, Order::RELAXED>(p, "entry");
  if constexpr (T == Transport::P2P) {
    allreduce_rows_ring<NP, VPT>(p, w);
  } else {
    const int G = gridDim.x;
    for (int j = blockIdx.x, parity = 0; j < p.rows; j += ROWS * G, parity ^= 1)
      add_rmsnorm_rows<T, VPT, ROWS>(p, p.rank * p.rows + j, j, G, w, parity);
  }
  barrier<Order::RELEASE, Order::ACQUIRE>(p, "exit");
}

// ---------------------------------------------------------------------------------------------
// Host launchers (no torch): they pick vectors per thread, so that a block stays within its path's
// thread limit, the rows at a time of the register path and the ring's shared memory of the p2p
// path; and instantiate every variant.

inline int vectors_per_thread(int nvec, bool ring) {
  if (ring) return nvec <= WIDE_THREADS ? 1 : nvec <= 2 * WIDE_THREADS ? 2 : nvec <= 4 * WIDE_THREADS ? 4 : 8;
  return nvec <= MAX_THREADS ? 1 : nvec <= 4 * WIDE_THREADS ? 4 : 8;
}

inline int threads_per_block(int nvec, bool ring) {
  const int vpt = vectors_per_thread(nvec, ring);
  return ((nvec + vpt - 1) / vpt + 31) / 32 * 32;
}

// Both launchers only refuse (cudaErrorInvalidValue) what the kernels cannot handle; the torch
// bindings check all of it first, with clearer messages. Launch errors are left for the caller's
// cudaGetLastError().
cudaError_t launch_fused_add_rmsnorm(const Params& p, cudaStream_t stream) {
  if (p.rows < 1 || p.nvec < 1 || p.nvec * 8 > MAX_HIDDEN) return cudaErrorInvalidValue;
  const dim3 grid(p.rows), block(threads_per_block(p.nvec, false));
  switch (vectors_per_thread(p.nvec, false)) {
    case 1: return launch_pdl(fused_add_rmsnorm_kernel<1>, grid, block, 0, stream, p);
    case 4: return launch_pdl(fused_add_rmsnorm_kernel<4>, grid, block, 0, stream, p);
    default: return launch_pdl(fused_add_rmsnorm_kernel<8>, grid, block, 0, stream, p);
  }
}

// The kernel instance for these sizes, handed to f with its block size and dynamic shared memory:
// the launcher and the occupancy query share the choice. MULTIMEM takes two rows at a time with one
// vector per thread (two loads in flight per thread, one block reduction for both). The p2p ring
// gets only the stages that the vectors of a CTA's rows_per_cta rows fill: no copy or read touches
// a stage past those (the copies for vectors past a CTA's last are predicated off), and a decode
// step's few rows then ask for a fraction of the shared memory.
template <Transport T, int NP, typename F>
void with_fused_kernel(int nvec, int rows_per_cta, F&& f) {
  constexpr bool ring = T == Transport::P2P;
  const int threads = threads_per_block(nvec, ring);
  const long long stages = std::min<long long>(ring_stages<NP>(), 1LL * rows_per_cta * vectors_per_thread(nvec, ring));
  const int smem = ring ? static_cast<int>(stages) * (NP + 1) * WIDE_THREADS * 16 : 0;
  switch (vectors_per_thread(nvec, ring)) {
    case 1: f(fused_allreduce_add_rmsnorm_kernel<T, NP, 1, (T == Transport::MULTIMEM ? 2 : 1)>, threads, smem); break;
    case 2:
      if constexpr (ring) f(fused_allreduce_add_rmsnorm_kernel<T, NP, 2, 1>, threads, smem);
      break;
    case 4: f(fused_allreduce_add_rmsnorm_kernel<T, NP, 4, 1>, threads, smem); break;
    default: f(fused_allreduce_add_rmsnorm_kernel<T, NP, 8, 1>, threads, smem); break;
  }
}

// The p2p kernel is built for each world size: its loops over the peers have no run-time bound.
template <typename F>
void with_fused_kernel(const Params& p, int rows_per_cta, F&& f) {
  if (p.multicast != nullptr) return with_fused_kernel<Transport::MULTIMEM, 1>(p.nvec, rows_per_cta, f);
  switch (p.n) {
    case 2: return with_fused_kernel<Transport::P2P, 2>(p.nvec, rows_per_cta, f);
    case 3: return with_fused_kernel<Transport::P2P, 3>(p.nvec, rows_per_cta, f);
    case 4: return with_fused_kernel<Transport::P2P, 4>(p.nvec, rows_per_cta, f);
    case 5: return with_fused_kernel<Transport::P2P, 5>(p.nvec, rows_per_cta, f);
    case 6: return with_fused_kernel<Transport::P2P, 6>(p.nvec, rows_per_cta, f);
    case 7: return with_fused_kernel<Transport::P2P, 7>(p.nvec, rows_per_cta, f);
    default: return with_fused_kernel<Transport::P2P, MAX_PEERS>(p.nvec, rows_per_cta, f);
  }
}

// A launch gets 48 KB of dynamic shared memory unless the kernel opts into more: the ring's kernels
// opt into RING_BYTES, once per kernel instance and device (a property of the function, which the
// launches a CUDA graph captured keep too).
inline cudaError_t opt_into_ring(const void* kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  const std::lock_guard<std::mutex> lock(mutex);
  if (e == cudaSuccess && !done.count({kernel, device})) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, RING_BYTES);
    if (e == cudaSuccess) done.insert({kernel, device});
  }
  return e;
}

// Every rank must call this with the same n_ctas, rows and nvec: CTA b meets CTA b of each peer.
cudaError_t launch_fused_allreduce_add_rmsnorm(const Params& p, int n_ctas, cudaStream_t stream) {
  if (n_ctas < 1 || n_ctas > MAX_CTAS || p.n < 2 || p.n > MAX_PEERS || p.rank < 0 ||
      p.rank >= p.n || p.rows < 1 || p.nvec < 1 || p.nvec * 8 > MAX_HIDDEN)
    return cudaErrorInvalidValue;
  cudaError_t e = cudaSuccess;
  with_fused_kernel(p, (p.rows + n_ctas - 1) / n_ctas, [&](auto kernel, int threads, int smem) {
    if (smem > 0) e = opt_into_ring(reinterpret_cast<const void*>(kernel));
    if (e == cudaSuccess) kernel<<<n_ctas, threads, smem, stream>>>(p);
  });
  return e;
}

// CTAs of the p2p kernel for this hidden size and world size that the current GPU holds at once
// (occupancy with the whole ring's shared memory, x SMs): ranks that spin on each other from one GPU
// must all fit (comm.VirtualRanks).
int resident_ctas(int nvec, int n) {
  Params p{};
  p.nvec = nvec;
  p.n = n;
  int per_sm = 0, device = 0, sms = 0;
  with_fused_kernel(p, INT_MAX, [&](auto kernel, int threads, int smem) {  // rows enough for every stage
    if (opt_into_ring(reinterpret_cast<const void*>(kernel)) == cudaSuccess)
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
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
