"""Shared by the test files: tiny random checkpoints in HF layout (hf_llama, hf_family), free_port,
and run_tp, the tensor-parallel runs. Imports stay light (no transformers here): spawned processes
import this file again."""
import os
import socket

import torch
import torch.multiprocessing as mp

import group

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

# pytest-xdist: the workers share the cores, so each one's torch takes its share of them. More
# OpenMP threads than cores spin in barriers: steps of the tiny test models ran 10-30x slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_llama(tmp, **kw):
    """A tiny random Llama saved in HF layout by transformers; returns (path, model)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=4, vocab_size=203, max_position_embeddings=512, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(cfg | kw))).eval()
    model.save_pretrained(tmp)
    return str(tmp), model


def hf_family(tmp, family, edit=None, **kw):
    """A tiny random Llama, Qwen2 or Mixtral (4 experts, top 2) saved in HF layout by transformers, eager
    attention and experts; returns (path, model). Matrices get std 1/sqrt(fan in), so the router and
    the argmax have clear winners that TP's last-bit differences cannot flip; transformers leaves
    biases at zero and norms at one, so those are drawn too. edit(model) runs before saving."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
               vocab_size=203, max_position_embeddings=512, attn_implementation="eager") | kw
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{"rope_theta": 1e6} | cfg))
    else:
        model = MixtralForCausalLM(MixtralConfig(**dict(num_local_experts=4, experts_implementation="eager") | cfg))
        assert model.config._experts_implementation == "eager"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
        if edit:
            edit(model)
    model.eval().save_pretrained(tmp)
    if family == "mixtral":   # transformers 5 fuses the experts in memory (mlp.experts.gate_up_proj);
        from safetensors import safe_open   # the checkpoint must have the hub's per-expert names
        with safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
            names = set(f.keys())
        assert {"model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w1.weight",
                "model.layers.1.block_sparse_moe.experts.3.w2.weight"} <= names, sorted(names)[:20]
    return str(tmp), model


# ----------------------------------------------------------------------------- tensor parallel runs


def run_tp(runs: dict, tmp, device="cpu") -> dict:
    """{world size: [(fn, args), ...]} -> {world size: [fn(dist, *args), ...]}: the ranks of each world
    size, started once, run its jobs in order (fn: a top-level function of a test file). Asserts that
    all ranks return the same results (bitwise for tensors); returns rank 0's.

    On the CPU the ranks are forks of this process: a spawned process spends seconds importing torch
    and the model code, more than the jobs take. CUDA cannot be forked: there they are spawned."""
    results = {}
    for world, jobs in runs.items():
        out = os.path.join(tmp, f"tp{world}.pt")
        mp.start_processes(_rank, (world, free_port(), device, jobs, out), nprocs=world,
                           start_method="fork" if device == "cpu" else "spawn")
        ranks = torch.load(out)
        for r in range(1, world):
            assert same(ranks[r], ranks[0]), f"TP {world}: rank {r}'s results differ from rank 0's"
        results[world] = ranks[0]
    return results


def _rank(rank, world, port, device, jobs, out):
    """One rank: every job in order; rank 0 saves all ranks' results to `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    d = group.init_distributed(device)
    try:
        results = [fn(d, *args) for fn, args in jobs]
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        torch.distributed.destroy_process_group()


def same(a, b) -> bool:
    """Equal results: tensors bitwise (dtype and shape too), containers item by item."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b
