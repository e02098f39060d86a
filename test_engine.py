"""The serving engine: the scheduler on its own (CPU), every prompt's greedy tokens under continuous
batching equal to running it alone (TP 1, and TP 2 / 4 over gloo), sampling, and on CUDA the
graph-replayed decode against eager steps. Run: pytest -q test_engine.py"""
import itertools
import random

import pytest
import torch

import comm
import engine
import models
import weave
from conftest import hf_llama, run_tp

N_GPUS = torch.cuda.device_count()


# ----------------------------------------------------------------------------- the scheduler alone


def drive(prompts, max_seqs, budget, max_new, eos_at=None):
    """Runs the scheduler with fake steps (no model); returns every step and the finish order.
    eos_at[i]: the number of tokens after which prompt i stops (else max_new)."""
    sched = engine.Scheduler(max_seqs, budget)
    seqs = [engine.Sequence(i, [7] * n, max_new) for i, n in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    steps, order = [], []
    while sched:
        step = sched.schedule()
        steps.append([(s.index, s.slot, s.cached, n) for s, n in step])
        assert step and sum(n for _, n in step) <= budget
        for s, n in step:
            assert s.next_tokens(n) and len(s.next_tokens(n)) == n
            s.cached += n
            if s.cached >= len(s.prompt):
                s.out.append(1)
                if len(s.out) == (eos_at or {}).get(s.index, max_new):
                    sched.finish(s)
                    order.append(s.index)
        assert len(steps) < 10_000, "no progress"
    return steps, order, seqs


@pytest.mark.parametrize("max_seqs,budget", [(1, 1), (2, 3), (4, 16), (8, 8), (3, 100)])
def test_scheduler_budget_slots_and_chunks(max_seqs, budget):
    rng = random.Random(max_seqs * 1000 + budget)
    prompts = [rng.randint(1, 40) for _ in range(23)]
    eos_at = {i: rng.randint(1, 6) for i in range(0, 23, 3)}
    steps, order, seqs = drive(prompts, max_seqs, budget, max_new=6, eos_at=eos_at)
    assert sorted(order) == list(range(23))                         # everyone finishes
    for step in steps:
        slots = [slot for _, slot, _, _ in step]
        assert len(set(slots)) == len(slots) and all(0 <= s < max_seqs for s in slots)   # slots reused, never shared
        decodes = [i for i, _, cached, n in step if cached >= prompts[i]]
        assert [i for i, *_ in step][:len(decodes)] == decodes       # decode tokens come first
    # Chunks of each prompt are contiguous and in order, and cover it exactly once.
    for i, n in enumerate(prompts):
        chunks = [(cached, k) for step in steps for j, _, cached, k in step if j == i and cached < n]
        assert [c for c, _ in chunks] == list(itertools.accumulate([0] + [k for _, k in chunks[:-1]]))
        assert sum(k for _, k in chunks) == n
    # Admission is first come, first served: prompts start in input order.
    first = {}
    for t, step in enumerate(steps):
        for i, *_ in step:
            first.setdefault(i, t)
    assert sorted(first, key=lambda i: (first[i], i)) == list(range(23))
    assert all(len(s.out) == eos_at.get(s.index, 6) for s in seqs)


def test_scheduler_rejects_more_seqs_than_budget():
    with pytest.raises(ValueError, match="max_seqs <= max_step_tokens"):
        engine.Scheduler(8, 4)


def test_buckets():
    assert engine.buckets(1) == [1] and engine.buckets(5) == [1, 2, 4, 5]
    assert engine.buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64] and engine.buckets(40)[-1] == 40


def test_sample_greedy_temperature_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]] * 4000)
    assert engine.sample(logits, 0.0, 1.0, None).eq(1).all()
    g = torch.Generator().manual_seed(0)
    # top_p below the largest probability: only the argmax survives.
    assert engine.sample(logits, 1.0, 0.5, g).eq(1).all()
    # Full sampling follows softmax: frequencies within a few standard errors.
    freq = torch.bincount(engine.sample(logits, 1.0, 1.0, g), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)
    # top_p = 0.9 keeps tokens 1 and 2 (0.84 + 0.11 reaches 0.9), renormalized.
    freq = torch.bincount(engine.sample(logits, 1.0, 0.9, g), minlength=4).float() / 4000
    p = torch.softmax(logits[0], -1) * torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(freq, p / p.sum(), atol=0.03, rtol=0)


# ----------------------------------------------------------------------------- served == alone

PROMPT_LENS = [1, 5, 37, 12, 70, 3, 2, 26, 9, 41]     # some longer than the smaller budgets
MAX_NEW = 7


def prompts_for(vocab: int):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def serve(path, d, dtype, max_seqs, budget, prompts, eos=(), weave_mode="on", backend="auto", graphs=False,
          max_new=MAX_NEW):
    model = models.load(path, d, dtype)
    w = weave.Weaver(model, comm.make_comm(backend, d, model.cfg.hidden, budget, dtype), weave_mode,
                     weave.Tuning(threshold=16))
    eng = engine.Engine(w, max_seqs, budget, max(map(len, prompts)) + max_new, graphs)
    return {s.index: (s.out, s.error) for s in eng.generate(prompts, max_new, eos)}


# (max_seqs, budget): one sequence at a time; steps of one token; small budgets that chunk every
# prompt and split mixed steps (threshold 16); a budget that takes everything at once.
CONFIGS = [(1, 128), (1, 1), (3, 8), (4, 16), (10, 40), (10, 256)]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return hf_llama(tmp_path_factory.mktemp("llama"), num_hidden_layers=2)[0]


@pytest.fixture(scope="module")
def alone(small_ckpt):
    """Each prompt run by itself (one sequence, its whole prompt in one step); an EOS id chosen to
    end prompt 2 after three tokens."""
    prompts = prompts_for(203)
    ref = {}
    for i, p in enumerate(prompts):
        ref[i] = serve(small_ckpt, comm.Dist(), torch.float32, 1, 128, [p], weave_mode="off")[0][0]
    eos = {ref[2][2]}
    with_eos = {i: serve(small_ckpt, comm.Dist(), torch.float32, 1, 128, [p], eos, weave_mode="off")[0][0]
                for i, p in enumerate(prompts)}
    assert len(with_eos[2]) == 3 and any(len(v) == MAX_NEW for v in with_eos.values())
    return prompts, eos, with_eos


@pytest.mark.parametrize("max_seqs,budget", CONFIGS)
def test_served_tokens_equal_alone_tp1(small_ckpt, alone, max_seqs, budget):
    prompts, eos, want = alone
    got = serve(small_ckpt, comm.Dist(), torch.float32, max_seqs, budget, prompts, eos)
    assert {i: out for i, (out, _) in got.items()} == want


def test_prompt_errors_do_not_sink_the_others(small_ckpt, alone):
    prompts, eos, want = alone
    too_long = [5] * 600          # the test model's context is 512
    got = serve(small_ckpt, comm.Dist(), torch.float32, 4, 16, [prompts[0], too_long, [], prompts[1]], eos)
    assert "exceeds the model's context of 512" in got[1][1] and "no tokens" in got[2][1]
    assert got[0] == (want[0], None) and got[3] == (want[1], None)


TP_CONFIGS = [(3, 8), (10, 40)]     # (max_seqs, budget) at TP 2 and 4


def serve_configs(d, path, prompts, eos):
    """serve() under each of TP_CONFIGS (a job for run_tp)."""
    return [serve(path, d, torch.float32, max_seqs, budget, prompts, eos) for max_seqs, budget in TP_CONFIGS]


def test_served_tokens_equal_alone_tp_gloo(small_ckpt, alone, tmp_path):
    """TP_CONFIGS at TP 2 and 4 over gloo (one launch per TP size): every prompt's tokens as alone."""
    prompts, eos, want = alone
    got = run_tp({world: [(serve_configs, (small_ckpt, prompts, eos))] for world in (2, 4)}, tmp_path)
    for world in (2, 4):
        served = got[world][0]
        assert len(served) == len(TP_CONFIGS)
        for config, result in zip(TP_CONFIGS, served):
            assert {i: out for i, (out, _) in result.items()} == want, (world, config)


# ----------------------------------------------------------------------------- CUDA: graphs


@pytest.mark.skipif(N_GPUS < 1, reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_eager(small_ckpt, alone):
    """bf16 on one GPU: decode steps replayed from graphs give the tokens eager steps give."""
    prompts, eos, _ = alone
    d = comm.Dist(device=torch.device("cuda", 0))
    eager = serve(small_ckpt, d, torch.bfloat16, 4, 16, prompts, eos, graphs=False, max_new=20)
    graphs = serve(small_ckpt, d, torch.bfloat16, 4, 16, prompts, eos, graphs=True, max_new=20)
    assert graphs == eager


@pytest.mark.skipif(N_GPUS < 1, reason="needs a CUDA GPU")
def test_cuda_attention_matches_cpu(small_ckpt):
    """The CUDA paths (FlashAttention over the cache for decode rows, cuDNN for chunks after a
    prefix) against the CPU ones, through a mixed step: decode rows, a chunk after a prefix, a fresh
    prompt, in fp32 on the CPU vs bf16 on the GPU."""
    logits = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        d = comm.Dist(device=torch.device(device))
        model = models.load(small_ckpt, d, dtype)
        model.allocate_cache(4, 64)
        w = weave.Weaver(model, comm.make_comm("auto", d, model.cfg.hidden, 64, dtype), "off")
        g = torch.Generator().manual_seed(1)
        toks = lambda n: torch.randint(0, 203, (n,), generator=g).tolist()
        w(weave.Batch.make([(0, 0, 20), (1, 0, 9), (2, 0, 12)], toks(41), d.device, 64))
        mixed = [(0, 20, 1), (1, 9, 1), (2, 12, 6), (3, 0, 11)]
        logits.append(w(weave.Batch.make(mixed, toks(19), d.device, 64)).float().cpu())
    cpu, cuda = logits
    assert (cuda - cpu).norm() / cpu.norm() < 2e-2


def serve_graphs_and_eager(d, path, prompts, eos, backend):
    """(tokens with decode from CUDA graphs, tokens with eager decode), bf16 on the GPUs (a run_tp job)."""
    run = lambda graphs: serve(path, d, torch.bfloat16, 4, 16, prompts, eos, backend=backend, graphs=graphs,
                               max_new=20)
    return run(True), run(False)


@pytest.mark.parametrize("world", [2, 4])
def test_cuda_graph_decode_equals_eager_tp(small_ckpt, alone, tmp_path, world):
    """TP 2 and 4 on GPUs: the fused comm op and NCCL captured in decode graphs and replayed give
    the tokens of eager decode (the barriers keep their state on the device, the buffers never move)."""
    if N_GPUS < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    prompts, eos, _ = alone
    jobs = [(serve_graphs_and_eager, (small_ckpt, prompts, eos, backend)) for backend in ("fused", "nccl")]
    for backend, (graphs, eager) in zip(("fused", "nccl"), run_tp({world: jobs}, tmp_path, device="cuda")[world]):
        assert graphs == eager, backend
