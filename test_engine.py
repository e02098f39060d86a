"""The serving engine: the KV range allocator and the scheduler on their own (CPU), sampling, every
prompt's greedy tokens under continuous batching equal to running it alone (TP 1, and TP 2 / 4 over
gloo), and on CUDA the model's attention against the per-span reference and graph-replayed decode
against eager steps. Run: pytest -q test_engine.py"""
import itertools
import os
import random
import subprocess
import sys

import pytest
import torch

import comm
import engine
import fastpath
import llama
import models
import weave
from batch import Batch, Span
import group
from conftest import hf_llama, run_tp
from group import Dist

N_GPUS = torch.cuda.device_count()


# ----------------------------------------------------------------------------- the KV ranges


def test_kv_cache_ranges_never_overlap_and_merge_back():
    """Random allocations and releases against a set of held rows: no row is ever given twice,
    every released row can be given again, and a fully released pool is one range again."""
    rng, rows = random.Random(0), 500
    cache, held = engine.KVCache(rows), {}
    for _ in range(20_000):
        if held and (rng.random() < 0.5 or len(held) > 40):
            start = rng.choice(list(held))
            cache.release(start, held.pop(start))
        else:
            n = rng.randint(1, 60)
            start = cache.alloc(n)
            taken = set(itertools.chain.from_iterable(range(s, s + k) for s, k in held.items()))
            if start is None:     # refused only when no free range is that long
                assert max((k for _, k in cache.free), default=0) < n
                continue
            assert 0 <= start and start + n <= rows and not taken & set(range(start, start + n))
            held[start] = n
        assert cache.free_rows == rows - sum(held.values())
        assert all(a + n < b for (a, n), (b, _) in zip(cache.free, cache.free[1:]))   # sorted, merged
    for start, n in list(held.items()):
        cache.release(start, n)
    assert cache.free == [(0, rows)]


# ----------------------------------------------------------------------------- the scheduler alone


def drive(prompts, max_seqs, budget, max_new, eos_at=None, rows=10**6, lag=False):
    """Runs the scheduler with fake steps (no model, the engine's own postprocess); returns every
    step, the finish order and the sequences. eos_at[i]: the number of tokens after which prompt i
    stops (else max_new); the stand-in for EOS is token 2. lag: as the engine runs it, each step is
    scheduled before the previous one's tokens are processed."""
    sched = engine.Scheduler(max_seqs, budget, engine.KVCache(rows))
    seqs = [engine.Sequence(i, [7] * n, max_new) for i, n in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    steps, order, flight = [], [], None

    def finish(step):
        tokens = [2 if len(w.seq.out) + 1 == (eos_at or {}).get(w.seq.index, -1) else 1 for w in step]
        order.extend(s.index for s in sched.postprocess(step, tokens, {2}, 0.0)[1])
    while sched or flight:
        step = sched.schedule() if sched else []
        steps.append([(w.seq.index, w.seq.row, w.start, w.n) for w in step])
        assert (step or flight) and sum(w.n for w in step) <= budget
        ranges = sorted((s.row, s.row + s.need) for s in sched.running)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), "two live sequences share cache rows"
        # Every token of the step exists: a prompt chunk, or the sequence's next token (sampled by the
        # step in flight when lagging).
        coming = {v.seq for v in flight or [] if v.samples}
        assert all(w.start + w.n <= len(w.seq.prompt) or
                   (w.n == 1 and w.start - len(w.seq.prompt) + 1 == len(w.seq.out) + (w.seq in coming)) for w in step)
        if not lag:
            finish(step)
        elif flight:
            finish(flight)
        flight = step if lag and step else None
        assert len(steps) < 100_000, "no progress"
    assert sched.cache.free == [(0, rows)], "cache rows leaked"
    return [s for s in steps if s], order, seqs


@pytest.mark.parametrize("lag", [False, True])
@pytest.mark.parametrize("max_seqs,budget", [(1, 1), (2, 3), (4, 16), (8, 8), (3, 100)])
def test_scheduler_budget_ranges_and_chunks(max_seqs, budget, lag):
    rng = random.Random(max_seqs * 1000 + budget)
    prompts = [rng.randint(1, 40) for _ in range(23)]
    eos_at = {i: rng.randint(1, 6) for i in range(0, 23, 3)}
    steps, order, seqs = drive(prompts, max_seqs, budget, max_new=6, eos_at=eos_at, lag=lag)
    assert sorted(order) == list(range(23))                         # everyone finishes
    for step in steps:
        assert len(step) <= max_seqs
        decodes = [i for i, _, start, n in step if start >= prompts[i]]
        assert [i for i, *_ in step][:len(decodes)] == decodes       # decode tokens come first
    # Chunks of each prompt are contiguous and in order, and cover it exactly once.
    for i, n in enumerate(prompts):
        chunks = [(start, k) for step in steps for j, _, start, k in step if j == i and start < n]
        assert [c for c, _ in chunks] == list(itertools.accumulate([0] + [k for _, k in chunks[:-1]]))
        assert sum(k for _, k in chunks) == n
    # Admission is first come, first served: prompts start in input order.
    first = {}
    for t, step in enumerate(steps):
        for i, *_ in step:
            first.setdefault(i, t)
    assert sorted(first, key=lambda i: (first[i], i)) == list(range(23))
    assert all(len(s.out) == eos_at.get(s.index, 6) for s in seqs)


def test_scheduler_waits_for_cache_and_admits_when_it_frees():
    """A pool of 100 rows, prompts needing 30-60 each: at most what fits runs, the next prompt waits
    (no eviction), and is admitted as soon as a finished sequence's rows come back."""
    prompts = [30, 50, 20, 60, 10, 45]
    steps, order, seqs = drive(prompts, max_seqs=6, budget=64, max_new=5, rows=100)
    needs = {s.index: s.need for s in seqs}
    for step in steps:
        assert sum(needs[i] for i, *_ in step) <= 100
    assert sorted(order) == list(range(6))
    first = {i: min(t for t, step in enumerate(steps) if any(j == i for j, *_ in step)) for i in range(6)}
    last = {i: max(t for t, step in enumerate(steps) if any(j == i for j, *_ in step)) for i in range(6)}
    # 34 and 54 rows fit together; the next one (24) waits, first in line, until one of them is done.
    assert {i for i, *_ in steps[0]} == {0, 1} and first[2] == min(last[0], last[1]) + 1


@pytest.mark.parametrize("lag", [False, True])
def test_scheduler_many_prompts_no_leak(lag):
    """10^4 prompts through a small pool: every one finishes, no range is lost or shared."""
    rng = random.Random(3)
    prompts = [rng.randint(1, 30) for _ in range(10_000)]
    eos_at = {i: rng.randint(1, 3) for i in range(0, 10_000, 7)}
    _, order, seqs = drive(prompts, max_seqs=32, budget=64, max_new=3, rows=600, eos_at=eos_at, lag=lag)
    assert sorted(order) == list(range(10_000))
    assert all(len(s.out) == eos_at.get(s.index, 3) for s in seqs)


def test_scheduler_rejects_more_seqs_than_budget():
    with pytest.raises(comm.UserError, match="max_seqs <= max_step_tokens"):
        engine.Scheduler(8, 4, engine.KVCache(10))


def test_buckets():
    assert engine.buckets(1) == [1] and engine.buckets(5) == [1, 2, 4, 5]
    assert engine.buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64] and engine.buckets(40)[-1] == 40


# ----------------------------------------------------------------------------- sampling


def draw(logits, s, ids=None, positions=None):
    B = logits.shape[0]
    ids = torch.arange(B) if ids is None else ids
    return engine.sample(logits, s, ids, torch.zeros(B, dtype=torch.long) if positions is None else positions)


def test_sample_greedy_temperature_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]] * 4000)
    assert draw(logits, engine.Sampling()).eq(1).all()
    # top_p below the largest probability: only the argmax survives.
    assert draw(logits, engine.Sampling(1.0, 0.5)).eq(1).all()
    # Full sampling follows softmax: frequencies within a few standard errors.
    freq = torch.bincount(draw(logits, engine.Sampling(1.0)), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)
    # top_p = 0.9 keeps tokens 1 and 2 (0.84 + 0.11 reaches 0.9), renormalized.
    freq = torch.bincount(draw(logits, engine.Sampling(1.0, 0.9)), minlength=4).float() / 4000
    p = torch.softmax(logits[0], -1) * torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(freq, p / p.sum(), atol=0.03, rtol=0)


@pytest.mark.parametrize("temperature,top_p,expect", [
    (1e-30, 1.0, "argmax"), (1e-45, 1.0, "argmax"), (1e-6, 1e-300, "argmax"), (1.0, 1e-300, "argmax"),
    (1e30, 1.0, "uniform"), (1e30, 1e-9, "any"), (0.5, 1 - 1e-9, "sampled"), (5.0, 0.999, "sampled")])
def test_sample_stays_a_distribution_at_extreme_settings(temperature, top_p, expect):
    """Legal but extreme settings: tiny temperatures and top-p pick the argmax, a huge temperature
    spreads over every token; never an out-of-range id, never a constant fallback."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 50, generator=g) * 3
    got = draw(logits, engine.Sampling(temperature, top_p))
    assert got.min() >= 0 and got.max() < 50
    if expect == "argmax":
        assert torch.equal(got, logits.argmax(-1))
    elif expect == "uniform":
        assert torch.bincount(got, minlength=50).min() > 0          # every token drawn
    elif expect == "sampled":
        assert (got != logits.argmax(-1)).any() and len(got.unique()) > 10


def test_sample_depends_on_seed_sequence_and_position_only():
    """A row's draw is fixed by (seed, sequence id, position): the same in any batch, any order."""
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1))
    s = engine.Sampling(1.0, 0.95, seed=7)
    ids, pos = torch.randperm(64) + 100, torch.randint(0, 5000, (64,))
    whole = draw(logits, s, ids, pos)
    perm = torch.randperm(64)
    assert torch.equal(draw(logits[perm], s, ids[perm], pos[perm]), whole[perm])
    assert torch.equal(draw(logits[:5], s, ids[:5], pos[:5]), whole[:5])
    assert not torch.equal(draw(logits, engine.Sampling(1.0, 0.95, seed=8), ids, pos), whole)
    assert not torch.equal(draw(logits, s, ids, pos + 1), whole)


# ----------------------------------------------------------------------------- served == alone

PROMPT_LENS = [1, 5, 37, 12, 70, 3, 2, 26, 9, 41]     # some longer than the smaller budgets
MAX_NEW = 7


def prompts_for(vocab: int):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def serve(path, d, dtype, max_seqs, budget, prompts, eos=(), weave_mode="on", backend="auto", graphs="off",
          max_new=MAX_NEW, sampling=engine.Sampling()):
    """{prompt index: (tokens, error)} from engine.LLM, the weave splitting every step of 16+ tokens."""
    with engine.LLM(path, dist=d, dtype=dtype, comm=backend, weave=weave_mode, graphs=graphs,
                    tuning=weave.Tuning(threshold=16), max_seqs=max_seqs, max_step_tokens=budget) as llm:
        llm.eos = set(eos)
        return {s.index: (s.out, s.error) for s in llm.generate(prompts, max_new, sampling.temperature,
                                                                 sampling.top_p, sampling.seed)}


# (max_seqs, budget): one sequence at a time; steps of one token; small budgets that chunk every
# prompt and split mixed steps (threshold 16); a budget that takes everything at once.
CONFIGS = [(1, 128), (1, 1), (3, 8), (4, 16), (10, 40), (10, 256)]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return hf_llama(tmp_path_factory.mktemp("llama"), num_hidden_layers=2)[0]


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """Heads of 128 dimensions, 4 to a KV head: the shape the decode attention kernel serves."""
    return hf_llama(tmp_path_factory.mktemp("wide"), num_hidden_layers=2, hidden_size=512, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=128, intermediate_size=128)[0]


@pytest.fixture(scope="module")
def alone(small_ckpt):
    """Each prompt run by itself (one sequence, its whole prompt in one step); an EOS id chosen to
    end prompt 2 after three tokens."""
    prompts = prompts_for(203)
    ref = {i: serve(small_ckpt, Dist(), torch.float32, 1, 128, [p], weave_mode="off")[0][0]
           for i, p in enumerate(prompts)}
    eos = {ref[2][2]}
    with_eos = {i: serve(small_ckpt, Dist(), torch.float32, 1, 128, [p], eos, weave_mode="off")[0][0]
                for i, p in enumerate(prompts)}
    assert len(with_eos[2]) == 3 and any(len(v) == MAX_NEW for v in with_eos.values())
    return prompts, eos, with_eos


@pytest.mark.parametrize("max_seqs,budget", CONFIGS)
def test_served_tokens_equal_alone_tp1(small_ckpt, alone, max_seqs, budget):
    prompts, eos, want = alone
    got = serve(small_ckpt, Dist(), torch.float32, max_seqs, budget, prompts, eos)
    assert {i: out for i, (out, _) in got.items()} == want


def test_sampled_tokens_do_not_depend_on_the_batch(small_ckpt, alone):
    """With sampling, a prompt's tokens depend on the seed and its index alone: the same at any
    max_seqs and budget (one generator shared by the batch made them depend on what ran beside)."""
    prompts = alone[0]
    s = engine.Sampling(1.0, 0.9, seed=11)
    runs = [serve(small_ckpt, Dist(), torch.float32, m, b, prompts, sampling=s) for m, b in [(1, 128), (4, 16),
                                                                                                   (10, 40)]]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] != serve(small_ckpt, Dist(), torch.float32, 4, 16, prompts,
                            sampling=engine.Sampling(1.0, 0.9, seed=12))


def test_prompt_errors_do_not_sink_the_others(small_ckpt, alone):
    prompts, eos, want = alone
    too_long = [5] * 600          # the test model's context is 512
    got = serve(small_ckpt, Dist(), torch.float32, 4, 16,
                [prompts[0], too_long, [], prompts[1], [3, 203, 4], [-1, 5]], eos)    # the test vocabulary: 203
    assert "exceeds the model's context of 512" in got[1][1] and "no tokens" in got[2][1]
    assert "token id 203, outside the model's vocabulary of 203" in got[4][1]
    assert "token id -1, outside" in got[5][1]
    assert got[0] == (want[0], None) and got[3] == (want[1], None)


def test_pool_follows_lengths_not_the_longest(small_ckpt):
    """The pool holds what max_seqs sequences can use at once, and a long prompt takes only its own
    rows: beside it, the short ones still run max_seqs at a time."""
    with engine.LLM(small_ckpt, dist=Dist(), max_seqs=8, max_step_tokens=64) as llm:
        prompts = [[3] * 400] + [[4] * 10] * 40
        llm.prepare(prompts, 4)
        assert llm.engine.rows == 403 + 7 * 13           # the 8 largest needs: 400 + 3 and 7 x (10 + 3)
        running = []
        done = list(llm.generate(prompts, 4, on_step=lambda step, s: running.append(len(step))))
        assert len(done) == 41 and all(s.error is None for s in done) and max(running) == 8


def serve_config(d, path, prompts, eos, max_seqs, budget):
    """serve() at this rank (a job for run_tp)."""
    return serve(path, d, torch.float32, max_seqs, budget, prompts, eos)


TP_CONFIGS = {2: (3, 8), 4: (10, 40)}     # TP size -> (max_seqs, budget)


def test_served_tokens_equal_alone_tp_gloo(small_ckpt, alone, tmp_path):
    """Serving at TP 2 and 4 over gloo, the weave splitting mixed steps: every prompt's tokens as alone."""
    prompts, eos, want = alone
    got = run_tp({world: [(serve_config, (small_ckpt, prompts, eos, *config))] for world, config in TP_CONFIGS.items()},
                 tmp_path)
    for world in TP_CONFIGS:
        assert {i: out for i, (out, _) in got[world][0].items()} == want, world


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(N_GPUS < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("nh,nkv,hd", [(32, 8, 128), (8, 8, 64), (6, 1, 128)])
def test_cuda_one_call_attention_equals_per_span(nh, nkv, hd, fast):
    """The model's attention over the cache against the per-span reference (SDPA one span at a
    time), for a mix of decode tokens, first chunks and chunks after a prefix, odd lengths, ranges in
    any order; and each half of a split step (the straddler's B part sees A's keys); and a long span
    alone, fresh and after a prefix. Plain (FlashAttention's variable-length calls) and with the fast
    path (the decode kernel where the heads fit it, cuDNN for the long span alone)."""
    g = torch.Generator("cuda").manual_seed(nh + hd)
    cfg = llama.Config(hidden=nh * hd, n_heads=nh, n_kv_heads=nkv, head_dim=hd, intermediate=8, vocab=8,
                       n_layers=1, max_positions=20000)
    model = models.build(llama.Transformer, cfg, Dist(device=torch.device("cuda")), torch.bfloat16)
    if fast and not fastpath.enable(model):
        pytest.skip("the fast path's kernels cannot be built here")
    attn = model.layers[0].attn
    rows = 40000
    attn.k_cache, attn.v_cache = (torch.randn(rows, nkv, hd, generator=g, device="cuda").bfloat16() for _ in range(2))
    mixes = [[Span(9000, 100, 1), Span(50, 7, 1), Span(3000, 0, 1), Span(12000, 513, 1), Span(15000, 0, 37),
              Span(500, 200, 64), Span(7000, 1000, 300), Span(100, 0, 129), Span(17000, 40, 2)],
             [Span(100 * i, 7 * i, 1) for i in range(1, 40)],         # decode only
             [Span(20000, 0, 5000)], [Span(20000, 3000, 4500)]]      # alone and long: cuDNN
    for spans in mixes:
        T = sum(s.n for s in spans)
        for split in (None, T // 2 + 3):
            batch = Batch.make(spans, [0] * T, "cuda", split_at=split)
            q = torch.randn(T, nh, hd, generator=g, device="cuda").bfloat16()
            for half, lo in zip(batch.halves or [batch], [0, split or 0]):
                got = attn.attend(q[lo:lo + half.T], half).float()
                want = llama.attend_reference(q[lo:lo + half.T].float(), attn.k_cache.float(), attn.v_cache.float(),
                                              half)
                err = ((got - want).norm() / want.norm()).item()
                assert err < 1e-2, (spans[:2], split, err)


@pytest.mark.skipif(N_GPUS < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("ckpt", ["small_ckpt", "wide_ckpt"])
def test_cuda_graph_decode_equals_eager(ckpt, alone, request):
    """bf16 on one GPU: decode steps replayed from graphs give the tokens eager steps give (graphs
    pad the batch to their bucket: the decode kernel's output must not depend on it)."""
    prompts, eos, _ = alone
    path, d = request.getfixturevalue(ckpt), Dist(device=torch.device("cuda", 0))
    eager = serve(path, d, torch.bfloat16, 4, 16, prompts, eos, graphs="off", max_new=20)
    graphs = serve(path, d, torch.bfloat16, 4, 16, prompts, eos, graphs="on", max_new=20)
    assert graphs == eager


@pytest.mark.skipif(N_GPUS < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("ckpt", ["small_ckpt", "wide_ckpt"])
def test_cuda_attention_matches_cpu(ckpt, request):
    """The CUDA paths against the CPU ones through a mixed step (decode rows, a chunk after a prefix,
    a fresh prompt), in fp32 on the CPU vs bf16 on the GPU."""
    logits = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        d = Dist(device=torch.device(device))
        model = models.load(request.getfixturevalue(ckpt), d, dtype)
        model.allocate_cache(4 * 64)
        w = weave.Weaver(model, comm.make_comm("auto", d, model.cfg.hidden, 64, dtype), "off")
        g = torch.Generator().manual_seed(1)
        toks = lambda n: torch.randint(0, 203, (n,), generator=g).tolist()  # noqa: E731
        w(w.batch([Span(0, 0, 20), Span(64, 0, 9), Span(128, 0, 12)], toks(41)))
        mixed = [Span(0, 20, 1), Span(64, 9, 1), Span(128, 12, 6), Span(192, 0, 11)]
        logits.append(w(w.batch(mixed, toks(19))).float().cpu())
    cpu, cuda = logits
    assert (cuda - cpu).norm() / cpu.norm() < 2e-2


def serve_graphs_and_eager(d, path, prompts, eos, backend):
    """(tokens with decode from CUDA graphs, tokens with eager decode), bf16 on the GPUs (a run_tp job)."""
    run = lambda graphs: serve(path, d, torch.bfloat16, 4, 16, prompts, eos, backend=backend, graphs=graphs,  # noqa: E731
                               max_new=20)
    return run("on"), run("off")


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


# ----------------------------------------------------------------------------- the API's boundary


@pytest.fixture(scope="module")
def demo_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "demo"
    models.make_demo(str(path))
    with engine.LLM(str(path), dist=Dist(), max_seqs=4, max_step_tokens=64) as llm:
        yield llm


def test_one_string_is_one_prompt(demo_llm):
    done = list(demo_llm.generate("The quick brown fox", max_new_tokens=3))
    assert len(done) == 1 and done[0].index == 0 and len(done[0].out) == 3 and done[0].finish == "length"


@pytest.mark.parametrize("call,says", [
    (lambda llm: llm.generate(["hi"], max_new_tokens="5"), "max_new_tokens must be an integer >= 1, got '5'"),
    (lambda llm: llm.generate(["hi"], max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (lambda llm: llm.generate(["hi"], max_new_tokens=True), "max_new_tokens must be an integer >= 1, got True"),
    (lambda llm: llm.generate(["hi"], temperature="hot"), "temperature must be a number >= 0 (0 = greedy), got 'hot'"),
    (lambda llm: llm.generate(["hi"], temperature=float("nan")), "temperature must be a number >= 0"),
    (lambda llm: llm.generate(["hi"], top_p=0), "top_p must be a number in (0, 1]"),
    (lambda llm: llm.generate(["hi"], seed=1.5), "seed must be an integer, got 1.5"),
    (lambda llm: llm.generate(["hi"], chat="yes"), "chat must be True or False"),
    (lambda llm: llm.generate(["hi"], on_token=3), "on_token must be a function or None"),
    (lambda llm: llm.generate([1, 2, 3]), "prompt 0 is 1: a prompt is a string or a list of token ids; token ids "
                                          "go in a list of lists, e.g. [[1, 2, 3]]"),
    (lambda llm: llm.generate(None), "prompts must be a list of strings or of token-id lists, got a NoneType"),
    (lambda llm: llm.generate(["ok", [1, "x"]]), "prompt 1 is [1, 'x']"),
    (lambda llm: llm.prepare(["hi"], max_new_tokens=-1), "max_new_tokens must be an integer >= 1, got -1"),
])
def test_bad_arguments_fail_at_the_call(demo_llm, call, says):
    """Checked when generate is called, not deep inside the first step, with the option's name."""
    with pytest.raises(engine.UserError) as e:
        call(demo_llm)
    assert says in str(e.value)


@pytest.mark.parametrize("kw,says", [
    (dict(max_seqs=0), "max_seqs must be an integer >= 1 or None, got 0"),
    (dict(max_step_tokens="2048"), "max_step_tokens must be an integer >= 1 or None, got '2048'"),
    (dict(memory=2), "memory must be a fraction in (0, 1], got 2"),
    (dict(graphs="yes"), "graphs must be auto or on or off, got 'yes'"),
    (dict(weave=True), "weave must be auto or on or off, got True"),
    (dict(layers=0), "layers must be an integer >= 1 or None, got 0"),
    (dict(dtype="bf16"), "dtype must be a floating-point torch dtype, got 'bf16'"),
    (dict(fast=1), "fast must be True or False, got 1"),
    (dict(tuning=5), "tuning must be a weave.Tuning, the path of a table bench.py tune wrote, or None, got 5"),
    (dict(model=7), "model must be a checkpoint directory, a hub id, a preset name or None, got 7"),
])
def test_bad_options_fail_before_loading(kw, says, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(engine.UserError) as e:
        engine.LLM(**{"model": "llama-3.1-8b", "dist": Dist()} | kw)
    assert says in str(e.value)


def test_default_step_budget(tmp_path):
    """No max_step_tokens: 8192 tokens a step on one GPU (capped by what max_seqs sequences of the
    model's context can bring), 2048 at TP > 1, where the weave splits the paper's 2048-token steps.
    No max_seqs: 256, or the step budget if that is lower (each running sequence decodes a token a step)."""
    path = tmp_path / "demo"
    models.make_demo(str(path))
    assert engine.default_step_budget(1) == 8192 and engine.default_step_budget(2) == engine.default_step_budget(8) == 2048
    with engine.LLM(str(path), dist=Dist()) as llm:
        assert llm.engine.budget == 8192
    with engine.LLM(str(path), dist=Dist(), max_seqs=3) as llm:
        assert llm.engine.budget == 3 * llm.model.cfg.max_positions < 8192
    with engine.LLM(str(path), dist=Dist(), max_step_tokens=100) as llm:
        assert (llm.engine.max_seqs, llm.engine.budget) == (100, 100)


def test_closed_llm_says_so(tmp_path):
    path = tmp_path / "demo"
    models.make_demo(str(path))
    llm = engine.LLM(str(path), dist=Dist(), max_seqs=2, max_step_tokens=16)
    llm.close()
    llm.close()                      # twice: harmless
    with pytest.raises(engine.UserError, match="this LLM is closed; make a new engine.LLM"):
        llm.generate(["hi"])


def test_finish_reason_stop_and_length(small_ckpt, alone):
    """A sequence that meets an end-of-sequence token ends with finish 'stop', one that runs to
    max_new_tokens with 'length' (prompt 2 meets the test's EOS after three tokens)."""
    prompts, eos, want = alone
    with engine.LLM(small_ckpt, dist=Dist(), dtype=torch.float32, max_seqs=4, max_step_tokens=16) as llm:
        llm.eos = set(eos)
        done = {s.index: s for s in llm.generate(prompts[:3], MAX_NEW)}
    assert done[2].finish == "stop" and done[2].out == want[2]
    assert all(done[i].finish == "length" for i in (0, 1) if len(want[i]) == MAX_NEW)


def test_preset_too_large_for_the_host_fails_at_once(monkeypatch):
    """A full-size preset on the CPU: refused in seconds with the size it needs, before any tensor
    is made (the OS would kill the process minutes later)."""
    build = models.build
    monkeypatch.setattr(models, "build", lambda *a: build(*a) if a[2].device.type == "meta" else pytest.fail("built"))
    with pytest.raises(engine.UserError) as e:
        engine.LLM("llama-3.3-70b", dist=Dist())
    assert "llama-3.3-70b needs 262.8 GiB for its weights (float32) on each of 1 rank" in str(e.value)
    assert "use more GPUs" in str(e.value)


def test_sizing_a_model_imports_nothing_heavy():
    """Counting a model's weights builds it on the meta device before anything loads; torch's meta
    arange is Python that imports sympy and more (~1.5 s on a CPU machine, 4-5 s on a GPU machine with
    cold caches). A fresh process: this one may have imported them already."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys, torch, models; from group import Dist; module, cfg = models.config('llama-3.1-8b'); "
            "before = set(sys.modules); models.weight_bytes(module, cfg, Dist(), torch.bfloat16); "
            "print(sorted(m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes', 'torch.distributed.fsdp') "
            "if m in set(sys.modules) - before))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=here,
                       env={**os.environ, "PYTHONPATH": here})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def one_rank_fails(d):
    """A run_tp job: rank 1 alone fails inside agree; every rank gets the same error."""
    def fn():
        if d.rank == 1:
            raise engine.UserError("its shard is unreadable")
        return "loaded"
    try:
        group.agree(d, fn)
    except engine.UserError as e:
        return str(e)
    return "no error"


def test_agree_ends_every_rank_with_one_ranks_error(tmp_path):
    got = run_tp({2: [(one_rank_fails, ())]}, tmp_path)
    assert got[2] == ["rank 1: its shard is unreadable"]
