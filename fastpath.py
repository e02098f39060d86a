"""The one-GPU fast path: kernels the model runs instead of its plain torch ops where they are faster.
None of it is TokenWeave (weave.py, comm.py and multimem_ops.cu are); it is what makes a decode step
and a served workload fast on one Hopper GPU. The engine switches it on with enable(model); llama.py
stays the plain reference model, and the tokens are the same either way (test_fastpath.py).

    path              runs                                 instead of                   where
    gemv              decode_ops.cu's gemv (gate/up with   cuBLAS                       steps of at most 8 tokens
                      SwiGLU, qkv with RoPE + the cache
                      write in its epilogue)
    cublaslt          cuBLASLt (addmm with a zero bias)    cuBLAS's split-K + reduce    row-parallel GEMMs of 32-96 tokens
    decode_attention  decode_ops.cu's decode attention     FlashAttention               head dim 128, <= 8 query heads a KV head
    cudnn             cuDNN attention (after a prefix,     FlashAttention               one span in a step, of >= 512 tokens
                      two calls and decode_ops.cu's merge)
    elementwise       one kernel for RoPE + cache write,   torch's several              any step
                      one for SwiGLU's activation
    argmax            decode_ops.cu's argmax               torch's argmax               greedy sampling

Each fast module is a subclass of the plain one: it overrides one method, and calls the plain
method wherever its path is off or its rule does not hold. enable() turns the model's modules into
their fast subclasses in place (same parameters, same cache); disable() turns them back.
"""
import warnings

import torch
import torch.nn.functional as F

import build_ext
import llama
import mixtral
from batch import Batch

PATHS = ("gemv", "cublaslt", "decode_attention", "cudnn", "elementwise", "argmax")
LT_TOKENS = range(32, 97)     # cublaslt: where cuBLAS picks a split-K pass plus a reduce for o_proj and down
# cudnn: whole steps of one span of 512-2048 tokens ran 1-6% faster with cuDNN's attention than FlashAttention's
# (8B and 70B shapes, H100); cuDNN plans per new shape (ms). After a prefix it takes two calls and a merge kernel,
# ~3x FlashAttention's host time, and still pays on the GPU from 512: in the 8B shape's 1K split (a 512-token half
# after a 512 prefix) the split's extra attention time fell from 1.17 to 0.28 ms a step (results.md)
CUDNN_MIN_TOKENS = 512


def enable(model, paths=PATHS) -> bool:
    """Switches the fast paths named in `paths` on in `model` (again, with other paths, to change
    them). False, and the model stays plain, where the kernels cannot run: no Hopper GPU or nvcc, a
    model that is not bf16."""
    d, dtype = model.d, model.norm.weight.dtype
    ext = build_ext.try_load("decode", d.device, d.rank) if dtype == torch.bfloat16 else None
    if ext is None:
        return False
    disable(model)
    paths = set(paths)
    if "cudnn" in paths and (why := cudnn_works(d.device, dtype)):
        if d.rank == 0:
            warnings.warn(f"cuDNN attention unavailable ({why}); long prompts use FlashAttention", stacklevel=2)
        paths.discard("cudnn")
    modules = [m for m in model.modules() if type(m) in FAST]
    for m in modules:
        m.__class__ = FAST[type(m)]
    for m in reversed(modules):      # children first: a parent may set up its children (MLP, down)
        m.setup(ext, paths)
    return True


def disable(model):
    """The plain model again."""
    for m in model.modules():
        if getattr(type(m), "plain", None):
            m.__class__ = m.plain


def gemv_fits(x, ext) -> bool:
    """gemv's rule: few enough tokens (a decode step, a short prompt), in 16-byte aligned rows."""
    return x.is_cuda and x.shape[0] <= ext.limits["gemv_max_m"] and x.shape[1] % 8 == 0 and \
        x.stride(0) % 8 == 0 and x.stride(1) == 1 and x.data_ptr() % 16 == 0


# ----------------------------------------------------------------------------- the fast modules


class ColumnParallel(llama.ColumnParallel):
    plain = llama.ColumnParallel

    def setup(self, ext, paths):
        self.ext, self.gemv = ext, "gemv" in paths

    def forward(self, x):
        if self.gemv and gemv_fits(x, self.ext):
            out = x.new_empty(x.shape[0], self.weight.shape[0])
            self.ext.gemv(x, self.weight, self.bias, out, False)
            return out
        return super().forward(x)


class RowParallel(llama.RowParallel):
    plain = llama.RowParallel

    def setup(self, ext, paths):
        self.ext, self.gemv, self.lt, self.pdl = ext, "gemv" in paths, "cublaslt" in paths, True
        self.zero = torch.zeros(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)

    def forward(self, x, out):
        if self.gemv and gemv_fits(x, self.ext):
            self.ext.gemv(x, self.weight, None, out, False, self.pdl)
        elif self.lt and x.shape[0] in LT_TOKENS:      # torch sends addmm with a bias to cuBLASLt
            torch.addmm(self.zero, x, self.weight.t(), out=out)
        else:
            super().forward(x, out)


class Attention(llama.Attention):
    plain = llama.Attention

    def setup(self, ext, paths):
        self.ext, self.gemv, self.elementwise = ext, "gemv" in paths, "elementwise" in paths
        self.decode_kernel = "decode_attention" in paths and self.hd == ext.limits["decode_head_dim"] and \
            self.nh // self.nkv <= ext.limits["decode_max_group"]
        self.cudnn = "cudnn" in paths

    def qkv_rope(self, h, batch: Batch):
        T, nh, hd = h.shape[0], self.nh, self.hd
        if self.gemv and hd % 16 == 0 and gemv_fits(h, self.ext):   # RoPE and the cache write in the epilogue
            q = h.new_empty(T, nh, hd)
            self.ext.gemv_rope(h, self.qkv.weight, self.qkv.bias, q.view(T, nh * hd), self.rope, batch.positions,
                               batch.kv_rows, self.k_cache, self.v_cache)
            return q
        if not self.elementwise:
            return super().qkv_rope(h, batch)
        qkv = self.qkv(h)                                                     # (T, (nh + 2 nkv) hd)
        self.ext.rope_kv_cache(qkv, self.rope, batch.positions, batch.kv_rows, self.k_cache, self.v_cache)
        return qkv[:, :nh * hd].view(T, nh, hd)                               # rotated in place

    def attend(self, q, batch: Batch):
        if self.cudnn and len(batch.spans) == 1 and batch.T >= CUDNN_MIN_TOKENS:
            return self.attend_cudnn(q, batch.spans[0])
        return super().attend(q, batch)

    def attend_decode(self, q, batch: Batch, out):
        """decode_ops.cu's decode attention: a sequence's keys in slices merged by their log-sum-exp."""
        if not self.decode_kernel:
            return super().attend_decode(q, batch, out)
        s, slices = q.shape[0], self.ext.decode_slices(batch.max_k)
        shape = (slices, s, self.nh) if slices > 1 else (0, 0, 0)
        part_o = torch.empty(*shape, self.hd, dtype=torch.float, device=q.device)   # (slices, s, nh, hd)
        part_lse = torch.empty(shape, dtype=torch.float, device=q.device)            # (slices, s, nh)
        self.ext.decode_attention(q, self.k_cache, self.v_cache, batch.kv_starts[:s], batch.kv_lens[:s], out, part_o,
                                  part_lse, batch.max_k, self.hd ** -0.5)

    def attend_cudnn(self, q, span):
        """One long span. From a sequence's start, causal attention in one call. After a prefix, two
        calls: cuDNN's causal mask is aligned to the queries' start, not their end, so the chunk
        attends to its own keys causally and to the prefix's keys whole, and the two are merged by
        their log-sum-exp. Both read the cache's KV heads in place (GQA), and q in its layout."""
        r, start, n, k, v = span.row, span.start, span.n, self.k_cache, self.v_cache
        q = heads(q, 0, n)                                                    # (1, nh, n, hd)
        if start == 0:
            o = F.scaled_dot_product_attention(q, heads(k, r, n), heads(v, r, n), is_causal=True, enable_gqa=True)
            return o[0].transpose(0, 1)                                       # (n, nh, hd)
        o1, lse1 = cudnn_attention(q, heads(k, r, start), heads(v, r, start), causal=False)
        o2, lse2 = cudnn_attention(q, heads(k, r + start, n), heads(v, r + start, n), causal=True)
        o = q.new_empty(n, q.shape[1], q.shape[3])                            # (n, nh, hd)
        self.ext.attention_merge(o1, lse1, o2, lse2, o)                       # by their log-sum-exp, in fp32
        return o


def heads(t, row: int, n: int):
    """Rows [row, row + n) of t (rows, heads, hd) as (1, heads, n, hd), the layout cuDNN reads: one
    view op where indexing, transposing and unsqueezing make three (a split step issues ~100
    attention calls, and its host time is what a rank at TP N has to cover)."""
    s_row, s_head, s_dim = t.stride()
    return t.as_strided((1, t.shape[1], n, t.shape[2]), (n * s_row, s_head, s_row, s_dim),
                        t.storage_offset() + row * s_row)


def cudnn_attention(q, k, v, causal: bool):
    """cuDNN's attention output (1, nh, n, hd) and its log-sum-exp in fp32 as torch returns it
    ((1, nh, n) or (1, nh, n, 1)); k and v may have fewer heads than q (GQA)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)
    return out[0], out[1]


def cudnn_works(device: torch.device, dtype) -> str:
    """'' if cuDNN attention runs here, else why not (an older cuDNN or torch)."""
    try:
        q = torch.zeros(1, 2, 8, 64, device=device, dtype=dtype)
        cudnn_attention(q, q[:, :, :4], q[:, :, :4], causal=False)
        return ""
    except RuntimeError as e:
        return str(e).splitlines()[0]


class SiluMul:
    """SwiGLU's activation in one kernel, the bits of torch's two (silu, then the product)."""

    def act(self, gate_up):
        if not self.elementwise or gate_up.shape[1] % 16:
            return super().act(gate_up)
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        self.ext.silu_mul(gate_up, out)
        return out


class MLP(SiluMul, llama.MLP):
    plain = llama.MLP

    def setup(self, ext, paths):
        self.ext, self.gemv, self.elementwise = ext, "gemv" in paths, "elementwise" in paths
        # down's gemv launches plainly: one wave of long CTAs behind gate/up's many waves then spreads
        # evenly over the SMs (decode_ops.cu, launch_gemv).
        self.down.pdl = False

    def forward(self, h, batch: Batch):
        if not (self.gemv and gemv_fits(h, self.ext)):
            return super().forward(h, batch)
        act = h.new_empty(h.shape[0], self.down.n)                            # (T, I/N): SwiGLU in the epilogue
        self.ext.gemv(h, self.gate_up.weight, None, act, True)
        self.down(act, out=h)                                                 # (T, H)


class MoE(SiluMul, mixtral.MoE):
    plain = mixtral.MoE

    def setup(self, ext, paths):
        self.ext, self.elementwise = ext, "elementwise" in paths


FAST = {cls.plain: cls for cls in (ColumnParallel, RowParallel, Attention, MLP, MoE)}


# ----------------------------------------------------------------------------- sampling


def argmax(logits):
    """Greedy sampling's argmax (engine.greedy) through decode_ops.cu's kernel where the logits fit
    it (bf16, V % 8 == 0, 16-byte aligned rows): torch's reduction of a few long rows runs on a few
    SMs, the kernel's CTAs take a chunk of a row each."""
    if logits.dtype != torch.bfloat16 or logits.shape[1] % 8 or logits.stride(1) != 1 or logits.stride(0) % 8 or \
            logits.data_ptr() % 16:
        return logits.argmax(-1)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    build_ext.load("decode").argmax(logits, out)
    return out
