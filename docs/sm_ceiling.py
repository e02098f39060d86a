"""What one SM can move on this GPU, the ceiling of a comm-kernel CTA on one GPU (docs/results.md).
One CTA per SM, 1-8 CTAs, 64 MB a CTA (out of L2); it reads, writes, or copies (reads and writes
back) its bytes; GB/s a CTA (read + written), the best of 5. Three ways to move them:
  threads   512 threads, U 16-byte loads in flight a thread (ld.global / st.global);
  bulk      the bulk copy engine (cp.async.bulk, TMA): one thread fills a ring of S stages in shared
            memory, a stage being G copies of B bytes that complete on its mbarrier, and writes each
            stage back with G bulk stores;
  bulk in   bulk copies in as above, 512 threads read the stage and store it with st.global (what a
            comm kernel that sums and normalizes its rows would do), then free it for the next copy.

With --peer P the bytes live on GPU P and GPU 0's SMs move them over NVLink (peer access, no
multicast): what a comm-kernel CTA can read from and write to its peers, by either way.

    python docs/sm_ceiling.py [--peer 1]          (a CUDA GPU, two for --peer; compiles for sm_90a)
"""
import argparse

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <torch/extension.h>
enum Mode { READ = 0, WRITE = 1, COPY = 2 };

// Each thread loads U vectors (all in flight at once), then stores them (COPY) or folds them into a
// value that is almost never stored (READ, kept from being optimized away); WRITE stores only.
template <int U, int MODE>
__global__ void __launch_bounds__(512) threads(const uint4* __restrict__ a, uint4* __restrict__ b, long n) {
  const long stride = (long)gridDim.x * 512 * U;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (long base = (long)blockIdx.x * 512 * U + threadIdx.x; base < n; base += stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long i = base + (long)u * 512;
      v[u] = MODE == WRITE ? make_uint4((unsigned)i, 1, 2, 3) : i < n ? __ldcs(a + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long i = base + (long)u * 512;
      if (MODE != READ) { if (i < n) __stcs(b + i, v[u]); }
      else { acc.x ^= v[u].x; acc.y ^= v[u].y; acc.z ^= v[u].z; acc.w ^= v[u].w; }
    }
  }
  if (MODE == READ && acc.x == 0x12345678u && acc.y == 1u) b[0] = acc;
}

__device__ __forceinline__ uint32_t smem(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void wait_parity(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(smem(bar)), "r"(parity) : "memory");
}
// Stage s of the ring gets chunk k: G copies of B bytes, completing on full[s].
template <int B, int G>
__device__ __forceinline__ void load_stage(char* ring, uint64_t* full, const char* src, long k, int s) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem(&full[s])), "r"(B * G) : "memory");
  for (int g = 0; g < G; ++g)
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(smem(ring + ((long)s * G + g) * B)), "l"(src + (k * G + g) * B), "r"(B), "r"(smem(&full[s]))
                 : "memory");
}

// One thread moves the CTA's bytes in chunks of G x B through S stages; S - 1 chunks' loads stay in
// flight while a stage is written back (COPY), S while it is only received (READ). WRITE stores the
// stages' bytes as they are (never rewritten), waiting only while S chunks' stores are still reading
// shared memory.
template <int B, int S, int G, int MODE>
__global__ void __launch_bounds__(32) bulk(const char* __restrict__ a, char* __restrict__ b, long per_cta) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) uint64_t full[S];
  if (threadIdx.x != 0) return;
  const char* src = a + (long)blockIdx.x * per_cta;
  char* dst = b + (long)blockIdx.x * per_cta;
  const long chunks = per_cta / (B * G);
  for (int s = 0; s < S; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem(&full[s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  if (MODE != WRITE)
    for (long k = 0; k < S && k < chunks; ++k) load_stage<B, G>(ring, full, src, k, k);
  for (long k = 0; k < chunks; ++k) {
    const int s = k % S;
    if (MODE != WRITE) wait_parity(&full[s], (k / S) & 1);
    if (MODE != READ) {
      for (int g = 0; g < G; ++g)
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                     :: "l"(dst + (k * G + g) * B), "r"(smem(ring + ((long)s * G + g) * B)), "r"(B) : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
    if (MODE == COPY) {
      // Every store group but this chunk's has finished reading shared memory, so stage (k - 1) % S
      // is free: refill it with chunk k - 1 + S.
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      if (k >= 1 && k - 1 + S < chunks) load_stage<B, G>(ring, full, src, k - 1 + S, (k - 1) % S);
    } else if (MODE == WRITE) {
      asm volatile("cp.async.bulk.wait_group.read %0;" :: "n"(S - 1) : "memory");
    } else if (k + S < chunks) {
      load_stage<B, G>(ring, full, src, k + S, s);
    }
  }
  if (MODE != READ) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// Bulk copies in (warp 16, one thread), 512 threads read each stage of B bytes and store it; each
// warp arrives on the stage's empty barrier once it has read it, and the producer refills it then.
template <int B, int S>
__global__ void __launch_bounds__(544) bulk_in(const char* __restrict__ a, char* __restrict__ b, long per_cta) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) uint64_t full[S], empty[S];
  const char* src = a + (long)blockIdx.x * per_cta;
  uint4* dst = reinterpret_cast<uint4*>(b + (long)blockIdx.x * per_cta);
  const long chunks = per_cta / B;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem(&full[s])));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 16;" :: "r"(smem(&empty[s])));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x >= 512) {
    if (threadIdx.x != 512) return;
    for (long k = 0; k < chunks; ++k) {
      const int s = k % S;
      if (k >= S) wait_parity(&empty[s], ((k / S) - 1) & 1);
      load_stage<B, 1>(ring, full, src, k, s);
    }
    return;
  }
  constexpr int V = B / 16 / 512;   // vectors a thread per stage
  for (long k = 0; k < chunks; ++k) {
    const int s = k % S;
    wait_parity(&full[s], (k / S) & 1);
    const uint4* stage = reinterpret_cast<const uint4*>(ring + (long)s * B);
#pragma unroll
    for (int v = 0; v < V; ++v) __stcs(dst + k * (B / 16) + v * 512 + threadIdx.x, stage[v * 512 + threadIdx.x]);
    __syncwarp();
    if (threadIdx.x % 32 == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem(&empty[s])) : "memory");
  }
}

template <typename K>
void start(K kernel, int ctas, int threads, int bytes, const char* a, char* b, long per_cta) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  kernel<<<ctas, threads, bytes>>>(a, b, per_cta);
}
template <int MODE>
void run_mode(const char* A, char* B, long n, int ctas, const std::string& how) {
  const long per = n / ctas;
  const uint4* a4 = (const uint4*)A;
  uint4* b4 = (uint4*)B;
  if (how == "threads 4") threads<4, MODE><<<ctas, 512>>>(a4, b4, n / 16);
  else if (how == "threads 16") threads<16, MODE><<<ctas, 512>>>(a4, b4, n / 16);
  else if (how == "bulk 8 KB x 24") start(bulk<8192, 24, 1, MODE>, ctas, 32, 8192 * 24, A, B, per);
  else if (how == "bulk 32 KB x 6") start(bulk<32768, 6, 1, MODE>, ctas, 32, 32768 * 6, A, B, per);
  else if (how == "bulk 4 x 8 KB x 6") start(bulk<8192, 6, 4, MODE>, ctas, 32, 8192 * 24, A, B, per);
  else if (MODE == COPY && how == "bulk in 16 KB x 12") start(bulk_in<16384, 12>, ctas, 544, 16384 * 12, A, B, per);
  else if (MODE == COPY && how == "bulk in 32 KB x 6") start(bulk_in<32768, 6>, ctas, 544, 32768 * 6, A, B, per);
  else TORCH_CHECK(false, "no such way: ", how);
}
// This GPU's kernels may read and write GPU `peer`'s memory (over NVLink where there is one).
void enable_peer(int64_t peer) {
  const cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
  else TORCH_CHECK(err == cudaSuccess, "peer access to GPU ", peer, ": ", cudaGetErrorString(err));
}
void run(torch::Tensor a, torch::Tensor b, int64_t ctas, std::string how, int64_t mode) {
  const auto A = (const char*)a.data_ptr();
  auto B = (char*)b.data_ptr();
  if (mode == READ) run_mode<READ>(A, B, a.numel(), ctas, how);
  else if (mode == WRITE) run_mode<WRITE>(A, B, a.numel(), ctas, how);
  else run_mode<COPY>(A, B, a.numel(), ctas, how);
  const cudaError_t err = cudaGetLastError();   // a launch that failed would otherwise time as a fast one
  TORCH_CHECK(err == cudaSuccess, how, ": ", cudaGetErrorString(err));
}
"""

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--peer", type=int, default=None, help="keep the bytes on this GPU; GPU 0's SMs move them")
args = p.parse_args()
ext = load_inline("sm_ceiling", cuda_sources=SOURCE, functions=["run", "enable_peer"],
                  cpp_sources="void run(torch::Tensor a, torch::Tensor b, int64_t ctas, std::string how, int64_t mode);\n"
                              "void enable_peer(int64_t peer);",
                  extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"])
torch.cuda.set_device(0)
where = torch.device("cuda", 0)
if args.peer is not None:
    if not 0 < args.peer < torch.cuda.device_count() or not torch.cuda.can_device_access_peer(0, args.peer):
        p.error(f"--peer {args.peer}: GPU 0 cannot reach that GPU's memory ({torch.cuda.device_count()} GPUs here)")
    ext.enable_peer(args.peer)
    where = torch.device("cuda", args.peer)
    print(f"bytes on GPU {args.peer}, moved by GPU 0's SMs")
a = torch.empty(512 << 20, dtype=torch.uint8, device=where)
b = torch.empty_like(a)
WAYS = ["threads 4", "threads 16", "bulk 8 KB x 24", "bulk 32 KB x 6", "bulk 4 x 8 KB x 6"]


def rates(how: str, mode: int) -> str:
    out = []
    for ctas in (1, 2, 4, 8):
        x, y = a[:(64 << 20) * ctas], b[:(64 << 20) * ctas]
        ext.run(x, y, ctas, how, mode)
        best = float("inf")
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            ext.run(x, y, ctas, how, mode)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        out.append(f"{ctas} CTAs {x.numel() * (2 if mode == 2 else 1) / best / 1e6 / ctas:.0f}")
    return ", ".join(out)


for mode, what in enumerate(("read", "write", "copy")):
    for how in WAYS + (["bulk in 16 KB x 12", "bulk in 32 KB x 6"] if what == "copy" else []):
        print(f"{what:5} {how:18} GB/s a CTA: {rates(how, mode)}", flush=True)
# Every way of copying, checked once: it copies.
for how in WAYS + ["bulk in 16 KB x 12", "bulk in 32 KB x 6"]:
    x = torch.randint(0, 255, (64 << 20,), dtype=torch.uint8, device=where)
    y = torch.zeros_like(x)
    torch.cuda.synchronize(where)          # made on the peer's stream, read from GPU 0's
    ext.run(x, y, 1, how, 2)
    torch.cuda.synchronize(0)
    assert torch.equal(x, y), how
