"""JIT build of multimem_ops.cu (sm_90a) with torch.utils.cpp_extension, cached and torchrun-safe.

    import build_ext; ops = build_ext.load()      # the compiled module, built once per source
    python build_ext.py [--verbose] [--sass]      # prebuild; --sass checks the kernels' SASS

The build lives in $XDG_CACHE_HOME/tokenweave/ext-<hash> (default ~/.cache), keyed by the source,
the build flags and the torch / CUDA versions, so an edit rebuilds and an old build is never
loaded by mistake. Under torch.distributed the first load() is collective (every rank must call
it): LOCAL_RANK 0 builds while the other ranks wait at a barrier, then they load the finished
build; if the build fails, every rank raises the same BuildError.
"""
import argparse
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

NAME = "tokenweave_ops"
SOURCE = Path(__file__).resolve().with_name("multimem_ops.cu")
# The kernels use sm_90a-only PTX (multimem); an explicit -gencode makes cpp_extension add no
# other arch, and TORCH_CUDA_ARCH_LIST is pinned too for torch versions that still look at it.
CUDA_FLAGS = ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "-lineinfo"]
ARCH_LIST = "9.0a"

_module = None


class BuildError(RuntimeError):
    """The extension cannot be built or loaded here; the message says why and what to do."""


def available() -> tuple[bool, str]:
    """Whether the extension can be built here (cheap checks only, no compilation), and why not."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA: install a CUDA build of torch"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible: the fused kernels need a Hopper GPU"
    dev = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(dev)
    if major != 9:
        return False, (f"GPU {dev} ({torch.cuda.get_device_name(dev)}) has compute capability "
                       f"{major}.{minor}: the fused kernels need Hopper (9.x, sm_90a)")
    from torch.utils.cpp_extension import CUDA_HOME
    if not CUDA_HOME or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return False, (f"nvcc not found (CUDA_HOME={CUDA_HOME}): install the CUDA toolkit torch "
                       f"was built with ({torch.version.cuda}); set CUDA_HOME or put nvcc on PATH")
    return True, f"ok: {torch.cuda.get_device_name(dev)}, CUDA_HOME={CUDA_HOME}"


def build_dir() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join([torch.__version__, str(torch.version.cuda), *CUDA_FLAGS]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tokenweave" / f"ext-{key.hexdigest()[:16]}"


def _build(directory: Path, verbose: bool):
    """Compile (or just load, when up to date) the extension; cpp_extension locks the directory."""
    from torch.utils import cpp_extension
    directory.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ARCH_LIST
    try:
        return cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cuda_cflags=CUDA_FLAGS,
                                  build_directory=str(directory), verbose=verbose)
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


def _build_here(directory: Path, verbose: bool):
    ok, why = available()
    if not ok:
        raise BuildError(why)
    built = directory / f"{NAME}.so"
    if built.exists() and not verbose:   # the directory is keyed by the source: importing it is enough
        return _import(built)
    return _build(directory, verbose)


def _import(path: Path):
    """The built module, imported directly: cpp_extension.load would import setuptools and run ninja
    to find it up to date, about a second of every start-up."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _try(fn):
    """(result, None) or (None, one-line reason): under torchrun, errors wait for the barrier."""
    try:
        return fn(), None
    except BuildError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - reported to every rank as a BuildError
        first = (str(e).strip().splitlines() or [""])[0]
        return None, (f"building {SOURCE.name} failed ({type(e).__name__}: {first}); "
                      "run `python build_ext.py --verbose` to see the compiler output")


def load(verbose: bool = False):
    """The compiled module (memoized). Raises BuildError with the reason when it cannot be built."""
    global _module
    if _module is not None:
        return _module
    directory = build_dir()
    failed = directory / "FAILED"  # how the builder tells the waiting ranks why it failed
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    builder = not dist or int(os.environ.get("LOCAL_RANK", "0")) == 0
    module = error = None
    if builder:
        with contextlib.suppress(OSError):
            failed.unlink(missing_ok=True)
        module, error = _try(lambda: _build_here(directory, verbose))
        if error:
            with contextlib.suppress(OSError):
                directory.mkdir(parents=True, exist_ok=True)
                failed.write_text(error)
    if dist:
        torch.distributed.barrier()  # every rank, exactly once, whatever happened above
        if not builder:
            with contextlib.suppress(OSError):
                error = failed.read_text()
            if error is None:  # built: this only loads it (or builds here if rank 0 could not)
                module, error = _try(lambda: _build_here(directory, verbose))
    if error:
        raise BuildError(error)
    limits = module.limits()
    _module = types.SimpleNamespace(
        fused_add_rmsnorm=_checked(module.fused_add_rmsnorm, _check_add_rmsnorm, limits),
        fused_allreduce_add_rmsnorm=_checked(module.fused_allreduce_add_rmsnorm, _check_allreduce, limits),
        rope_kv_cache=_checked(module.rope_kv_cache, _check_rope, limits),
        decode_attention=_checked(module.decode_attention, _check_decode, limits),
        silu_mul=_checked(module.silu_mul, _check_silu_mul, limits),
        gemv=_checked(module.gemv, _check_gemv, limits),
        gemv_rope=_checked(module.gemv_rope, _check_gemv_rope, limits),
        argmax=_checked(module.argmax, _check_argmax, limits),
        decode_slices=module.decode_slices, resident_ctas=module.resident_ctas, limits=limits, so=module.__file__)
    return _module


# Every argument is validated here, in Python, once: the extension only unpacks and launches (on the
# H200 machines its own C++ error paths crashed the process instead of reporting). The limits
# come from the extension itself (multimem_ops.cu's constants). A caller that builds its arguments
# itself once (comm.FusedComm, per comm point) can skip the checks, a few microseconds a call, with
# op.unchecked.
def _checked(op, check, limits):
    def unchecked(*args):
        if error := op(*args):
            raise RuntimeError(error)

    def call(*args):
        check(limits, *args)
        unchecked(*args)
    call.__doc__, call.unchecked = op.__doc__, unchecked
    return call


def _check_tensors(op: str, limits, like, **tensors):
    H, most = like.shape[-1], limits["max_hidden"]
    if H % 8 or not 0 < H <= most:
        raise RuntimeError(f"{op}: hidden size must be a multiple of 8 (16-byte vectors) in [8, {most}], got {H}")
    for name, t in tensors.items():
        if not t.is_cuda or t.dtype != torch.bfloat16 or not t.is_contiguous() or t.device != like.device:
            raise RuntimeError(f"{op}: {name} must be a contiguous bfloat16 CUDA tensor on {like.device}, "
                               f"got {t.dtype} on {t.device}, contiguous={t.is_contiguous()}")
        if t.data_ptr() % 16:
            raise RuntimeError(f"{op}: {name} must be 16-byte aligned (data_ptr % 16 == 0); "
                               f"a view at an odd row or column offset is not")


def _check_add_rmsnorm(limits, x, residual, weight, eps):
    _check_tensors("fused_add_rmsnorm", limits, x, x=x, residual=residual, weight=weight)
    if residual.shape != x.shape or weight.shape != x.shape[-1:]:
        raise RuntimeError(f"fused_add_rmsnorm: residual must have x's shape {tuple(x.shape)} and weight "
                           f"[{x.shape[-1]}], got {tuple(residual.shape)} and {tuple(weight.shape)}")


def _check_allreduce(limits, buf, peer_bufs, multicast_ptr, peer_flags, rank, residual, weight, eps, n_ctas,
                     timeout_s):
    op, peers, most = "fused_allreduce_add_rmsnorm", limits["max_peers"], limits["max_ctas"]
    _check_tensors(op, limits, buf, buf=buf, residual=residual, weight=weight)
    if buf.dim() != 2:
        raise RuntimeError(f"{op}: buf must be [rows, hidden], got {tuple(buf.shape)}")
    n, (Tp, H) = len(peer_bufs), buf.shape
    if not 2 <= n <= peers or len(peer_flags) != n or not 0 <= rank < n or peer_bufs[rank] != buf.data_ptr():
        raise RuntimeError(f"{op}: need 2 to {peers} ranks with one buffer and one flag address each, and "
                           f"peer_bufs[rank] == buf.data_ptr() (got {n} buffers, {len(peer_flags)} flags, rank {rank})")
    if any(p % 16 or not p for p in peer_bufs) or multicast_ptr % 16 or any(f % 4 or not f for f in peer_flags):
        raise RuntimeError(f"{op}: peer and multicast addresses must be 16-byte aligned, flags 4-byte aligned")
    if Tp % n:
        raise RuntimeError(f"{op}: the row count {Tp} must be a multiple of the world size {n} (pad the tokens)")
    if residual.shape != (Tp // n, H) or weight.shape != (H,):
        raise RuntimeError(f"{op}: residual must be this rank's slice [{Tp // n}, {H}] and weight [{H}], "
                           f"got {tuple(residual.shape)} and {tuple(weight.shape)}")
    if not 1 <= n_ctas <= most or timeout_s <= 0:
        raise RuntimeError(f"{op}: n_ctas must be in [1, {most}] (got {n_ctas}) and timeout_s positive")


def _check_rope(limits, qkv, rope, positions, kv_rows, k_cache, v_cache):
    op = "rope_kv_cache"
    if not qkv.is_cuda or qkv.dtype != torch.bfloat16 or not qkv.is_contiguous():
        raise RuntimeError(f"{op}: qkv must be a contiguous bfloat16 CUDA tensor, got {qkv.dtype} on {qkv.device}, "
                           f"contiguous={qkv.is_contiguous()}")
    nkv, hd = _check_rope_operands(op, qkv.device, qkv.shape[0], rope, positions, kv_rows, k_cache, v_cache, 8)
    if qkv.dim() != 2 or qkv.shape[1] % hd or qkv.shape[1] // hd <= 2 * nkv:
        raise RuntimeError(f"{op}: qkv must be [T, (nh + 2 * {nkv}) * {hd}], got {tuple(qkv.shape)}")


def _check_rope_operands(op, device, T, rope, positions, kv_rows, k_cache, v_cache, hd_multiple):
    """The RoPE table, the tokens' positions and cache rows, and the caches: (nkv, hd)."""
    for name, t, dtype in [("rope", rope, torch.bfloat16), ("positions", positions, torch.int32),
                           ("kv_rows", kv_rows, torch.int32), ("k_cache", k_cache, torch.bfloat16),
                           ("v_cache", v_cache, torch.bfloat16)]:
        if not t.is_cuda or t.dtype != dtype or not t.is_contiguous() or t.device != device:
            raise RuntimeError(f"{op}: {name} must be a contiguous {dtype} CUDA tensor on {device}, "
                               f"got {t.dtype} on {t.device}, contiguous={t.is_contiguous()}")
    if k_cache.dim() != 3 or v_cache.shape != k_cache.shape or k_cache.shape[2] % hd_multiple:
        raise RuntimeError(f"{op}: k_cache and v_cache must be [rows, nkv, hd] alike with hd % {hd_multiple} == 0, "
                           f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    nkv, hd = k_cache.shape[1:]
    if positions.shape != (T,) or kv_rows.shape != (T,) or rope.dim() != 3 or rope.shape[1:] != (2, hd):
        raise RuntimeError(f"{op}: positions and kv_rows must be [{T}], rope [max_len, 2, {hd}]; got "
                           f"{tuple(positions.shape)}, {tuple(kv_rows.shape)}, {tuple(rope.shape)}")
    return nkv, hd


def _check_decode(limits, q, k_cache, v_cache, kv_starts, kv_lens, out, part_o, part_lse, max_k, scale):
    op, hd, most = "decode_attention", limits["decode_head_dim"], limits["decode_max_group"]
    for name, t, dtype in [("k_cache", k_cache, torch.bfloat16), ("v_cache", v_cache, torch.bfloat16),
                           ("kv_starts", kv_starts, torch.int32), ("kv_lens", kv_lens, torch.int32),
                           ("out", out, torch.bfloat16), ("part_o", part_o, torch.float32),
                           ("part_lse", part_lse, torch.float32)]:
        if not t.is_cuda or t.dtype != dtype or not t.is_contiguous() or t.device != q.device:
            raise RuntimeError(f"{op}: {name} must be a contiguous {dtype} CUDA tensor on {q.device}, "
                               f"got {t.dtype} on {t.device}, contiguous={t.is_contiguous()}")
    if q.dtype != torch.bfloat16 or q.dim() != 3 or q.stride(2) != 1 or q.stride(1) != q.shape[2] or q.stride(0) % 2:
        raise RuntimeError(f"{op}: q must be bfloat16 [B, nh, hd] with contiguous heads (rows may be strided), "
                           f"got {q.dtype} {tuple(q.shape)} strides {q.stride()}")
    B, nh, _ = q.shape
    if k_cache.dim() != 3 or v_cache.shape != k_cache.shape or k_cache.shape[2] != hd or q.shape[2] != hd:
        raise RuntimeError(f"{op}: q [B, nh, {hd}] and k_cache, v_cache [rows, nkv, {hd}] alike; got "
                           f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    nkv = k_cache.shape[1]
    if nh % nkv or nh // nkv > most:
        raise RuntimeError(f"{op}: needs nh a multiple of nkv with at most {most} query heads per kv head, "
                           f"got nh {nh}, nkv {nkv}")
    if kv_starts.shape != (B,) or kv_lens.shape != (B,) or out.shape != q.shape:
        raise RuntimeError(f"{op}: kv_starts and kv_lens must be [{B}] and out {tuple(q.shape)}; got "
                           f"{tuple(kv_starts.shape)}, {tuple(kv_lens.shape)}, {tuple(out.shape)}")
    splits = _module.decode_slices(max_k) if max_k >= 1 else 0
    if splits < 1 or (splits > 1 and (part_o.shape != (splits, B, nh, hd) or part_lse.shape != (splits, B, nh))):
        raise RuntimeError(f"{op}: max_k must be at least 1 and, with {max_k}, part_o [{splits}, {B}, {nh}, {hd}] "
                           f"and part_lse [{splits}, {B}, {nh}]; got {tuple(part_o.shape)} and {tuple(part_lse.shape)}")
    if B and not 1 <= int(kv_lens.min()) <= int(kv_lens.max()) <= max_k:
        raise RuntimeError(f"{op}: every kv_lens must be in [1, max_k = {max_k}]")


def _check_silu_mul(limits, gate_up, out):
    op = "silu_mul"
    for name, t in (("gate_up", gate_up), ("out", out)):
        if not t.is_cuda or t.dtype != torch.bfloat16 or not t.is_contiguous() or t.dim() != 2 or t.data_ptr() % 16:
            raise RuntimeError(f"{op}: {name} must be a contiguous, 16-byte aligned 2-D bfloat16 CUDA tensor")
    T, I = out.shape
    if gate_up.shape != (T, 2 * I) or I % 8:
        raise RuntimeError(f"{op}: gate_up must be [T, 2 I] for out [T, I] with I % 8 == 0; got "
                           f"{tuple(gate_up.shape)} and {tuple(out.shape)}")


def _check_gemv(limits, x, w, bias, out, swiglu, pdl=True):
    op = "gemv"
    M, N = _check_gemv_operands(op, limits, x, w, bias, out)
    if swiglu and (N % 2 or bias is not None):
        raise RuntimeError(f"{op}: with swiglu, w is [gate; up] (an even number of rows, got {N}) and has no bias")
    if out.shape != (M, N // 2 if swiglu else N):
        raise RuntimeError(f"{op}: out must be [{M}, {N // 2 if swiglu else N}]; got {tuple(out.shape)}")


def _check_gemv_rope(limits, x, w, bias, q, rope, positions, kv_rows, k_cache, v_cache):
    op = "gemv_rope"
    M, N = _check_gemv_operands(op, limits, x, w, bias, q)
    nkv, hd = _check_rope_operands(op, x.device, M, rope, positions, kv_rows, k_cache, v_cache, 16)
    nh = q.shape[1] // hd if q.dim() == 2 else 0
    if q.dim() != 2 or q.shape[1] % hd or nh < 1 or N != (nh + 2 * nkv) * hd:
        raise RuntimeError(f"{op}: q must be [{M}, nh * {hd}] for w [(nh + 2 * {nkv}) * {hd}, K]; got "
                           f"{tuple(q.shape)} and {tuple(w.shape)}")


def _check_gemv_operands(op, limits, x, w, bias, out):
    """x [M, K], w [N, K], bias [N] or None, a 2-D out: (M, N)."""
    most = limits["gemv_max_m"]
    for name, t in (("x", x), ("w", w), ("bias", bias), ("out", out)):
        if t is None and name == "bias":
            continue
        if not t.is_cuda or t.dtype != torch.bfloat16 or t.device != x.device or t.data_ptr() % 16 or \
                t.stride(-1) != 1 or (t.dim() == 2 and t.stride(0) % 8):
            raise RuntimeError(f"{op}: {name} must be a bfloat16 CUDA tensor on {x.device}, 16-byte aligned, with "
                               f"contiguous rows a multiple of 8 elements apart")
    M, (N, K) = x.shape[0], w.shape
    if x.dim() != 2 or w.dim() != 2 or not w.is_contiguous() or x.shape[1] != K or K % 8 or not 1 <= M <= most:
        raise RuntimeError(f"{op}: x [M, K] and a contiguous w [N, K] with K % 8 == 0 and 1 <= M <= {most}; got "
                           f"{tuple(x.shape)} and {tuple(w.shape)}")
    if out.dim() != 2 or (bias is not None and bias.shape != (N,)):
        raise RuntimeError(f"{op}: out must be 2-D and bias [{N}]; got {tuple(out.shape)} and "
                           f"{None if bias is None else tuple(bias.shape)}")
    return M, N


def _check_argmax(limits, logits, out):
    op = "argmax"
    if not logits.is_cuda or logits.dtype != torch.bfloat16 or logits.dim() != 2 or logits.stride(1) != 1 or \
            logits.stride(0) % 8 or logits.shape[1] % 8 or logits.data_ptr() % 16 or not 0 < logits.shape[1] < 2**31:
        raise RuntimeError(f"{op}: logits must be a 2-D bfloat16 CUDA tensor [B, V], V % 8 == 0, with contiguous "
                           f"16-byte aligned rows a multiple of 8 elements apart; got {logits.dtype} "
                           f"{tuple(logits.shape)} strides {logits.stride()} on {logits.device}")
    if out.dtype != torch.int64 or out.shape != logits.shape[:1] or not out.is_contiguous() or out.device != logits.device:
        raise RuntimeError(f"{op}: out must be a contiguous int64 [{logits.shape[0]}] on {logits.device}; got "
                           f"{out.dtype} {tuple(out.shape)} on {out.device}")


def _cuda_tool(name: str) -> str:
    from torch.utils.cpp_extension import CUDA_HOME
    return shutil.which(name) or str(Path(CUDA_HOME or "/usr/local/cuda") / "bin" / name)


INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)")  # opcode


def sass_counts(so: Path) -> dict[str, dict]:
    """Per kernel, from cuobjdump: multimem instructions, 128-bit global loads and stores, and
    the distinct memory opcodes (to read when a count looks wrong)."""
    sass = subprocess.run([_cuda_tool("cuobjdump"), "--dump-sass", str(so)], capture_output=True,
                          text=True, check=True).stdout
    with contextlib.suppress(OSError, subprocess.CalledProcessError):  # demangle, if cu++filt is
        sass = subprocess.run([_cuda_tool("cu++filt")], input=sass, capture_output=True,
                              text=True, check=True).stdout
    counts, kernel = {}, None
    for line in sass.splitlines():
        if m := re.search(r"Function : (.+)", line):
            kernel = m.group(1).strip()
            counts[kernel] = {"multimem": 0, "LDG.128": 0, "STG.128": 0, "ops": set()}
        elif kernel and (m := INSTRUCTION.search(line)):
            c, op = counts[kernel], m.group(1).split(".")
            # multimem lowers to multicast ("MC") forms of the global memory instructions
            multimem = op[0].endswith("MC") or "MC" in op[1:] or "MULTIMEM" in op
            c["multimem"] += multimem
            c["LDG.128"] += op[0] == "LDG" and "128" in op
            c["STG.128"] += op[0] == "STG" and "128" in op
            if multimem or op[0] in ("LD", "LDG", "ST", "STG", "RED", "REDG", "ATOM", "ATOMG"):
                c["ops"].add(m.group(1))
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    ap.add_argument("--sass", action="store_true",
                    help="after building, print per kernel the number of multimem instructions and "
                         "of 128-bit global loads/stores in its SASS (cuobjdump --dump-sass)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    try:
        module = load(verbose=args.verbose)
    except BuildError as e:
        print(f"build_ext: {e}", file=sys.stderr)
        return 1
    print(f"{NAME} ready in {time.perf_counter() - t0:.1f} s: {module.so}")
    if args.sass:
        print("multimem LDG.128 STG.128  kernel / memory opcodes")
        for kernel, c in sass_counts(Path(module.so)).items():
            print(f"{c['multimem']:8d} {c['LDG.128']:7d} {c['STG.128']:7d}  {kernel}\n"
                  f"{'':26}{' '.join(sorted(c['ops']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
