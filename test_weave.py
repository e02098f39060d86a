"""Correctness of the models and the weave schedule: CPU (gloo) everywhere, CUDA (NCCL, two streams)
where 2+ GPUs are present. Run: pytest -q"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import llama
import weave

HERE = os.path.dirname(os.path.abspath(__file__))
N_GPUS = torch.cuda.device_count()
needs_gpus = lambda n: pytest.mark.skipif(N_GPUS < n, reason=f"needs {n} CUDA GPUs")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


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


def ours(path, d=weave.Dist(), dtype=torch.float32, comm="auto", mode="off", n_slots=4, max_len=128):
    with open(os.path.join(path, "config.json")) as f:
        cfg = llama.Config.from_hf(json.load(f))
    model = llama.load_checkpoint(llama.build(llama.Transformer, cfg, d, dtype), path, log=lambda s: None)
    model.allocate_cache(n_slots, max_len)
    return weave.Weaver(model, weave.make_comm(comm, d, cfg.hidden, 256, dtype), mode)


# A scenario exercising everything the schedule must get right: several sequences, one of a single
# token, a sequence straddling the split, odd token counts, decode, a chunked continuation, T = 1.
# Each step: ([(slot, start, n)], split or None = the Weaver's own choice).
STEPS = [([(0, 0, 38), (1, 0, 1), (2, 0, 22)], 30),     # T=61: seq 0 straddles S=30
         ([(0, 0, 38), (1, 0, 1), (2, 0, 22)], None),
         ([(0, 38, 1), (1, 1, 1), (2, 22, 1)], None),     # decode, all sequences in one call
         ([(0, 39, 5), (2, 23, 2)], 3),                  # chunked continuation straddling S=3
         ([(1, 2, 1)], None)]                            # a single token


def step_tokens(i, seqs):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(0, 203, (sum(n for _, _, n in seqs),), generator=g).tolist()


def run_steps(weaver, device, steps=STEPS):
    """Logits of every step. Steps 0 and 1 prefill the same prompts: step 1 starts from fresh slots
    (the cache rows are rewritten), so each step stands alone."""
    out = []
    for i, (seqs, split) in enumerate(steps):
        batch = weave.Batch.make(seqs, step_tokens(i if i != 1 else 0, seqs), device)
        out.append(weaver(batch, split=split).float().cpu())
    return out


# ----------------------------------------------------------------------------- vs transformers


@pytest.mark.parametrize("kw", [dict(rope_scaling=LLAMA3_ROPE), dict(num_key_value_heads=8),
                                dict(num_key_value_heads=2, tie_word_embeddings=True),
                                dict(num_key_value_heads=1, rope_theta=500000.0)],
                         ids=["gqa2-llama3rope", "mha", "gqa4-tied", "mqa"])
def test_llama_matches_transformers(tmp_path, kw):
    path, hf = hf_llama(tmp_path, **kw)
    weaver = ours(path, mode="on")
    prompts = [torch.randint(0, 203, (n,)) for n in (17, 5, 30)]
    with torch.no_grad():
        batch = weave.Batch.make([(i, 0, len(p)) for i, p in enumerate(prompts)], torch.cat(prompts).tolist(), "cpu")
        got = weaver(batch, split=20)                                   # prefill, seq 1 straddles
        want = torch.stack([hf(p[None]).logits[0, -1] for p in prompts])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        for step in range(3):                                          # incremental decode
            nxt = got.argmax(-1)
            batch = weave.Batch.make([(i, len(p), 1) for i, p in enumerate(prompts)], nxt.tolist(), "cpu")
            prompts = [torch.cat([p, t[None]]) for p, t in zip(prompts, nxt)]
            got = weaver(batch)
            want = torch.stack([hf(p[None]).logits[0, -1] for p in prompts])
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- tensor parallel


def _tp_worker(rank, world, port, path, device, dtype, comm, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    d = weave.init_distributed(device)
    try:
        weaver = ours(path, d, dtype, comm, mode)
        logits = run_steps(weaver, d.device)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, logits)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        torch.distributed.destroy_process_group()


def tp_logits(path, world, tmp, device="cpu", dtype=torch.float32, comm="auto", mode="on"):
    """Logits of every step at TP `world` (spawned processes); asserts all ranks agree bitwise."""
    out = os.path.join(tmp, f"logits-{world}-{comm}-{mode}.pt")
    if world == 1:
        torch.save([run_steps(ours(path, weave.Dist(device=torch.device(device)), dtype, comm, mode), device)], out)
    else:
        mp.spawn(_tp_worker, (world, free_port(), path, device, dtype, comm, mode, out), nprocs=world)
    ranks = torch.load(out)
    for r in ranks[1:]:
        for a, b in zip(ranks[0], r):
            assert torch.equal(a, b), "ranks disagree"
    return ranks[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return hf_llama(tmp_path_factory.mktemp("llama"), rope_scaling=LLAMA3_ROPE)[0]


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    return tp_logits(ckpt, 1, tmp_path_factory.mktemp("ref"), mode="off")


@pytest.mark.parametrize("world,mode", [(2, "on"), (2, "off"), (4, "on")])
def test_tp_gloo_matches_tp1(ckpt, reference, tmp_path, world, mode):
    for got, want in zip(tp_logits(ckpt, world, tmp_path, mode=mode), reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_weave_on_matches_off_tp1(ckpt, reference, tmp_path):
    for got, want in zip(tp_logits(ckpt, 1, tmp_path, mode="on"), reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_gpus(2)
@pytest.mark.parametrize("comm,mode", [("nccl", "off"), ("nccl", "on")])
def test_tp_nccl_matches_tp1_cuda(ckpt, tmp_path, comm, mode):
    """bf16 on GPUs: TP 2 with NCCL (weave on: two streams) against TP 1 on one GPU."""
    want = tp_logits(ckpt, 1, tmp_path, "cuda", torch.bfloat16, mode="off")
    got = tp_logits(ckpt, 2, tmp_path, "cuda", torch.bfloat16, comm, mode)
    for g, w in zip(got, want):
        assert (g - w).norm() / w.norm() < 2e-2


# ----------------------------------------------------------------------------- the split


def test_split_straddles_and_keeps_order():
    b = weave.Batch.make([(3, 10, 5), (0, 0, 4), (7, 2, 3)], list(range(12)), "cpu")
    a, c = b.split(7)
    assert a.seqs == [(3, 10, 5), (0, 0, 2)] and c.seqs == [(0, 2, 2), (7, 2, 3)]
    assert a.positions.tolist() == [10, 11, 12, 13, 14, 0, 1] and c.positions.tolist() == [2, 3, 2, 3, 4]
    assert a.tokens.tolist() + c.tokens.tolist() == list(range(12))
    assert b.last_rows == [4, 8, 11] and c.slots.tolist() == [0, 0, 7, 7, 7]


@pytest.mark.parametrize("T", [256, 1000, 1024, 3000, 4096, 8192, 16384, 16383])
def test_wave_split_is_near_half_on_tiles(T):
    widths = [2560, 8192, 14336, 8192]      # Llama-70B at TP 4
    S = weave.wave_split(T, widths)
    assert S % weave.GEMM_TILE_M == 0 and 0 < S < T and abs(S - T / 2) <= 2 * weave.GEMM_TILE_M + 64
    cost = lambda s: sum(weave.gemm_waves(s, n, 132) + weave.gemm_waves(T - s, n, 132) for n in widths)
    assert cost(S) <= cost(round(T / 2 / 128) * 128)


def test_split_threshold_and_tuning(tmp_path):
    w = weave.Weaver.__new__(weave.Weaver)
    w.model, w.n_sms = type("M", (), {"gemm_widths": [1024]})(), 132
    w.mode, w.tuning = "auto", weave.Tuning(threshold=1024)
    assert w.split_point(1023) is None and w.split_point(1024) == 512
    w.mode = "on"
    assert w.split_point(1) is None and w.split_point(2) == 1 and w.split_point(5) == 2
    w.mode = "off"
    assert w.split_point(100000) is None
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"threshold": 2048, "table": {"4096": {"offset": 128, "attn_ctas": 2, "mlp_ctas": 8}}}))
    t = weave.Tuning.load(str(path))
    assert t.threshold == 2048 and t.split(5000, [1024], 132) == 2560 + 128 and t.ctas(3000, "mlp") == 8
    assert weave.Tuning.load(str(tmp_path / "absent.json")) == weave.Tuning()
    assert [weave.padded(n, 4) for n in (1, 4, 5, 61)] == [4, 4, 8, 64]


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
        json.dump({"weight_map": {k: "model-00002-of-00002.safetensors" for k in tensors}}, f)
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        ours(path)
    with pytest.raises(ValueError, match="does not divide|must divide"):
        llama.Transformer(llama.Config(n_heads=8, n_kv_heads=4, hidden=64, head_dim=8, intermediate=96, vocab=10,
                                       n_layers=1), weave.Dist(0, 3))
    with pytest.raises(ValueError, match="context"):
        llama.Transformer(llama.Config(hidden=64, head_dim=8, n_heads=8, intermediate=96, vocab=10, n_layers=1,
                                       max_positions=16), weave.Dist()).allocate_cache(1, 17)


def test_config_forms():
    hub = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8,
               vocab_size=10, rope_theta=1e4, rope_scaling=LLAMA3_ROPE, torch_dtype="bfloat16", eos_token_id=[1, 2])
    v5 = {k: v for k, v in hub.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5 |= dict(rope_parameters=LLAMA3_ROPE | {"rope_theta": 1e4}, dtype="bfloat16")
    assert llama.Config.from_hf(hub) == llama.Config.from_hf(v5)
    c = llama.Config.from_hf(llama.PRESETS["llama-3.3-70b"])
    assert (c.hidden, c.n_layers, c.n_kv_heads, c.eos_ids, c.rope_scaling["factor"]) == (8192, 80, 8, (128001, 128008, 128009), 8.0)


def run_cli(*args, nproc=1, cache=None, device="cpu"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if cache:
        env["XDG_CACHE_HOME"] = str(cache)
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port",
                str(free_port())] if nproc > 1 else [sys.executable]
    return subprocess.run(launcher + [os.path.join(HERE, "run.py"), "--device", device, *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/dir"], "no such directory"),
    (["--prompt", " "], "empty prompt"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompt", "fox " * 2000], "exceeds the model's context"),
])
def test_cli_errors(tmp_path, args, message):
    r = run_cli(*args, cache=tmp_path)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_cli_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = run_cli("--model", str(tmp_path))
    assert r.returncode == 1 and "'gpt2' is not supported; supported: llama" in r.stderr


def demo_tokens(cache, nproc, weave_mode, device="cpu"):
    r = run_cli("--json", "--max-new-tokens", "12", "--weave", weave_mode, "--prompt", "The quick brown fox",
                "--prompt", "Once upon a time there was", nproc=nproc, cache=cache, device=device)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and all(len(x["token_ids"]) >= 1 and x["ttft_s"] > 0 for x in lines)
    return [x["token_ids"] for x in lines]


def test_demo_same_tokens_weave_and_tp(tmp_path):
    want = demo_tokens(tmp_path, 1, "off")
    assert os.path.exists(tmp_path / "tokenweave" / "demo-llama-v1" / "tokenizer.json")
    for nproc, mode in [(1, "on"), (2, "on"), (2, "off")]:
        assert demo_tokens(tmp_path, nproc, mode) == want, (nproc, mode)


@needs_gpus(2)
def test_demo_same_tokens_cuda(tmp_path):
    want = demo_tokens(tmp_path, 1, "off", "cuda")
    for nproc, mode in [(2, "on"), (2, "off")]:
        assert demo_tokens(tmp_path, nproc, mode, "cuda") == want, (nproc, mode)
