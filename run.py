"""Generate text with tensor-parallel TokenWeave inference.

    torchrun --nproc-per-node 4 run.py --model meta-llama/Llama-3.3-70B-Instruct --chat --prompt "Hi"
    torchrun --nproc-per-node 2 run.py          # a tiny random-weight demo model, created once
    python run.py --prompts-file prompts.txt --json > out.jsonl
    cat prompts.txt | python run.py --prompts-file - --json

The tensor-parallel size is the number of processes torchrun starts (--nproc-per-node); plain
`python run.py` runs on one GPU (or the CPU). Any number of prompts stream through the KV cache:
each step packs the running sequences' next tokens and chunks of waiting prompts into one batch of
at most --max-step-tokens, and a large step is split in two halves whose communication and
computation overlap. One prompt is printed as it is generated; many are printed in input order
(or, with --json, one line each as it finishes), with a progress line on stderr.

stdout holds the results only (the text, or with --json one line per prompt); progress, timings
and errors go to stderr. Exit codes: 0 every prompt completed; 1 a prompt or the run failed (the
error: line says why); 2 a bad command line; 130 interrupted (Ctrl-C); 143 a rank was stopped
(SIGTERM; one line says which).
"""
import time

STARTED = time.perf_counter()   # before the heavy imports: start-up counts from here

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import comm  # noqa: E402
import engine  # noqa: E402
import group  # noqa: E402
import models  # noqa: E402
from group import UserError  # noqa: E402

IMPORTED = time.perf_counter()

DEFAULT_PROMPT = {"demo": "The quick brown fox", "model": "Tell me about tensor parallelism."}
STDIN = ("-", "/dev/stdin")


class UsageError(UserError):
    """A bad command line: reported as one line on rank 0, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse would print and exit on every rank
        raise UsageError(f"{message} (see python run.py --help)")

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
                   "added after the --prompt ones; - (or /dev/stdin) reads standard input")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=positive("max-new-tokens"), default=64,
                   help="tokens to generate per prompt, at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this, in (0, 1] (default 1.0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler; matters only with --temperature > 0. "
                   "A prompt's sampled text depends on the seed, its place in the input and nothing else "
                   "(not on --max-seqs, the step budget or the TP size) (default 0)")
    p.add_argument("--max-seqs", type=positive("max-seqs"), help="sequences generated at once, at most (default "
                   "256, or --max-step-tokens if that is lower): decode graphs are captured up to this batch. The "
                   "KV cache holds each running sequence's prompt + --max-new-tokens and is sized from memory "
                   "(see --memory); a prompt waits while no room is free")
    p.add_argument("--max-step-tokens", type=positive("max-step-tokens"), help="token budget of one step: "
                   "decode tokens plus prompt chunks; longer prompts are prefilled over several steps (default "
                   "2048 at TP > 1, as the paper's throughput runs, whose steps the weave splits; 8192 on one GPU, "
                   "where --weave auto splits nothing and larger steps run faster)")
    p.add_argument("--memory", type=float, default=0.9, help="fraction of the GPU's memory this process may "
                   "fill in all (weights, step buffers, KV cache), in (0, 1] (default 0.9; on the CPU: of the "
                   "host's available memory). The ready line says what the KV cache got")
    p.add_argument("--weave", choices=["auto", "on", "off"], help="split steps in two and overlap comm with "
                   "compute: auto = at or above the tuned token threshold (the default), on = every step of 2+ "
                   "tokens (the demo's default, so that its small steps split), off = never")
    p.add_argument("--comm", choices=comm.CHOICES, default="auto",
                   help="comm point backend: fused (one kernel: all-reduce + add + RMSNorm, Hopper, bf16), nccl "
                   "(all-reduce then add + RMSNorm), gloo (CPU reference); auto = fused where it can run, else "
                   "nccl, gloo on CPU. Needs 2+ ranks, except auto. (bench.py also has none: no communication, "
                   "for timing only)")
    p.add_argument("--graphs", choices=["auto", "on", "off"], default="auto", help="replay decode steps from "
                   "CUDA graphs, captured at start for the batch sizes the run can reach: auto = on CUDA "
                   "(default), off = launch every kernel from Python")
    p.add_argument("--tuning", help="a tuning table written by `bench.py tune` (default: configs/<gpu>-<model "
                   "type>-h<hidden>-tp<N>.json when it exists, else the analytic wave model)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda if available")
    p.add_argument("--json", action="store_true", help="print one JSON line per prompt as it finishes: index "
                   "(its place among all prompts), line (its line in --prompts-file), prompt, text, token_ids, "
                   "finish_reason (stop: an end-of-sequence token; length: --max-new-tokens; error), timings; "
                   "error for a prompt that could not run. stdout has nothing else")
    args, extra = p.parse_known_args(argv)
    if extra:
        what = extra[0]
        raise UsageError(f"unknown option {what}; see python run.py --help" if what.startswith("-") else
                         f"unexpected argument {what!r}: give a prompt with --prompt {what!r} (see python run.py --help)")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (1 = keep all tokens), got {args.top_p}")
    if not 0 < args.memory <= 1:
        raise UsageError(f"--memory must be in (0, 1], got {args.memory}")
    if args.comm == "none":
        raise UsageError("--comm none removes the communication, so the text is not the model's: it is a "
                         "benchmark mode (bench.py); use --comm auto")
    if args.weave is None:
        args.weave = "on" if args.model is None else "auto"
    if args.max_seqs is not None and args.max_step_tokens is not None and args.max_seqs > args.max_step_tokens:
        raise UsageError(f"--max-seqs ({args.max_seqs}) must not exceed --max-step-tokens ({args.max_step_tokens}): "
                         f"every running sequence decodes one token per step")
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if args.graphs == "on" and cpu:
        raise UsageError("--graphs on needs CUDA, and this run is on the CPU; use --graphs off (or auto)")
    if args.tuning and os.path.isdir(args.tuning):
        raise UsageError(f"--tuning {args.tuning} is a directory; give a table written by `bench.py tune`")
    if args.tuning and not os.path.exists(args.tuning):
        raise UsageError(f"--tuning {args.tuning} does not exist; `bench.py tune` writes one (or leave --tuning "
                         f"out for the shipped table or the analytic model)")
    return args


def read_prompts(args, d) -> list:
    """[(line in --prompts-file or None, prompt)]. Standard input is read by rank 0 and broadcast."""
    prompts = [(None, p) for p in args.prompt]
    if any(not s.strip() for _, s in prompts):
        raise UsageError("empty prompt: every --prompt needs some text")
    if args.prompts_file:
        f = args.prompts_file
        if f in STDIN:
            got = read_stdin(f) if d.rank == 0 else None
            got = group.broadcast_object(got, d)
        else:
            got = read_file(f)
        if isinstance(got, str):        # rank 0's error, on every rank
            raise UsageError(got)
        prompts += got
    return prompts or [(None, DEFAULT_PROMPT["demo" if args.model is None else "model"])]


def read_file(f: str):
    if os.path.isdir(f):
        return f"--prompts-file {f} is a directory; give a text file with one prompt per line"
    try:
        with open(f, encoding="utf-8-sig") as fh:   # -sig: a byte-order mark is not part of the first prompt
            return read_lines(fh, f)
    except FileNotFoundError:
        return f"--prompts-file {f} does not exist"
    except OSError as e:
        return f"--prompts-file {f} cannot be read ({e.strerror or e})"


def read_stdin(f: str):
    if sys.stdin.isatty():
        print("reading prompts from the terminal, one per line; end with Ctrl-D", file=sys.stderr, flush=True)
    text = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig")
    try:
        return read_lines(text, f)
    finally:
        text.detach()     # sys.stdin's buffer stays open


def read_lines(fh, f: str):
    """[(line number, prompt)] of the non-blank lines, or why not (a message)."""
    try:
        lines = [(i, line.rstrip("\r\n")) for i, line in enumerate(fh, 1) if line.strip()]
    except UnicodeDecodeError as e:
        return f"--prompts-file {f} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
    return lines or f"--prompts-file {f} has no prompts (every line is blank); write one prompt per line"


# ----------------------------------------------------------------------------- output


class Printer:
    """Rank 0's output: streamed text for one prompt; input order (text) or finish order (JSON)
    for many; a progress line and every error on stderr; the summary."""

    def __init__(self, args, prompts, llm, d, load_s, start):
        self.args, self.prompts, self.llm, self.load_s = args, prompts, llm, load_s
        self.on = d.rank == 0
        self.stream = self.on and len(prompts) == 1 and not args.json
        self.pending, self.next, self.done, self.failed, self.tokens = {}, 0, 0, 0, 0
        self.headed, self.shown, self.t0, self.last_progress = False, "", start, 0.0
        self.ttfts, self.n_in, self.n_out, self.last = [], 0, 0, None   # for the summary

    def token(self, seq, t):
        self.tokens += 1
        if self.stream:
            if not self.headed:
                print(f"--- {self.prompts[0][1]}", flush=True)
                self.headed = True
            text = self.llm.decode(seq.out)
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
        line, text = self.prompts[seq.index]
        if seq.error:
            where = f"prompt {seq.index + 1}" + (f" (line {line} of {self.args.prompts_file})" if line else "")
            print(f"error: {where}: {seq.error}", file=sys.stderr, flush=True)
        if self.args.json:
            print(json.dumps(self.record(seq)), flush=True)
        elif self.stream and seq.error is None:
            print(seq.text[len(self.shown):] + "\n", flush=True)   # what was held back, if any
        elif not self.stream:
            self.pending[seq.index] = seq
            while self.next in self.pending:
                s = self.pending.pop(self.next)
                print(f"--- {self.prompts[s.index][1]}\n{s.text if s.error is None else 'error: ' + s.error}\n",
                      flush=True)
                self.next += 1
        self.progress()

    def record(self, seq):
        line, text = self.prompts[seq.index]
        out = {"index": seq.index} | ({"line": line} if line else {}) | {"prompt": text}
        if seq.error:
            return out | {"error": seq.error, "text": "", "token_ids": [], "finish_reason": "error"}
        decode = seq.t_done - seq.t_first
        return out | {"text": seq.text, "token_ids": seq.out, "finish_reason": seq.finish, "ttft_s": seq.t_first - self.t0,
                      "prefill_tok_s": len(seq.prompt) / max(seq.t_first - seq.t_admit, 1e-9),
                      "decode_tok_s": (len(seq.out) - 1) / decode if len(seq.out) > 1 and decode > 0 else None,
                      "decode_steps": len(seq.out) - 1, "load_s": self.load_s}

    def weave_line(self, d):
        """What the weave did: how many steps it split in two, where, and what carried the comm points."""
        r = self.llm.engine.runner
        how = f"comm {self.llm.comm_name}, TP {d.world}"
        if r is None or not r.split_steps:
            why = "TP 1 and --weave auto" if d.world == 1 and self.args.weave == "auto" else \
                "--weave off" if self.args.weave == "off" else f"every step under {self.llm.weaver.threshold} tokens"
            print(f"weave {self.args.weave}: no step split ({why}); {how}", file=sys.stderr, flush=True)
            return
        T, a = r.last_split
        ran = "beside the other half's compute" if d.device.type == "cuda" else "in turn with it (one stream on the CPU)"
        print(f"weave {self.args.weave}: {r.split_steps} of {r.steps} steps split in two (the last: {T} tokens as "
              f"{a} + {T - a}), each half's comm points {ran}; {how}", file=sys.stderr, flush=True)

    def progress(self, final=False):
        now = time.perf_counter()
        if len(self.prompts) < 2 or (not final and now - self.last_progress < 0.5):
            return
        self.last_progress = now
        line = (f"{self.done}/{len(self.prompts)} prompts done{f' ({self.failed} failed)' if self.failed else ''}, "
                f"{self.tokens / (now - self.t0):.1f} tok/s generated")
        tty = sys.stderr.isatty()
        print(("\r" if tty else "") + line, end="\n" if final or not tty else "", file=sys.stderr, flush=True)

    def summary(self, d, wall):
        if not self.on:
            return
        self.progress(final=True)
        self.weave_line(d)
        if not self.ttfts:
            return
        how = f"(TP {d.world}, comm {self.llm.comm_name}, weave {self.args.weave})"
        if len(self.prompts) == 1:
            s = self.last
            dec = (len(s.out) - 1) / (s.t_done - s.t_first) if len(s.out) > 1 and s.t_done > s.t_first else None
            line = (f"load {self.load_s:.1f}s | time to first token {(s.t_first - self.t0) * 1e3:.1f} ms "
                    f"({s.t_first - STARTED:.1f}s after the process started) | prefill "
                    f"{len(s.prompt) / max(s.t_first - s.t_admit, 1e-9):.0f} tok/s | decode "
                    f"{f'{dec:.1f} tok/s' if dec else '-'} {how}")
        else:
            ttft = sorted(self.ttfts)[len(self.ttfts) // 2]
            line = (f"load {self.load_s:.1f}s | {len(self.ttfts)} prompts in {wall:.2f}s | {self.n_out / wall:.1f} "
                    f"output tok/s, {(self.n_in + self.n_out) / wall:.1f} total tok/s | median time to first token "
                    f"{ttft * 1e3:.0f} ms {how}")
        print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- main


def check_gpus(device: str):
    """More processes on this node than GPUs: every rank sees the same numbers, so all of them fail
    here and rank 0 says why (in init_distributed only the ranks without a GPU would fail, silently,
    while rank 0 waited for them)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return
    n, procs = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if n == 0:
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu (or auto)")
    if procs > n:
        raise UserError(f"torchrun started {procs} processes on this node but only {n} GPU{'s' * (n > 1)} "
                        f"{'are' if n > 1 else 'is'} visible; use --nproc-per-node {n} or fewer")


def sync(d) -> float:
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    if d.world > 1:
        dist.barrier()   # every rank is ready: the clock starts for all at once
    return time.perf_counter()


REPORTED = False    # this rank printed the launch's error line


def stop_file() -> str:
    """A file the ranks of one torchrun launch on this host share, keyed by torchrun's run id, port
    and process: the first rank to stop claims it, with the error line it has to say, if any."""
    key = "-".join(os.environ.get(k, "0") for k in ("TORCHELASTIC_RUN_ID", "MASTER_PORT")) + f"-{os.getppid()}"
    return os.path.join(tempfile.gettempdir(), f"tokenweave-{key}.stopped")


def claim_stop(line: str = "") -> bool:
    """Whether this rank is the first of the launch to stop; if so, `line` is left for rank 0."""
    try:
        fd = os.open(stop_file(), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError:
        return False
    os.write(fd, line.encode())
    os.close(fd)
    return True


def on_sigterm(signum, frame):
    """A rank stopped by SIGTERM, from outside or by torchrun after another rank ended: one line for
    the whole launch. The first rank to stop says so; but rank 0, stopped after another rank failed,
    prints that rank's error line instead (only rank 0 prints errors). Then the process ends at
    once, leaving nothing behind."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not REPORTED:
        if world == 1 or claim_stop():
            who = f"rank {rank} of {world}" if world > 1 else "the run"
            also = "; the other ranks stop with it" if world > 1 else ""
            print(f"\nerror: {who} was stopped (SIGTERM){also}", file=sys.stderr, flush=True)
        elif rank == 0:
            with contextlib.suppress(OSError):
                with open(stop_file()) as f:
                    if line := f.read():
                        print(line, file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGTERM)


@torch.no_grad()
def main(argv=None) -> int:
    rank0 = int(os.environ.get("RANK", 0)) == 0
    d, run, completed = None, {}, False
    say = lambda msg: print(msg, file=sys.stderr, flush=True) if ((d.rank == 0) if d else rank0) else None  # noqa: E731
    if __name__ == "__main__":
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        args = parse_args(argv)
        check_gpus(args.device)
        path = models.resolve(args.model)      # before the process group: no rank waits on a download
        d = group.init_distributed(args.device)
        comm.check_comm(args.comm, d)          # the ranks and devices it needs: fails before minutes of loading
        failed = generate(args, d, run, path)
        completed = True
        return 1 if failed else 0    # the others completed; the failed ones said why
    except BrokenPipeError:     # stdout's reader left early (`run.py --json | head -1`)
        stdout_to_devnull()
        say("error: stdout was closed before every result was written (broken pipe)")
        return 1
    except UserError as e:
        global REPORTED
        REPORTED = (d.rank == 0) if d else rank0
        say(f"error: {e}")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:   # rank 0 said it; another rank leaves it to rank 0
            claim_stop("" if REPORTED else f"error: {e}")
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        if run.get("llm") is not None:
            run.pop("llm").close()
        shutdown(d, completed)


def generate(args, d, run: dict, path: str) -> int:
    """Checks what it can before loading (prompts, tokenizer, lengths against the context), loads,
    runs every prompt, prints the results; returns how many prompts failed. The LLM goes into `run`
    so that main closes it (graphs, comm buffers, model) before the process group goes."""
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if d.rank == 0 else (lambda s: None)
    t0 = time.perf_counter()
    prompts = read_prompts(args, d)
    if args.model is None:
        log(f"no --model given: using the demo model at {path} (tiny, RANDOM weights: the text is gibberish)")
    if path in models.PRESETS:
        raise UserError(f"--model {path} is a preset (random weights of that shape, no tokenizer): run.py needs a "
                        f"checkpoint with a tokenizer; time presets with bench.py, or give engine.LLM token ids")
    _, cfg = models.config(path)
    tokenizer = models.Tokenizer(path, cfg.vocab)
    ids = tokenizer.encode([p for _, p in prompts], args.chat)
    if all(len(p) + args.max_new_tokens > cfg.max_positions for p in ids):   # nothing could run: say so now
        shortest, one = min(map(len, ids)), len(ids) == 1
        if shortest >= cfg.max_positions:
            raise UserError(f"{'the prompt has' if one else 'every prompt has'} {shortest}{'' if one else ' or more'} "
                            f"tokens: {'it exceeds' if one else 'they exceed'} the model's context of {cfg.max_positions} "
                            f"by {'itself' if one else 'themselves'}; shorten {'it' if one else 'them'}")
        raise UserError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context of {cfg.max_positions} "
                        f"with {'the prompt' if one else 'any prompt'} ({shortest}{'' if one else ' tokens or more'}"
                        f"{' tokens' if one else ''}); the largest that fits is {cfg.max_positions - shortest}")
    t_prompts = time.perf_counter()
    llm = run["llm"] = engine.LLM(path, comm=args.comm, weave=args.weave, graphs=args.graphs, tuning=args.tuning,
                                  max_seqs=args.max_seqs, max_step_tokens=args.max_step_tokens, memory=args.memory,
                                  dist=d, log=log, tokenizer=tokenizer)
    t_model = sync(d)
    llm.prepare(ids, args.max_new_tokens)
    start = sync(d)
    load_s = start - t0
    eng = llm.engine
    log(f"ready in {load_s:.1f}s ({start - STARTED:.1f}s after the process started: {IMPORTED - STARTED:.1f}s of "
        f"imports, {t0 - IMPORTED:.1f}s starting the device, {t_prompts - t0:.1f}s reading and tokenizing the prompts, "
        f"{t_model - t_prompts:.1f}s loading the model, {start - t_model:.1f}s sizing the KV cache and capturing "
        f"graphs): comm {llm.comm_name}, weave {args.weave}, KV cache {eng.rows} positions "
        f"({llm.model.cache_bytes(eng.rows) / 2**30:.2f} GiB) for up to {eng.max_seqs} sequences, decode graphs "
        f"{'for batches up to ' + str(max(eng.runner.graphs)) if eng.runner.graphs else 'off'}")
    out = Printer(args, prompts, llm, d, load_s, start)
    for seq in llm.generate(ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, on_token=out.token):
        out.finished(seq)
    out.summary(d, sync(d) - start)
    return out.failed


def stdout_to_devnull():
    """What is left in stdout's buffer goes nowhere, instead of failing again at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, ValueError, OSError):   # not a real file (a test's capture)
        pass


def shutdown(d, completed: bool):
    """The teardown, in order: the run's objects are closed (main) and collected; the GPU's queued
    work ends; after a run every rank completed, a barrier, so that no rank destroys the
    communicator while a peer is still freeing its graphs; then the process group."""
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
