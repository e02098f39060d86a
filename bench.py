"""Benchmarks and the tuner, on full-size model shapes with random weights (no checkpoint needed).

    torchrun --nproc-per-node 4 bench.py kernel                      # fused kernel vs NCCL, by CTAs
    python bench.py kernel --virtual 4                               # its protocol's fixed cost, one GPU
    torchrun --nproc-per-node 4 bench.py model --model llama-3.3-70b --layers 8
    python bench.py model --model llama-3.1-8b --modes tp1,tp1-flash # one GPU: the attention paths
    python bench.py model --layers 8 --modes tp1,tp1-split --graph --profile  # the split's own cost, by kernel class
    torchrun --nproc-per-node 4 bench.py tune  --model llama-3.3-70b --layers 4   # writes configs/
    python bench.py decode --model llama-3.1-8b --profile            # ms per decode step vs the HBM floor
    python bench.py attention --model llama-3.1-8b                   # decode attention alone vs FlashAttention
    python bench.py gemm --model llama-3.1-8b                        # a decode step's GEMMs vs the HBM floor
    python bench.py serve --model llama-3.1-8b --workloads 1000x1024/128 --budgets 2048,8192
    python bench.py checkpoint /tmp/ckpt --model llama-3.1-8b        # a random-weight HF checkpoint + prompts

Every figure is the median of --iters timed runs after warm-up, with the spread (10th-90th
percentile); a run's time is the slowest rank's. Modes run interleaved, round by round, so drift
hits them alike. Each command prints a title, a Markdown table and, last, one line of JSON.
"""
import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
import typing

import torch
import torch.distributed as dist
import torch.nn.functional as F

import build_ext
import comm
import engine
import fastpath
import group
import models
import weave
from batch import Batch, Span
from group import UserError

# name -> how the step runs: comm backend, weave mode, GEMM carveout beside the comm (across ranks only: weave.plan),
# cuDNN for long prompts (the fast path's, where it is on)
MODES = {"nccl": ("nccl", "off", True, True),           # baseline: NCCL all-reduce + add/RMSNorm, no split
         "fuse-only": ("fused", "off", True, True),     # the fused kernel, no split
         "weave": ("fused", "on", True, True),          # split + overlap + fused kernel
         "weave-nocarve": ("fused", "on", False, True),  # ... with GEMMs on all SMs beside the comm
         "weave-nccl": ("nccl", "on", True, True),      # split + overlap with NCCL: what overlap alone gives
         "none": ("none", "off", True, True),           # communication removed: the ideal
         "tp1": ("auto", "off", True, True),            # one GPU: the model alone
         "tp1-flash": ("auto", "off", True, False),     # ... every attention through FlashAttention's varlen kernel
         "tp1-split": ("auto", "on", True, True),       # ... split in two as the weave does (the second half's
         "tp1-split-flash": ("auto", "on", True, False),  # attention after a prefix), with FlashAttention only,
         "tp1-split-inline": ("auto", "on", True, True)}  # or each comm point on the compute stream
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


# ----------------------------------------------------------------------------- helpers


def timed(fn, iters: int, warmup: int = 3) -> list:
    """ms of each call (the slowest rank's), each started together on all ranks; host clock on CPU."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        sync()
        barrier()
        t0 = time.perf_counter()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        out.append(slowest_rank(ms))
    return out


def issue_ms(fn, iters: int = 5) -> float:
    """ms the host takes to issue one call of fn to the GPU, the median of iters calls each from an
    idle GPU (a full launch queue would block it too; single calls scatter): where it is close to
    the GPU's time, the host bounds the step."""
    out = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    sync()
    return stats(out)["median"]


@contextlib.contextmanager
def gpu_clocks(d):
    """Samples this GPU's SM clock, power draw and use every 0.5 s while the block runs (nvidia-smi),
    into the dict it yields: sm_mhz and watts, the medians of the samples with the GPU busy (>= 90%).
    A minutes-long run on a power-capped GPU holds lower clocks than a seconds-long benchmark, and
    its floor moves with them. Nothing without nvidia-smi."""
    out, proc = {}, None
    if d.device.type == "cuda":
        uuid = torch.cuda.get_device_properties(d.device).uuid
        try:
            proc = subprocess.Popen(["nvidia-smi", "-i", f"GPU-{uuid}", "--query-gpu=clocks.sm,power.draw,utilization.gpu",
                                     "--format=csv,noheader,nounits", "-lms", "500"], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
        except OSError:
            pass
    try:
        yield out
    finally:
        if proc is not None:
            proc.terminate()
            out.update(busy_clocks(proc.communicate()[0]))


def clocks_text(c: dict) -> str:
    return f", SM clock {c['sm_mhz']:.0f} MHz ({c['watts']:.0f} W)" if c else ""


def busy_clocks(text: str) -> dict:
    """nvidia-smi's 'MHz, W, %' lines -> the median SM clock and power of the busy ones."""
    rows = []
    for line in text.splitlines():
        try:
            mhz, watts, util = (float(x) for x in line.split(","))
        except ValueError:
            continue
        if util >= 90:
            rows.append((mhz, watts))
    if not rows:
        return {}
    return {"sm_mhz": stats([r[0] for r in rows])["median"], "watts": stats([r[1] for r in rows])["median"],
            "samples": len(rows)}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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
    """The median (of an even count, the mean of the middle two: a ratio's median leans neither way)
    and the samples nearest the 10th and 90th percentiles."""
    s = sorted(values)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]   # noqa: E731
    return {"median": statistics.median(s), "p10": q(0.1), "p90": q(0.9), "n": len(s)}


def fmt(st: dict, digits: int = 3) -> str:
    return f"{st['median']:.{digits}f} ({st['p10']:.{digits}f}-{st['p90']:.{digits}f})"


def say(d, *a):
    if d.rank == 0:
        print(*a, flush=True)


def build_model(args, d: group.Dist):
    """A preset (random weights) or a checkpoint directory; bf16 on CUDA, fp32 on the CPU; with the
    fast path on where it runs, as the engine runs it."""
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    model = models.load(os.path.expanduser(args.model), d, dtype, layers=args.layers)
    fastpath.enable(model)
    return model


def load_tuning(args, model, d):
    return weave.Tuning.load(args.tuning or weave.tuning_path(model.cfg, d.world), required=bool(args.tuning))


def prefill_spans(T: int, n_seqs: int) -> list:
    """T tokens as n_seqs sequences of (nearly) equal length, each in its own cache range."""
    lens = [T // n_seqs + (i < T % n_seqs) for i in range(n_seqs)]
    return [Span(sum(lens[:i]), 0, n) for i, n in enumerate(lens)]


def random_tokens(n: int, vocab: int, seed: int) -> list:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@contextlib.contextmanager
def cudnn_attention(model, on: bool):
    """Long prompts through cuDNN (the fast path's, where it is on) or FlashAttention's varlen kernel."""
    old = [getattr(layer.attn, "cudnn", False) for layer in model.layers]
    for layer, c in zip(model.layers, old):
        layer.attn.cudnn = c and on
    try:
        yield
    finally:
        for layer, c in zip(model.layers, old):
            layer.attn.cudnn = c


class InlineStreams(weave.Streams):
    """Each comm point runs on the compute stream where it is issued: no side stream, no events."""

    def comm(self, fn, half: int):
        fn()

    def join(self):
        pass


# modes whose split runs on other Streams than the weave's: without its stream crossings (what they cost)
STREAMS = {"tp1-split-inline": InlineStreams}


def make_weavers(model, d, modes, max_tokens, tuning) -> dict:
    comms, out = {}, {}
    for m in modes:
        backend, split, carveout, _ = MODES[m]
        if backend not in comms:
            comms[backend] = comm.make_comm(backend, d, model.cfg.hidden, max_tokens, model.norm.weight.dtype)
        out[m] = weave.Weaver(model, comms[backend], split, dataclasses.replace(tuning, carveout=carveout))
        if m in STREAMS:
            out[m].streams = STREAMS[m](d.device)
    return out


# ----------------------------------------------------------------------------- prefill: model, tune, kernel


def cmd_model(args, d):
    """Prefill latency by mode: one step of T tokens as --seqs sequences."""
    if bad := [m for m in args.modes if (d.world == 1) != m.startswith("tp1")]:
        raise UserError(f"modes {', '.join(bad)} do not run at TP {d.world}; at TP 1 use "
                        f"{', '.join(m for m in MODES if m.startswith('tp1'))}; under torchrun the others")
    if (args.profile or args.graph) and d.device.type != "cuda":
        raise UserError(f"bench.py model {'--profile' if args.profile else '--graph'} needs a CUDA GPU")
    model = build_model(args, d)
    tuning = load_tuning(args, model, d)
    max_T = max(args.tokens)
    model.allocate_cache(max_T)
    weavers = make_weavers(model, d, args.modes, max_T, tuning)

    def run(m, batches, fn=lambda step: timed(step, 1, warmup=0)):
        with cudnn_attention(model, MODES[m][3]):
            return fn(lambda: weavers[m](batches[m]))
    base = "nccl" if "nccl" in args.modes else args.modes[0]
    rows = []
    for T in args.tokens:
        for n_seqs in args.seqs:
            spans, tokens = prefill_spans(T, n_seqs), random_tokens(T, model.cfg.vocab, T)
            batches = {m: weavers[m].batch(spans, tokens) for m in args.modes}
            for m in args.modes:                            # warm-up (and autotuning) of every mode
                run(m, batches), run(m, batches)
            times = {m: [] for m in args.modes}
            for _ in range(args.iters):                     # interleaved rounds
                for m in args.modes:
                    times[m] += run(m, batches)
            split = next((weavers[m].split_at(T) for m in args.modes if MODES[m][1] == "on"), None)
            row = {"tokens": T, "seqs": n_seqs, "split": split} | {m: stats(t) for m, t in times.items()}
            row["speedup"] = paired(times, base)
            if "none" in times:                             # each mode against no communication, paired alike
                row["over_none"] = {m: 1 / x for m, x in paired(times, "none").items()}
            rows.append(row)
            say(d, f"  {T:>6} tokens x {n_seqs} seqs: " + ", ".join(f"{m} {row[m]['median']:.2f}" for m in args.modes))
            if args.graph:
                replays, profiles = graph_rounds({m: functools.partial(run, m, batches, lambda step: step())
                                                  for m in args.modes}, args.iters, d, args.profile)
                row["graph"] = {m: stats(t)["median"] if t else None for m, t in replays.items()}
                row["graph_speedup"] = paired(replays, base)
                say(d, "    replayed from a CUDA graph: " + ", ".join(f"{m} {ms:.2f}" if ms else f"{m} n/a"
                                                               for m, ms in row["graph"].items()))
            if args.profile:
                row["profile"] = {m: kernel_classes(gpu_kernels(lambda: run(m, batches), 1)) |
                                  {"host_ms": run(m, batches, issue_ms)} for m in args.modes}
                say(d, "    eager, GPU ms (kernels) by class:\n" + classes_text(row["profile"], base))
                if args.graph:
                    row["graph_profile"] = profiles
                    say(d, "    replayed, GPU ms (kernels) by class:\n" + classes_text(profiles, base))
    if args.trace:
        w = weavers.get("weave") or next(iter(weavers.values()))
        trace(w, w.batch(prefill_spans(max_T, 1), random_tokens(max_T, model.cfg.vocab, 0)), args.trace, d)
    head = ["tokens", "seqs", "split"] + [f"{m} ms" for m in args.modes] + [f"{m} speedup" for m in args.modes if m != base]
    if args.graph:
        head += [f"{m} graph ms" for m in args.modes] + [f"{m} graph speedup" for m in args.modes if m != base]
    if "none" in args.modes:
        head += [f"{m} / none" for m in args.modes if m != "none"]
    table = [head]
    for r in rows:
        line = [r["tokens"], r["seqs"], r["split"]] + [fmt(r[m]) for m in args.modes]
        line += [f"{r['speedup'][m]:.3f}x" for m in args.modes if m != base]
        if args.graph:
            g, speedup = r["graph"], r["graph_speedup"]
            line += [f"{g[m]:.3f}" if g[m] else "n/a" for m in args.modes]
            line += [f"{speedup[m]:.3f}x" if speedup[m] else "n/a" for m in args.modes if m != base]
        if "none" in args.modes:
            line += [f"{r['over_none'][m]:.3f}" for m in args.modes if m != "none"]
        table.append(line)
    if args.plot:
        plot(rows, args.modes, args.plot, args.model)
    title = (f"{args.model} ({model.cfg.n_layers} layers), TP {d.world}, prefill latency in ms: median "
             f"(p10-p90) of {args.iters}; speedup over {base}: the median of the rounds' {base} / mode ratios")
    return title, table, rows


def cmd_tune(args, d):
    """Per token count: the split offset, the attention-time and MLP-time CTA budgets, then whether
    the overlapped GEMMs carve out the comm's SMs, by coordinate descent (each knob swept with the
    others held), keeping the fastest; and the fuse-only CTAs. Writes configs/."""
    model = build_model(args, d)
    max_T = max(args.tokens)
    model.allocate_cache(max_T)
    fused = comm.make_comm("fused", d, model.cfg.hidden, max_T, torch.bfloat16)
    tuning = weave.Tuning()
    weaver, plain = weave.Weaver(model, fused, "on", tuning), weave.Weaver(model, fused, "off", tuning)
    measure = lambda w: stats(timed(lambda: w(w.batch(spans, tokens)), args.iters, warmup=1))["median"]  # noqa: E731
    table, rows = [["tokens", "offset", "attn CTAs", "mlp CTAs", "carveout", "weave ms", "fuse-only ms", "fuse CTAs"]], []
    for T in args.tokens:
        spans, tokens = prefill_spans(T, 1), random_tokens(T, model.cfg.vocab, T)
        best = {"offset": 0, "attn_ctas": 4, "mlp_ctas": 4}
        for knob, values in (("offset", [-256, -128, 0, 128, 256]), ("attn_ctas", args.ctas), ("mlp_ctas", args.ctas),
                             ("carveout", [True, False])):
            times = {}
            for v in values:
                tuning.table = {T: best | {knob: v}}
                times[v] = measure(weaver)
            best[knob] = min(times, key=times.get)
        tuning.table = {T: best}
        weave_ms, fuse = measure(weaver), {}
        for c in (8, 16, 32):
            tuning.fuse_ctas = c
            fuse[c] = measure(plain)
        fuse_ctas = min(fuse, key=fuse.get)
        rows.append({"tokens": T, **best, "weave_ms": weave_ms, "fuse_only_ms": fuse[fuse_ctas], "fuse_ctas": fuse_ctas})
        table.append([T, best["offset"], best["attn_ctas"], best["mlp_ctas"], best["carveout"], f"{weave_ms:.3f}",
                      f"{fuse[fuse_ctas]:.3f}", fuse_ctas])
        say(d, f"  {T}: {best}, weave {weave_ms:.2f} ms vs fuse-only {fuse[fuse_ctas]:.2f} ms")
    wins = [r["tokens"] for r in rows if r["weave_ms"] < r["fuse_only_ms"]]
    threshold = min((t for t in wins if all(u in wins for u in args.tokens if u >= t)), default=2 * max_T)
    tuned = weave.Tuning(threshold=threshold, fuse_ctas=rows[0]["fuse_ctas"],
                         table={r["tokens"]: {k: r[k] for k in ("offset", "attn_ctas", "mlp_ctas", "carveout")}
                                for r in rows})
    path = weave.tuning_path(model.cfg, d.world)
    if d.rank == 0:
        tuned.save(path, model=args.model, layers=model.cfg.n_layers, env=environment())
    return f"tuned {args.model} at TP {d.world} ({model.cfg.n_layers} layers) -> {path}; threshold {threshold}", table, rows


def cmd_kernel(args, d):
    """The comm point alone: fused (p2p) by CTA count vs NCCL all-reduce (+ add + RMSNorm); with
    --virtual N, the fused kernel's N virtual ranks on one GPU (its barriers' and phases' fixed cost)
    beside the local add + RMSNorm of the same rows."""
    if args.virtual:
        return kernel_virtual(args, d)
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
        st = {k: per_call(timed(lambda: [f() for _ in range(args.repeat)], args.iters), args.repeat)
              for k, f in variants.items()}
        best = min((k for k in st if k.startswith("fused")), key=lambda k: st[k]["median"])
        mb = n * H * 2 / 1e6
        busbw = 2 * (d.world - 1) / d.world * mb / 1e3 / (st[best]["median"] / 1e3)
        rows.append({"tokens": T, "mbytes": mb, **st, "best": best, "busbw_gbps": busbw})
        table.append([T, f"{mb:.0f}"] + [f"{st[k]['median'] * 1e3:.0f}" for k in variants] +
                     [f"{st['NCCL AR + norm']['median'] / st[best]['median']:.2f}x ({best.split()[1]} CTAs)",
                      f"{busbw:.0f} ({100 * busbw / NVLINK_GBPS:.0f}% of {NVLINK_GBPS})"])
        say(d, f"  {T} tokens: best {best} {st[best]['median'] * 1e3:.0f} us, NCCL AR {st['NCCL AR']['median'] * 1e3:.0f} us")
    return f"comm point alone, hidden {H}, TP {d.world}, bf16, in us (median of {args.iters} x {args.repeat} calls)", table, rows


def per_call(ms: list, repeat: int) -> dict:
    st = stats(ms)
    return {**st, "median": st["median"] / repeat, "p10": st["p10"] / repeat, "p90": st["p90"] / repeat}


def kernel_virtual(args, d):
    """Kernel durations from the profiler (no launch gaps): per call, the N ranks' kernels; the
    shortest is the one whose peers were all there when it started, i.e. the protocol's cost. Beside
    each, the GB/s each of its CTAs moved: the bytes a rank reads and writes over that time, over the
    CTA count. A rank owns rows/N rows and, per row, reads the N partials and its residual and writes
    the N normalized copies and its residual: 2 x (N + 1)/N x rows x hidden x 2 B."""
    N, H = args.virtual, args.hidden
    v = comm.VirtualRanks(N, H, max(args.tokens), d.device)
    ctas = [c for c in args.ctas if N * c <= v.resident_ctas()]
    local = comm.LocalComm(d, H, max(args.tokens), torch.bfloat16)
    w = torch.ones(H, dtype=torch.bfloat16, device=d.device)
    head = ["tokens", "local add+norm us"] + [f"{c} CTAs: {what}" for c in ctas for what in
                                              ("last to arrive us", "GB/s per CTA")] + [f"{ctas[-1]} CTAs: all N us"]
    table, rows = [head], []
    for T in args.tokens:
        n = comm.padded(T, N)
        v.bufs[:, :n].normal_()
        res = [torch.randn(n // N, H, device=d.device).bfloat16() for _ in range(N)]
        loc_res = torch.randn(n, H, device=d.device).bfloat16()
        local_us = stats([k[0] for k in kernel_us(lambda: local(0, n, loc_res, w, 1e-5, 0), 1, args.iters,
                                                  "add_rmsnorm")])["median"]
        row = {"tokens": T, "local_us": local_us}
        for c in ctas:
            per_call = kernel_us(lambda: v(n, res, w, 1e-5, c), N, args.iters, "allreduce")
            last = stats([min(k) for k in per_call])
            row[c] = {"last": last, "all": stats([max(k) for k in per_call]),
                      "gbps_per_cta": 2 * (N + 1) / N * n * H * 2 / (last["median"] * 1e3) / c}
        rows.append(row)
        table.append([T, f"{local_us:.1f}"] + [x for c in ctas for x in (f"{row[c]['last']['median']:.1f}",
                                                                          f"{row[c]['gbps_per_cta']:.0f}")] +
                     [f"{row[ctas[-1]]['all']['median']:.1f}"])
        say(d, f"  {T} tokens: local {local_us:.1f} us, " +
            ", ".join(f"{c} CTAs {row[c]['last']['median']:.1f} us ({row[c]['gbps_per_cta']:.0f} GB/s a CTA)" for c in ctas))
    return (f"fused kernel, {N} virtual ranks on one GPU (local memory, not NVLink), hidden {H}: kernel us per comm "
            f"point, median of {args.iters} calls; 'last to arrive' is the rank whose peers were all running "
            f"({v.resident_ctas()} CTAs fit at once); GB/s per CTA = 2 x (N + 1)/N x rows x hidden x 2 B / that "
            f"time / CTAs"), \
        table, rows


def gpu_kernels(fn, iters: int) -> list:
    """[(start, us, name)] of the GPU work of iters calls of fn (after one untimed call), in order."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync()
    return sorted((e.time_range.start, e.time_range.elapsed_us(), e.name) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0)


# kernel name fragment -> class, first match wins (cuDNN's attention kernels carry "sm90" too)
KERNEL_CLASSES = [(("flash", "fmha", "sdpa", "attention", "cudnn", "decode_combine"), "attention"),
                  (("gemm", "gemv", "xmma", "cutlass", "nvjet", "sm90", "splitk"), "gemm"),
                  (("rmsnorm", "nccl", "allreduce"), "comm point"),
                  (("copy", "index", "gather", "scatter", "catarray", "fill", "memcpy", "memset"), "copy/index")]
CLASSES = [c for _, c in KERNEL_CLASSES] + ["elementwise"]


def kernel_classes(ks: list) -> dict:
    """Where one step's GPU time goes: ms and kernel count per class, the span from the first
    kernel's start to the last one's end, and the idle part of it (no kernel running on any stream)."""
    out = {c: {"ms": 0.0, "kernels": 0} for c in CLASSES}
    busy, end = 0.0, float("-inf")
    for s, u, name in ks:              # by start
        c = next((c for keys, c in KERNEL_CLASSES if any(k in name.lower() for k in keys)), "elementwise")
        out[c]["ms"] += u / 1e3
        out[c]["kernels"] += 1
        busy += max(0.0, s + u - max(s, end))
        end = max(end, s + u)
    span = (end - ks[0][0]) / 1e3 if ks else 0.0
    return out | {"span_ms": span, "idle_ms": span - busy / 1e3}


def classes_text(profile: dict, base: str | None = None) -> str:
    """One line per mode: ms (kernels) per class, then the span, its idle part and, where measured,
    the host's time; with base, a second line per other mode: where its time differs from base's."""
    extra = ("host_ms", "alone_ms", "back_to_back_ms")
    lines = []
    for m, p in profile.items():
        lines.append(f"    {m:>16}: " + ", ".join(f"{c} {p[c]['ms']:.2f} ({p[c]['kernels']})" for c in CLASSES) +
                     f"; span {p['span_ms']:.2f}, idle {p['idle_ms']:.2f}" +
                     "".join(f", {k.removesuffix('_ms').replace('_', ' ')} {p[k]:.2f}" for k in extra if k in p))
        if base in profile and m != base:
            b = profile[base]
            lines.append(f"    {'- ' + base:>16}: " + ", ".join(f"{c} {p[c]['ms'] - b[c]['ms']:+.2f}" for c in CLASSES) +
                         f"; span {p['span_ms'] - b['span_ms']:+.2f}, idle {p['idle_ms'] - b['idle_ms']:+.2f}")
    return "\n".join(lines)


def kernel_us(fn, per_call: int, iters: int, name: str) -> list:
    """[[us of each of the per_call kernels named *name* of one call] for each of iters calls]."""
    us = [u for _, u, n in gpu_kernels(fn, iters) if name in n]
    return [us[i:i + per_call] for i in range(0, len(us) - per_call + 1, per_call)]


# ----------------------------------------------------------------------------- decode and serve


def copy_bandwidth(d) -> float:
    """GB/s of a large device-to-device copy, bytes read plus written (the HBM ceiling): the best of
    30 after a warm-up. The median swings with the machine's moment (4017-4187 GB/s between three
    processes on one H200), the best hardly (4174-4206), and a floor is what the memory can do."""
    if d.device.type != "cuda":
        return float("nan")
    a = torch.empty(2 ** 30, dtype=torch.uint8, device=d.device)
    b = torch.empty_like(a)
    ms = min(timed(lambda: b.copy_(a), 30, warmup=10))
    return 2 * a.numel() / ms / 1e6


def step_bytes(model, B: int, ctx: int) -> int:
    """What a decode step must read on this rank: every weight but the embedding table (B rows of
    it), and the K/V of B sequences of ctx positions."""
    w = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.head is not model.embed_tokens:
        w -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return w + model.cache_bytes(B * ctx)


def cmd_decode(args, d):
    """ms per decode step by batch size and context, graphs on and off, against the floor: this
    rank's step bytes at the copy bandwidth measured in the same run. `ms` is one step alone, from
    its enqueue until its tokens are on the host; `pipelined` a step of a run of them as the engine
    runs them (pipelined_ms), which the % of the floor is of; `host` the time to enqueue a step."""
    model = build_model(args, d)
    tuning = load_tuning(args, model, d)
    bw = copy_bandwidth(d)
    fast = getattr(model.layers[0].attn, "decode_kernel", None) is not None   # the fast path runs here
    modes = args.modes or (["graphs", "graphs-flash", "graphs-cublas", "eager"] if fast else ["graphs", "eager"])
    modes = [m for m in modes if d.device.type == "cuda" or m == "eager"]
    head = ["batch", "context", "floor ms"] + [f"{m} {x}" for m in modes
                                               for x in ("ms", "pipelined ms", "% of floor", "tok/s", "host ms")]
    table, rows = [head], []
    g = torch.Generator(d.device).manual_seed(0)
    for ctx in args.contexts:
        for B in args.batches:
            floor = step_bytes(model, B, ctx) / bw / 1e6
            row, line = {"batch": B, "context": ctx, "floor_ms": floor}, [B, ctx, f"{floor:.2f}"]
            if d.device.type == "cuda" and model.cache_bytes(B * ctx + 1) > 0.9 * torch.cuda.mem_get_info()[0]:
                say(d, f"  batch {B} context {ctx}: its KV cache ({model.cache_bytes(B * ctx) / 2**30:.0f} GiB) "
                       f"does not fit beside the weights; skipped")
                table.append(line + ["does not fit"] * (len(head) - 3))
                continue
            backend = comm.make_comm(args.comm, d, model.cfg.hidden, B, model.norm.weight.dtype)
            for mode in modes:
                if fast:   # -flash: decode tokens through FlashAttention; -cublas: every GEMM through cuBLAS
                    off = {"graphs-flash": "decode_attention", "graphs-cublas": "gemv"}.get(mode)
                    fastpath.enable(model, [p for p in fastpath.PATHS if p != off])
                runner = engine.Runner(weave.Weaver(model, backend, "auto", tuning), B * ctx, mode != "eager", ctx,
                                       fastpath.argmax if fast else engine.greedy)
                for layer in model.layers:          # never time on zeros
                    for c in (layer.attn.k_cache, layer.attn.v_cache):
                        c.normal_(generator=g)
                runner.capture([B])
                spans = [Span(i * ctx, ctx - 1, 1) for i in range(B)]
                tokens = random_tokens(B, model.cfg.vocab, B)
                host, step = [], []
                for i in range(args.iters + 3):
                    sync()
                    barrier()
                    t0 = time.perf_counter()
                    nxt = runner.step(spans, tokens, list(range(B)), engine.Sampling())
                    t1 = time.perf_counter()
                    nxt.tolist()
                    t2 = time.perf_counter()
                    if i >= 3:
                        host.append(slowest_rank((t1 - t0) * 1e3))
                        step.append(slowest_rank((t2 - t0) * 1e3))
                st, hs = stats(step), stats(host)
                pl = stats([pipelined_ms(runner, spans, tokens, args.iters) for _ in range(5)])
                row[mode] = {**st, "host_ms": hs["median"], "pipelined": pl}
                if args.profile and mode != "eager":
                    row[mode]["profile"] = step_profile(functools.partial(runner.step, spans, tokens, list(range(B)),
                                                                          engine.Sampling()))
                    say(d, profile_text(row[mode]["profile"], f"batch {B} context {ctx} {mode}"))
                line += [fmt(st, 2), fmt(pl, 2), f"{100 * floor / pl['median']:.0f}%", f"{B / pl['median'] * 1e3:.0f}",
                         f"{hs['median']:.2f}"]
                say(d, f"  batch {B} context {ctx} {mode}: {st['median']:.2f} ms alone, {pl['median']:.2f} pipelined "
                       f"(floor {floor:.2f}), host {hs['median']:.2f} ms")
                del runner
                model.allocate_cache(0)
                if d.device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            table.append(line)
    title = (f"{args.model} ({model.cfg.n_layers} layers), TP {d.world}, decode step in ms: median (p10-p90) of "
             f"{args.iters}; floor = this rank's weights + KV at {bw:.0f} GB/s (the best copy bandwidth, this run)")
    if args.hf:
        del model
        ms = hf_decode_ms(args.model, args.contexts[0], d)
        rows.append({"hf_static_cache_ms": ms, "batch": 1, "context": args.contexts[0]})
        title += f"; HF transformers generate (static cache, its compile), batch 1, context {args.contexts[0]}: {ms:.2f} ms"
    return title, table, rows


def pipelined_ms(runner, spans, tokens, n: int) -> float:
    """ms per step of n decode steps run as Engine.generate runs them: step k + 1 is enqueued, its
    tokens carried over from step k's output on the device, before the host waits for step k's."""
    ids, carry = list(range(len(spans))), [(i, i) for i in range(len(spans))]
    flight = engine.Flight([], runner.step(spans, tokens, ids, engine.Sampling()))
    flight.tokens()
    barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = runner.step(spans, tokens, ids, engine.Sampling(), (flight.nxt, carry))
        flight.tokens()
        flight = engine.Flight([], nxt)
    flight.tokens()
    return slowest_rank((time.perf_counter() - t0) * 1e3 / n)


def hf_decode_ms(preset: str, ctx: int, d) -> float:
    """ms per new token of HF transformers' own generate at batch 1 with its static cache (which it
    compiles), the same shape with random weights: what a user would otherwise run."""
    import transformers
    if preset not in models.PRESETS or d.world != 1 or d.device.type != "cuda":
        raise UserError("--hf needs a preset shape, one process and a GPU")
    c = dict(models.PRESETS[preset])
    cfg = transformers.AutoConfig.for_model(c.pop("model_type"), **c)
    with torch.device(d.device):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), device=d.device)

    def gen(n):
        sync()
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
        sync()
        return time.perf_counter() - t0
    for _ in range(2):             # compile and warm up
        gen(65)
    ms = stats([(gen(65) - gen(1)) / 64 * 1e3 for _ in range(3)])["median"]
    say(d, f"  HF transformers {transformers.__version__} generate, static cache, batch 1, context {ctx}: {ms:.2f} ms")
    return ms


def step_profile(fn) -> dict:
    """Where one step's GPU time goes: its kernels in order (profiler durations), the span from the
    first kernel's start to the last one's end, the time some kernel runs in it (with PDL the
    kernels overlap: the union of their intervals) and the idle rest. Layers are cut at the comm
    points (every kernel named *add_rmsnorm*, two per layer), so each position within a layer gets
    the median duration over the layers, and the median of what it adds to the step: its end minus
    the end of the kernel before it (with PDL a kernel's duration includes the time its CTAs wait
    for the one before, so the durations overlap and only these sum to the span)."""
    ks = gpu_kernels(fn, 1)
    adds = [ks[0][1]] + [max(0.0, s + u - (s0 + u0)) for (s0, u0, _), (s, u, _) in zip(ks, ks[1:])]
    span = max(s + u for s, u, _ in ks) - ks[0][0]
    busy, end = 0.0, float("-inf")
    for s, u, _ in ks:                 # by start
        busy += max(0.0, s + u - max(s, end))
        end = max(end, s + u)
    cuts = [i for i, k in enumerate(ks) if "add_rmsnorm" in k[2]]
    bounds = list(zip(cuts[0:-1:2], cuts[2::2]))
    layers = [ks[a + 1:b + 1] for a, b in bounds]
    per_layer = []
    if layers and all(len(x) == len(layers[0]) for x in layers):
        for pos in range(len(layers[0])):
            per_layer.append({"name": layers[0][pos][2][:90], "us": stats([x[pos][1] for x in layers])["median"],
                              "adds_us": stats([adds[a + 1 + pos] for a, _ in bounds])["median"]})
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy, "kernels": len(ks), "layers": len(layers),
            "head_us": sum(u for _, u, _ in ks[:cuts[0] + 1]) if cuts else 0.0,
            "tail": [{"name": n[:90], "us": u} for _, u, n in ks[cuts[-1] + 1:]] if cuts else [],
            "per_layer": per_layer}


def profile_text(p: dict, what: str) -> str:
    lines = [f"  profile, {what}: {p['kernels']} kernels over {p['span_us']:.0f} us, busy {p['busy_us']:.0f} us, "
             f"idle {p['idle_us']:.0f} us; {p['layers']} layers, head {p['head_us']:.0f} us"]
    lines += [f"    layer x{p['layers']}: {k['us']:8.1f} us, adds {k['adds_us']:6.1f}  {k['name']}" for k in p["per_layer"]]
    lines += [f"    tail:     {k['us']:8.1f} us  {k['name']}" for k in p["tail"]]
    return "\n".join(lines)


def cmd_attention(args, d):
    """Decode attention alone, on this rank's heads of the model: the extension's split-KV kernel
    against FlashAttention's varlen kernel (what attention used before), B sequences of ctx keys, us
    per call of calls replayed from one CUDA graph, each on another copy of the cache so that none
    is in L2 (as a step finds a layer's cache), against the floor: their K and V bytes at the copy
    bandwidth. Wall time, not the sum of kernel times: with PDL a kernel's time overlaps the one
    before it."""
    module, cfg = models.config(args.model)
    model = models.build(module.Transformer, dataclasses.replace(cfg, n_layers=1), d, torch.bfloat16)
    attn = model.layers[0].attn
    if not fastpath.enable(model) or not attn.decode_kernel:
        raise UserError(f"the extension's decode kernel does not serve {args.model} (head dim {attn.hd}, "
                        f"{attn.nh // attn.nkv} query heads a KV head) or it is not built here")
    bw, l2 = copy_bandwidth(d), torch.cuda.get_device_properties(d.device).L2_cache_size
    g = torch.Generator(d.device).manual_seed(0)
    head = ["batch", "context", "KV MB", "floor us", "ours us", "ours % of floor", "FlashAttention us",
            "FlashAttention % of floor"]
    table, rows = [head], []
    for ctx in args.contexts:
        for B in args.batches:
            kv_bytes = model.cache_bytes(B * ctx)
            if kv_bytes > 0.8 * torch.cuda.mem_get_info()[0]:
                table.append([B, ctx, f"{kv_bytes / 1e6:.0f}"] + ["does not fit"] * (len(head) - 3))
                continue
            caches = [tuple(torch.randn(B * ctx, attn.nkv, attn.hd, generator=g, device=d.device).bfloat16()
                            for _ in range(2)) for _ in range(-(-2 * l2 // kv_bytes))]   # (k, v) copies
            batch = Batch.make([Span(i * ctx, ctx - 1, 1) for i in range(B)], [0] * B, d.device)
            q = torch.randn(B, attn.nh, attn.hd, generator=g, device=d.device).bfloat16()
            floor = kv_bytes / bw / 1e3
            row = {"batch": B, "context": ctx, "kv_bytes": kv_bytes, "floor_us": floor}

            def attend(i):
                attn.k_cache, attn.v_cache = caches[i % len(caches)]
                return attn.attend(q, batch)

            for name, ours in (("ours", True), ("flash", False)):
                attn.decode_kernel = ours
                row[name] = graph_us([functools.partial(attend, i) for i in range(max(8, len(caches)))], args.iters)
            attn.decode_kernel = True
            caches.clear()
            rows.append(row)
            table.append([B, ctx, f"{kv_bytes / 1e6:.0f}", f"{floor:.1f}", f"{row['ours']:.1f}",
                          f"{100 * floor / row['ours']:.0f}%", f"{row['flash']:.1f}", f"{100 * floor / row['flash']:.0f}%"])
            say(d, f"  batch {B} context {ctx}: ours {row['ours']:.1f} us, FlashAttention {row['flash']:.1f} us, "
                   f"floor {floor:.1f} us")
            attn.k_cache = attn.v_cache = None
    return (f"decode attention of {args.model} at TP {d.world} ({attn.nh} query heads, {attn.nkv} KV heads, "
            f"head dim {attn.hd}): us per call in a CUDA graph, median of {args.iters} replays; floor = K and V at {bw:.0f} GB/s "
            f"(the best copy bandwidth, this run)"), table, rows


def cmd_gemm(args, d):
    """A decode step's GEMMs alone, on this rank's shards of the model's weights, through cuBLAS
    (F.linear; gate/up with the SwiGLU kernel after it), through cuBLASLt (addmm with a zero bias
    routes there) and through the extension's gemv (M <= its limit; gate/up with SwiGLU in its
    epilogue), as the model runs them at that M. M tokens; us per call of 24 calls replayed from one CUDA
    graph, as a decode step runs them (launch gaps included), each call on another copy of the
    weights so that none is still in L2; against the floor: the weights' bytes at the copy bandwidth."""
    module, cfg = models.config(args.model)
    model = models.build(module.Transformer, dataclasses.replace(cfg, n_layers=1), d, torch.bfloat16).init_random_()
    if not fastpath.enable(model):
        raise UserError("bench.py gemm needs the fast path's kernels (a Hopper GPU and nvcc)")
    layer, ext = model.layers[0], build_ext.load("decode")
    bw, l2 = copy_bandwidth(d), torch.cuda.get_device_properties(d.device).L2_cache_size
    shapes = {"qkv": layer.attn.qkv, "o_proj": layer.attn.o, "gate_up": layer.mlp.gate_up, "down": layer.mlp.down,
              "lm_head": model.head}
    head = ["layer", "N x K", "M", "floor us"] + [f"{k} {x}" for k in ("cuBLAS", "cuBLASLt", "gemv")
                                                 for x in ("us", "% of floor")]
    table, rows = [head], []
    g = torch.Generator(d.device).manual_seed(0)
    for name, m in shapes.items():
        w, pdl = m.weight, getattr(m, "pdl", True)    # gemv launched as the model launches it
        N, K = w.shape
        size = w.numel() * w.element_size()
        copies = [w] + [w.clone() for _ in range(-(-2 * l2 // size))]
        zero = torch.zeros(N, dtype=w.dtype, device=w.device)
        floor = size / bw / 1e3
        swiglu = name == "gate_up"
        after = layer.mlp.act if swiglu else (lambda y: y)   # noqa: E731
        for M in args.batches:
            x = torch.randn(M, K, generator=g, device=d.device).bfloat16()
            act = torch.empty(M, N // 2 if swiglu else N, dtype=w.dtype, device=w.device)
            fns = {"cublas": lambda w: after(F.linear(x, w)), "lt": lambda w: after(torch.addmm(zero, x, w.t()))}
            if M <= ext.limits["gemv_max_m"] and name != "lm_head":
                fns["gemv"] = lambda w: ext.gemv(x, w, None, act, swiglu, pdl)
            row = {"layer": name, "N": N, "K": K, "M": M, "floor_us": floor}
            row |= {k: graph_us([functools.partial(f, copies[i % len(copies)]) for i in range(24)], args.iters)
                    for k, f in fns.items()}
            rows.append(row)
            pct = lambda k: [f"{row[k]:.1f}", f"{100 * floor / row[k]:.0f}%"] if k in row else ["-", "-"]   # noqa: E731
            table.append([name, f"{N} x {K}", M, f"{floor:.1f}", *pct("cublas"), *pct("lt"), *pct("gemv")])
            say(d, f"  {name} {N}x{K} M {M}: floor {floor:.1f} us, " + ", ".join(f"{k} {row[k]:.1f}" for k in fns))
        del copies
    return (f"decode GEMMs of {args.model} at TP {d.world}: us per call in a CUDA graph of 24 (gate_up with its "
            f"SwiGLU kernel), median of {args.iters} replays; floor = the weights at {bw:.0f} GB/s "
            f"(the best copy bandwidth, this run)"), table, rows


def graph_rounds(steps: dict, iters: int, d, profile: bool = False) -> tuple[dict, dict]:
    """Each step() captured once into a CUDA graph and replayed: {mode: the replays' ms}, the step's
    GPU time with no host time in it (where the host bounds a step, the difference); with profile,
    also {mode: one replay's kernel classes} (a replay has no launch gaps of its own). The replays
    take turns round by round, as the eager steps do: under a power limit the clock drifts through a
    run, and a mode timed after the others would get more of the drift. None for a step that cannot
    be captured on some rank (said on rank 0). The graphs share one memory pool, so that all modes
    together hold one step's activations, not one each: they replay one at a time, and nothing reads
    what one leaves in it."""
    graphs, pool = {}, torch.cuda.graph_pool_handle()
    for m, step in steps.items():
        try:
            graphs[m], _ = engine.capture_graph(step, pool)
        except RuntimeError as e:
            say(d, f"    {m}: cannot capture it: {str(e).splitlines()[0]}")
    captured = torch.tensor([m in graphs for m in steps], dtype=torch.int32, device=d.device)
    if dist.is_initialized():   # every rank times the same modes: timed() meets the other ranks at each call
        dist.all_reduce(captured, op=dist.ReduceOp.MIN)
    graphs = {m: graphs[m] for m, ok in zip(steps, captured.tolist()) if ok}
    times = {m: [] for m in graphs}
    for r in range(iters + 1):
        for m, graph in graphs.items():
            ms = timed(graph.replay, 1, warmup=0)
            if r:                                 # a graph's first replay uploads it
                times[m] += ms
    profiles = {m: kernel_classes(gpu_kernels(graph.replay, 1)) for m, graph in graphs.items()} if profile else {}
    return {m: times.get(m) for m in steps}, profiles


def paired(times: dict, base: str) -> dict:
    """Each mode's speedup over base: the median over rounds of base's ms / the mode's. A round runs
    every mode once, so what drifts through a run (the clock under a power limit) cancels within
    each ratio. None for a mode (or base) without times."""
    return {m: stats([b / x for b, x in zip(times[base], t)])["median"] if t and times[base] else None
            for m, t in times.items() if m != base}


def graph_us(calls: list, iters: int) -> float:
    """us per call of these callables captured once, in order, into a CUDA graph and replayed."""
    graph, _ = engine.capture_graph(lambda: [c() for c in calls])
    return stats(timed(graph.replay, iters))["median"] * 1e3 / len(calls)


def workload(spec: str, vocab: int, seed: int = 0):
    """'NxIN/OUT': N random prompts of IN tokens, OUT new tokens each; IN may be 'mixed' (uniform in
    [128, 2048]) or 'tail' (99% of 512 tokens, 1% of 16K)."""
    try:
        n, rest = spec.split("x", 1)
        lens, out = rest.split("/")
        rng = random.Random(seed)
        pick = {"mixed": lambda i: rng.randint(128, 2048), "tail": lambda i: 16384 if i % 100 == 99 else 512}
        sizes = [pick[lens](i) if lens in pick else int(lens) for i in range(int(n))]
        return [[rng.randrange(vocab) for _ in range(k)] for k in sizes], int(out)
    except (ValueError, KeyError):
        raise UserError(f"workload {spec!r}: expected NxIN/OUT, e.g. 1000x1024/128, 1000xmixed/128 or "
                        f"1000xtail/128") from None


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
        T = sum(w.n for w in step)
        attn = sum(4 * w.n * (w.start + (w.n + 1) / 2) * a.hd * a.nh for w in step) * len(model.layers)
        return 2 * per_token * T + attn + 2 * head * len(step)
    return flops


def cmd_serve(args, d):
    """The paper's throughput setting: N prompts through engine.LLM (chunked prefill, mixed steps),
    per budget, max seqs and mode: the first run in a fresh engine (what a user's run.py gets) and warm runs,
    output and total tokens/s. Also the FLOP rate of its prefill-heavy steps (half the budget or more
    in prompt chunks) against one 16K-token prefill, the time of its decode-only steps, and how many
    sequences ran per step, and the GPU's SM clock while the runs ran (a long run on a power-capped
    GPU holds lower clocks than the reference prefill); with --profile, where the time went by kind
    of step."""
    modes = ["tp1"] if d.world == 1 else args.modes
    head = ["workload", "budget", "max seqs", "mode", "setup s", "first run output tok/s", "warm output tok/s",
            "warm total tok/s", "prefill-heavy TFLOP/s (% of ref)", "decode-only steps: median ms (batch)", "mean running seqs", "steps",
            "SM clock in the runs"]
    table, rows, ref, gbps, ref_clocks = [head], [], None, None, {}
    for spec, budget, max_seqs, mode in itertools.product(args.workloads, args.budgets, args.max_seqs, modes):
        backend, split, carveout, _ = MODES[mode]
        seqs = min(max_seqs, budget)
        what = f"{spec} budget {budget} max seqs {seqs} {mode}"
        with engine.LLM(os.path.expanduser(args.model), comm=backend, weave=split, dist=d,
                        graphs="auto" if args.graphs else "off", layers=args.layers,
                        max_seqs=seqs, max_step_tokens=budget) as llm:
            llm.weaver.tuning = dataclasses.replace(llm.weaver.tuning, carveout=carveout)
            if ref is None:
                with gpu_clocks(d) as ref_clocks:
                    ref = prefill_rate(llm, d)
                say(d, f"  reference: {ref[0]}-token prefill at {ref[1]:.1f} TFLOP/s{clocks_text(ref_clocks)}")
            prompts, out_len = workload(spec, llm.model.cfg.vocab)
            row, steps = serve_runs(llm, d, prompts, out_len, args.iters, budget, ref[1])
            if args.profile:
                gbps = gbps or copy_bandwidth(d)
                kinds = served_kinds(steps, budget, ref[1], gbps, llm.model.cache_bytes(1))
                say(d, f"  {what}, the last warm run by kind of step:\n" +
                    kinds_text(kinds, row["last_wall_s"], gbps, ref[1]))
                prof = served_profile(llm, kinds) if d.device.type == "cuda" else {}
                if prof:
                    say(d, "  each kind's median step replayed, GPU ms (kernels) by class:\n" + classes_text(prof) +
                        "".join(f"\n    {kind} top: " + "; ".join(f"{ms:.2f} ({c}) {name[:70]}" for name, ms, c in p["top"])
                                for kind, p in prof.items()))
                row["by_kind"] = {kind: {key: v for key, v in k.items() if key != "median"} |
                                  {"median_ms": k["median"].seconds * 1e3, "median_seqs": len(k["median"].spans),
                                   "median_prompt": k["median"].prompt} | {"profile": prof.get(kind)}
                                  for kind, k in kinds.items()}
        rows.append({"workload": spec, "budget": budget, "max_seqs": seqs, "mode": mode, **row})
        table.append([spec, budget, seqs, mode, f"{row['setup_s']:.1f}", f"{row['first']:.1f}", fmt_rate(row["output"]),
                      fmt_rate(row["total"]), f"{row['heavy_tflops']:.1f} ({100 * row['heavy_tflops'] / ref[1]:.0f}%)",
                      f"{row['decode_ms']:.2f} ({row['decode_batch']})", f"{row['running']:.1f}", row["steps"],
                      clocks_text(row["clocks"]).removeprefix(", SM clock ") or "-"])
        say(d, f"  {what}: first {row['first']:.1f}, warm {row['output']['median']:.1f} output tok/s")
    title = (f"{args.model}, TP {d.world}, serving throughput: the first run of a fresh engine, then the median "
             f"(p10-p90) of {args.iters} warm runs; reference prefill {ref[0]} tokens at {ref[1]:.1f} TFLOP/s"
             f"{clocks_text(ref_clocks)}; SM clock: the median while busy, and the power draw")
    return title, table, rows


class Served(typing.NamedTuple):
    """One step of a served run, as on_step saw it."""
    flops: float      # matrix FLOPs (step_flops)
    prompt: int       # tokens of prompt chunks in it
    spans: list       # [Span], the decode tokens first
    seconds: float    # since the step before it delivered its tokens

    @property
    def kv_rows(self) -> int:   # cache rows its attention reads: each span's keys, prefix included
        return sum(s.start + s.n for s in self.spans)


def serve_runs(llm, d, prompts, out_len: int, iters: int, budget: int, ref_tflops: float) -> tuple:
    """(the row of figures, [Served] of the last warm run)."""
    flops = step_flops(llm.model)
    sync()
    t0 = time.perf_counter()
    llm.prepare(prompts, out_len)          # what run.py does before its ready line: pool, graphs
    sync()
    setup = time.perf_counter() - t0
    runs = []
    with gpu_clocks(d) as clocks:
        for _ in range(iters + 1):          # the first run, then the warm ones
            steps = []
            sync()
            barrier()
            t0 = time.perf_counter()
            done = list(llm.generate(prompts, out_len, on_step=lambda step, s: steps.append(Served(
                flops(step), sum(w.n for w in step if w.start < len(w.seq.prompt)),
                [Span(w.seq.row, w.start, w.n) for w in step], s))))
            wall = slowest_rank(time.perf_counter() - t0)
            n_out, n_in = sum(len(s.out) for s in done), sum(len(s.prompt) for s in done)
            runs.append((n_out / wall, (n_in + n_out) / wall, steps, wall))
    warm = runs[1:] or runs
    heavy = [st for *_, steps, _ in warm for st in steps if st.prompt >= budget / 2]
    decode = sorted((st.seconds * 1e3, len(st.spans)) for *_, steps, _ in warm for st in steps if st.prompt == 0)
    dec = decode[len(decode) // 2] if decode else (float("nan"), 0)
    steps, wall = warm[-1][2:]
    return {"setup_s": setup, "first": runs[0][0], "output": stats([r[0] for r in warm]),
            "total": stats([r[1] for r in warm]), "ref_tflops": ref_tflops,
            "heavy_tflops": sum(st.flops for st in heavy) / max(sum(st.seconds for st in heavy), 1e-9) / 1e12,
            "decode_ms": dec[0], "decode_batch": dec[1], "running": sum(len(st.spans) for st in steps) / max(len(steps), 1),
            "steps": len(steps), "kv_rows": llm.engine.rows, "last_wall_s": wall, "clocks": clocks}, steps


STEP_KINDS = {"prefill-heavy": lambda prompt, budget: prompt >= budget / 2,
              "mixed": lambda prompt, budget: 0 < prompt < budget / 2,
              "decode-only": lambda prompt, budget: prompt == 0}


def served_kinds(steps: list, budget: int, ref_tflops: float, gbps: float, kv_row_bytes: int) -> dict:
    """Where a served run's time went, by kind of step (STEP_KINDS): the steps, their seconds and
    share of the run's wall time, and their floor: the FLOPs at the reference prefill's rate plus
    the KV cache their attention reads (every key once) at the copy bandwidth."""
    out = {}
    for kind, pick in STEP_KINDS.items():
        mine = [st for st in steps if pick(st.prompt, budget)]
        if mine:
            flop_s = sum(st.flops for st in mine) / ref_tflops / 1e12
            kv_s = sum(st.kv_rows for st in mine) * kv_row_bytes / gbps / 1e9
            out[kind] = {"steps": len(mine), "s": sum(st.seconds for st in mine), "flop_floor_s": flop_s,
                         "kv_floor_s": kv_s, "median": sorted(mine, key=lambda st: st.seconds)[len(mine) // 2]}
    return out


def served_profile(llm, kinds: dict) -> dict:
    """Each kind's step of median time replayed (the cache as the run left it): GPU ms by kernel
    class, span, idle and the host's time to issue it; ms alone (the median of 5, waiting after
    each) and back to back (10 enqueued, then one wait: as a run enqueues them)."""
    runner, out = llm.engine.runner, {}
    for kind, k in kinds.items():
        spans = k["median"].spans
        fn = functools.partial(runner.step, spans, [0] * sum(s.n for s in spans), list(range(len(spans))),
                               engine.Sampling())
        ks = gpu_kernels(fn, 1)
        out[kind] = kernel_classes(ks) | {"top": top_kernels(ks, 6), "host_ms": issue_ms(fn),
                                          "alone_ms": stats(timed(fn, 5, warmup=1))["median"],
                                          "back_to_back_ms": back_to_back_ms(fn, 10)}
    return out


def top_kernels(ks: list, n: int) -> list:
    """[(name, ms, calls)] of the n kernels (by name) that take the most GPU time."""
    by = {}
    for _, us, name in ks:
        ms, calls = by.get(name[:100], (0.0, 0))
        by[name[:100]] = ms + us / 1e3, calls + 1
    return sorted(((k, round(ms, 3), c) for k, (ms, c) in by.items()), key=lambda x: -x[1])[:n]


def back_to_back_ms(fn, n: int) -> float:
    """ms per call of n calls enqueued one after the other, as a run enqueues its steps (no wait
    between them): against a call alone, what running in a stream of steps costs or saves."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / n


def kinds_text(kinds: dict, wall: float, gbps: float, ref_tflops: float) -> str:
    return "\n".join(f"    {kind:>13}: {k['steps']} steps, {k['s']:.2f} s ({100 * k['s'] / wall:.0f}% of {wall:.2f} s); "
                     f"floor {k['flop_floor_s'] + k['kv_floor_s']:.2f} s = FLOPs {k['flop_floor_s']:.2f} at "
                     f"{ref_tflops:.0f} TFLOP/s + KV reads {k['kv_floor_s']:.2f} at {gbps:.0f} GB/s; median step "
                     f"{k['median'].seconds * 1e3:.2f} ms ({len(k['median'].spans)} seqs, {k['median'].prompt} prompt tokens)"
                     for kind, k in kinds.items())


def prefill_rate(llm, d):
    """(T, TFLOP/s) of one T-token prefill, unsplit (the reference for the serve run's prompt chunks)."""
    model = llm.model
    T = min(16384, model.cfg.max_positions)
    llm.engine.close()                      # its pool and graphs go first; the next prepare makes them again
    model.allocate_cache(T)
    weaver = weave.Weaver(model, comm.make_comm(llm.comm.name if d.world > 1 else "auto", d, model.cfg.hidden, T,
                                                model.norm.weight.dtype), "off", llm.weaver.tuning)
    batch = weaver.batch(prefill_spans(T, 1), random_tokens(T, model.cfg.vocab, 0))
    ms = stats(timed(lambda: weaver(batch), 3, warmup=1))["median"]
    model.allocate_cache(0)
    return T, step_flops(model)([engine.Work(engine.Sequence(0, [0] * T, 1), T, 0)]) / ms / 1e9


def fmt_rate(st: dict) -> str:
    return f"{st['median']:.1f} ({st['p10']:.1f}-{st['p90']:.1f})"


# ----------------------------------------------------------------------------- a checkpoint to run


DEMO_WORDS = ("the quick brown fox jumps over lazy dog tensor parallel layers end with an all-reduce fusing it "
              "residual add and RMSNorm saves memory traffic once upon a time there was small model random weights "
              "splits tokens of step into two halves overlaps communication one half computation other").split()


def cmd_checkpoint(args, d):
    """A random-weight checkpoint of a preset's shape in HF layout (safetensors shards of ~4 GB,
    config.json, the demo's tokenizer) and a prompts file, for timing run.py end to end."""
    from safetensors.torch import save_file
    module, cfg = models.config(args.model)
    out = args.dir
    os.makedirs(out, exist_ok=True)
    meta = models.build(module.Transformer, cfg, group.Dist(device=torch.device("meta")), torch.bfloat16)
    g = torch.Generator(d.device).manual_seed(0)
    shard, shards, size, index = {}, [], 0, {}
    for name, s in sorted(meta.loaders().items()):
        shard[name] = (torch.ones(s.full, device=d.device) if name.endswith("norm.weight") else
                       torch.randn(s.full, generator=g, device=d.device) * 0.02).bfloat16().cpu()
        size += shard[name].numel() * 2
        if size > 4 * 2**30:
            shards.append(shard)
            shard, size = {}, 0
    shards.append(shard)
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
        index |= {name: fname for name in tensors}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(models.PRESETS[args.model], f, indent=1)
    demo = models.resolve(None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(demo, name)) as src, open(os.path.join(out, name), "w") as dst:
            dst.write(src.read())
    tok = models.Tokenizer(out, cfg.vocab)
    rng, words = random.Random(0), DEMO_WORDS     # words the demo's tokenizer was trained on: ~1 token each
    per_word = len(tok.encode([" ".join(words)])[0]) / len(words)
    with open(os.path.join(out, "prompts.txt"), "w") as f:
        for _ in range(args.prompts):
            f.write(" ".join(rng.choice(words) for _ in range(int(args.prompt_tokens / per_word))) + "\n")
    lens = [len(ids) for ids in tok.encode(open(os.path.join(out, "prompts.txt")).read().splitlines()[:50])]
    return (f"{args.model} checkpoint in {out}: {len(shards)} shards, {args.prompts} prompts of ~{sum(lens) // len(lens)} "
            f"tokens in prompts.txt"), [["shards", "prompts"], [len(shards), args.prompts]], []


# ----------------------------------------------------------------------------- output


def trace(weaver, batch, path: str, d):
    """A Chrome trace of one step, and on rank 0 a PNG timeline of the compute and comm streams."""
    from torch.profiler import ProfilerActivity, profile
    weaver(batch)
    sync()
    barrier()   # else the first comm point shows the ranks' skew as a long wait for peers
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        weaver(batch)
        sync()
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
        is_comm = any(k in e["name"] for k in ("allreduce", "AllReduce", "nccl"))
        ax.broken_barh([((e["ts"] - t0) / 1e3, e["dur"] / 1e3)], (y - 0.4, 0.8), color="tab:red" if is_comm else "tab:blue")
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


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",")]   # noqa: E731
    names = lambda s: s.split(",")                    # noqa: E731
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="llama-3.3-70b", help=f"a full-size shape with random weights "
                        f"({', '.join(models.PRESETS)}) or a checkpoint directory (default llama-3.3-70b)")
    common.add_argument("--layers", type=int, help="run only this many layers (quick sweeps); default: all")
    common.add_argument("--iters", type=int, default=10, help="timed iterations per figure (default 10)")
    common.add_argument("--tuning", help="tuning table to use (default: configs/ for this GPU, model and TP)")
    common.add_argument("--out", help="also write the JSON document to this file")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True, metavar="command")

    def command(name, help):
        return sub.add_parser(name, parents=[common], help=help, description=help)
    m = command("model", "end-to-end prefill latency by mode")
    m.add_argument("--tokens", type=ints, default=[1024, 2048, 4096, 8192, 16384], help="prefill token counts")
    m.add_argument("--seqs", type=ints, default=[1], help="split each step into this many sequences (list)")
    m.add_argument("--modes", type=names, default=None, help=f"modes to compare, from {', '.join(MODES)} (default "
                   "nccl,fuse-only,weave,none under torchrun, tp1,tp1-flash,tp1-split,tp1-split-flash on one GPU)")
    m.add_argument("--trace", help="write a Chrome trace of one weave step here, and a PNG timeline beside it")
    m.add_argument("--plot", help="write a PNG of latency vs tokens, one line per mode")
    m.add_argument("--graph", action="store_true", help="also time each mode's step replayed from a CUDA graph, "
                   "captured once per figure: its GPU time without the host's (where the host bounds a step)")
    m.add_argument("--profile", action="store_true", help="also profile one step per figure and mode: GPU ms and "
                   "kernels by class (GEMM, attention, comm point, copy/index, elementwise), span, idle time and the "
                   "host's time to issue the step, and each mode's difference from the base mode's; with --graph, of one "
                   "replay too")
    t = command("tune", "sweep split offset, CTA budgets and carveout; write configs/")
    t.add_argument("--tokens", type=ints, default=[1024, 2048, 4096, 8192, 16384], help="prefill token counts")
    t.add_argument("--ctas", type=ints, default=[2, 4, 8, 16], help="CTA budgets to try (default 2,4,8,16)")
    k = command("kernel", "the comm point alone: fused kernel vs NCCL, or its virtual ranks on one GPU")
    k.add_argument("--tokens", type=ints, default=None, help="token counts (default 1024..16384; 1..256 with --virtual)")
    k.add_argument("--ctas", type=ints, default=[2, 4, 8, 16, 32], help="CTA counts (default 2,4,8,16,32)")
    k.add_argument("--hidden", type=int, default=8192, help="hidden size (default 8192)")
    k.add_argument("--repeat", type=int, default=10, help="calls per timed iteration (default 10)")
    k.add_argument("--virtual", type=int, default=0, help="N: time N virtual ranks on this one GPU (comm.VirtualRanks)")
    dc = command("decode", "ms per decode step vs the memory floor, graphs on and off")
    dc.add_argument("--batches", type=ints, default=[1, 8, 32, 128], help="batch sizes (default 1,8,32,128)")
    dc.add_argument("--contexts", type=ints, default=[1024, 8192], help="context lengths (default 1024,8192)")
    dc.add_argument("--comm", default="auto", help="comm backend (default auto)")
    dc.add_argument("--modes", type=names, default=None, help="graphs (decode steps replayed from CUDA graphs), "
                    "graphs-flash (the same with decode attention through FlashAttention's varlen kernel instead "
                    "of the extension's), graphs-cublas (the same with every GEMM through cuBLAS instead of the "
                    "extension's gemv for up to 8 tokens), eager; default all four on CUDA")
    dc.add_argument("--hf", action="store_true", help="also time HF transformers' generate at batch 1 with its static "
                    "cache on the same preset shape (random weights; compiles for a minute or more)")
    dc.add_argument("--profile", action="store_true", help="also profile one step per figure: kernels per layer, "
                    "their durations, and the GPU's idle time between kernels")
    at = command("attention", "decode attention alone: the extension's kernel vs FlashAttention, vs the floor")
    at.add_argument("--batches", type=ints, default=[1, 8, 32, 128], help="batch sizes (default 1,8,32,128)")
    at.add_argument("--contexts", type=ints, default=[1024, 8192, 32768],
                    help="keys per sequence (default 1024,8192,32768)")
    gm = command("gemm", "a decode step's GEMMs alone: cuBLAS, cuBLASLt and the extension's gemv, vs the floor")
    gm.add_argument("--batches", type=ints, default=[1, 2, 4, 8, 16, 32, 64, 128],
                    help="tokens M (default 1,2,4,8,16,32,64,128)")
    s = command("serve", "throughput of many prompts through engine.LLM, first run and warm")
    s.add_argument("--workloads", type=names, default=["1000x1024/128", "1000xmixed/128"],
                   help="NxIN/OUT prompt sets, comma-separated; IN may be 'mixed' (128-2048) or 'tail' (1%% of 16K)")
    s.add_argument("--budgets", type=ints, default=[2048, 8192], help="step token budgets (default 2048,8192)")
    s.add_argument("--modes", type=names, default=["nccl", "fuse-only", "weave", "none"],
                   help="modes to compare under torchrun (at TP 1: tp1)")
    s.add_argument("--max-seqs", type=ints, default=[256], help="running sequences at most, a list to compare "
                   "(default 256; at most the budget)")
    s.add_argument("--graphs", type=int, default=1, help="1 = decode steps from CUDA graphs (default), 0 = eager")
    s.add_argument("--profile", action="store_true", help="also say where the last warm run's time went by kind of step "
                   "(prefill-heavy, mixed, decode-only) against its floor (FLOPs at the reference prefill's rate + the KV "
                   "cache its attention reads at the copy bandwidth), and replay each kind's median step: GPU ms by "
                   "kernel class, idle time, the host's time to issue it, ms alone and back to back")
    c = command("checkpoint", "write a random-weight checkpoint of a preset's shape and a prompts file")
    c.add_argument("dir", help="where to write it")
    c.add_argument("--prompts", type=int, default=1000, help="prompts in prompts.txt (default 1000)")
    c.add_argument("--prompt-tokens", type=int, default=1024, help="about this many tokens each (default 1024)")
    args = p.parse_args(argv)
    if args.what == "kernel" and args.tokens is None:
        args.tokens = [1, 2, 8, 32, 128, 256] if args.virtual else [1024, 2048, 4096, 8192, 16384]
    return args


COMMANDS = {"model": cmd_model, "kernel": cmd_kernel, "tune": cmd_tune, "decode": cmd_decode, "attention": cmd_attention,
            "gemm": cmd_gemm, "serve": cmd_serve, "checkpoint": cmd_checkpoint}


def main(argv=None):
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    multi = args.what == "tune" or (args.what == "kernel" and not args.virtual)
    try:
        if (multi or args.what in ("kernel", "attention", "gemm")) and not torch.cuda.is_available():
            raise UserError(f"bench.py {args.what} needs CUDA GPUs")
        d = group.init_distributed("auto")
        if multi and d.world < 2:
            raise UserError(f"bench.py {args.what} needs at least 2 ranks: torchrun --nproc-per-node N bench.py ...")
        if args.what == "model" and args.modes is None:
            args.modes = ["tp1", "tp1-flash", "tp1-split", "tp1-split-flash"] if d.world == 1 else \
                ["nccl", "fuse-only", "weave", "none"]
        env = environment()
        say(d, f"# {env['gpu']} x{env['world']}, driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}, "
               f"NCCL {env['nccl']}, commit {env['commit']}")
        t0 = time.time()
        with torch.no_grad():
            title, table, rows = COMMANDS[args.what](args, d)
    except UserError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if d.rank == 0:
        print(f"\n{title}\n")
        print("| " + " | ".join(map(str, table[0])) + " |\n|" + "---|" * len(table[0]))
        for line in table[1:]:
            print("| " + " | ".join(map(str, line)) + " |")
        doc = json.dumps({"what": args.what, "title": title, "env": env, "args": vars(args), "rows": rows,
                          "seconds": round(time.time() - t0, 1)})
        if args.out:
            with open(args.out, "w") as f:
                f.write(doc + "\n")
        print(doc)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
