"""GPU tests of multimem_ops.cu: the fused AllReduce + residual add + RMSNorm (p2p transport) on 2
and 4 GPUs, driven through comm.FusedComm as the model drives it and checked against NCCL's sum and
comm.add_rmsnorm_ (the reference op); on one GPU, the same kernel's protocol with 2, 4 and 8
virtual ranks (comm.VirtualRanks), the local fused add + RMSNorm, the RoPE + KV-cache kernel, the
decode attention, SwiGLU's activation, the decode GEMM and greedy sampling's argmax.

Skipped, with the reason, without a Hopper GPU, nvcc, or enough GPUs. Multi-GPU tests spawn one
process per GPU (conftest.run_tp); a failure on any rank fails the test with that rank's traceback.
"""
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import build_ext
import comm
import engine
from conftest import run_tp

OK, WHY = build_ext.available()
GPUS = torch.cuda.device_count() if OK else 0
pytestmark = pytest.mark.skipif(not OK, reason=WHY)

EPS = 1e-5
BF16 = torch.bfloat16
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # 2.13 name


def reference(total, residual, weight):
    """(x, residual) of the reference op, comm.add_rmsnorm_, on the fp32 sum over ranks."""
    x, r = torch.empty_like(residual), residual.clone()
    comm.add_rmsnorm_(x, r, weight, EPS, s=total)
    return x, r


def assert_close(got, want, what):
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6)).item()
    assert err < 1e-2, f"{what}: relative error {err:.3g}"
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, msg=lambda m: f"{what}: {m}")


def make_inputs(T, H, seed):
    """Padded [Tp, H] partial (this rank's) and residual (all ranks'), and the weight."""
    rank, world = dist.get_rank(), dist.get_world_size()
    Tp = comm.padded(T, world)
    g = torch.Generator("cuda").manual_seed(seed)  # the same on every rank
    residual = torch.randn(Tp, H, generator=g, device="cuda").to(BF16)
    weight = (1 + 0.1 * torch.randn(H, generator=g, device="cuda")).to(BF16)
    g.manual_seed(seed * 16 + rank + 1)  # different on every rank
    partial = torch.randn(Tp, H, generator=g, device="cuda").to(BF16)
    partial[T:], residual[T:] = 0, 0  # pad rows are inert
    return partial, residual, weight


def my_rows(t):
    rows = t.shape[0] // dist.get_world_size()
    return t[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def verify(what, partial, residual, weight, x, my_residual):
    total = partial.float()
    dist.all_reduce(total)
    want_x, want_r = reference(total, residual, weight)
    what = f"{what} rank {dist.get_rank()}/{dist.get_world_size()}"
    assert_close(x, want_x, f"{what}: x")
    assert_close(my_residual, my_rows(want_r), f"{what}: residual")
    world = dist.get_world_size()
    everyone = torch.empty(world * x.shape[0], x.shape[1], dtype=BF16, device="cuda")
    all_gather(everyone, x.contiguous())
    same = torch.equal(everyone.view(torch.int16), x.view(torch.int16).repeat(world, 1))
    assert same, f"{what}: x is not bitwise identical on all ranks"


class Comms:
    """One comm.FusedComm per hidden size (its buffers are [2, rows, H]), made on first use: every
    rank asks for the same sizes in the same order, as the symmetric allocation requires."""

    def __init__(self, d):
        self.d, self.comms = d, {}

    def __getitem__(self, H):
        if H not in self.comms:
            self.comms[H] = comm.FusedComm(self.d, H, 16384 if H == 8192 else 3000, BF16)
        return self.comms[H]


def run_case(comms, T, H, n_ctas, seed):
    partial, residual, weight = make_inputs(T, H, seed)
    fc, Tp = comms[H], partial.shape[0]
    fc.bufs[0, :Tp].copy_(partial)
    mine = my_rows(residual).clone()
    fc(0, Tp, mine, weight, EPS, n_ctas)
    verify(f"T={T} H={H} ctas={n_ctas}", partial, residual, weight, fc.bufs[0, :Tp], mine)


TOKENS = (1, 3, 64, 1000, 1024, 4097, 16384)
CASES = ([(t, 8192, 8) for t in TOKENS]
         + [(t, 8192, c) for t in (64, 4097) for c in (1, 2, 4, 16, 32, 64)]
         # 4104: idle lanes in the last warp; 12288 and 28672: 4 and 8 vectors per thread
         + [(t, h, 16) for t in (3, 1024) for h in (4096, 6144, 4104, 12288, 28672)])


def body_cases(comms):
    world, rank = dist.get_world_size(), dist.get_rank()
    fc = comms[8192]
    most = fc.ext.limits["max_ctas"]
    assert most == 64

    def call(buf, residual, n_ctas=8, weight=None):
        weight = torch.ones(buf.shape[-1], dtype=BF16, device="cuda") if weight is None else weight
        fc.ext.fused_allreduce_add_rmsnorm(buf, fc.peer_bufs[0], fc.multicast[0], fc.peer_flags, rank, residual,
                                           weight, EPS, n_ctas, fc.timeout_s)
    # Argument checks run on the host before any launch, so a rejected call cannot desync ranks.
    zeros = torch.zeros(2, 8192, dtype=BF16, device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 8"):
        call(torch.zeros(2 * world, 4100, dtype=BF16, device="cuda"), torch.zeros(2, 4100, dtype=BF16, device="cuda"))
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        call(fc.bufs.view(-1)[1:1 + 2 * world * 8192].view(2 * world, 8192), zeros)
    with pytest.raises(RuntimeError, match="multiple of the world size"):
        call(fc.bufs[0, :2 * world + 1], zeros)
    with pytest.raises(RuntimeError, match="n_ctas"):
        call(fc.bufs[0, :2 * world], zeros, most + 1)
    for i, (T, H, n_ctas) in enumerate(CASES):
        run_case(comms, T, H, n_ctas, seed=i)


def body_stress(comms, calls=2000, every=400):
    """Back-to-back calls of varying shapes and CTA counts, no host sync; check a few of them."""
    world = dist.get_world_size()
    rng = random.Random(1234)  # the same shapes on every rank, as the kernel requires
    residuals = torch.zeros(3000 * 8192 // world, dtype=BF16, device="cuda")
    unit = torch.ones(8192, dtype=BF16, device="cuda")
    saved = []
    for i in range(calls):
        T, H = rng.randint(1, 3000), rng.choice((4096, 6144, 8192))
        n_ctas = rng.randint(1, 64)
        Tp = comm.padded(T, world)
        fc, mine = comms[H], residuals[:Tp // world * H].view(Tp // world, H)
        checked = i % every == every - 1
        if checked:
            inputs = make_inputs(T, H, seed=10_000 + i)
            fc.bufs[0, :Tp].copy_(inputs[0])
            mine.copy_(my_rows(inputs[1]))
        fc(0, Tp, mine, inputs[2] if checked else unit[:H], EPS, n_ctas)
        if checked:
            saved.append((f"call {i} T={T} H={H} ctas={n_ctas}", *inputs, fc.bufs[0, :Tp].clone(), mine.clone()))
    torch.cuda.synchronize()  # returns: no call hung (a stuck barrier would have trapped)
    for args in saved:
        verify(*args)


def fused_job(d, body):
    """A run_tp job: one of the bodies above on this rank."""
    body(Comms(d))
    torch.cuda.synchronize()


def spawn(world, body, tmp):
    if GPUS < world:
        pytest.skip(f"needs {world} CUDA GPUs, found {GPUS}")
    build_ext.load()
    run_tp({world: [(fused_job, (body,))]}, tmp, device="cuda")


@pytest.mark.parametrize("world", [2, 4])
def test_fused_allreduce_add_rmsnorm(world, tmp_path):
    spawn(world, body_cases, tmp_path)


@pytest.mark.parametrize("world", [2, 4])
def test_fused_allreduce_add_rmsnorm_back_to_back(world, tmp_path):
    spawn(world, body_stress, tmp_path)


# ----------------------------------------------------------------------------- one GPU, virtual ranks
# N ranks are N launches on N streams of one GPU, each with its own rank and everyone's buffers
# (comm.VirtualRanks). They spin on each other's flags, so every case keeps N x CTAs within what the
# GPU holds at once (resident_ctas); a larger one would hang until the timeout, by design.


def virtual_inputs(v, T, seed):
    """Rank r's partial in v.bufs[r], the residual (all rows), the weight; pad rows zero."""
    N, H = v.n, v.bufs.shape[-1]
    Tp = comm.padded(T, N)
    g = torch.Generator("cuda").manual_seed(seed)
    partial = torch.randn(N, Tp, H, generator=g, device="cuda").to(BF16)
    residual = torch.randn(Tp, H, generator=g, device="cuda").to(BF16)
    weight = (1 + 0.1 * torch.randn(H, generator=g, device="cuda")).to(BF16)
    partial[:, T:], residual[T:] = 0, 0
    v.bufs[:, :Tp] = partial
    return partial, residual, weight


def virtual_check(what, v, partial, residual, weight, mine):
    """Every rank's rows equal (bitwise) and the reference's; each rank's residual slice is the
    kernel's sum in its own order (ranks 0..N-1 in fp32, then the residual), bit for bit."""
    N, Tp = v.n, partial.shape[1]
    total = partial[0].float()
    for r in range(1, N):
        total += partial[r].float()
    want_x, want_r = reference(total, residual, weight)
    x = v.bufs[:, :Tp]
    assert torch.equal(x.view(torch.int16), x[:1].expand_as(x).view(torch.int16)), f"{what}: ranks differ"
    assert_close(x[0], want_x, f"{what}: x")
    assert torch.equal(torch.cat(mine), want_r), f"{what}: residual"


def virtual_call(v, T, ctas, seed, what):
    partial, residual, weight = virtual_inputs(v, T, seed)
    mine = list(residual.chunk(v.n))
    mine = [m.clone() for m in mine]
    v(partial.shape[1], mine, weight, EPS, ctas)
    virtual_check(what, v, partial, residual, weight, mine)


def fits(v, ctas):
    return v.n * ctas <= v.resident_ctas()


@pytest.mark.parametrize("N", [2, 4, 8])
@pytest.mark.parametrize("H", [4096, 6144, 8192])
def test_virtual_ranks_equal_reference(N, H):
    """1 to 16K tokens, odd counts, CTA counts 1-32 (those the GPU holds for N ranks)."""
    v = comm.VirtualRanks(N, H, 16384, "cuda")
    cases = [(T, 8) for T in (1, 3, 7, 64, 1000, 1023, 4097, 16384)] + [(T, c) for T in (5, 2049) for c in (1, 2, 4, 16, 32)]
    ran = 0
    for i, (T, ctas) in enumerate(cases):
        if fits(v, ctas):
            virtual_call(v, T, ctas, seed=i, what=f"N={N} H={H} T={T} ctas={ctas}")
            ran += 1
    assert ran >= len(cases) - 5, f"only {ran} cases fit ({v.resident_ctas()} CTAs resident)"


@pytest.mark.parametrize("N", [2, 4, 8])
def test_virtual_ranks_soak(N):
    """Thousands of back-to-back calls of varying shapes and CTA counts, no host sync between them;
    every 250th checked against the reference: no stale flag, no hang."""
    rng = random.Random(N)
    v = comm.VirtualRanks(N, 8192, 3000, "cuda")
    unit = torch.ones(8192, dtype=BF16, device="cuda")
    scratch = torch.zeros(3000, 8192, dtype=BF16, device="cuda")
    for i in range(3000):
        T, ctas = rng.randint(1, 3000), rng.choice([c for c in (1, 2, 4, 8, 16, 32) if fits(v, c)])
        if i % 250 == 249:
            virtual_call(v, T, ctas, seed=i, what=f"call {i} T={T} ctas={ctas}")
        else:
            Tp = comm.padded(T, N)
            v(Tp, list(scratch[:Tp].chunk(N)), unit, EPS, ctas)
    torch.cuda.synchronize()


@pytest.mark.parametrize("N", [2, 4, 8])
def test_virtual_ranks_graph_replay(N):
    """Two comm points (different sizes and CTA counts) captured in one CUDA graph, replayed 300
    times with new inputs written between replays: the same results as eager calls."""
    v = comm.VirtualRanks(N, 4096, 512, "cuda")
    sizes = [(comm.padded(37, N), 4), (comm.padded(256, N), 2)]
    residuals = [[torch.zeros(Tp // N, 4096, dtype=BF16, device="cuda") for _ in range(N)] for Tp, _ in sizes]
    weight = torch.empty(4096, dtype=BF16, device="cuda")
    outs = [torch.empty(N, Tp, 4096, dtype=BF16, device="cuda") for Tp, _ in sizes]
    ins = [torch.empty(N, Tp, 4096, dtype=BF16, device="cuda") for Tp, _ in sizes]

    def points():
        for (Tp, ctas), res, i, o in zip(sizes, residuals, ins, outs):
            v.bufs[:, :Tp] = i
            v(Tp, res, weight, EPS, ctas)
            o.copy_(v.bufs[:, :Tp])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        points()                                  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        points()
    g = torch.Generator("cuda").manual_seed(N)
    for rep in range(300):
        want = []
        for (Tp, _), res, i in zip(sizes, residuals, ins):
            i.copy_(torch.randn(N, Tp, 4096, generator=g, device="cuda"))
            full = torch.randn(Tp, 4096, generator=g, device="cuda").to(BF16)
            for r in range(N):
                res[r].copy_(full.chunk(N)[r])
            want.append((i.clone(), full))
        weight.copy_(1 + 0.1 * torch.randn(4096, generator=g, device="cuda"))
        graph.replay()
        if rep % 30 == 0 or rep == 299:
            for (Tp, _), res, o, (partial, full) in zip(sizes, residuals, outs, want):
                v.bufs[:, :Tp] = o                  # virtual_check reads the rows from v.bufs
                virtual_check(f"replay {rep} Tp={Tp}", v, partial, full, weight, res)


FAULT = """
import sys, torch
sys.path.insert(0, {root!r})
import comm
v = comm.VirtualRanks({n}, 4096, 64, "cuda", timeout_s=0.5)
res = [torch.zeros(64 // {n}, 4096, dtype=torch.bfloat16, device="cuda") for _ in range({n})]
w = torch.ones(4096, dtype=torch.bfloat16, device="cuda")
v(64, res, w, 1e-5, 4, ranks=range({n} - 1))     # the last rank never arrives
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.parametrize("N", [2, 4])
def test_virtual_rank_that_never_arrives_traps(N):
    """One rank's launch left out: the others trap after the timeout with the kernel's message, and
    the process fails with a CUDA error (a trap ends the context: a subprocess)."""
    r = subprocess.run([sys.executable, "-c", FAULT.format(root=os.path.dirname(os.path.abspath(__file__)), n=N)],
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "no error" not in out, out[-2000:]
    assert "timed out at the entry barrier" in out and "peer" in out, out[-2000:]


@pytest.mark.parametrize("T,H", [(1, 8192), (7, 4104), (1000, 4096), (4097, 8192), (333, 12288),
                                 (5, 28672)])
def test_fused_add_rmsnorm(T, H):
    ops = build_ext.load()
    g = torch.Generator("cuda").manual_seed(T + H)
    x, residual = (torch.randn(T, H, generator=g, device="cuda").to(BF16) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(H, generator=g, device="cuda")).to(BF16)
    want_x, want_r = reference(x.float(), residual, weight)
    ops.fused_add_rmsnorm(x, residual, weight, EPS)
    assert torch.equal(residual, want_r), f"T={T} H={H}: residual differs from bf16(x + residual)"
    assert_close(x, want_x, f"T={T} H={H}: x")
    odd = torch.zeros(2, 12, dtype=BF16, device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.fused_add_rmsnorm(odd, odd.clone(), weight[:12].contiguous(), EPS)


@pytest.mark.parametrize("T,nh,nkv,hd", [(1, 32, 8, 128), (37, 8, 2, 128), (1000, 16, 4, 64), (5, 5, 1, 8)])
def test_rope_kv_cache(T, nh, nkv, hd):
    """The fused RoPE + KV-cache write against the model's torch path, bit for bit: q rotated in
    place, k rotated and v copied into their cache rows, every other row untouched."""
    import llama
    ops = build_ext.load()
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
    with pytest.raises(RuntimeError, match="positions must be a contiguous torch.int32"):
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
@pytest.mark.parametrize("nh,nkv", [(32, 8), (16, 4), (8, 2), (8, 1), (6, 1), (7, 7), (15, 5)])
def test_decode_attention(nh, nkv):
    """The split-KV decode kernel against fp32 attention: lengths from 1 key to past 16 slices,
    ranges anywhere in the cache and in any order, q a strided view of qkv, with max_k from the
    longest length to far beyond it (more slices in the grid than a sequence has). Within bf16
    rounding, and no worse than FlashAttention-2's variable-length kernel on the same inputs.
    A sequence's output is bitwise the same whatever max_k and the rest of the batch are."""
    ops = build_ext.load()
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
    with pytest.raises(RuntimeError, match="kv_lens must be in"):
        run(q, starts_t, lens_t, 100)
    if (nh, nkv) != (8, 1):
        return
    wide = torch.zeros(1, 9 * nkv, hd, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match="at most 8 query heads"):
        ops.decode_attention(wide, k_cache, v_cache, starts_t[:1], lens_t[:1], wide.clone(), wide.float(), wide.float(),
                             8, 1.0)


@pytest.mark.parametrize("T,I", [(1, 14336), (7, 3584), (128, 1792), (1000, 8)])
def test_silu_mul(T, I):
    """SwiGLU's activation kernel against torch's F.silu(gate) * up in bf16, bit for bit."""
    ops = build_ext.load()
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
@pytest.mark.parametrize("N,K", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (1536, 4096),
                                 (4096, 1024), (4096, 3584), (40, 8), (24, 200), (1000, 1032)])
def test_gemv(N, K):
    """The decode GEMM against fp32: within bf16 rounding and no worse than cuBLAS, at every token
    count it takes (x a strided view), with and without a bias. A token's row is bitwise the same at
    any M, and the same launched plainly (pdl false). The SwiGLU epilogue is bitwise gemv followed
    by silu_mul."""
    ops = build_ext.load()
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
def test_gemv_rope(nh, nkv, hd, K, bias):
    """qkv's GEMM with RoPE and the cache write in its epilogue: bitwise gemv followed by
    rope_kv_cache (q, both caches, every other cache row untouched), at every token count."""
    ops = build_ext.load()
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


@pytest.mark.parametrize("B,V", [(1, 128256), (6, 152064), (128, 128256), (6, 8), (7, 8200), (6, 32768)])
def test_argmax(B, V):
    """Greedy sampling's kernel picks what torch's argmax(-1) picks on the GPU: ties to the first
    index (inside one CTA's span and across spans), -0 equal to +0, infinities, a NaN above every
    number; rows may be strided."""
    ops = build_ext.load()
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
    assert torch.equal(engine.argmax(x, ops), x.argmax(-1))
    with pytest.raises(RuntimeError, match="V % 8 == 0"):
        ops.argmax(x[:, :V - 1], out)
