"""GPU tests of the technique's kernels (multimem_ops.cu): the fused AllReduce + residual add + RMSNorm
(p2p transport) on 2 and 4 GPUs, driven through comm.FusedComm as the model drives it and checked
against NCCL's sum and comm.add_rmsnorm_ (the reference op); on one GPU, the same kernel's protocol
with 2, 4 and 8 virtual ranks (comm.VirtualRanks), and the local fused add + RMSNorm.

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
    # The binding checks its arguments before any launch, so a rejected call cannot desync ranks.
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
    build_ext.load("comm")
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


@pytest.mark.parametrize("N,H", [(3, 8192), (5, 4096), (6, 6144), (7, 8192), (2, 4104), (8, 4104),
                                 (4, 12288), (2, 28672), (8, 28672)])
def test_virtual_ranks_other_shapes(N, H):
    """World sizes beside 2, 4 and 8 (the p2p kernel is built for each), and the p2p ring's other
    launch shapes: idle lanes in the last warp (4104: 513 vectors, 2 a thread), 4 and 8 vectors a
    thread (12288, 28672); row counts that are not multiples of the CTA count."""
    v = comm.VirtualRanks(N, H, 1031, "cuda")
    for i, (T, ctas) in enumerate([(1, 1), (7, 3), (333, 12), (1031, 5)]):
        assert fits(v, ctas), f"{N} x {ctas} CTAs do not fit ({v.resident_ctas()} resident)"
        virtual_call(v, T, ctas, seed=100 + i, what=f"N={N} H={H} T={T} ctas={ctas}")


@pytest.mark.parametrize("H", [4096, 4104, 8192, 12288, 28672])
def test_virtual_ranks_bits_of_the_local_kernel(H):
    """With every partial but rank 0's zero, the p2p sum is rank 0's partial exactly, so the p2p
    kernel's x and residual must be the local kernel's, bit for bit: the same add, the same
    normalization, and the same block reduction tree although the p2p kernel's launch shape differs
    (at most 512 threads; multimem_ops.cu's header)."""
    N = 4
    v = comm.VirtualRanks(N, H, 1000, "cuda")
    partial, residual, weight = virtual_inputs(v, 1000, seed=H)
    Tp = partial.shape[1]
    v.bufs[1:, :Tp] = 0
    mine = [m.clone() for m in residual.chunk(N)]
    v(Tp, mine, weight, EPS, 4)
    x, r = partial[0].clone(), residual.clone()
    v.ext.fused_add_rmsnorm(x, r, weight, EPS)
    assert torch.equal(torch.cat(mine), r), f"H={H}: residual differs from the local kernel's"
    for rank in range(N):
        assert torch.equal(v.bufs[rank, :Tp].view(torch.int16), x.view(torch.int16)), \
            f"H={H}: rank {rank}'s x differs from the local kernel's"


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
    ops = build_ext.load("comm")
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
