"""Benchmarks and the tuner, on full-size model shapes with random weights (no checkpoint needed).

    torchrun --nproc-per-node 4 bench.py kernel                      # fused kernel vs NCCL, by CTAs
    torchrun --nproc-per-node 4 bench.py model --model llama-3.3-70b --layers 8
    torchrun --nproc-per-node 4 bench.py tune  --model llama-3.3-70b --layers 4   # writes configs/
    python bench.py decode --model llama-3.1-8b                      # ms per decode step vs the HBM floor
    python bench.py serve --model llama-3.1-8b --workloads 1000x1024/128 --budgets 2048,8192
    python bench.py serve --model ~/.cache/tokenweave/demo-llama-v2 --workloads 64x100/16   # CPU, tiny

Every figure is the median of --iters timed runs after warm-up, with the spread (10th-90th
percentile); a run's time is the slowest rank's. Modes run interleaved, round by round, so drift
hits them alike. Prints a Markdown table and, last, one line of JSON.
"""
import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import time

import torch
import torch.distributed as dist

import comm
import engine
import models
import weave

MODES = {"nccl": ("nccl", "off", True),          # baseline: NCCL all-reduce + add/RMSNorm, no split
         "fuse-only": ("fused", "off", True),    # the fused kernel, no split
         "weave": ("fused", "on", True),         # split + overlap + fused kernel
         "weave-nocarve": ("fused", "on", False),  # ... with GEMMs on all SMs beside the comm
         "weave-nccl": ("nccl", "on", True),     # split + overlap with NCCL: what overlap alone gives
         "none": ("none", "off", True)}          # communication removed: the ideal
NVLINK_GBPS = 450   # H100/H200 NVLink 4, per direction


def environment() -> dict:
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                              text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.split("\n")[0] if torch.cuda.is_available() else ""
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "driver": smi,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
            "world": dist.get_world_size() if dist.is_initialized() else 1, "commit": commit or "unknown"}


def timed(fn, iters: int, warmup: int = 3) -> list:
    """ms of each call (the slowest rank's), each started together on all ranks."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        torch.cuda.synchronize()
        barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(slowest_rank(start.elapsed_time(end)))
    return out


def barrier():
    if dist.is_initialized():
        dist.barrier()


def slowest_rank(x: float) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor(x, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def stats(values: list) -> dict:
    s = sorted(values)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]
    return {"median": q(0.5), "p10": q(0.1), "p90": q(0.9), "n": len(s)}


def fmt(st: dict) -> str:
    return f"{st['median']:.3f} ({st['p10']:.3f}-{st['p90']:.3f})"


# ----------------------------------------------------------------------------- models


def build_model(args, d: comm.Dist):
    """A preset (random weights) or a checkpoint directory; bf16 on CUDA, fp32 on the CPU."""
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    return models.load(os.path.expanduser(args.model), d, dtype, layers=args.layers)


def load_tuning(args, model, d):
    return weave.Tuning.load(args.tuning or weave.tuning_path(model.cfg, d.world), model.weave_threshold,
                             required=bool(args.tuning))


def prefill_batch(T: int, n_seqs: int, vocab: int, device, max_len: int) -> weave.Batch:
    """T tokens as n_seqs sequences of (nearly) equal length, each in its own cache slot."""
    lens = [T // n_seqs + (i < T % n_seqs) for i in range(n_seqs)]
    g = torch.Generator().manual_seed(T)
    return weave.Batch.make([(i, 0, n) for i, n in enumerate(lens)],
                            torch.randint(0, vocab, (T,), generator=g).tolist(), device, max_len)


def make_weavers(model, d, modes, max_tokens, tuning) -> dict:
    comms, out = {}, {}
    for m in modes:
        backend, split, carveout = MODES[m]
        if backend not in comms:
            comms[backend] = comm.make_comm(backend, d, model.cfg.hidden, max_tokens, model.norm.weight.dtype)
        out[m] = weave.Weaver(model, comms[backend], split, dataclasses.replace(tuning, carveout=carveout))
    return out


def cmd_model(args, d, env):
    model = build_model(args, d)
    tuning = load_tuning(args, model, d)
    max_T = max(args.tokens)
    model.allocate_cache(max(args.seqs), max_T)
    weavers = make_weavers(model, d, args.modes, max_T, tuning)
    rows = []
    for T in args.tokens:
        for n_seqs in args.seqs:
            batch = prefill_batch(T, n_seqs, model.cfg.vocab, d.device, max_T)
            times = {m: [] for m in args.modes}
            for m in args.modes:                            # warm-up (and autotuning) of every mode
                timed(lambda: weavers[m](batch), 1, warmup=2)
            for _ in range(args.iters):                     # interleaved rounds
                for m in args.modes:
                    times[m] += timed(lambda: weavers[m](batch), 1, warmup=0)
            split = next((weavers[m].split_point(T) for m in args.modes if MODES[m][1] == "on"), None)
            row = {"tokens": T, "seqs": n_seqs, "split": split}
            row |= {m: stats(t) for m, t in times.items()}
            rows.append(row)
            say(d, f"  {T:>6} tokens x {n_seqs} seqs: " + ", ".join(f"{m} {row[m]['median']:.2f}" for m in args.modes))
    if args.trace:
        trace(weavers["weave"] if "weave" in weavers else next(iter(weavers.values())),
              prefill_batch(args.tokens[-1], 1, model.cfg.vocab, d.device, max_T), args.trace, d)
    base = "nccl" if "nccl" in args.modes else args.modes[0]
    head = ["tokens", "seqs"] + [f"{m} ms" for m in args.modes] + [f"{m} speedup" for m in args.modes if m != base]
    if "none" in args.modes:
        head += [f"{m} / none" for m in args.modes if m != "none"]
    table = [head]
    for r in rows:
        med = {m: r[m]["median"] for m in args.modes}
        line = [r["tokens"], r["seqs"]] + [fmt(r[m]) for m in args.modes]
        line += [f"{med[base] / med[m]:.3f}x" for m in args.modes if m != base]
        if "none" in args.modes:
            line += [f"{med[m] / med['none']:.3f}" for m in args.modes if m != "none"]
        table.append(line)
    title = (f"{args.model} ({model.cfg.n_layers} layers), TP {d.world}, prefill latency in ms: median "
             f"(p10-p90) of {args.iters}; speedup over {base}")
    return title, table, rows


def cmd_kernel(args, d, env):
    """The comm point alone: fused (p2p) by CTA count vs NCCL all-reduce (+ add + RMSNorm)."""
    H, max_T = args.hidden, max(args.tokens)
    fused = comm.make_comm("fused", d, H, max_T, torch.bfloat16)
    nccl = comm.make_comm("nccl", d, H, max_T, torch.bfloat16)
    w = torch.ones(H, dtype=torch.bfloat16, device=d.device)
    head = ["tokens", "MB", "NCCL AR", "NCCL AR + norm"] + [f"fused {c} CTAs" for c in args.ctas] + \
           ["best fused vs AR+norm", "best fused busbw GB/s"]
    table, rows = [head], []
    for T in args.tokens:
        n = comm.padded(T, d.world)
        res = {c: c.new_residual(n) for c in (fused, nccl)}
        for c in (fused, nccl):
            c.bufs[0, :n].normal_()
        variants = {"NCCL AR": lambda: dist.all_reduce(nccl.bufs[0, :n]),
                    "NCCL AR + norm": lambda: nccl(0, n, res[nccl], w, 1e-5, 0)}
        variants |= {f"fused {c}": (lambda c=c: fused(0, n, res[fused], w, 1e-5, c)) for c in args.ctas}
        st = {k: stats(timed(lambda: [f() for _ in range(args.repeat)], args.iters)) for k, f in variants.items()}
        st = {k: {**v, "median": v["median"] / args.repeat, "p10": v["p10"] / args.repeat,
                  "p90": v["p90"] / args.repeat} for k, v in st.items()}
        best = min((k for k in st if k.startswith("fused")), key=lambda k: st[k]["median"])
        mb = n * H * 2 / 1e6
        busbw = 2 * (d.world - 1) / d.world * mb / 1e3 / (st[best]["median"] / 1e3)
        rows.append({"tokens": T, "mbytes": mb, **st, "best": best, "busbw_gbps": busbw})
        table.append([T, f"{mb:.0f}"] + [f"{st[k]['median'] * 1e3:.0f}" for k in variants] +
                     [f"{st['NCCL AR + norm']['median'] / st[best]['median']:.2f}x ({best.split()[1]} CTAs)",
                      f"{busbw:.0f} ({100 * busbw / NVLINK_GBPS:.0f}% of {NVLINK_GBPS})"])
        say(d, f"  {T} tokens: best {best} {st[best]['median'] * 1e3:.0f} us, NCCL AR {st['NCCL AR']['median'] * 1e3:.0f} us")
    return f"comm point alone, hidden {H}, TP {d.world}, bf16, in us (median of {args.iters} x {args.repeat} calls)", table, rows


def cmd_tune(args, d, env):
    """Per token count: the split offset, the attention-time and MLP-time CTA budgets, then whether
    the overlapped GEMMs carve out the comm's SMs, by
    coordinate descent (each knob swept with the others held), keeping the fastest."""
    model = build_model(args, d)
    max_T = max(args.tokens)
    model.allocate_cache(1, max_T)
    fused = comm.make_comm("fused", d, model.cfg.hidden, max_T, torch.bfloat16)
    tuning = weave.Tuning()
    weaver, plain = weave.Weaver(model, fused, "on", tuning), weave.Weaver(model, fused, "off", tuning)
    measure = lambda w, b: stats(timed(lambda: w(b), args.iters, warmup=1))["median"]
    table, rows = [["tokens", "offset", "attn CTAs", "mlp CTAs", "carveout", "weave ms", "fuse-only ms", "fuse CTAs"]], []
    fuse_ctas = {}
    for T in args.tokens:
        batch = prefill_batch(T, 1, model.cfg.vocab, d.device, max_T)
        best = {"offset": 0, "attn_ctas": 4, "mlp_ctas": 4}
        tuning.table = {T: best}
        for knob, values in (("offset", [-256, -128, 0, 128, 256]), ("attn_ctas", args.ctas), ("mlp_ctas", args.ctas),
                             ("carveout", [True, False])):
            times = {}
            for v in values:
                tuning.table = {T: best | {knob: v}}
                times[v] = measure(weaver, batch)
            best[knob] = min(times, key=times.get)
        tuning.table = {T: best}
        weave_ms = measure(weaver, batch)
        fuse = {}
        for c in (8, 16, 32):
            tuning.fuse_ctas = c
            fuse[c] = measure(plain, batch)
        fuse_ctas[T] = min(fuse, key=fuse.get)
        rows.append({"tokens": T, **best, "weave_ms": weave_ms, "fuse_only_ms": fuse[fuse_ctas[T]], "fuse_ctas": fuse_ctas[T]})
        table.append([T, best["offset"], best["attn_ctas"], best["mlp_ctas"], best["carveout"], f"{weave_ms:.3f}",
                      f"{fuse[fuse_ctas[T]]:.3f}", fuse_ctas[T]])
        say(d, f"  {T}: {best}, weave {weave_ms:.2f} ms vs fuse-only {fuse[fuse_ctas[T]]:.2f} ms")
    wins = [r["tokens"] for r in rows if r["weave_ms"] < r["fuse_only_ms"]]
    threshold = min((t for t in wins if all(u in wins for u in args.tokens if u >= t)), default=2 * max_T)
    small = min(args.tokens)
    out = {"threshold": threshold, "fuse_ctas": fuse_ctas[small], "model": args.model, "layers": model.cfg.n_layers,
           "env": env, "table": {str(r["tokens"]): {k: r[k] for k in ("offset", "attn_ctas", "mlp_ctas", "carveout")} for r in rows}}
    path = weave.tuning_path(model.cfg, d.world)
    if d.rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    return f"tuned {args.model} at TP {d.world} ({model.cfg.n_layers} layers) -> {path}; threshold {threshold}", table, rows


# ----------------------------------------------------------------------------- decode and serve


def sync(d):
    if d.device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(d) -> float:
    """GB/s of a large device-to-device copy, bytes read plus written (the HBM ceiling)."""
    if d.device.type != "cuda":
        return float("nan")
    a = torch.empty(2 ** 30, dtype=torch.uint8, device=d.device)
    b = torch.empty_like(a)
    ms = stats(timed(lambda: b.copy_(a), 10))["median"]
    return 2 * a.numel() / ms / 1e6


def step_bytes(model, B: int, ctx: int) -> int:
    """What a decode step must read on this rank: every weight but the embedding table (B rows of
    it), and the K/V of B sequences of ctx positions."""
    w = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.head is not model.embed_tokens:
        w -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return w + model.cache_bytes(B, ctx)


def cmd_decode(args, d, env):
    """ms per decode step by batch size and context, graphs on and off, against the floor: this
    rank's step bytes at the copy bandwidth measured in the same run. `host` is the time to enqueue a
    step (until the call returns), `step` until its tokens are on the host."""
    model = build_model(args, d)
    tuning = load_tuning(args, model, d)
    bw = copy_bandwidth(d)
    modes = ["graphs", "eager"] if d.device.type == "cuda" else ["eager"]
    head = ["batch", "context", "floor ms"] + [f"{m} {x}" for m in modes for x in ("ms", "tok/s", "% of floor", "host ms")]
    table, rows = [head], []
    g = torch.Generator(d.device).manual_seed(0)
    for ctx in args.contexts:
        for B in args.batches:
            floor = step_bytes(model, B, ctx) / bw / 1e6
            row, line = {"batch": B, "context": ctx, "floor_ms": floor}, [B, ctx, f"{floor:.2f}"]
            if d.device.type == "cuda" and model.cache_bytes(B + 1, ctx + 1) > 0.9 * torch.cuda.mem_get_info()[0]:
                say(d, f"  batch {B} context {ctx}: its KV cache ({model.cache_bytes(B + 1, ctx + 1) / 2**30:.0f} GiB) "
                       f"does not fit beside the weights; skipped")
                table.append(line + ["does not fit"] * (len(head) - 3))
                continue
            backend = comm.make_comm(args.comm, d, model.cfg.hidden, B, model.norm.weight.dtype)
            for mode in modes:
                runner = engine.Runner(weave.Weaver(model, backend, "auto", tuning), B, ctx + 1, graphs=False)
                for layer in model.layers:          # never time on zeros
                    for c in (layer.attn.k_cache, layer.attn.v_cache):
                        c.normal_(generator=g)
                if mode == "graphs":
                    runner.capture([B])
                seqs = [(i, ctx - 1, 1) for i in range(B)]
                tokens = torch.randint(0, model.cfg.vocab, (B,), generator=torch.Generator().manual_seed(B)).tolist()
                host, step = [], []
                for i in range(args.iters + 3):
                    sync(d)
                    barrier()
                    t0 = time.perf_counter()
                    nxt = runner.step(seqs, tokens)
                    t1 = time.perf_counter()
                    nxt.tolist()
                    t2 = time.perf_counter()
                    if i >= 3:
                        host.append(slowest_rank((t1 - t0) * 1e3))
                        step.append(slowest_rank((t2 - t0) * 1e3))
                st, hs = stats(step), stats(host)
                row[mode] = {**st, "host_ms": hs["median"]}
                line += [fmt(st), f"{B / st['median'] * 1e3:.0f}", f"{100 * floor / st['median']:.0f}%",
                         f"{hs['median']:.2f}"]
                say(d, f"  batch {B} context {ctx} {mode}: {st['median']:.2f} ms (floor {floor:.2f}), host {hs['median']:.2f} ms")
                del runner
                if d.device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            table.append(line)
    title = (f"{args.model} ({model.cfg.n_layers} layers), TP {d.world}, decode step in ms: median (p10-p90) of "
             f"{args.iters}; floor = this rank's weights + KV at {bw:.0f} GB/s (copy bandwidth, this run)")
    return title, table, rows


def workload(spec: str, vocab: int, seed: int = 0):
    """'NxIN/OUT': N random prompts of IN tokens, OUT new tokens each; IN may be 'mixed' (uniform in
    [128, 2048])."""
    try:
        n, rest = spec.split("x", 1)
        lens, out = rest.split("/")
        rng = random.Random(seed)
        sizes = [rng.randint(128, 2048) if lens == "mixed" else int(lens) for _ in range(int(n))]
        return [[rng.randrange(vocab) for _ in range(k)] for k in sizes], int(out)
    except ValueError:
        raise ValueError(f"workload {spec!r}: expected NxIN/OUT, e.g. 1000x1024/128 or 1000xmixed/128") from None


def step_flops(model):
    """step -> matrix FLOPs of that engine step on this rank: the layers' GEMMs over its tokens,
    attention over each chunk's context, the LM head over its sequences. The weights are counted
    once here, not on every step of a timed run."""
    cfg, a = model.cfg, model.layers[0].attn
    per_token = sum(p.numel() for name, p in model.layers.named_parameters() if p.dim() >= 2 and "router" not in name)
    if hasattr(model.layers[0].mlp, "w13"):   # MoE: a token runs top_k of the experts
        moe = model.layers[0].mlp
        per_token -= len(model.layers) * (moe.w13.numel() + moe.w2.numel()) * (1 - cfg.top_k / cfg.n_experts)
    head = model.head.weight.numel()

    def flops(step) -> float:
        T = sum(n for _, n in step)
        attn = sum(4 * n * (s.cached + (n + 1) / 2) * a.hd * a.nh for s, n in step) * len(model.layers)
        return 2 * per_token * T + attn + 2 * head * len(step)
    return flops


def cmd_serve(args, d, env):
    """The paper's throughput setting: N prompts through the engine (chunked prefill, mixed steps),
    per budget and mode, output and total tokens/s. Also the FLOP rate of its prefill-heavy steps
    (half the budget or more in prompt chunks) against one 16K-token prefill, and the time of its
    decode-only steps."""
    model = build_model(args, d)
    tuning = load_tuning(args, model, d)
    dtype = model.norm.weight.dtype
    modes = ["tp1"] if d.world == 1 else args.modes
    ref_T = min(16384, model.cfg.max_positions)
    flops = step_flops(model)
    ref_tflops = prefill_rate(model, d, tuning, ref_T, flops)
    say(d, f"  reference: {ref_T}-token prefill at {ref_tflops:.1f} TFLOP/s")
    graphs = d.device.type == "cuda" and args.graphs
    head = ["workload", "budget", "mode", "output tok/s", "total tok/s", "prefill-heavy TFLOP/s (% of ref)",
            "decode-only steps: median ms (batch)", "steps"]
    table, rows = [head], []
    for spec in args.workloads:
        prompts, out_len = workload(spec, model.cfg.vocab)
        max_len = max(map(len, prompts)) + out_len
        for budget in args.budgets:
            for mode in modes:
                backend, split, carveout = MODES.get(mode, ("auto", "auto", True))
                c = comm.make_comm(backend, d, model.cfg.hidden, budget, dtype)
                w = weave.Weaver(model, c, split, dataclasses.replace(tuning, carveout=carveout))
                eng = engine.Engine(w, min(args.max_seqs, budget), budget, max_len, graphs)
                if args.warmup:     # a tenth of the prompts: every step shape and graph once
                    list(eng.generate(prompts[:max(len(prompts) // 10, 1)], out_len))
                tput, total, heavy, decode = [], [], [], []
                for _ in range(args.iters):
                    steps = []
                    sync(d)
                    barrier()
                    t0 = time.perf_counter()
                    done = list(eng.generate(prompts, out_len, on_step=lambda step, s: steps.append(
                        (flops(step), sum(n for q, n in step if q.cached < len(q.prompt)), len(step), s))))
                    wall = slowest_rank(time.perf_counter() - t0)
                    n_out, n_in = sum(len(s.out) for s in done), sum(len(s.prompt) for s in done)
                    tput.append(n_out / wall)
                    total.append((n_in + n_out) / wall)
                    heavy += [(f, s) for f, pre, _, s in steps if pre >= budget / 2]
                    decode += [(s * 1e3, b) for _, pre, b, s in steps if pre == 0]
                st = {"output": stats(tput), "total": stats(total)}
                h = sum(f for f, _ in heavy) / max(sum(s for _, s in heavy), 1e-9) / 1e12
                dec = sorted(decode)[len(decode) // 2] if decode else (float("nan"), 0)
                rows.append({"workload": spec, "budget": budget, "mode": mode, **st, "heavy_tflops": h,
                             "ref_tflops": ref_tflops, "decode_ms": dec[0], "decode_batch": dec[1], "steps": len(steps)})
                table.append([spec, budget, mode, fmt_rate(st["output"]), fmt_rate(st["total"]),
                              f"{h:.1f} ({100 * h / ref_tflops:.0f}%)", f"{dec[0]:.2f} ({dec[1]})", len(steps)])
                say(d, f"  {spec} budget {budget} {mode}: {st['output']['median']:.1f} output tok/s")
                del eng, w, c
    title = (f"{args.model} ({model.cfg.n_layers} layers), TP {d.world}, serving throughput: median (p10-p90) of "
             f"{args.iters} runs; reference prefill {ref_T} tokens at {ref_tflops:.1f} TFLOP/s")
    return title, table, rows


def prefill_rate(model, d, tuning, T: int, flops) -> float:
    """TFLOP/s of one T-token prefill, unsplit (the reference for the serve run's prompt chunks)."""
    model.allocate_cache(1, T)
    weaver = weave.Weaver(model, comm.make_comm("auto", d, model.cfg.hidden, T, model.norm.weight.dtype), "off", tuning)
    batch = prefill_batch(T, 1, model.cfg.vocab, d.device, T)
    ms = stats(timed(lambda: weaver(batch), 3, warmup=1) if d.device.type == "cuda" else
               cpu_timed(lambda: weaver(batch), 2))["median"]
    return flops([(engine.Sequence(0, [], 0), T)]) / ms / 1e9


def cpu_timed(fn, iters):
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def fmt_rate(st: dict) -> str:
    return f"{st['median']:.1f} ({st['p10']:.1f}-{st['p90']:.1f})"


# ----------------------------------------------------------------------------- output


def trace(weaver, batch, path: str, d):
    """A Chrome trace of one step, and on rank 0 a PNG timeline of the compute and comm streams."""
    from torch.profiler import ProfilerActivity, profile
    weaver(batch)
    torch.cuda.synchronize()
    dist.barrier()   # else the first comm point shows the ranks' skew as a long wait for peers
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        weaver(batch)
        torch.cuda.synchronize()
    if d.rank:
        return
    prof.export_chrome_trace(path)
    with open(path) as f:
        kernels = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t0 = min(e["ts"] for e in kernels)
    streams = sorted({e["args"]["stream"] for e in kernels})
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.5 * len(streams)))
    for e in kernels:
        y = streams.index(e["args"]["stream"])
        comm = any(k in e["name"] for k in ("allreduce", "AllReduce", "nccl"))
        ax.broken_barh([((e["ts"] - t0) / 1e3, e["dur"] / 1e3)], (y - 0.4, 0.8), color="tab:red" if comm else "tab:blue")
    ax.set_yticks(range(len(streams)), [f"stream {s}" for s in streams])
    ax.set_xlabel("ms (blue: compute kernels, red: comm kernels)")
    ax.set_title(f"one step, {batch.T} tokens, rank 0")
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)


def plot(rows, modes, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in modes:
        pts = [(r["tokens"], r[m]["median"]) for r in rows if r["seqs"] == rows[0]["seqs"]]
        ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prefill tokens")
    ax.set_ylabel("ms per step")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def say(d, *a):
    if d.rank == 0:
        print(*a, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["model", "kernel", "tune", "decode", "serve"], help="model: end-to-end "
                   "prefill latency by mode; kernel: the comm point alone; tune: sweep split offset and CTA "
                   "budgets, write configs/; decode: ms per decode step vs the memory floor; serve: throughput "
                   "of many prompts through the engine")
    ints = lambda s: [int(x) for x in s.split(",")]
    p.add_argument("--model", default="llama-3.3-70b", help=f"a full-size shape with random weights "
                   f"({', '.join(models.PRESETS)}) or a checkpoint directory (default llama-3.3-70b)")
    p.add_argument("--layers", type=int, help="run only this many layers (quick sweeps); default: all")
    p.add_argument("--tokens", type=ints, default=[1024, 2048, 4096, 8192, 16384], help="prefill token counts, comma-separated")
    p.add_argument("--seqs", type=ints, default=[1], help="model: split each step into this many sequences (comma-separated list)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["nccl", "fuse-only", "weave", "none"],
                   help=f"model, serve: modes to compare, comma-separated, from {', '.join(MODES)} (serve at TP 1: one mode)")
    p.add_argument("--ctas", type=ints, default=None, help="kernel: CTA counts (default 2,4,8,16,32); tune: budgets (default 2,4,8,16)")
    p.add_argument("--hidden", type=int, default=8192, help="kernel: hidden size (default 8192)")
    p.add_argument("--batches", type=ints, default=[1, 8, 32, 128], help="decode: batch sizes (default 1,8,32,128)")
    p.add_argument("--contexts", type=ints, default=[1024, 8192], help="decode: context lengths (default 1024,8192)")
    p.add_argument("--comm", default="auto", help="decode: comm backend (default auto)")
    p.add_argument("--workloads", type=lambda s: s.split(","), default=["1000x1024/128", "1000xmixed/128"],
                   help="serve: NxIN/OUT prompt sets, comma-separated; IN may be 'mixed' (128-2048)")
    p.add_argument("--budgets", type=ints, default=[2048, 8192], help="serve: step token budgets (default 2048,8192)")
    p.add_argument("--max-seqs", type=int, default=256, help="serve: running sequences at most (default 256)")
    p.add_argument("--graphs", type=int, default=1, help="serve: 1 = decode steps from CUDA graphs (default), 0 = eager")
    p.add_argument("--warmup", type=int, default=1, help="serve: first run a tenth of each workload untimed (default 1)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per figure (default 10)")
    p.add_argument("--repeat", type=int, default=10, help="kernel: calls per timed iteration (default 10)")
    p.add_argument("--tuning", help="tuning table to use (default: configs/ for this GPU, model and TP)")
    p.add_argument("--trace", help="model: write a Chrome trace of one weave step here, and a PNG timeline beside it")
    p.add_argument("--plot", help="model: write a PNG of latency vs tokens, one line per mode")
    p.add_argument("--out", help="also write the JSON document to this file")
    args = p.parse_args()
    if args.ctas is None:
        args.ctas = [2, 4, 8, 16, 32] if args.what == "kernel" else [2, 4, 8, 16]
    multi = args.what in ("model", "kernel", "tune")
    if multi and not torch.cuda.is_available():
        sys.exit(f"error: bench.py {args.what} needs CUDA GPUs (run it under torchrun, one process per GPU)")
    try:
        d = comm.init_distributed("auto")
        if multi and d.world < 2:
            raise ValueError(f"bench.py {args.what} needs at least 2 ranks: torchrun --nproc-per-node N bench.py ...")
        env = environment()
        say(d, f"# {env['gpu']} x{env['world']}, driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}, "
               f"NCCL {env['nccl']}, commit {env['commit']}")
        t0 = time.time()
        cmds = {"model": cmd_model, "kernel": cmd_kernel, "tune": cmd_tune, "decode": cmd_decode, "serve": cmd_serve}
        with torch.no_grad():
            title, table, rows = cmds[args.what](args, d, env)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    if d.rank == 0:
        print(f"\n{title}\n")
        print("| " + " | ".join(map(str, table[0])) + " |\n|" + "---|" * len(table[0]))
        for line in table[1:]:
            print("| " + " | ".join(map(str, line)) + " |")
        if args.plot and args.what == "model":
            plot(rows, args.modes, args.plot, title)
        doc = json.dumps({"what": args.what, "title": title, "env": env, "args": vars(args), "rows": rows,
                          "seconds": round(time.time() - t0, 1)})
        if args.out:
            with open(args.out, "w") as f:
                f.write(doc + "\n")
        print(doc)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
