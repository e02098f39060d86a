"""Correctness of the models and the weave schedule: CPU (gloo) everywhere, CUDA (NCCL, two streams)
where 2+ GPUs are present. Run: pytest -q"""
import dataclasses
import json
import os

import pytest
import torch

import comm
import group
import llama
import mixtral
import models
import qwen
import weave
from batch import Batch, Span
from conftest import LLAMA3_ROPE, hf_family, hf_llama, run_tp

N_GPUS = torch.cuda.device_count()
needs_gpus = lambda n: pytest.mark.skipif(N_GPUS < n, reason=f"needs {n} CUDA GPUs")  # noqa: E731
ROWS = 128   # cache rows per sequence in these tests (sequence i from row i * ROWS)


def ours(path, d=group.Dist(), dtype=torch.float32, backend="auto", mode="off", n_seqs=4):
    model = models.load(path, d, dtype)
    model.allocate_cache(n_seqs * ROWS)
    return weave.Weaver(model, comm.make_comm(backend, d, model.cfg.hidden, 256, dtype), mode)


def spans(*seqs):
    """Spans of (sequence, start, n): sequence i's rows from i * ROWS."""
    return [Span(i * ROWS, start, n) for i, start, n in seqs]


# A scenario exercising everything the schedule must get right: several sequences, one of a single
# token, a sequence straddling the split, odd token counts, decode, a chunked continuation, T = 1.
# Each step: (spans, split or None = the Weaver's own choice).
STEPS = [(spans((0, 0, 38), (1, 0, 1), (2, 0, 22)), 30),     # T=61: seq 0 straddles S=30
         (spans((0, 0, 38), (1, 0, 1), (2, 0, 22)), None),
         (spans((0, 38, 1), (1, 1, 1), (2, 22, 1)), None),     # decode, all sequences in one call
         (spans((0, 39, 5), (2, 23, 2)), 3),                  # chunked continuation straddling S=3
         (spans((1, 2, 1)), None)]                            # a single token


def batch(weaver, seqs, tokens, split_at=None):
    """A step laid out where the test splits it (split_at), or where the Weaver would."""
    split_at = weaver.split_at(sum(s.n for s in seqs)) if split_at is None else split_at
    return Batch.make(seqs, tokens, weaver.comm.d.device, split_at=split_at)


def step_tokens(i, seqs):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(0, 203, (sum(s.n for s in seqs),), generator=g).tolist()


def run_steps(weaver, steps=STEPS):
    """Logits of every step. Steps 0 and 1 prefill the same prompts: step 1 starts from fresh rows
    (the cache rows are rewritten), so each step stands alone."""
    return [weaver(batch(weaver, seqs, step_tokens(i if i != 1 else 0, seqs), split)).float().cpu()
            for i, (seqs, split) in enumerate(steps)]


# ----------------------------------------------------------------------------- vs transformers


def assert_matches_hf(path, hf):
    """Our logits against transformers' (fp32): a prefill of 3 prompts split at 20 (one straddles
    the split), then 3 incremental decode steps."""
    weaver = ours(path, mode="on")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 203, (n,), generator=g) for n in (17, 5, 30)]
    with torch.no_grad():
        got = weaver(batch(weaver, spans(*[(i, 0, len(p)) for i, p in enumerate(prompts)]), torch.cat(prompts).tolist(),
                           split_at=20))
        want = torch.stack([hf(p[None]).logits[0, -1] for p in prompts])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        for step in range(3):
            nxt = got.argmax(-1)
            step = weaver.batch(spans(*[(i, len(p), 1) for i, p in enumerate(prompts)]), nxt.tolist())
            prompts = [torch.cat([p, t[None]]) for p, t in zip(prompts, nxt)]
            got = weaver(step)
            want = torch.stack([hf(p[None]).logits[0, -1] for p in prompts])
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(rope_scaling=LLAMA3_ROPE), dict(num_key_value_heads=8),
                                dict(num_key_value_heads=2, tie_word_embeddings=True),
                                dict(num_key_value_heads=1, rope_theta=500000.0)],
                         ids=["gqa2-llama3rope", "mha", "gqa4-tied", "mqa"])
def test_llama_matches_transformers(tmp_path, kw):
    assert_matches_hf(*hf_llama(tmp_path, **kw))


# ----------------------------------------------------------------------------- tensor parallel


def checkpoints_logits(d, path, dtype=torch.float32, backend="auto", mode="on"):
    """run_steps' logits of one checkpoint, or of a list of them back to back."""
    paths = [path] if isinstance(path, str) else path
    return [x for p in paths for x in run_steps(ours(p, d, dtype, backend, mode))]


def tp_logits(path, world, tmp, device="cpu", dtype=torch.float32, backend="auto", mode="on"):
    """checkpoints_logits at TP `world`: in this process at TP 1, else in one launch of `world`
    processes whose ranks must agree bitwise."""
    if world == 1:
        return checkpoints_logits(group.Dist(device=torch.device(device)), path, dtype, backend, mode)
    return run_tp({world: [(checkpoints_logits, (path, dtype, backend, mode))]}, tmp, device)[world][0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return hf_llama(tmp_path_factory.mktemp("llama"), rope_scaling=LLAMA3_ROPE)[0]


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    return tp_logits(ckpt, 1, tmp_path_factory.mktemp("ref"), mode="off")


def test_tp_gloo_matches_tp1(ckpt, reference, fam_ckpts, tmp_path):
    """STEPS' logits at TP 2 and 4 over gloo against TP 1 with weave off: Llama with weave on, and off
    at TP 2; Qwen2 and Mixtral back to back with weave on. One launch per TP size for all of them."""
    ckpts = {"llama": (ckpt, reference),
             "families": ([fam_ckpts[f][0] for f in FAMILIES], [x for f in FAMILIES for x in fam_ckpts[f][2]])}
    cases = {2: [("llama", "on"), ("llama", "off"), ("families", "on")], 4: [("llama", "on"), ("families", "on")]}
    got = run_tp({world: [(checkpoints_logits, (ckpts[what][0], torch.float32, "auto", mode)) for what, mode in c]
                  for world, c in cases.items()}, tmp_path)
    for world, c in cases.items():
        for (what, mode), logits in zip(c, got[world]):
            want = ckpts[what][1]
            assert len(logits) == len(want)
            for step, (g, w) in enumerate(zip(logits, want)):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"TP {world}, {what}, weave {mode}, step {step}: {m}")


def test_weave_on_matches_off_tp1(ckpt, reference, tmp_path):
    for got, want in zip(tp_logits(ckpt, 1, tmp_path, mode="on"), reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


CUDA_CASES = [(1, "auto", "on"), (2, "nccl", "off"), (2, "nccl", "on"), (2, "fused", "off"), (2, "fused", "on"),
              (4, "fused", "on"), (4, "nccl", "on")]


@pytest.mark.skipif(N_GPUS < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("world,backend,mode", CUDA_CASES)
def test_tp_cuda_matches_tp1(ckpt, tmp_path, world, backend, mode):
    assert_cuda_tp_matches_tp1(ckpt, tmp_path, world, backend, mode)


def assert_cuda_tp_matches_tp1(path, tmp, world, backend, mode):
    """bf16 on GPUs: TP 2/4 with NCCL or the fused kernel (weave on: two streams) against TP 1, and
    TP 1 split (its halves' comm points on the side stream) against TP 1 whole."""
    if N_GPUS < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    want = tp_logits(path, 1, tmp, "cuda", torch.bfloat16, mode="off")
    got = tp_logits(path, world, tmp, "cuda", torch.bfloat16, backend, mode)
    for g, w in zip(got, want):
        assert (g - w).norm() / w.norm() < 2e-2


# ----------------------------------------------------------------------------- the split


def test_split_straddles_and_keeps_order():
    sp = [Span(300, 10, 5), Span(0, 0, 4), Span(700, 2, 3)]
    whole = Batch.make(sp, list(range(12)), "cpu", seq_ids=[5, 6, 7])
    assert whole.last_rows.tolist() == [4, 8, 11] and whole.cu_q.tolist() == [0, 5, 9, 12] and whole.max_q == 5
    assert whole.kv_starts.tolist()[:3] == [300, 0, 700] and whole.kv_lens.tolist() == [15, 4, 5]
    b = Batch.make(sp, list(range(12)), "cpu", seq_ids=[5, 6, 7], split_at=7)
    a, c = b.halves
    assert a.spans == [Span(300, 10, 5), Span(0, 0, 2)] and c.spans == [Span(0, 2, 2), Span(700, 2, 3)]
    assert a.positions.tolist() == [10, 11, 12, 13, 14, 0, 1] and c.positions.tolist() == [2, 3, 2, 3, 4]
    assert a.tokens.tolist() + c.tokens.tolist() == list(range(12))
    assert a.kv_rows.tolist() == [310, 311, 312, 313, 314, 0, 1] and c.kv_rows.tolist() == [2, 3, 702, 703, 704]
    # Logits rows: the straddler's last token is in B, so A ends one sequence and B two.
    assert a.last_rows.tolist() == [4] and c.last_rows.tolist() == [1, 4]
    # Each half's attention: its own queries, and the straddler's B part sees A's keys too.
    assert a.cu_q.tolist() == [0, 5, 7] and a.kv_lens.tolist() == [15, 2] and a.max_q == 5
    assert c.cu_q.tolist() == [0, 2, 5] and c.kv_lens.tolist() == [4, 5] and c.kv_starts.tolist()[:2] == [0, 700]
    assert b.seq_ids.tolist() == [5, 6, 7] and b.next_pos.tolist() == [15, 4, 5]
    assert a.seq_ids.tolist() == [5, 6] and c.seq_ids.tolist() == [6, 7]
    with pytest.raises(ValueError, match="split point 12 must fall inside"):
        Batch.make(sp, list(range(12)), "cpu", split_at=12)


@pytest.mark.parametrize("T", [256, 1000, 1024, 3000, 4096, 8192, 16384, 16383, 33920])
@pytest.mark.parametrize("widths", [[2560, 8192, 14336, 8192], [256], [1024, 6144]])   # Llama-70B at TP 4, ...
def test_wave_split_is_near_half_on_tiles(T, widths):
    """The split is on a tile, within one tile of half, and no split point there (every multiple of
    256 tokens, counted here by brute force) needs fewer waves of 256 x 128 tiles on 132 SMs; of
    those that need as few, it is the most even. A step of under two tiles splits at its middle."""
    S = weave.wave_split(T, widths)
    if T < 512:
        assert S == T // 2
        return
    waves = lambda m: sum(-(-(-(-m // 256) * -(-n // 128)) // 132) for n in widths)   # noqa: E731
    cost = lambda s: waves(s) + waves(T - s)   # noqa: E731
    near = [s for s in range(256, T, 256) if abs(s - T / 2) <= 256 + 128]
    assert S % 256 == 0 and 0 < S < T and S in near
    best = min(map(cost, near))
    assert cost(S) == best and abs(S - T / 2) == min(abs(s - T / 2) for s in near if cost(s) == best), (S, best)


def test_split_threshold():
    """auto splits at TP > 1 from the threshold on, never at TP 1; on splits every step of 2+ tokens."""
    cfg = llama.Config(hidden=64, n_heads=8, n_kv_heads=4, head_dim=8, intermediate=96, vocab=10, n_layers=1,
                       max_positions=64)
    for world, mode, tuning, want in [(2, "auto", weave.Tuning(threshold=1024), {1023: None, 1024: 512}),
                                      (1, "auto", weave.Tuning(threshold=1024), {100000: None}),
                                      (2, "on", weave.Tuning(), {1: None, 2: 1, 5: 2}),
                                      (2, "off", weave.Tuning(), {100000: None})]:
        d = group.Dist(0, world)       # rank 0's shards: building them needs no process group
        model = models.build(llama.Transformer, cfg, d, torch.float32)
        w = weave.Weaver(model, comm.LocalComm(d, cfg.hidden, 8, torch.float32), mode, tuning)
        assert {T: w.split_at(T) for T in want} == want, (world, mode)
    assert w.threshold == llama.Transformer.weave_threshold      # the model's, where the table has none
    assert [comm.padded(n, 4) for n in (1, 4, 5, 61)] == [4, 4, 8, 64]


def test_plan_budgets_and_carveout():
    """Which comm point gets which CTA budget, and which stage leaves SMs free, per half."""
    t = weave.Tuning(fuse_ctas=16, attn_ctas=2, mlp_ctas=8)
    kinds = ["embed", "attn", "mlp", "attn", "mlp"]
    assert weave.plan(kinds, 1, t, 4096, 4) == [[weave.StagePlan(16, 0)]] * 5     # whole: nothing overlaps
    p = weave.plan(kinds, 2, t, 4096, 4)
    a, b = [s[0] for s in p], [s[1] for s in p]
    # comm(A, k) runs beside B's stage k, comm(B, k) beside A's stage k + 1 (the embedding counts as
    # attention, and the last comm point overlaps only the LM head: attention's budget).
    assert [s.ctas for s in a] == [2, 2, 8, 2, 8] and [s.ctas for s in b] == [2, 8, 2, 8, 2]
    # Each stage carves out the CTAs of the comm beside it; A's first stage has none beside it.
    assert [s.carveout for s in a] == [0, 2, 8, 2, 8] and [s.carveout for s in b] == [2, 2, 8, 2, 8]
    t.table = {4096: {"attn_ctas": 4, "mlp_ctas": 16, "carveout": False}, 16384: {"attn_ctas": 1}}
    p = weave.plan(kinds, 2, t, 5000, 4)      # the nearest key is 4096
    assert [s[1].ctas for s in p] == [4, 16, 4, 16, 4] and all(s.carveout == 0 for st in p for s in st)
    assert [s[0].ctas for s in weave.plan(kinds, 2, t, 20000, 4)] == [1, 1, 8, 1, 8]   # the rest: defaults
    t.carveout, t.table = False, {}
    assert all(s.carveout == 0 for st in weave.plan(kinds, 2, t, 4096, 4) for s in st)
    t.carveout = True      # one GPU: no comm kernel to leave SMs for, the same CTA budgets
    assert weave.plan(kinds, 2, t, 4096, 1) == [[dataclasses.replace(s, carveout=0) for s in st]
                                                  for st in weave.plan(kinds, 2, t, 4096, 4)]


def test_carve_calls_torch_only_on_a_change(monkeypatch):
    """Streams.carve sets torch's carveout and BLAS choice when the budget changes, not per stage,
    and 0 puts back what torch had before (the setters cost host time; a step with one budget sets
    and unsets once)."""
    calls, state = [], {"carve": None, "blas": "default"}
    monkeypatch.setattr(torch._C, "_get_sm_carveout_experimental", lambda: state["carve"])
    monkeypatch.setattr(torch._C, "_set_sm_carveout_experimental", lambda v: calls.append(("carve", v)))
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library",
                        lambda v=None: state["blas"] if v is None else calls.append(("blas", v)))
    s = weave.Streams(torch.device("cpu"))
    s.cuda = True
    for sms in (0, 4, 4, 4, 8, 8, 0, 0):
        s.carve(sms)
    assert calls == [("carve", 4), ("blas", "cublaslt"), ("carve", 8), ("carve", None), ("blas", "default")]


def test_tuning_files(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"threshold": 2048, "table": {"4096": {"offset": 128, "attn_ctas": 2}}}))
    t = weave.Tuning.load(str(path))
    assert t.threshold == 2048 and t.split_at(5000, [1024], 132) == 2560 + 128 and t.entry(3000)["attn_ctas"] == 2
    # What the tuner saves is what load reads.
    t.save(str(tmp_path / "saved.json"), model="x")
    assert weave.Tuning.load(str(tmp_path / "saved.json")) == t
    # No file, or none set in it: the threshold is the model's (Mixtral's 8192 must reach the Weaver).
    assert weave.Tuning.load(str(tmp_path / "absent.json")).threshold is None
    assert mixtral.Transformer.weave_threshold == 8192
    with pytest.raises(group.UserError, match="absent.json does not exist"):
        weave.Tuning.load(str(tmp_path / "absent.json"), required=True)
    for text, says in [("{not json", "t.json is not a table"), ('{"threshold": "big"}', "threshold is 'big', not an integer"),
                       ('{"table": {"1024": {"carveout": 1}}}', "carveout is 1, not true or false"),
                       ('{"table": {"1k": {}}}', "t.json is not a table")]:
        path.write_text(text)
        with pytest.raises(group.UserError, match=says):
            weave.Tuning.load(str(path))


# ----------------------------------------------------------------------------- loading and errors


def test_loader_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = hf_llama(tmp_path / "ok")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        ours(path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: "model-00002-of-00002.safetensors"
                                  for k in [*tensors, "model.layers.1.mlp.up_proj.weight"]}}, f)
    with pytest.raises(group.UserError, match="model-00002-of-00002.safetensors"):
        ours(path)
    with pytest.raises(ValueError, match="does not divide|must divide"):
        llama.Transformer(llama.Config(n_heads=8, n_kv_heads=4, hidden=64, head_dim=8, intermediate=96, vocab=10,
                                       n_layers=1), group.Dist(0, 3))


def test_config_forms():
    hub = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8,
               vocab_size=10, rope_theta=1e4, rope_scaling=LLAMA3_ROPE, torch_dtype="bfloat16", eos_token_id=[1, 2])
    v5 = {k: v for k, v in hub.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5 |= dict(rope_parameters=LLAMA3_ROPE | {"rope_theta": 1e4}, dtype="bfloat16")
    assert llama.Config.from_hf(hub) == llama.Config.from_hf(v5)
    c = llama.Config.from_hf(models.PRESETS["llama-3.3-70b"])
    assert (c.hidden, c.n_layers, c.n_kv_heads, c.eos_ids, c.rope_scaling["factor"]) == (8192, 80, 8, (128001, 128008, 128009), 8.0)


# ============================================================================= Qwen2.5 and Mixtral
# The same bar for the other two families: transformers' logits, TP over gloo, weave on vs off, the
# CLI; and what only they have: q/k/v biases, sliding windows refused, experts with no tokens.

FAMILIES = ["qwen2", "mixtral"]


@pytest.fixture(scope="module")
def fam_ckpts(tmp_path_factory):
    """family -> (checkpoint path, HF model, TP-1 weave-off logits of STEPS)"""
    out = {}
    for family in FAMILIES:
        path, hf = hf_family(tmp_path_factory.mktemp(family), family)
        out[family] = path, hf, tp_logits(path, 1, tmp_path_factory.mktemp("ref"), mode="off")
    return out


@pytest.fixture(params=FAMILIES)
def fam_ckpt(request, fam_ckpts):
    return fam_ckpts[request.param]


def test_family_matches_transformers(fam_ckpt):
    assert_matches_hf(*fam_ckpt[:2])


def test_mixtral_idle_experts_and_one_expert_takes_all(tmp_path):
    """Every token goes to experts 0 and 1, none to 2 and 3: empty groups and a group of all T."""
    def skew(model):
        # A large constant first feature of every embedding keeps x[:, 0] large and positive in every
        # layer, so router column 0 decides: experts 0 and 1 win everywhere, 2 and 3 never.
        model.model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[0] = 1.0
            layer.mlp.gate.weight[:, 0] = torch.tensor([1.0, 0.9, -2.0, -2.0])
    path, hf = hf_family(tmp_path, "mixtral", edit=skew)
    chosen = []
    for layer in hf.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, args, out: chosen.append(out[2]))
    with torch.no_grad():
        hf(torch.randint(0, 203, (1, 40), generator=torch.Generator().manual_seed(3)))
    assert len(chosen) == 2 and all(c.sort(-1).values.eq(torch.tensor([0, 1])).all() for c in chosen)
    assert_matches_hf(path, hf)


def test_family_weave_on_matches_off_tp1(fam_ckpt, tmp_path):
    for got, want in zip(tp_logits(fam_ckpt[0], 1, tmp_path, mode="on"), fam_ckpt[2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_gpus(2)
@pytest.mark.parametrize("world,backend,mode", [(2, "nccl", "off"), (2, "nccl", "on"), (2, "fused", "on")])
def test_family_tp_cuda_matches_tp1(fam_ckpt, tmp_path, world, backend, mode):
    assert_cuda_tp_matches_tp1(fam_ckpt[0], tmp_path, world, backend, mode)


def test_qwen_rejects_sliding_window(tmp_path):
    from transformers import Qwen2Config
    hub = models.PRESETS["qwen2.5-72b"] | dict(use_sliding_window=True, sliding_window=4096, max_window_layers=70)
    v5 = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2).to_dict()
    layer_types_only = {k: v for k, v in v5.items() if k != "use_sliding_window"}   # sliding per layer
    for c in (hub, v5, layer_types_only):
        with pytest.raises(group.UserError, match="use_sliding_window: true; sliding-window attention is not supported"):
            qwen.Config.from_hf(c)
    (tmp_path / "config.json").write_text(json.dumps(hub))
    with pytest.raises(group.UserError, match=f"{tmp_path / 'config.json'} sets use_sliding_window: true"):
        models.config(str(tmp_path))


def test_family_presets_full_shapes():
    q = qwen.Config.from_hf(models.PRESETS["qwen2.5-72b"])
    assert (q.hidden, q.n_layers, q.n_heads, q.n_kv_heads, q.head_dim, q.intermediate, q.vocab, q.eps, q.rope_theta,
            q.rope_scaling, q.qkv_bias, q.eos_ids, q.max_positions, q.tie_embeddings, q.dtype) == (
        8192, 80, 64, 8, 128, 29568, 152064, 1e-6, 1e6, None, True, (151645,), 32768, False, "bfloat16")
    m = mixtral.Config.from_hf(models.PRESETS["mixtral-8x22b"])
    assert (m.hidden, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.intermediate, m.n_experts, m.top_k, m.vocab,
            m.eps, m.rope_theta, m.eos_ids, m.max_positions, m.tie_embeddings, m.dtype) == (
        6144, 56, 48, 8, 128, 16384, 8, 2, 32768, 1e-5, 1e6, (2,), 65536, False, "bfloat16")
    meta = group.Dist(1, 4, torch.device("meta"))    # full-size shapes at TP 4, no memory
    a = models.build(qwen.Transformer, q, meta, torch.bfloat16).layers[0].attn
    assert a.qkv.weight.shape == (2560, 8192) and a.qkv.bias.shape == (2560,) and a.o.weight.shape == (8192, 2048)
    model = models.build(mixtral.Transformer, m, meta, torch.bfloat16)
    moe = model.layers[0].mlp
    assert moe.router.shape == (8, 6144) and moe.w13.shape == (8, 8192, 6144) and moe.w2.shape == (8, 6144, 4096)
    assert model.weave_threshold == 8192 and model.gemm_widths[2:] == [2 * 4096 * 2, 6144 * 2]
    assert abs(weave.wave_split(8192, model.gemm_widths) - 4096) <= weave.GEMM_TILE_M
