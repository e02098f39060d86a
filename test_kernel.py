"""GPU tests of multimem_ops.cu: the fused AllReduce + residual add + RMSNorm (p2p transport) on 2
and 4 GPUs, driven through comm.FusedComm as the model drives it and checked against NCCL's sum and
comm.add_rmsnorm_ (the reference op); on one GPU, the local fused add + RMSNorm and the RoPE +
KV-cache kernel.

Skipped, with the reason, without a Hopper GPU, nvcc, or enough GPUs. Multi-GPU tests spawn one
process per GPU; a failure on any rank fails the test with that rank's traceback.
"""
import faulthandler
import os
import random
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import build_ext
import comm

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


def _worker(rank, world, port, body):
    faulthandler.enable()  # a crash in native code still shows where it happened
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=120),
                            device_id=torch.device("cuda", rank))
    body(Comms(comm.Dist(rank, world, torch.device("cuda", rank), rank, world)))
    torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()  # only on success: after a failure, spawn ends the others


def spawn(world, body):
    if GPUS < world:
        pytest.skip(f"needs {world} CUDA GPUs, found {GPUS}")
    build_ext.load()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, body), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 4])
def test_fused_allreduce_add_rmsnorm(world):
    spawn(world, body_cases)


@pytest.mark.parametrize("world", [2, 4])
def test_fused_allreduce_add_rmsnorm_back_to_back(world):
    spawn(world, body_stress)


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
