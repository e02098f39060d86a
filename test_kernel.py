"""GPU tests of multimem_ops.cu against NCCL + torch: the fused AllReduce + residual add + RMSNorm
(p2p transport) on 2 and 4 GPUs, and the local fused add + RMSNorm on one GPU.

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

OK, WHY = build_ext.available()
GPUS = torch.cuda.device_count() if OK else 0
pytestmark = pytest.mark.skipif(not OK, reason=WHY)

EPS = 1e-5
TIMEOUT_S = 30.0  # the kernel's barrier timeout: a hang becomes a trap with a message
MAX_CTAS = 64  # multimem_ops.cu's limit; checked against ops.limits below
CAPACITY = 16384 * 8192  # elements of the symmetric buffer: the largest case
BF16 = torch.bfloat16
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # 2.13 name


def reference(total, residual, weight):
    """HF semantics: r = bf16(sum + residual); x = bf16(w * bf16(r * rsqrt(mean(r^2) + eps)))."""
    r = (total + residual.float()).to(BF16)
    rf = r.float()
    y = (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + EPS)).to(BF16)
    return (weight.float() * y.float()).to(BF16), r


def assert_close(got, want, what):
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6)).item()
    assert err < 1e-2, f"{what}: relative error {err:.3g}"
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, msg=lambda m: f"{what}: {m}")


class Symm:
    """Test-only stand-in for weave.FusedComm: a symmetric bf16 buffer and our flag array."""

    def __init__(self):
        import torch.distributed._symmetric_memory as symm_mem
        group, dev = dist.group.WORLD.group_name, torch.device("cuda", torch.cuda.current_device())
        if torch.__version__ < (2, 11) and hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(group)
        self.flat = symm_mem.empty(CAPACITY, dtype=BF16, device=dev).zero_()
        self.hdl = symm_mem.rendezvous(self.flat, group)
        self.flags = symm_mem.empty(MAX_CTAS * dist.get_world_size(), dtype=torch.int32,
                                    device=dev).zero_()
        self.flags_hdl = symm_mem.rendezvous(self.flags, group)
        torch.cuda.synchronize()  # flags are zero everywhere before any rank can signal
        dist.barrier()

    def view(self, rows, hidden, offset=0):
        return self.flat[offset:offset + rows * hidden].view(rows, hidden)

    @staticmethod
    def peers(t, hdl):
        """The address of t in every rank's mapping."""
        return [base + t.data_ptr() - hdl.buffer_ptrs[hdl.rank] for base in hdl.buffer_ptrs]

    def __call__(self, ops, view, residual, weight, n_ctas):
        ops.fused_allreduce_add_rmsnorm(view, self.peers(view, self.hdl), 0,
                                        self.peers(self.flags, self.flags_hdl), dist.get_rank(),
                                        residual, weight, EPS, n_ctas, TIMEOUT_S)


def make_inputs(T, H, seed):
    """Padded [Tp, H] partial (this rank's) and residual (all ranks'), and the weight."""
    rank, world = dist.get_rank(), dist.get_world_size()
    Tp = -(-T // world) * world
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


def run_case(symm, ops, T, H, n_ctas, seed):
    partial, residual, weight = make_inputs(T, H, seed)
    view = symm.view(partial.shape[0], H)
    view.copy_(partial)
    mine = my_rows(residual).clone()
    symm(ops, view, mine, weight, n_ctas)
    verify(f"T={T} H={H} ctas={n_ctas}", partial, residual, weight, view, mine)


TOKENS = (1, 3, 64, 1000, 1024, 4097, 16384)
CASES = ([(t, 8192, 8) for t in TOKENS]
         + [(t, 8192, c) for t in (64, 4097) for c in (1, 2, 4, 16, 32, MAX_CTAS)]
         # 4104: idle lanes in the last warp; 12288 and 28672: 4 and 8 vectors per thread
         + [(t, h, 16) for t in (3, 1024) for h in (4096, 6144, 4104, 12288, 28672)])


def body_cases(symm, ops):
    world = dist.get_world_size()
    # Argument checks run on the host before any launch, so a rejected call cannot desync ranks.
    with pytest.raises(RuntimeError, match="multiple of 8"):
        symm(ops, symm.view(2 * world, 4100), torch.zeros(2, 4100, dtype=BF16, device="cuda"),
             torch.ones(4100, dtype=BF16, device="cuda"), 8)
    ones = torch.ones(8192, dtype=BF16, device="cuda")
    zeros = torch.zeros(2, 8192, dtype=BF16, device="cuda")
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        symm(ops, symm.view(2 * world, 8192, offset=1), zeros, ones, 8)
    with pytest.raises(RuntimeError, match="multiple of the world size"):
        symm(ops, symm.view(2 * world + 1, 8192), zeros, ones, 8)
    with pytest.raises(RuntimeError, match="n_ctas"):
        symm(ops, symm.view(2 * world, 8192), zeros, ones, MAX_CTAS + 1)
    for i, (T, H, n_ctas) in enumerate(CASES):
        run_case(symm, ops, T, H, n_ctas, seed=i)


def body_stress(symm, ops, calls=2000, every=400):
    """Back-to-back calls of varying shapes and CTA counts, no host sync; check a few of them."""
    world = dist.get_world_size()
    rng = random.Random(1234)  # the same shapes on every rank, as the kernel requires
    residuals = torch.zeros(CAPACITY // world, dtype=BF16, device="cuda")
    unit = torch.ones(8192, dtype=BF16, device="cuda")
    saved = []
    for i in range(calls):
        T, H = rng.randint(1, 3000), rng.choice((4096, 6144, 8192))
        n_ctas = rng.randint(1, MAX_CTAS)
        Tp = -(-T // world) * world
        view, mine = symm.view(Tp, H), residuals[:Tp // world * H].view(Tp // world, H)
        checked = i % every == every - 1
        if checked:
            inputs = make_inputs(T, H, seed=10_000 + i)
            view.copy_(inputs[0])
            mine.copy_(my_rows(inputs[1]))
        symm(ops, view, mine, inputs[2] if checked else unit[:H], n_ctas)
        if checked:
            saved.append((f"call {i} T={T} H={H} ctas={n_ctas}", *inputs, view.clone(),
                          mine.clone()))
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
    ops = build_ext.load()  # built by the parent: loads from the cache
    assert ops.limits["max_ctas"] == MAX_CTAS
    body(Symm(), ops)
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
