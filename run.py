"""Generate text with tensor-parallel TokenWeave inference.

    torchrun --nproc-per-node 4 run.py --model meta-llama/Llama-3.3-70B-Instruct --chat --prompt "Hi"
    torchrun --nproc-per-node 2 run.py          # a tiny random-weight demo model, created once
    python run.py --prompts-file prompts.txt --json > out.jsonl

The tensor-parallel size is the number of processes torchrun starts (--nproc-per-node); plain
`python run.py` runs on one GPU (or the CPU). Any number of prompts stream through a fixed KV
cache: each step packs the running sequences' next tokens and chunks of waiting prompts into one
batch of at most --max-step-tokens, and a large step is split in two halves whose communication
and computation overlap. One prompt is printed as it is generated; many are printed in input order
(or, with --json, one line each as it finishes), with a progress line on stderr.
"""
import argparse
import gc
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import comm
import engine
import models
import weave

DEFAULT_PROMPT = {"demo": "The quick brown fox", "model": "Tell me about tensor parallelism."}


class UsageError(ValueError):
    """A bad command line: reported as one line on rank 0, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse would print and exit on every rank
        raise UsageError(message)

    def print_help(self, file=None):   # --help: once, not once per rank
        if int(os.environ.get("RANK", 0)) == 0:
            super().print_help(file)


def positive(name):
    def parse(s):
        v = int(s)
        if v < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
        return v
    parse.__name__ = name
    return parse


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local checkpoint directory (HF layout: config.json, *.safetensors, "
                   "tokenizer.json) or a hub id to download; default: the tiny random-weight demo model, "
                   "made once in ~/.cache/tokenweave (its text is gibberish)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several. Default, when "
                   f"no prompt is given: {DEFAULT_PROMPT['demo']!r} (demo) or {DEFAULT_PROMPT['model']!r}")
    p.add_argument("--prompts-file", help="a UTF-8 text file with one prompt per line (blank lines skipped), "
                   "added after the --prompt ones")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=positive("max-new-tokens"), default=64,
                   help="tokens to generate per prompt, at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this, in (0, 1] (default 1.0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler; matters only with --temperature > 0 "
                   "(default 0)")
    p.add_argument("--max-seqs", type=positive("max-seqs"), default=64, help="sequences generated at once: the "
                   "KV cache holds this many (default 64; lowered to what fits in GPU memory)")
    p.add_argument("--max-step-tokens", type=positive("max-step-tokens"), default=2048, help="token budget "
                   "of one step: decode tokens plus prompt chunks (default 2048, as the paper's throughput "
                   "runs); longer prompts are prefilled over several steps")
    p.add_argument("--weave", choices=["auto", "on", "off"], default="auto", help="split steps in two and overlap "
                   "comm with compute: auto = at or above the tuned token threshold (default), on = every step "
                   "of 2+ tokens, off = never")
    p.add_argument("--comm", choices=["auto", *comm.BACKENDS], default="auto",
                   help="comm point backend: fused (one kernel: all-reduce + add + RMSNorm, Hopper), nccl "
                   "(all-reduce then add + RMSNorm), gloo (CPU reference), none (no communication: wrong "
                   "results, for timing only); auto = fused where available, else nccl, gloo on CPU. "
                   "Needs 2+ ranks, except auto and none")
    p.add_argument("--graphs", choices=["auto", "on", "off"], default="auto", help="replay decode steps from "
                   "CUDA graphs, captured once per batch size at start: auto = on CUDA (default), off = "
                   "launch every kernel from Python")
    p.add_argument("--tuning", help="a tuning table written by `bench.py tune` (default: configs/<gpu>-<model "
                   "type>-h<hidden>-tp<N>.json when it exists, else the analytic wave model)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda if available")
    p.add_argument("--json", action="store_true", help="print one JSON line per prompt as it finishes (index, "
                   "prompt, text, token_ids, timings; error for a prompt that could not run); stdout has "
                   "nothing else")
    args = p.parse_args(argv)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (1 = keep all tokens), got {args.top_p}")
    if args.max_seqs > args.max_step_tokens:
        raise UsageError(f"--max-seqs ({args.max_seqs}) must not exceed --max-step-tokens ({args.max_step_tokens}): "
                         f"every running sequence decodes one token per step")
    if args.graphs == "on" and args.device == "cpu":
        raise UsageError("--graphs on needs CUDA; on the CPU use --graphs off (or auto)")
    if args.tuning and os.path.isdir(args.tuning):
        raise UsageError(f"--tuning {args.tuning} is a directory; give a table written by `bench.py tune`")
    if args.tuning and not os.path.exists(args.tuning):
        raise UsageError(f"--tuning {args.tuning} does not exist; `bench.py tune` writes one (or leave --tuning "
                         f"out for the shipped table or the analytic model)")
    return args


def read_prompts(args) -> list:
    prompts = list(args.prompt)
    if args.prompts_file:
        f = args.prompts_file
        if os.path.isdir(f):
            raise UsageError(f"--prompts-file {f} is a directory; give a text file with one prompt per line")
        try:
            with open(f, encoding="utf-8-sig") as fh:   # -sig: a byte-order mark is not part of the first prompt
                lines = [line.rstrip("\n") for line in fh if line.strip()]
        except FileNotFoundError:
            raise UsageError(f"--prompts-file {f} does not exist") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompts-file {f} is not UTF-8 text ({e.reason} at byte {e.start}); "
                             f"save it as UTF-8") from None
        except OSError as e:
            raise UsageError(f"--prompts-file {f} cannot be read ({e.strerror or e})") from None
        if not lines:
            raise UsageError(f"--prompts-file {f} has no prompts (every line is blank); write one prompt per line")
        prompts += lines
    if any(not s.strip() for s in prompts):
        raise UsageError("empty prompt: every --prompt needs some text")
    return prompts or [DEFAULT_PROMPT["demo" if args.model is None else "model"]]


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str):
    from tokenizers import Tokenizer
    f = os.path.join(path, "tokenizer.json")
    if not os.path.exists(f):
        raise FileNotFoundError(f"no tokenizer.json in {path}: this runner needs a `tokenizers` tokenizer file")
    try:
        return Tokenizer.from_file(f)
    except Exception as e:   # the tokenizers library raises a bare Exception
        raise ValueError(f"{f} is not a readable tokenizer ({e}); it may be truncated: download it again") from None


def encode_prompts(tok, prompts, path: str, chat: bool) -> list:
    if not chat:
        return [tok.encode(p).ids for p in prompts]
    tc = models.read_json(path, "tokenizer_config.json")
    template = tc.get("chat_template")
    if isinstance(template, list):   # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if not template:
        raise ValueError(f"--chat: the checkpoint in {path} has no chat template (tokenizer_config.json)")
    import jinja2
    special = lambda v: v.get("content") if isinstance(v, dict) else v
    try:
        render = jinja2.Environment().from_string(template).render
        texts = [render(messages=[{"role": "user", "content": p}], add_generation_prompt=True,
                        bos_token=special(tc.get("bos_token")) or "", eos_token=special(tc.get("eos_token")) or "")
                 for p in prompts]
    except jinja2.TemplateError as e:
        raise ValueError(f"--chat: the chat template in {os.path.join(path, 'tokenizer_config.json')} does not "
                         f"render ({type(e).__name__}: {e}); fix it, or leave --chat out") from None
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


# ----------------------------------------------------------------------------- output


class Printer:
    """Rank 0's output: streamed text for one prompt; input order (text) or finish order (JSON)
    for many; a progress line on stderr; the summary."""

    def __init__(self, args, prompts, tok, eos, d, load_s, start):
        self.args, self.prompts, self.tok, self.eos, self.load_s = args, prompts, tok, eos, load_s
        self.on = d.rank == 0
        self.stream = self.on and len(prompts) == 1 and not args.json
        self.pending, self.next, self.done, self.failed, self.tokens = {}, 0, 0, 0, 0
        self.shown, self.t0, self.last_progress = "", start, 0.0
        self.ttfts, self.n_in, self.n_out, self.last = [], 0, 0, None   # for the summary

    def text(self, ids):
        return self.tok.decode([t for t in ids if t not in self.eos])

    def token(self, seq, t):
        self.tokens += 1
        if self.stream:
            if not self.shown:
                print(f"--- {self.prompts[0]}", flush=True)
            text = self.text(seq.out)
            if not text.endswith("\ufffd"):   # an incomplete UTF-8 character: wait for the rest
                print(text[len(self.shown):], end="", flush=True)
                self.shown = text

    def finished(self, seq):
        self.done += 1
        self.failed += seq.error is not None
        if seq.error is None:
            self.ttfts.append(seq.t_first - self.t0)
            self.n_in, self.n_out, self.last = self.n_in + len(seq.prompt), self.n_out + len(seq.out), seq
        if not self.on:
            return
        if self.args.json:
            print(json.dumps(self.record(seq)), flush=True)
        elif self.stream and seq.error:
            print(f"--- {self.prompts[0]}\nerror: {seq.error}\n", flush=True)
        elif self.stream:
            print(self.text(seq.out)[len(self.shown):] + "\n", flush=True)   # what was held back, if any
        else:
            self.pending[seq.index] = seq
            while self.next in self.pending:
                s = self.pending.pop(self.next)
                print(f"--- {self.prompts[s.index]}\n{self.text(s.out) if s.error is None else 'error: ' + s.error}\n",
                      flush=True)
                self.next += 1
        self.progress()

    def record(self, seq):
        out = {"index": seq.index, "prompt": self.prompts[seq.index]}
        if seq.error:
            return out | {"error": seq.error, "text": "", "token_ids": []}
        decode = seq.t_done - seq.t_first
        return out | {"text": self.text(seq.out), "token_ids": seq.out, "ttft_s": seq.t_first - self.t0,
                      "prefill_tok_s": len(seq.prompt) / max(seq.t_first - seq.t_admit, 1e-9),
                      "decode_tok_s": (len(seq.out) - 1) / decode if len(seq.out) > 1 and decode > 0 else None,
                      "decode_steps": len(seq.out) - 1, "load_s": self.load_s}

    def progress(self, final=False):
        now = time.perf_counter()
        if len(self.prompts) < 2 or (not final and now - self.last_progress < 0.5):
            return
        self.last_progress = now
        line = (f"{self.done}/{len(self.prompts)} prompts done{f' ({self.failed} failed)' if self.failed else ''}, "
                f"{self.tokens / (now - self.t0):.1f} tok/s generated")
        tty = sys.stderr.isatty()
        print(("\r" if tty else "") + line, end="\n" if final or not tty else "", file=sys.stderr, flush=True)

    def summary(self, d, comm_name, wall):
        if not self.on:
            return
        self.progress(final=True)
        if self.args.json or not self.ttfts:
            return
        if len(self.prompts) == 1:
            s = self.last
            dec = (len(s.out) - 1) / (s.t_done - s.t_first) if len(s.out) > 1 and s.t_done > s.t_first else None
            print(f"load {self.load_s:.1f}s | time to first token {(s.t_first - self.t0) * 1e3:.1f} ms | prefill "
                  f"{len(s.prompt) / max(s.t_first - s.t_admit, 1e-9):.0f} tok/s | decode "
                  f"{f'{dec:.1f} tok/s' if dec else '-'} (TP {d.world}, comm {comm_name}, weave {self.args.weave})")
        else:
            ttft = sorted(self.ttfts)[len(self.ttfts) // 2]
            print(f"load {self.load_s:.1f}s | {len(self.ttfts)} prompts in {wall:.2f}s | {self.n_out / wall:.1f} "
                  f"output tok/s, {(self.n_in + self.n_out) / wall:.1f} total tok/s | median time to first token "
                  f"{ttft * 1e3:.0f} ms "
                  f"(TP {d.world}, comm {comm_name}, weave {self.args.weave})")


# ----------------------------------------------------------------------------- main


def check_gpus(device: str):
    """More processes on this node than GPUs: every rank sees the same numbers, so all of them fail
    here and rank 0 says why (in init_distributed only the ranks without a GPU would fail, silently,
    while rank 0 waited for them)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return
    n, procs = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if n == 0:
        raise RuntimeError("--device cuda: no CUDA GPU is visible; use --device cpu (or auto)")
    if procs > n:
        raise RuntimeError(f"torchrun started {procs} processes on this node but only {n} GPU{'s' * (n > 1)} "
                           f"{'are' if n > 1 else 'is'} visible; use --nproc-per-node {n} or fewer")


def model_path(args, d) -> str:
    if args.model is not None:
        return models.resolve(args.model, d)
    try:
        return models.resolve(None, d)
    except OSError as e:
        why = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        raise RuntimeError(f"cannot create the demo model in {models.DEMO_DIR} ({why}); set XDG_CACHE_HOME to a "
                           f"writable directory, or pass --model") from None


def model_config(path: str):
    """(model file, Config) from the checkpoint's config.json, or an error that names the file."""
    f = os.path.join(path, "config.json")
    if not os.path.exists(f):
        raise FileNotFoundError(f"no config.json in {path}: --model needs a checkpoint directory in HF layout "
                                f"(config.json, *.safetensors, tokenizer.json)")
    hf = models.read_json(path, "config.json")
    if not isinstance(hf, dict):
        raise ValueError(f"{f} is not a model config (a JSON object with model_type, hidden_size, ...)")
    try:
        return models.config(hf)
    except (KeyError, TypeError) as e:
        what = f"has no {e.args[0]!r}" if isinstance(e, KeyError) else f"has a value of the wrong type ({e})"
        raise ValueError(f"{f} {what}: it is not a complete {hf.get('model_type')} config") from None


def load_tuning(args, cfg, module, d):
    try:
        return weave.Tuning.load(args.tuning or weave.tuning_path(cfg, d.world),
                                 threshold=module.Transformer.weave_threshold, required=bool(args.tuning))
    except ValueError as e:
        if not args.tuning:
            raise
        raise ValueError(f"--tuning: {e}; run `bench.py tune` again, or leave --tuning out") from None


def sync(d) -> float:
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    if d.world > 1:
        dist.barrier()   # every rank has loaded: the clock starts for all at once
    return time.perf_counter()


@torch.no_grad()
def main(argv=None) -> int:
    rank0 = int(os.environ.get("RANK", 0)) == 0
    d, completed = None, False
    try:
        args = parse_args(argv)
        prompts = read_prompts(args)
        check_gpus(args.device)
        d = comm.init_distributed(args.device)
        comm.check_comm(args.comm, d)          # fails before minutes of loading
        failed = generate(args, prompts, d)
        completed = True
        return 1 if failed else 0    # the others completed; the failed ones said why
    except BrokenPipeError:     # stdout's reader left early (`run.py --json | head -1`)
        stdout_to_devnull()
        if (d.rank == 0) if d else rank0:
            print("error: stdout was closed before every result was written (broken pipe)", file=sys.stderr,
                  flush=True)
        return 1
    except (ValueError, OSError, RuntimeError) as e:   # OSError: FileNotFoundError, ConnectionError, ...
        if (d.rank == 0) if d else rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        if (d.rank == 0) if d else rank0:
            print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        shutdown(d, completed)


def generate(args, prompts, d) -> int:
    """Loads the model, runs every prompt, prints the results; returns how many prompts failed.
    Whatever holds on to the process group lives in this frame only, so it is all freed when this
    returns (or raises), before the group is destroyed: the engine's CUDA graphs, which captured the
    comm's collectives (NCCL's communicator cannot be torn down while a graph holds it), the comm
    buffers in symmetric memory, the model."""
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if d.rank == 0 else (lambda s: None)
    t0 = time.perf_counter()
    path = model_path(args, d)
    if args.model is None:
        log(f"no --model given: using the demo model at {path} (tiny, RANDOM weights: the text is gibberish)")
    module, cfg = model_config(path)
    tuning = load_tuning(args, cfg, module, d)
    tok = load_tokenizer(path)
    ids = encode_prompts(tok, prompts, path, args.chat)
    fits = [len(p) + args.max_new_tokens for p in ids if len(p) + args.max_new_tokens <= cfg.max_positions]
    dtype = getattr(torch, cfg.dtype.replace("torch.", "")) if d.device.type == "cuda" else torch.float32
    model = models.load(path, d, dtype, log=log)
    eos = models.eos_ids(model, path)
    backend = comm.make_comm(args.comm, d, cfg.hidden, args.max_step_tokens, dtype)
    weaver = weave.Weaver(model, backend, args.weave, tuning)
    graphs = args.graphs == "on" or (args.graphs == "auto" and d.device.type == "cuda")
    eng = engine.Engine(weaver, args.max_seqs, args.max_step_tokens, max(fits, default=1), graphs,
                        args.temperature, args.top_p, args.seed, log=log)
    name = backend.name + (f"/{backend.transport}" if backend.name == "fused" else "")
    start = sync(d)
    load_s = start - t0
    log(f"ready in {load_s:.1f}s: comm {name}, weave {args.weave}, graphs {'on' if graphs else 'off'}, "
        f"{eng.max_seqs} sequences x {eng.max_len} positions")
    out = Printer(args, prompts, tok, eos, d, load_s, start)
    for seq in eng.generate(ids, args.max_new_tokens, eos, on_token=out.token):
        out.finished(seq)
    out.summary(d, name, sync(d) - start)
    return out.failed


def stdout_to_devnull():
    """What is left in stdout's buffer goes nowhere, instead of failing again at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, ValueError, OSError):   # not a real file (a test's capture)
        pass


def shutdown(d, completed: bool):
    """The teardown, in order: the run's objects are gone with generate's frame (and any cycles
    here); the GPU's queued work ends; after a run every rank completed, a barrier, so that no rank
    destroys the communicator while a peer is still freeing its graphs; then the process group."""
    try:
        sys.stdout.flush()
    except OSError:
        stdout_to_devnull()
    if not dist.is_initialized():
        return
    try:
        gc.collect()
        if d is not None and d.device.type == "cuda":
            torch.cuda.synchronize()
        if completed and d is not None and d.world > 1:
            dist.barrier()
        dist.destroy_process_group()
    except Exception as e:     # a peer gone, a CUDA error already reported: what was printed stands
        if (d.rank == 0) if d else int(os.environ.get("RANK", 0)) == 0:
            print(f"warning: shutdown: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
