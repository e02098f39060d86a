/*
The one-GPU fast path's kernels: what a decode step (and a prefill's elementwise work) runs instead
of torch's ops where fastpath.py finds them eligible. None of this is TokenWeave: the technique's
kernels are in multimem_ops.cu. Every kernel gives the bits of the torch ops it replaces (HF
transformers' bf16 rounding), so the fast path changes no token.

Kernels (bf16 in and out, fp32 math):
  rope_kv_cache     the attention prologue of a step, one launch instead of ~10: RoPE (rotate-half,
                    HF's bf16 rounding of each product and of the sum) on q in place in qkv
                    [T, (nh + 2 nkv) hd], on k into k_cache[kv_rows[t]], and v copied into
                    v_cache[kv_rows[t]].
  silu_mul          SwiGLU's activation, silu(gate) * up, in one pass.
  attention_merge   a chunk's attention over its prefix and over its own keys (two cuDNN calls)
                    merged by their log-sum-exp, in one pass.
  decode_attention  one query per sequence (decode) against its range of the KV cache, on the tensor
                    cores, long sequences split over the keys and merged by their log-sum-exp.
  gemv              a decode step's GEMMs (up to 8 tokens) as one stream over the weights; optionally
                    with SwiGLU's activation in its epilogue.
  gemv_rope         qkv's gemv with rope_kv_cache in its epilogue: one kernel from a decode step's x
                    to rotated q and the cache write.
  argmax            greedy sampling: each row's first index of its largest logit.
All but down's gemv (see launch_gemv) start early behind the kernel before them (programmatic
dependent launch, common.cuh).

Build:
  JIT, as the project uses it:     python build_ext.py      (torch.utils.cpp_extension, sm_90a)
  standalone kernel check (CI):    nvcc -c -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
                                        -DTW_NO_TORCH decode_ops.cu -o /dev/null

Memory ordering: each kernel reads what the kernels before it in the stream wrote, after pdl_wait
(common.cuh), and nothing else crosses CTAs but the shared memory of one CTA (__syncthreads) and
decode attention's slices, which a second kernel merges.
*/
#include "common.cuh"

#include <algorithm>
#include <cmath>

namespace tw {
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
// Attention after a prefix, merged. cuDNN's causal mask is aligned to the queries' start, so the fast
// path attends to a chunk's prefix and to its own keys in two calls (fastpath.attend_cudnn); this
// merges them by their log-sum-exp: out = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2), per query and
// head, in fp32, rounded once. o1, o2 [nh, n, hd] with any head and row strides (cuDNN lays its output
// out as q), lse [nh, n] fp32, out [n, nh, hd] contiguous; the binding also takes cuDNN's outputs as
// torch returns them, with their unit dims, so the caller spends no host time reshaping them.
// One thread per 16-byte vector of out.

struct MergeParams {
  const __nv_bfloat16* o[2];       // [nh, n, hd]
  const float* lse[2];             // [nh, n], natural log
  __nv_bfloat16* out;              // [n, nh, hd]
  long long o_head[2], o_row[2];   // strides in elements
  long long lse_head[2], lse_row[2];
  int n, nh, nvec;                 // nvec = hd / 8
};

__global__ void attention_merge_kernel(const MergeParams p) {
  pdl_wait();
  pdl_launch_dependents();
  const size_t j = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= static_cast<size_t>(p.n) * p.nh * p.nvec) return;
  const int i = static_cast<int>(j % p.nvec), h = static_cast<int>(j / p.nvec % p.nh);
  const long long t = static_cast<long long>(j / p.nvec / p.nh);
  float l[2], f[2][8];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    l[s] = p.lse[s][h * p.lse_head[s] + t * p.lse_row[s]];
    unpack8(reinterpret_cast<const uint4*>(p.o[s] + h * p.o_head[s] + t * p.o_row[s])[i], f[s]);
  }
  const float m = fmaxf(l[0], l[1]);   // every row sees keys in both calls; -inf in both gives 0
  const float w0 = m == -INFINITY ? 0.f : expf(l[0] - m), w1 = m == -INFINITY ? 0.f : expf(l[1] - m);
  const float inv = w0 + w1 > 0.f ? 1.f / (w0 + w1) : 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) f[0][k] = (w0 * f[0][k] + w1 * f[1][k]) * inv;
  reinterpret_cast<uint4*>(p.out)[j] = pack8(f[0]);
}

cudaError_t launch_attention_merge(const MergeParams& p, cudaStream_t stream) {
  if (p.n < 1 || p.nh < 1 || p.nvec < 1) return cudaErrorInvalidValue;
  const size_t n = static_cast<size_t>(p.n) * p.nh * p.nvec;
  return launch_pdl(attention_merge_kernel, dim3(static_cast<unsigned>((n + 255) / 256)), dim3(256), 0, stream, p);
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
// sequence whose slices round up to whole tiles (O = 0, lse = -inf), weigh 0. A kernel of its own,
// because merging in the last CTA of each sequence needs a counter and a fence on every CTA's path,
// which cost more than this launch. S: the slots a thread holds, at least the grid's p.slices, so
// that a short context's merge keeps 4 slices in registers, not 16.
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
// kernel is a stream over W and only has to keep enough bytes in flight, in one pass (cuBLAS splits
// the narrow layers' K and adds a reduce kernel; bench.py gemm compares them).
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
// Three CTAs an SM (__launch_bounds__ below: at most 40 registers), so that qkv's 384 CTAs (8B shape)
// run in one wave; left to itself ptxas gives the RoPE epilogue more registers and two CTAs an SM.
// At 40 no variant spills.
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
// spread evenly (fastpath.MLP launches down so).
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
// runs on a few SMs, and by chunks (engine.argmax) it takes five kernels.

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
// Torch bindings: check (see common.cuh), then launch.
#ifndef TW_NO_TORCH
#include <ATen/ops/empty.h>

#include <map>
#include <optional>
#include <string>

namespace {

using tw::check_tensor;

// The RoPE table, the tokens' positions and cache rows, and the caches; sets nkv and hd.
std::string check_rope_operands(const char* op, const at::Device& dev, int64_t T, const at::Tensor& rope,
                                const at::Tensor& positions, const at::Tensor& kv_rows, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, int hd_multiple, int64_t& nkv, int64_t& hd) {
  const std::string fail = std::string(op) + ": ";
  TW_TRY(check_tensor(op, "rope", rope, at::kBFloat16, dev, true, false));
  TW_TRY(check_tensor(op, "positions", positions, at::kInt, dev, true, false));
  TW_TRY(check_tensor(op, "kv_rows", kv_rows, at::kInt, dev, true, false));
  TW_TRY(check_tensor(op, "k_cache", k_cache, at::kBFloat16, dev));
  TW_TRY(check_tensor(op, "v_cache", v_cache, at::kBFloat16, dev));
  if (k_cache.dim() != 3 || v_cache.sizes() != k_cache.sizes() || k_cache.size(2) < hd_multiple ||
      k_cache.size(2) % hd_multiple)
    return fail + "k_cache and v_cache must be [rows, nkv, hd] alike with hd % " + std::to_string(hd_multiple) +
           " == 0, got " + tw::shape(k_cache) + " and " + tw::shape(v_cache);
  nkv = k_cache.size(1);
  hd = k_cache.size(2);
  if (positions.dim() != 1 || positions.size(0) != T || kv_rows.dim() != 1 || kv_rows.size(0) != T ||
      rope.dim() != 3 || rope.size(1) != 2 || rope.size(2) != hd)
    return fail + "positions and kv_rows must be [" + std::to_string(T) + "], rope [max_len, 2, " +
           std::to_string(hd) + "]; got " + tw::shape(positions) + ", " + tw::shape(kv_rows) + ", " + tw::shape(rope);
  return "";
}

std::string rope_kv_cache(at::Tensor qkv, at::Tensor rope, at::Tensor positions, at::Tensor kv_rows,
                          at::Tensor k_cache, at::Tensor v_cache) {
  const char* op = "rope_kv_cache";
  TW_TRY(check_tensor(op, "qkv", qkv, at::kBFloat16, qkv.device()));
  if (qkv.dim() != 2) return std::string(op) + ": qkv must be [T, (nh + 2 nkv) hd], got " + tw::shape(qkv);
  int64_t nkv = 0, hd = 0;
  TW_TRY(check_rope_operands(op, qkv.device(), qkv.size(0), rope, positions, kv_rows, k_cache, v_cache, 8, nkv, hd));
  if (qkv.size(1) % hd || qkv.size(1) / hd <= 2 * nkv)
    return std::string(op) + ": qkv must be [T, (nh + 2 * " + std::to_string(nkv) + ") * " + std::to_string(hd) +
           "], got " + tw::shape(qkv);
  if (qkv.size(0) == 0) return "";
  tw::RopeParams p{};
  p.qkv = static_cast<__nv_bfloat16*>(qkv.data_ptr());
  p.rope = static_cast<const __nv_bfloat16*>(rope.data_ptr());
  p.positions = static_cast<const int*>(positions.data_ptr());
  p.kv_rows = static_cast<const int*>(kv_rows.data_ptr());
  p.k_cache = static_cast<__nv_bfloat16*>(k_cache.data_ptr());
  p.v_cache = static_cast<__nv_bfloat16*>(v_cache.data_ptr());
  p.tokens = static_cast<int>(qkv.size(0));
  p.nkv = static_cast<int>(nkv);
  p.hd = static_cast<int>(hd);
  p.nh = static_cast<int>(qkv.size(1) / hd - 2 * nkv);
  const c10::cuda::CUDAGuard guard(qkv.device());
  return tw::cuda_error(op, tw::launch_rope_kv_cache(p, c10::cuda::getCurrentCUDAStream()));
}

// Every kv_lens[b] must be in [1, max_k]: the grid is sized by max_k. That is the caller's promise
// (batch.py's max_k bounds every span's keys); checking it here would read the GPU.
std::string decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor kv_starts,
                             at::Tensor kv_lens, at::Tensor out, at::Tensor part_o, at::Tensor part_lse,
                             int64_t max_k, double scale) {
  const char* op = "decode_attention";
  const std::string fail = std::string(op) + ": ";
  const at::Device dev = q.device();
  if (q.scalar_type() != at::kBFloat16 || !q.is_cuda() || q.dim() != 3 || q.stride(2) != 1 ||
      q.stride(1) != q.size(2) || q.stride(0) % 2)
    return fail + "q must be a bfloat16 CUDA tensor [B, nh, hd] with contiguous heads (rows may be strided), got " +
           tw::dtype_name(q.scalar_type()) + " " + tw::shape(q);
  TW_TRY(check_tensor(op, "k_cache", k_cache, at::kBFloat16, dev));
  TW_TRY(check_tensor(op, "v_cache", v_cache, at::kBFloat16, dev));
  TW_TRY(check_tensor(op, "kv_starts", kv_starts, at::kInt, dev, true, false));
  TW_TRY(check_tensor(op, "kv_lens", kv_lens, at::kInt, dev, true, false));
  TW_TRY(check_tensor(op, "out", out, at::kBFloat16, dev));
  TW_TRY(check_tensor(op, "part_o", part_o, at::kFloat, dev));
  TW_TRY(check_tensor(op, "part_lse", part_lse, at::kFloat, dev, true, false));
  const int64_t B = q.size(0), nh = q.size(1), hd = tw::attn::HD;
  if (k_cache.dim() != 3 || v_cache.sizes() != k_cache.sizes() || k_cache.size(2) != hd || q.size(2) != hd)
    return fail + "q [B, nh, " + std::to_string(hd) + "] and k_cache, v_cache [rows, nkv, " + std::to_string(hd) +
           "] alike; got " + tw::shape(q) + ", " + tw::shape(k_cache) + ", " + tw::shape(v_cache);
  const int64_t nkv = k_cache.size(1);
  if (nkv < 1 || nh % nkv || nh / nkv > tw::attn::MAX_G)
    return fail + "needs nh a multiple of nkv with at most " + std::to_string(tw::attn::MAX_G) +
           " query heads per kv head, got nh " + std::to_string(nh) + ", nkv " + std::to_string(nkv);
  if (kv_starts.dim() != 1 || kv_starts.size(0) != B || kv_lens.dim() != 1 || kv_lens.size(0) != B ||
      out.sizes() != q.sizes())
    return fail + "kv_starts and kv_lens must be [" + std::to_string(B) + "] and out " + tw::shape(q) + "; got " +
           tw::shape(kv_starts) + ", " + tw::shape(kv_lens) + ", " + tw::shape(out);
  const int64_t slices = max_k >= 1 ? tw::slices_for(static_cast<int>(std::min<int64_t>(max_k, 1 << 30))) : 0;
  const bool parts_ok = slices == 1 || (part_o.dim() == 4 && part_o.size(0) == slices && part_o.size(1) == B &&
                                        part_o.size(2) == nh && part_o.size(3) == hd && part_lse.dim() == 3 &&
                                        part_lse.size(0) == slices && part_lse.size(1) == B && part_lse.size(2) == nh);
  if (slices < 1 || !parts_ok)
    return fail + "max_k must be at least 1 and, with " + std::to_string(max_k) + ", part_o [" +
           std::to_string(slices) + ", " + std::to_string(B) + ", " + std::to_string(nh) + ", " + std::to_string(hd) +
           "] and part_lse [" + std::to_string(slices) + ", " + std::to_string(B) + ", " + std::to_string(nh) +
           "]; got " + tw::shape(part_o) + " and " + tw::shape(part_lse);
  if (B == 0) return "";
  tw::DecodeParams p{};
  p.q = static_cast<const __nv_bfloat16*>(q.data_ptr());
  p.k_cache = static_cast<const __nv_bfloat16*>(k_cache.data_ptr());
  p.v_cache = static_cast<const __nv_bfloat16*>(v_cache.data_ptr());
  p.kv_starts = static_cast<const int*>(kv_starts.data_ptr());
  p.kv_lens = static_cast<const int*>(kv_lens.data_ptr());
  p.out = static_cast<__nv_bfloat16*>(out.data_ptr());
  p.part_o = static_cast<float*>(part_o.data_ptr());
  p.part_lse = static_cast<float*>(part_lse.data_ptr());
  p.batch = static_cast<int>(B);
  p.nh = static_cast<int>(nh);
  p.nkv = static_cast<int>(nkv);
  p.q_stride = static_cast<int>(q.stride(0));
  p.slices = static_cast<int>(slices);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const c10::cuda::CUDAGuard guard(dev);
  return tw::cuda_error(op, tw::launch_decode_attention(p, c10::cuda::getCurrentCUDAStream()));
}

std::string silu_mul(at::Tensor gate_up, at::Tensor out) {
  const char* op = "silu_mul";
  if (gate_up.dim() != 2 || out.dim() != 2 || gate_up.size(0) != out.size(0) || gate_up.size(1) != 2 * out.size(1) ||
      out.size(1) % 8)
    return std::string(op) + ": gate_up must be [T, 2 I] for out [T, I] with I % 8 == 0; got " + tw::shape(gate_up) +
           " and " + tw::shape(out);
  TW_TRY(check_tensor(op, "gate_up", gate_up, at::kBFloat16, gate_up.device()));
  TW_TRY(check_tensor(op, "out", out, at::kBFloat16, gate_up.device()));
  if (out.numel() == 0) return "";
  const c10::cuda::CUDAGuard guard(gate_up.device());
  return tw::cuda_error(op, tw::launch_silu_mul(static_cast<const uint4*>(gate_up.data_ptr()),
                                                static_cast<uint4*>(out.data_ptr()), static_cast<int>(out.size(0)),
                                                static_cast<int>(out.size(1) / 8), c10::cuda::getCurrentCUDAStream()));
}

std::string attention_merge(at::Tensor o1, at::Tensor lse1, at::Tensor o2, at::Tensor lse2, at::Tensor out) {
  const char* op = "attention_merge";
  if (out.dim() != 3 || out.size(2) % 8)
    return std::string(op) + ": out must be [n, nh, hd] with hd % 8 == 0; got " + tw::shape(out);
  TW_TRY(check_tensor(op, "out", out, at::kBFloat16, out.device()));
  const int64_t n = out.size(0), nh = out.size(1), hd = out.size(2);
  tw::MergeParams p{};
  const at::Tensor* os[2] = {&o1, &o2};
  const at::Tensor* ls[2] = {&lse1, &lse2};
  for (int s = 0; s < 2; ++s) {
    at::Tensor o = *os[s], l = *ls[s];   // or cuDNN's as torch returns them: o [1, nh, n, hd], lse [1, nh, n(, 1)]
    if (o.dim() == 4) o = o.squeeze(0);
    if (l.dim() == 4) l = l.squeeze(3);
    if (l.dim() == 3) l = l.squeeze(0);
    const char* o_name = s ? "o2" : "o1";
    if (o.dim() != 3 || o.size(0) != nh || o.size(1) != n || o.size(2) != hd || l.dim() != 2 || l.size(0) != nh ||
        l.size(1) != n)
      return std::string(op) + ": " + o_name + " must be [(1,) nh, n, hd] and its lse [(1,) nh, n(, 1)] for out " +
             "[n, nh, hd] " + tw::shape(out) + "; got " + tw::shape(*os[s]) + " and " + tw::shape(*ls[s]);
    TW_TRY(check_tensor(op, o_name, o, at::kBFloat16, out.device(), false));
    if (o.stride(0) % 8)
      return std::string(op) + ": " + o_name + "'s heads must be a multiple of 16 bytes apart";
    if (!l.is_cuda() || l.device() != out.device() || l.scalar_type() != at::kFloat)   // any strides
      return std::string(op) + ": " + (s ? "lse2" : "lse1") + " must be a float32 CUDA tensor on " + out.device().str();
    p.o[s] = static_cast<const __nv_bfloat16*>(o.data_ptr());
    p.lse[s] = static_cast<const float*>(l.data_ptr());
    p.o_head[s] = o.stride(0);
    p.o_row[s] = o.stride(1);
    p.lse_head[s] = l.stride(0);
    p.lse_row[s] = l.stride(1);
  }
  if (out.numel() == 0) return "";
  p.out = static_cast<__nv_bfloat16*>(out.data_ptr());
  p.n = static_cast<int>(n);
  p.nh = static_cast<int>(nh);
  p.nvec = static_cast<int>(hd / 8);
  const c10::cuda::CUDAGuard guard(out.device());
  return tw::cuda_error(op, tw::launch_attention_merge(p, c10::cuda::getCurrentCUDAStream()));
}

// x [M, K], a contiguous w [N, K], bias [N] or none, a 2-D out (rows of x and out may be strided).
std::string check_gemv_operands(const char* op, const at::Tensor& x, const at::Tensor& w,
                                const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  const std::string fail = std::string(op) + ": ";
  TW_TRY(check_tensor(op, "x", x, at::kBFloat16, x.device(), false));
  TW_TRY(check_tensor(op, "w", w, at::kBFloat16, x.device()));
  if (bias) TW_TRY(check_tensor(op, "bias", *bias, at::kBFloat16, x.device()));
  TW_TRY(check_tensor(op, "out", out, at::kBFloat16, x.device(), false));
  if (x.dim() != 2 || w.dim() != 2 || out.dim() != 2 || x.size(1) != w.size(1) || w.size(1) % 8 ||
      x.size(0) < 1 || x.size(0) > tw::gemv::MAX_M)
    return fail + "x [M, K], w [N, K] and a 2-D out with K % 8 == 0 and 1 <= M <= " +
           std::to_string(tw::gemv::MAX_M) + "; got " + tw::shape(x) + ", " + tw::shape(w) + ", " + tw::shape(out);
  if (bias && (bias->dim() != 1 || bias->size(0) != w.size(0)))
    return fail + "bias must be [" + std::to_string(w.size(0)) + "], got " + tw::shape(*bias);
  return "";
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
  const char* op = "gemv";
  TW_TRY(check_gemv_operands(op, x, w, bias, out));
  const int64_t M = x.size(0), N = w.size(0);
  if (swiglu && (N % 2 || bias))
    return std::string(op) + ": with swiglu, w is [gate; up] (an even number of rows, got " + std::to_string(N) +
           ") and has no bias";
  if (out.size(0) != M || out.size(1) != (swiglu ? N / 2 : N))
    return std::string(op) + ": out must be [" + std::to_string(M) + ", " + std::to_string(swiglu ? N / 2 : N) +
           "]; got " + tw::shape(out);
  const c10::cuda::CUDAGuard guard(x.device());
  return tw::cuda_error(op, tw::launch_gemv(gemv_params(x, w, bias, out), swiglu ? tw::gemv::SWIGLU : tw::gemv::STORE,
                                            pdl, c10::cuda::getCurrentCUDAStream()));
}

std::string gemv_rope(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias, at::Tensor q, at::Tensor rope,
                      at::Tensor positions, at::Tensor kv_rows, at::Tensor k_cache, at::Tensor v_cache) {
  const char* op = "gemv_rope";
  TW_TRY(check_gemv_operands(op, x, w, bias, q));
  int64_t nkv = 0, hd = 0;
  TW_TRY(check_rope_operands(op, x.device(), x.size(0), rope, positions, kv_rows, k_cache, v_cache, 16, nkv, hd));
  const int64_t nh = q.size(1) / hd;
  if (q.size(0) != x.size(0) || q.size(1) % hd || nh < 1 || w.size(0) != (nh + 2 * nkv) * hd)
    return std::string(op) + ": q must be [" + std::to_string(x.size(0)) + ", nh * " + std::to_string(hd) +
           "] for w [(nh + 2 * " + std::to_string(nkv) + ") * " + std::to_string(hd) + ", K]; got " + tw::shape(q) +
           " and " + tw::shape(w);
  tw::GemvParams p = gemv_params(x, w, bias, q);
  p.rope = static_cast<const __nv_bfloat16*>(rope.data_ptr());
  p.positions = static_cast<const int*>(positions.data_ptr());
  p.kv_rows = static_cast<const int*>(kv_rows.data_ptr());
  p.k_cache = static_cast<__nv_bfloat16*>(k_cache.data_ptr());
  p.v_cache = static_cast<__nv_bfloat16*>(v_cache.data_ptr());
  p.nkv = static_cast<int>(nkv);
  p.hd = static_cast<int>(hd);
  p.nh = static_cast<int>(nh);
  const c10::cuda::CUDAGuard guard(x.device());
  return tw::cuda_error(op, tw::launch_gemv(p, tw::gemv::ROPE, true, c10::cuda::getCurrentCUDAStream()));
}

std::string argmax(at::Tensor logits, at::Tensor out) {
  const char* op = "argmax";
  TW_TRY(check_tensor(op, "logits", logits, at::kBFloat16, logits.device(), false));
  if (logits.dim() != 2 || logits.size(1) % 8 || logits.size(1) < 1 || logits.size(1) >= (int64_t{1} << 31))
    return std::string(op) + ": logits must be [B, V] with V % 8 == 0, got " + tw::shape(logits);
  TW_TRY(check_tensor(op, "out", out, at::kLong, logits.device(), true, false));
  if (out.dim() != 1 || out.size(0) != logits.size(0))
    return std::string(op) + ": out must be [" + std::to_string(logits.size(0)) + "], got " + tw::shape(out);
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
  return tw::cuda_error(op, tw::launch_argmax(p, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The one-GPU fast path's kernels: RoPE + cache write, SwiGLU, attention merge, decode attention, gemv, "
            "argmax (sm_90a)";
  m.def("rope_kv_cache", &rope_kv_cache,
        "In place: RoPE on the q heads of qkv [T, (nh + 2 nkv) hd]; k rotated into "
        "k_cache[kv_rows[t]] and v copied into v_cache[kv_rows[t]] ([rows, nkv, hd]); rope "
        "[max_len, 2, hd] holds cos and sin by position; positions and kv_rows int32 [T]",
        py::arg("qkv"), py::arg("rope"), py::arg("positions"), py::arg("kv_rows"), py::arg("k_cache"),
        py::arg("v_cache"));
  m.def("decode_attention", &decode_attention,
        "out [B, nh, hd] <- attention of q [B, nh, hd] (rows may be strided) over keys "
        "kv_starts[b] .. kv_starts[b] + kv_lens[b] - 1 of k_cache and v_cache [rows, nkv, hd]; "
        "kv_starts, kv_lens int32 [B], every kv_lens[b] in [1, max_k] (not checked); part_o fp32 "
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
  m.def("attention_merge", &attention_merge,
        "out [n, nh, hd] (contiguous) <- the merge of two attention outputs o1, o2 [(1,) nh, n, hd] (last dim "
        "contiguous, 16-byte aligned) by their log-sum-exp lse1, lse2 [(1,) nh, n(, 1)] (fp32, natural log): "
        "(e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2) in fp32; hd % 8 == 0",
        py::arg("o1"), py::arg("lse1"), py::arg("o2"), py::arg("lse2"), py::arg("out"));
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
  m.def("limits", [] {
    return std::map<std::string, int>{{"decode_head_dim", tw::attn::HD}, {"decode_max_group", tw::attn::MAX_G},
                                      {"gemv_max_m", tw::gemv::MAX_M}};
  }, "The kernels' limits, which fastpath.py's eligibility rules read");
}
#endif  // TW_NO_TORCH
