"""GPU tests of the one-GPU fast path: its kernels (decode_ops.cu) against torch's ops, bit for bit
where the kernel promises the same bits (RoPE + cache write, SwiGLU's activation, gemv's epilogues,
argmax) and within rounding elsewhere (decode attention, gemv); and the model with the fast path on
against the plain model (fastpath.py). The mechanics of switching it on and off run on the CPU too.
"""
import pytest
import torch

import build_ext
import comm
import fastpath
import llama
import models
import weave
from batch import Batch, Span
from conftest import hf_family
from group import Dist

OK, WHY = build_ext.available()
needs_kernels = pytest.mark.skipif(not OK, reason=WHY)
BF16 = torch.bfloat16


@needs_kernels
@pytest.mark.parametrize("T,nh,nkv,hd", [(1, 32, 8, 128), (37, 8, 2, 128), (1000, 16, 4, 64), (5, 5, 1, 8)])
def test_rope_kv_cache(T, nh, nkv, hd):
    """The fused RoPE + KV-cache write against the model's torch path, bit for bit: q rotated in
    place, k rotated and v copied into their cache rows, every other row untouched."""
    ops = build_ext.load("decode")
    g = torch.Generator("cuda").manual_seed(T * nh + hd)
    rows, max_len = 4 * T + 3, 3 * T + 1
    qkv = torch.randn(T, (nh + 2 * nkv) * hd, generator=g, device="cuda").to(BF16)
    rope = (2 * torch.rand(max_len, 2, hd, generator=g, device="cuda") - 1).to(BF16)
    positions = torch.randint(0, max_len, (T,), generator=g, device="cuda", dtype=torch.int32)
    kv_rows = torch.randperm(rows, generator=g, device="cuda")[:T].int()
    k_cache, v_cache = (torch.randn(rows, nkv, hd, generator=g, device="cuda").to(BF16) for _ in range(2))
    cos, sin = rope[positions].unsqueeze(2).unbind(1)
    qk = llama.apply_rope(qkv[:, :(nh + nkv) * hd].view(T, nh + nkv, hd), cos, sin)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k[kv_rows] = qk[:, nh:]
    want_v[kv_rows] = qkv[:, (nh + nkv) * hd:].view(T, nkv, hd)
    rest = qkv[:, nh * hd:].clone()
    ops.rope_kv_cache(qkv, rope, positions, kv_rows, k_cache, v_cache)
    assert torch.equal(qkv[:, :nh * hd].view(T, nh, hd), qk[:, :nh]), "q"
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), "cache"
    assert torch.equal(qkv[:, nh * hd:], rest), "k and v in qkv must stay as they were"
    with pytest.raises(RuntimeError, match="positions must be a CUDA tensor of dtype int32"):
        ops.rope_kv_cache(qkv, rope, positions.long(), kv_rows, k_cache, v_cache)


def decode_reference(q, k_cache, v_cache, starts, lens):
    """(B, nh, hd) fp32: each query against its own range of the cache, GQA, in fp32."""
    B, nh, hd = q.shape
    G = nh // k_cache.shape[1]
    out = torch.empty(B, nh, hd, device=q.device)
    for b, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
        K, V = (c[s:s + n].float().repeat_interleave(G, dim=1) for c in (k_cache, v_cache))  # (n, nh, hd)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), K) * hd ** -0.5, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, V)
    return out


# (nh, nkv): Llama-3.1-8B at TP 1, 2, 4 (the shards), 70B and Qwen2.5-72B at TP 8, Mixtral's 6 heads
# a group, one head a group, odd counts.
@needs_kernels
@pytest.mark.parametrize("nh,nkv", [(32, 8), (16, 4), (8, 2), (8, 1), (6, 1), (7, 7), (15, 5)])
def test_decode_attention(nh, nkv):
    """The split-KV decode kernel against fp32 attention: lengths from 1 key to past 16 slices,
    ranges anywhere in the cache and in any order, q a strided view of qkv, with max_k from the
    longest length to far beyond it (more slices in the grid than a sequence has). Within bf16
    rounding, and no worse than FlashAttention-2's variable-length kernel on the same inputs.
    A sequence's output is bitwise the same whatever max_k and the rest of the batch are."""
    ops = build_ext.load("decode")
    hd = 128
    g = torch.Generator("cuda").manual_seed(nh * 10 + nkv)
    lens = [1, 2, 63, 64, 65, 255, 256, 257, 1000, 4097, 333]
    order = torch.randperm(len(lens), generator=g, device="cuda").tolist()
    starts, row = [0] * len(lens), 5
    for i in order:                      # ranges in a shuffled order with gaps between them
        starts[i], row = row, row + lens[i] + 3
    k_cache, v_cache = (torch.randn(row + 7, nkv, hd, generator=g, device="cuda").bfloat16() for _ in range(2))
    B = len(lens)
    qkv = torch.randn(B, (nh + 2 * nkv) * hd, generator=g, device="cuda").bfloat16()
    q = qkv[:, :nh * hd].view(B, nh, hd)
    starts_t, lens_t = (torch.tensor(x, dtype=torch.int32, device="cuda") for x in (starts, lens))
    want = decode_reference(q, k_cache, v_cache, starts_t, lens_t)
    cu_k = torch.tensor(starts + [row], dtype=torch.int32, device="cuda")
    flash = torch.ops.aten._flash_attention_forward(
        q, k_cache, v_cache, torch.arange(B + 1, dtype=torch.int32, device="cuda"), cu_k, 1, max(lens), 0.0, True,
        False, seqused_k=lens_t)[0].float()

    def run(q, starts_t, lens_t, max_k):
        slices = ops.decode_slices(max_k)
        out = torch.full(q.shape, float("nan"), device="cuda").bfloat16()
        part_o = torch.full((slices, q.shape[0], nh, hd) if slices > 1 else (0, 0, 0, hd), float("nan"), device="cuda")
        part_lse = torch.full(part_o.shape[:3], float("nan"), device="cuda")
        ops.decode_attention(q, k_cache, v_cache, starts_t, lens_t, out, part_o, part_lse, max_k, hd ** -0.5)
        return out

    runs = {max_k: run(q, starts_t, lens_t, max_k) for max_k in (max(lens), 8192, 131072)}
    for max_k, out in runs.items():
        for b in range(B):
            err = ((out[b].float() - want[b]).norm() / want[b].norm()).item()
            flash_err = ((flash[b] - want[b]).norm() / want[b].norm()).item()
            assert err < 1e-2 and err <= 1.5 * flash_err + 1e-3, (max_k, lens[b], err, flash_err)
        assert torch.equal(out, runs[max(lens)]), f"max_k {max_k} changed the bits"
    for b in (3, 9):   # alone, the grid fits the SMs and the kernel keeps 4 tiles in flight, not 2
        alone = run(q[b:b + 1], starts_t[b:b + 1], lens_t[b:b + 1], lens[b])
        assert torch.equal(alone, runs[max(lens)][b:b + 1]), f"sequence {b} alone differs from the same in a batch"
    for cap in (300, 1000, 2000):      # a grid of 2, 4, 8 slices: the merge holds fewer slots
        sel = [b for b in range(B) if lens[b] <= cap]
        part = run(q[sel], starts_t[sel], lens_t[sel], cap)
        assert torch.equal(part, runs[max(lens)][sel]), f"max_k {cap} changed the bits"
    if (nh, nkv) != (8, 1):
        return
    wide = torch.zeros(1, 9 * nkv, hd, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match="at most 8 query heads"):
        ops.decode_attention(wide, k_cache, v_cache, starts_t[:1], lens_t[:1], wide.clone(), wide.float(), wide.float(),
                             8, 1.0)


# A prompt from its start; a chunk after a prefix (the weave's second half), odd lengths, a prefix
# four times the chunk and one a twentieth of it; GQA groups of 4 and 1.
@needs_kernels
@pytest.mark.parametrize("start,n,nh,nkv", [(0, 2111, 8, 2), (3001, 2111, 8, 2), (517, 129, 4, 4), (64, 1000, 32, 8),
                                            (8192, 2048, 8, 2), (100, 2000, 8, 2)])
def test_cudnn_attention(start, n, nh, nkv):
    """The cudnn path against the reference in fp32, within twice the plain FlashAttention path's
    error, q a view into the qkv projection's output as the model passes it. After a prefix it
    merges two calls: the merge is the exact one of those calls' outputs within the rounding of the
    result to bf16."""
    g = torch.Generator("cuda").manual_seed(n)
    cache = [torch.randn(start + n + 50, nkv, 128, generator=g, device="cuda", dtype=BF16) for _ in "kv"]
    qkv = torch.randn(n, (nh + 2 * nkv) * 128, generator=g, device="cuda", dtype=BF16)
    q = qkv[:, :nh * 128].view(n, nh, 128)                                        # (n, nh, hd), rows strided
    span, row = Span(50, start, n), 50
    attn = type("A", (), {"k_cache": cache[0], "v_cache": cache[1], "ext": build_ext.load("decode")})()
    fast = fastpath.Attention.attend_cudnn(attn, q, span)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32, device="cuda")   # noqa: E731
    flash = llama.Attention.flash(attn, q, i32(0, n), i32(row, 0), i32(start + n), n, start + n)
    ref = llama.attend_reference(q.float(), *(c.float() for c in cache), type("B", (), {"spans": [span]})())
    err = lambda x: ((x.float() - ref).norm() / ref.norm()).item()   # noqa: E731
    assert fast.shape == q.shape and err(fast) <= 2 * err(flash) + 1e-4, (err(fast), err(flash))
    if start:
        k, v = (c[row:row + start + n].transpose(0, 1)[None] for c in cache)        # (1, nkv, start + n, hd)
        q4 = q.transpose(0, 1)[None]                                                 # (1, nh, n, hd)
        o1, lse1 = fastpath.cudnn_attention(q4, k[:, :, :start], v[:, :, :start], causal=False)
        o2, lse2 = fastpath.cudnn_attention(q4, k[:, :, start:], v[:, :, start:], causal=True)
        o1, o2 = o1.double(), o2.double()
        w1 = torch.sigmoid(lse1 - lse2).double().reshape(*o1.shape[:-1], 1)                  # o1's share
        exact = (o2 + w1 * (o1 - o2))[0].transpose(0, 1)                                     # (n, nh, hd)
        bound = 2 ** -8 * exact.abs() + 1e-5 * (o1 - o2).abs()[0].transpose(0, 1) + 1e-6
        assert ((fast.double() - exact).abs() <= bound).all()


def test_heads_is_the_view_cudnn_reads():
    """fastpath.heads: rows [row, row + n) of a (rows, heads, hd) tensor as (1, heads, n, hd), a view
    of the same storage with the values of index, transpose and unsqueeze and their strides (but the
    unit dim's), for a cache, for q strided inside the qkv projection's output and for k there (a
    storage offset of its own)."""
    cache = torch.randn(40, 2, 16)
    qkv = torch.randn(9, (4 + 2 * 2) * 16)
    q, k = qkv[:, :4 * 16].view(9, 4, 16), qkv[:, 4 * 16:6 * 16].view(9, 2, 16)   # rows strided
    for t, row, n in ((cache, 0, 40), (cache, 7, 20), (cache, 39, 1), (q, 0, 9), (q, 3, 5), (k, 2, 6)):
        want = t[row:row + n].transpose(0, 1)[None]
        got = fastpath.heads(t, row, n)
        assert got.shape == want.shape and got.stride()[1:] == want.stride()[1:] and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


@needs_kernels
def test_attention_merge():
    """The merge kernel against (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2) in fp64, rounded once: odd
    sizes, o1 strided as cuDNN lays it out and o2 contiguous, lse1 transposed, rows where one part
    has no weight (-inf) or neither has (zeros), and the same with the unit dims cuDNN's outputs
    carry; shapes that do not match and heads not 16 bytes apart are refused."""
    ops = build_ext.load("decode")
    n, nh, hd = 37, 3, 136
    g = torch.Generator("cuda").manual_seed(0)
    o1 = torch.randn(n, nh, hd, generator=g, device="cuda", dtype=BF16).transpose(0, 1)   # (nh, n, hd), strided
    o2 = torch.randn(nh, n, hd, generator=g, device="cuda", dtype=BF16)                    # (nh, n, hd), contiguous
    lse1 = 4 * torch.randn(n, nh, generator=g, device="cuda").t()                          # (nh, n), strided
    lse2 = 4 * torch.randn(nh, n, generator=g, device="cuda")
    lse1[0, :5], lse2[1, 5:9] = -float("inf"), -float("inf")
    lse1[2, 9], lse2[2, 9] = -float("inf"), -float("inf")
    out = torch.empty(n, nh, hd, device="cuda", dtype=BF16)
    ops.attention_merge(o1, lse1, o2, lse2, out)
    w = torch.sigmoid((lse1 - lse2).double()).nan_to_num(0.0)[..., None]              # o1's share (0 where neither)
    exact = (w * o1.double() + (1 - w) * o2.double()).transpose(0, 1)              # (n, nh, hd)
    exact[9, 2] = 0
    bound = 2 ** -8 * exact.abs() + 1e-6 * (o1.double().abs() + o2.double().abs()).transpose(0, 1) + 1e-6
    assert ((out.double() - exact).abs() <= bound).all()
    assert torch.equal(out.transpose(0, 1)[0, :5], o2[0, :5]) and torch.equal(out.transpose(0, 1)[1, 5:9], o1[1, 5:9])
    cudnn_like = torch.empty_like(out)
    ops.attention_merge(o1[None], lse1[None, ..., None], o2[None], lse2[None], cudnn_like)   # unit dims as cuDNN's
    assert torch.equal(cudnn_like, out)
    with pytest.raises(RuntimeError, match=r"o2 must be \[\(1,\) nh, n, hd\]"):
        ops.attention_merge(o1, lse1, o2[:, :8], lse2[:, :8], out)
    odd = torch.randn(nh, n * hd + 4, device="cuda", dtype=BF16)[:, :n * hd].view(nh, n, hd)   # heads 8 bytes off
    with pytest.raises(RuntimeError, match="heads must be a multiple of 16 bytes apart"):
        ops.attention_merge(o1, lse1, odd, lse2, out)


@needs_kernels
@pytest.mark.parametrize("T,I", [(1, 14336), (7, 3584), (128, 1792), (1000, 8)])
def test_silu_mul(T, I):
    """SwiGLU's activation kernel against torch's F.silu(gate) * up in bf16, bit for bit."""
    ops = build_ext.load("decode")
    g = torch.Generator("cuda").manual_seed(T + I)
    gate_up = (3 * torch.randn(T, 2 * I, generator=g, device="cuda")).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.empty(T, I, dtype=BF16, device="cuda")
    ops.silu_mul(gate_up, out)
    assert torch.equal(out, torch.nn.functional.silu(gate) * up)
    with pytest.raises(RuntimeError, match="I % 8 == 0"):
        ops.silu_mul(gate_up[:, :12].contiguous(), out[:, :6].contiguous())


# (N, K): the 8B shape's qkv, o_proj, gate/up and down at TP 1, their TP 4 shards, and odd sizes (N
# not a multiple of the CTA's 16 rows, K not of the 64-column chunk nor of 32).
@needs_kernels
@pytest.mark.parametrize("N,K", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (1536, 4096),
                                 (4096, 1024), (4096, 3584), (40, 8), (24, 200), (1000, 1032)])
def test_gemv(N, K):
    """The decode GEMM against fp32: within bf16 rounding and no worse than cuBLAS, at every token
    count it takes (x a strided view), with and without a bias. A token's row is bitwise the same at
    any M, and the same launched plainly (pdl false). The SwiGLU epilogue is bitwise gemv followed
    by silu_mul."""
    ops = build_ext.load("decode")
    g = torch.Generator("cuda").manual_seed(N + K)
    most = ops.limits["gemv_max_m"]
    w = (torch.randn(N, K, generator=g, device="cuda") / K ** 0.5).bfloat16()
    bias = torch.randn(N, generator=g, device="cuda").bfloat16()
    xs = torch.randn(most, K + 16, generator=g, device="cuda").bfloat16()
    x = xs[:, 8:K + 8]                                 # rows K + 16 apart, 16-byte aligned
    first = {}
    for M in range(1, most + 1):
        for b in (None, bias):
            out = torch.full((M, N), float("nan"), device="cuda").bfloat16()
            ops.gemv(x[:M], w, b, out, False)
            want = x[:M].float() @ w.float().t() + (0 if b is None else b.float())
            cublas = torch.nn.functional.linear(x[:M], w, b).float()
            err = ((out.float() - want).norm() / want.norm()).item()
            cublas_err = ((cublas - want).norm() / want.norm()).item()
            assert err < 8e-3 and err <= 1.2 * cublas_err + 1e-4, (M, b is None, err, cublas_err)
            first.setdefault(b is None, out[:1].clone())
            assert torch.equal(out[:1], first[b is None]), f"token 0's row changed with M = {M}"
            plain_launch = torch.full_like(out, float("nan"))
            ops.gemv(x[:M], w, b, plain_launch, False, False)
            assert torch.equal(plain_launch, out), f"the plain launch differs, M = {M}"
    if N % 16 == 0:                                    # silu_mul's I % 8 == 0
        for M in (1, 5, most):
            act = torch.full((M, N // 2), float("nan"), device="cuda").bfloat16()
            ops.gemv(x[:M], w, None, act, True)
            plain = torch.empty(M, N, dtype=BF16, device="cuda")
            ops.gemv(x[:M], w, None, plain, False)
            want = torch.empty_like(act)
            ops.silu_mul(plain, want)
            assert torch.equal(act, want), f"swiglu epilogue, M = {M}"
    with pytest.raises(RuntimeError, match=f"1 <= M <= {most}"):
        ops.gemv(xs[:, :K].repeat(2, 1).contiguous(), w, None, torch.empty(2 * most, N, dtype=BF16, device="cuda"),
                 False)


# (nh, nkv, hd, K, bias): the 8B shape's qkv at TP 1, 2 and 4, Qwen2.5-72B's at TP 4 (with its bias),
# odd head counts and the smallest head dim.
@pytest.mark.parametrize("nh,nkv,hd,K,bias", [(32, 8, 128, 4096, False), (16, 4, 128, 4096, False),
                                              (8, 2, 128, 4096, False), (16, 2, 128, 8192, True),
                                              (5, 1, 16, 200, True), (3, 3, 32, 40, False)])
@needs_kernels
def test_gemv_rope(nh, nkv, hd, K, bias):
    """qkv's GEMM with RoPE and the cache write in its epilogue: bitwise gemv followed by
    rope_kv_cache (q, both caches, every other cache row untouched), at every token count."""
    ops = build_ext.load("decode")
    g = torch.Generator("cuda").manual_seed(nh * K + hd)
    N, most, rows, max_len = (nh + 2 * nkv) * hd, ops.limits["gemv_max_m"], 40, 100
    w = (torch.randn(N, K, generator=g, device="cuda") / K ** 0.5).bfloat16()
    b = torch.randn(N, generator=g, device="cuda").bfloat16() if bias else None
    x = torch.randn(most, K + 8, generator=g, device="cuda").bfloat16()[:, :K]   # rows K + 8 apart
    rope = (2 * torch.rand(max_len, 2, hd, generator=g, device="cuda") - 1).to(BF16)
    caches = [torch.randn(rows, nkv, hd, generator=g, device="cuda").bfloat16() for _ in range(2)]
    for M in range(1, most + 1):
        positions = torch.randint(0, max_len, (M,), generator=g, device="cuda", dtype=torch.int32)
        kv_rows = torch.randperm(rows, generator=g, device="cuda")[:M].int()
        qkv = torch.empty(M, N, dtype=BF16, device="cuda")
        ops.gemv(x[:M], w, b, qkv, False)
        want_k, want_v = (c.clone() for c in caches)
        ops.rope_kv_cache(qkv, rope, positions, kv_rows, want_k, want_v)
        q = torch.full((M, nh * hd), float("nan"), device="cuda").bfloat16()
        k_cache, v_cache = (c.clone() for c in caches)
        ops.gemv_rope(x[:M], w, b, q, rope, positions, kv_rows, k_cache, v_cache)
        assert torch.equal(q, qkv[:, :nh * hd]), f"q, M = {M}"
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), f"cache, M = {M}"
    if hd == 16:
        with pytest.raises(RuntimeError, match="hd % 16 == 0"):
            narrow = torch.zeros(rows, 2 * nkv, 8, dtype=BF16, device="cuda")
            ops.gemv_rope(x[:1], w, b, q[:1], rope[:, :, :8].contiguous(), positions[:1], kv_rows[:1], narrow, narrow)


@needs_kernels
@pytest.mark.parametrize("B,V", [(1, 128256), (6, 152064), (128, 128256), (6, 8), (7, 8200), (6, 32768)])
def test_argmax(B, V):
    """Greedy sampling's kernel picks what torch's argmax(-1) picks on the GPU: ties to the first
    index (inside one CTA's span and across spans), -0 equal to +0, infinities, a NaN above every
    number; rows may be strided."""
    ops = build_ext.load("decode")
    g = torch.Generator("cuda").manual_seed(B * V)
    x = torch.randn(B, V + 16, generator=g, device="cuda").bfloat16()[:, :V]   # rows V + 16 apart
    x[0, [3, V // 2, V - 1]] = 60.0                                            # ties across spans
    if B > 1:
        special = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), float("-inf")], dtype=BF16, device="cuda")
        x[1] = 1.0                                                             # all ties
        x[2] = -1.0
        x[2, [V // 3, V - 1]] = special[:2]                                    # -0 first: it wins
        x[3, [V - 1, V // 2, V // 2 + 1]] = special[[2, 2, 3]]                 # the first NaN
        x[4] = special[4]
        x[5] = special[4]
        x[5, 0] = special[2]
    out = torch.full((B,), -1, dtype=torch.long, device="cuda")
    ops.argmax(x, out)
    assert torch.equal(out, x.argmax(-1)), (out[:8], x.argmax(-1)[:8])
    assert torch.equal(fastpath.argmax(x), x.argmax(-1))
    with pytest.raises(RuntimeError, match="V % 8 == 0"):
        ops.argmax(x[:, :V - 1], out)


# ----------------------------------------------------------------------------- the model, fast and plain


def tiny_model(dtype):
    cfg = llama.Config(hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate=96, vocab=101,
                       max_positions=64)
    return models.build(llama.Transformer, cfg, Dist(), dtype).init_random_()


def logits_of(model):
    """The model's logits for a mixed step (decode tokens, a chunk after a prefix, a new prompt)."""
    model.allocate_cache(200)
    w = weave.Weaver(model, comm.make_comm("auto", model.d, model.cfg.hidden, 64, model.norm.weight.dtype), "off")
    w(w.batch([Span(0, 0, 9), Span(64, 0, 5)], list(range(3, 17))))
    return w(w.batch([Span(0, 9, 1), Span(64, 5, 4), Span(128, 0, 7)], list(range(20, 32))))


def test_enable_swaps_modules_in_place_and_back(monkeypatch):
    """On the CPU enable() leaves the model plain (no kernels). With kernels stubbed in, it turns
    every module that has a fast path into its fast subclass in place: the same parameters under the
    same checkpoint names; with every path off each override falls back to the plain method, the
    logits bit for bit the plain model's; and disable() turns the modules back."""
    model = tiny_model(torch.bfloat16)
    plain = {name: type(m) for name, m in model.named_modules()}
    if not torch.cuda.is_available():
        assert fastpath.enable(model) is False
    want = logits_of(model)
    stub = type("Ext", (), {"limits": {"gemv_max_m": 8, "decode_head_dim": 128, "decode_max_group": 8}})()
    monkeypatch.setattr(build_ext, "try_load", lambda which, *a: stub if which == "decode" else None)
    params = dict(model.named_parameters())
    assert fastpath.enable(model, paths=()) is True
    swapped = {name for name, m in model.named_modules() if type(m) is not plain[name]}
    assert swapped and all(type(m).plain is plain[name] for name, m in model.named_modules() if name in swapped)
    assert {name: type(m).__name__ for name, m in model.named_modules() if name in swapped} == \
        {name: plain[name].__name__ for name in swapped}
    assert dict(model.named_parameters()) == params and model.loaders().keys() == tiny_model(torch.bfloat16).loaders().keys()
    assert torch.equal(logits_of(model), want)
    fastpath.disable(model)
    assert {name: type(m) for name, m in model.named_modules()} == plain



@pytest.mark.parametrize("spans,path", [([(0, 511)], "flash"), ([(0, 512)], "cudnn"), ([(512, 511)], "flash"),
                                        ([(512, 512)], "cudnn"), ([(0, 600), (0, 600)], "flash")])
def test_cudnn_takes_a_lone_span_from_its_threshold(spans, path, monkeypatch):
    """Which attention a step takes with the cudnn path on: a lone span of CUDNN_MIN_TOKENS or more,
    from its start or after a prefix (two calls and a merge), else FlashAttention."""
    model = tiny_model(torch.bfloat16)
    stub = type("Ext", (), {"limits": {"gemv_max_m": 8, "decode_head_dim": 128, "decode_max_group": 8}})()
    monkeypatch.setattr(build_ext, "try_load", lambda which, *a: stub if which == "decode" else None)
    monkeypatch.setattr(fastpath, "cudnn_works", lambda *a: "")
    assert fastpath.enable(model, paths=("cudnn",))
    monkeypatch.setattr(fastpath.Attention, "attend_cudnn", lambda self, q, span: "cudnn")
    monkeypatch.setattr(llama.Attention, "attend", lambda self, q, batch: "flash")
    layout = [Span(1000 * i, start, n) for i, (start, n) in enumerate(spans)]
    batch = Batch.make(layout, [0] * sum(n for _, n in spans), "cpu")
    assert model.layers[0].attn.attend(None, batch) == path

def teacher_forced(model, steps, feed=None):
    """(logits of every step, the tokens each step ran), over a fresh cache: a prompt's tokens drawn
    from a fixed stream, a decode token the greedy choice for that sequence in the step before; or,
    given `feed` (another pass's tokens), those."""
    model.allocate_cache(16384)
    w = weave.Weaver(model, comm.make_comm("auto", model.d, model.cfg.hidden, 8192, model.norm.weight.dtype), "off")
    g = torch.Generator().manual_seed(5)
    logits, fed, last = [], [], {}
    for i, spans in enumerate(steps):
        tokens = feed[i] if feed else [last[s.row] if s.start and s.n == 1 else int(torch.randint(2, 203, (1,), generator=g))
                                       for s in spans for _ in range(s.n)]
        logits.append(w(Batch.make(spans, tokens, model.d.device)).float())
        fed.append(tokens)
        last |= {s.row: t for s, t in zip(spans, logits[-1].argmax(-1).tolist())}
    model.allocate_cache(0)
    return logits, fed


@needs_kernels
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fast_path_gives_the_plain_models_tokens(tmp_path):
    """A model whose heads the decode kernel serves, on one GPU: the same steps in fp32 (the
    reference), in bf16 plain, and in bf16 with the fast path, the decode tokens forced to the
    reference's greedy ones. Every path runs: a 76-token prefill (cuBLASLt), decode steps of 6
    sequences (gemv, decode attention), a mixed step of 8 tokens, a long prompt alone (cuDNN) and its
    decode steps (the decode kernel's slices). At every step the fast path is as close to the
    reference as the plain bf16 model is, and picks the reference's greedy token wherever the plain
    model does and the choice is not a near-tie (the top two within 5% of a logit's spread)."""
    path, _ = hf_family(tmp_path, "llama", hidden_size=512, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                        intermediate_size=256, max_position_embeddings=8192)
    cuda = Dist(device=torch.device("cuda", 0))
    lens, rows, long = [5, 40, 13, 3, 9, 6], [1000 * i for i in range(6)], 8000
    steps = [[Span(r, 0, n) for r, n in zip(rows, lens)]]
    steps += [[Span(r, n + k, 1) for r, n in zip(rows, lens)] for k in range(10)]
    steps += [[Span(r, n + 10, 1) for r, n in zip(rows, lens)] + [Span(6000, 0, 2)]]
    steps += [[Span(long, 0, 4500)]] + [[Span(long, 4500 + k, 1)] for k in range(3)]
    ref, tokens = teacher_forced(models.load(path, cuda, torch.float32), steps)
    model = models.load(path, cuda, BF16)
    plain, _ = teacher_forced(model, steps, feed=tokens)
    assert fastpath.enable(model)
    fast, _ = teacher_forced(model, steps, feed=tokens)
    checked = 0
    for i, (r, p, f) in enumerate(zip(ref, plain, fast)):
        err = lambda x: ((x - r).norm() / r.norm()).item()   # noqa: E731
        assert err(f) <= 1.5 * err(p) + 1e-3, (i, err(f), err(p))
        top = r.topk(2, dim=-1).values
        clear = (top[:, 0] - top[:, 1] > 0.05 * r.std(-1)) & (p.argmax(-1) == r.argmax(-1))
        assert torch.equal(f.argmax(-1)[clear], r.argmax(-1)[clear]), i
        checked += int(clear.sum())
    assert checked > 0.6 * sum(r.shape[0] for r in ref), checked
