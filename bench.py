"""Benchmarks and the tuner, on full-size model shapes with random weights (no checkpoint needed).

    torchrun --nproc-per-node 4 bench.py kernel                      # fused kernel vs NCCL, by CTAs
    torchrun --nproc-per-node 4 bench.py model --model llama-3.3-70b --layers 8
    torchrun --nproc-per-node 4 bench.py tune  --model llama-3.3-70b --layers 4   # writes configs/

Every figure is the median of --iters timed runs after warm-up, with the spread (10th-90th
percentile); a run's time is the slowest rank's. Modes run interleaved, round by round, so drift
hits them alike. Prints a Markdown table and, last, one line of JSON.
"""
import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

import weave

PRESETS = {"llama-3.3-70b": "llama", "qwen2.5-72b": "qwen", "mixtral-8x22b": "mixtral"}   # preset -> model file
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
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        t = torch.tensor(start.elapsed_time(end), device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.append(t.item())
    return out


def stats(ms: list) -> dict:
    s = sorted(ms)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]
    return {"median_ms": q(0.5), "p10_ms": q(0.1), "p90_ms": q(0.9), "n": len(s)}


def fmt(st: dict) -> str:
    return f"{st['median_ms']:.3f} ({st['p10_ms']:.3f}-{st['p90_ms']:.3f})"


# ----------------------------------------------------------------------------- models


def build_model(preset: str, layers: int | None, d: weave.Dist):
    mod = importlib.import_module(PRESETS[preset])
    cfg = mod.Config.from_hf(mod.PRESETS[preset])
    if layers:
        cfg = dataclasses.replace(cfg, n_layers=layers)
    return mod.build(mod.Transformer, cfg, d, torch.bfloat16).init_random_()


def prefill_batch(T: int, n_seqs: int, vocab: int, device) -> weave.Batch:
    """T tokens as n_seqs sequences of (nearly) equal length, each in its own cache slot."""
    lens = [T // n_seqs + (i < T % n_seqs) for i in range(n_seqs)]
    g = torch.Generator().manual_seed(T)
    return weave.Batch.make([(i, 0, n) for i, n in enumerate(lens)],
                            torch.randint(0, vocab, (T,), generator=g).tolist(), device)


def make_weavers(model, d, modes, max_tokens, tuning) -> dict:
    comms, out = {}, {}
    for m in modes:
        comm, split, carveout = MODES[m]
        if comm not in comms:
            comms[comm] = weave.make_comm(comm, d, model.cfg.hidden, max_tokens, torch.bfloat16)
        out[m] = weave.Weaver(model, comms[comm], split, dataclasses.replace(tuning, carveout=carveout))
    return out


def cmd_model(args, d, env):
    model = build_model(args.model, args.layers, d)
    tuning = weave.Tuning.load(args.tuning or weave.tuning_path(model.cfg, d.world))
    max_T = max(args.tokens)
    model.allocate_cache(max(args.seqs), max_T)
    weavers = make_weavers(model, d, args.modes, max_T, tuning)
    rows = []
    for T in args.tokens:
        for n_seqs in args.seqs:
            batch = prefill_batch(T, n_seqs, model.cfg.vocab, d.device)
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
            say(d, f"  {T:>6} tokens x {n_seqs} seqs: " + ", ".join(f"{m} {row[m]['median_ms']:.2f}" for m in args.modes))
    if args.trace:
        trace(weavers["weave"] if "weave" in weavers else next(iter(weavers.values())),
              prefill_batch(args.tokens[-1], 1, model.cfg.vocab, d.device), args.trace, d)
    base = "nccl" if "nccl" in args.modes else args.modes[0]
    head = ["tokens", "seqs"] + [f"{m} ms" for m in args.modes] + [f"{m} speedup" for m in args.modes if m != base]
    if "none" in args.modes:
        head += [f"{m} / none" for m in args.modes if m != "none"]
    table = [head]
    for r in rows:
        med = {m: r[m]["median_ms"] for m in args.modes}
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
    fused = weave.make_comm("fused", d, H, max_T, torch.bfloat16)
    nccl = weave.make_comm("nccl", d, H, max_T, torch.bfloat16)
    w = torch.ones(H, dtype=torch.bfloat16, device=d.device)
    head = ["tokens", "MB", "NCCL AR", "NCCL AR + norm"] + [f"fused {c} CTAs" for c in args.ctas] + \
           ["best fused vs AR+norm", "best fused busbw GB/s"]
    table, rows = [head], []
    for T in args.tokens:
        n = weave.padded(T, d.world)
        res = {c: c.new_residual(n) for c in (fused, nccl)}
        for c in (fused, nccl):
            c.bufs[0, :n].normal_()
        variants = {"NCCL AR": lambda: dist.all_reduce(nccl.bufs[0, :n]),
                    "NCCL AR + norm": lambda: nccl(0, n, res[nccl], w, 1e-5, 0)}
        variants |= {f"fused {c}": (lambda c=c: fused(0, n, res[fused], w, 1e-5, c)) for c in args.ctas}
        st = {k: stats(timed(lambda: [f() for _ in range(args.repeat)], args.iters)) for k, f in variants.items()}
        st = {k: {**v, "median_ms": v["median_ms"] / args.repeat, "p10_ms": v["p10_ms"] / args.repeat,
                  "p90_ms": v["p90_ms"] / args.repeat} for k, v in st.items()}
        best = min((k for k in st if k.startswith("fused")), key=lambda k: st[k]["median_ms"])
        mb = n * H * 2 / 1e6
        busbw = 2 * (d.world - 1) / d.world * mb / 1e3 / (st[best]["median_ms"] / 1e3)
        rows.append({"tokens": T, "mbytes": mb, **st, "best": best, "busbw_gbps": busbw})
        table.append([T, f"{mb:.0f}"] + [f"{st[k]['median_ms'] * 1e3:.0f}" for k in variants] +
                     [f"{st['NCCL AR + norm']['median_ms'] / st[best]['median_ms']:.2f}x ({best.split()[1]} CTAs)",
                      f"{busbw:.0f} ({100 * busbw / NVLINK_GBPS:.0f}% of {NVLINK_GBPS})"])
        say(d, f"  {T} tokens: best {best} {st[best]['median_ms'] * 1e3:.0f} us, NCCL AR {st['NCCL AR']['median_ms'] * 1e3:.0f} us")
    return f"comm point alone, hidden {H}, TP {d.world}, bf16, in us (median of {args.iters} x {args.repeat} calls)", table, rows


def cmd_tune(args, d, env):
    """Per token count: the split offset, the attention-time and MLP-time CTA budgets, then whether
    the overlapped GEMMs carve out the comm's SMs, by
    coordinate descent (each knob swept with the others held), keeping the fastest."""
    model = build_model(args.model, args.layers, d)
    max_T = max(args.tokens)
    model.allocate_cache(1, max_T)
    comm = weave.make_comm("fused", d, model.cfg.hidden, max_T, torch.bfloat16)
    tuning = weave.Tuning()
    weaver, plain = weave.Weaver(model, comm, "on", tuning), weave.Weaver(model, comm, "off", tuning)
    measure = lambda w, b: stats(timed(lambda: w(b), args.iters, warmup=1))["median_ms"]
    table, rows = [["tokens", "offset", "attn CTAs", "mlp CTAs", "carveout", "weave ms", "fuse-only ms", "fuse CTAs"]], []
    fuse_ctas = {}
    for T in args.tokens:
        batch = prefill_batch(T, 1, model.cfg.vocab, d.device)
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
        pts = [(r["tokens"], r[m]["median_ms"]) for r in rows if r["seqs"] == rows[0]["seqs"]]
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
    p.add_argument("what", choices=["model", "kernel", "tune"], help="model: end-to-end prefill latency by mode; "
                   "kernel: the comm point alone; tune: sweep split offset and CTA budgets, write configs/")
    ints = lambda s: [int(x) for x in s.split(",")]
    p.add_argument("--model", default="llama-3.3-70b", choices=list(PRESETS), help="full-size model shape (random weights)")
    p.add_argument("--layers", type=int, help="run only this many layers (quick sweeps); default: all")
    p.add_argument("--tokens", type=ints, default=[1024, 2048, 4096, 8192, 16384], help="prefill token counts, comma-separated")
    p.add_argument("--seqs", type=ints, default=[1], help="model: split each step into this many sequences (comma-separated list)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["nccl", "fuse-only", "weave", "none"],
                   help=f"model: modes to compare, comma-separated, from {', '.join(MODES)}")
    p.add_argument("--ctas", type=ints, default=None, help="kernel: CTA counts (default 2,4,8,16,32); tune: budgets (default 2,4,8,16)")
    p.add_argument("--hidden", type=int, default=8192, help="kernel: hidden size (default 8192)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per figure (default 10)")
    p.add_argument("--repeat", type=int, default=10, help="kernel: calls per timed iteration (default 10)")
    p.add_argument("--tuning", help="model: tuning table to use (default: configs/ for this GPU, model and TP)")
    p.add_argument("--trace", help="model: write a Chrome trace of one weave step here, and a PNG timeline beside it")
    p.add_argument("--plot", help="model: write a PNG of latency vs tokens, one line per mode")
    p.add_argument("--out", help="also write the JSON document to this file")
    args = p.parse_args()
    if args.ctas is None:
        args.ctas = [2, 4, 8, 16, 32] if args.what == "kernel" else [2, 4, 8, 16]
    if not torch.cuda.is_available():
        sys.exit("error: bench.py needs CUDA GPUs (run it under torchrun, one process per GPU)")
    d = weave.init_distributed("cuda")
    if d.world < 2:
        sys.exit("error: bench.py needs at least 2 ranks: torchrun --nproc-per-node N bench.py ...")
    env = environment()
    say(d, f"# {env['gpu']} x{env['world']}, driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}, "
           f"NCCL {env['nccl']}, commit {env['commit']}")
    t0 = time.time()
    title, table, rows = {"model": cmd_model, "kernel": cmd_kernel, "tune": cmd_tune}[args.what](args, d, env)
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
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
