"""JIT build of the two CUDA extensions (sm_90a) with torch.utils.cpp_extension, cached and torchrun-safe.

    comm   multimem_ops.cu: the technique's kernels (the fused comm point, the local add + RMSNorm)
    decode decode_ops.cu:   the one-GPU fast path's kernels (fastpath.py)

    import build_ext; ops = build_ext.load("comm")   # the compiled module, built once per source
    python build_ext.py [--verbose] [--sass]         # prebuild both; --sass checks the kernels' SASS

A build lives in $XDG_CACHE_HOME/tokenweave/<name>-<hash> (default ~/.cache), keyed by its sources
(the .cu and common.cuh), the build flags and the torch / CUDA versions, so an edit rebuilds and an
old build is never loaded by mistake. Under torch.distributed each extension's first load() is
collective (every rank must call it): LOCAL_RANK 0 builds while the other ranks wait at a barrier,
then they load the finished build; if the build fails, every rank raises the same BuildError.

The bindings check their arguments themselves (see common.cuh) and return "" or a message; the
module load() returns raises the message as a RuntimeError.
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
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SOURCES = {"comm": "multimem_ops.cu", "decode": "decode_ops.cu"}
HEADER = "common.cuh"
# The kernels use sm_90a-only PTX (multimem); an explicit -gencode makes cpp_extension add no
# other arch, and TORCH_CUDA_ARCH_LIST is pinned too for torch versions that still look at it.
CUDA_FLAGS = ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "-lineinfo"]
ARCH_LIST = "9.0a"

_modules = {}


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


def module_name(which: str) -> str:
    return f"tokenweave_{which}"


def build_dir(which: str) -> Path:
    key = hashlib.sha256((HERE / SOURCES[which]).read_bytes() + (HERE / HEADER).read_bytes())
    key.update(" ".join([torch.__version__, str(torch.version.cuda), *CUDA_FLAGS]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tokenweave" / f"{which}-{key.hexdigest()[:16]}"


def _build(which: str, directory: Path, verbose: bool):
    """Compile (or just load, when up to date) the extension; cpp_extension locks the directory."""
    from torch.utils import cpp_extension
    directory.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ARCH_LIST
    try:
        return cpp_extension.load(name=module_name(which), sources=[str(HERE / SOURCES[which])],
                                  extra_cuda_cflags=CUDA_FLAGS, extra_include_paths=[str(HERE)],
                                  build_directory=str(directory), verbose=verbose)
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


def _build_here(which: str, directory: Path, verbose: bool):
    ok, why = available()
    if not ok:
        raise BuildError(why)
    built = directory / f"{module_name(which)}.so"
    if built.exists() and not verbose:   # the directory is keyed by the sources: importing it is enough
        return _import(which, built)
    return _build(which, directory, verbose)


def _import(which: str, path: Path):
    """The built module, imported directly: cpp_extension.load would import setuptools and run ninja
    to find it up to date, about a second of every start-up."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(module_name(which), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _try(which: str, fn):
    """(result, None) or (None, one-line reason): under torchrun, errors wait for the barrier."""
    try:
        return fn(), None
    except BuildError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - reported to every rank as a BuildError
        first = (str(e).strip().splitlines() or [""])[0]
        return None, (f"building {SOURCES[which]} failed ({type(e).__name__}: {first}); "
                      "run `python build_ext.py --verbose` to see the compiler output")


def load(which: str = "comm", verbose: bool = False):
    """The compiled extension `which` (comm or decode), memoized: its functions, each raising its
    binding's message as a RuntimeError. Raises BuildError with the reason when it cannot be built."""
    if which in _modules:
        return _modules[which]
    directory = build_dir(which)
    failed = directory / "FAILED"  # how the builder tells the waiting ranks why it failed
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    builder = not dist or int(os.environ.get("LOCAL_RANK", "0")) == 0
    module = error = None
    if builder:
        with contextlib.suppress(OSError):
            failed.unlink(missing_ok=True)
        module, error = _try(which, lambda: _build_here(which, directory, verbose))
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
                module, error = _try(which, lambda: _build_here(which, directory, verbose))
    if error:
        raise BuildError(error)
    ops = {n: _raising(getattr(module, n)) for n in dir(module) if not n.startswith("_") and n != "limits"
           and callable(getattr(module, n))}
    _modules[which] = types.SimpleNamespace(**ops, limits=module.limits(), so=module.__file__)
    return _modules[which]


def _raising(fn):
    """fn, raising a binding's non-empty message (a str result) as a RuntimeError; queries (a count,
    a dict of limits) pass their result through."""
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, str):
            if out:
                raise RuntimeError(out)
            return None
        return out
    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


def try_load(which: str, device: torch.device, rank: int = 0):
    """load(which) where the extension can be built here (a Hopper GPU, nvcc), else None, with a
    warning on rank 0 if the build itself failed: the callers fall back to torch ops."""
    if device.type != "cuda" or not available()[0]:
        return None
    try:
        return load(which)
    except BuildError as e:
        if rank == 0:
            warnings.warn(f"{e}; using torch ops instead", stacklevel=2)
        return None


def _cuda_tool(name: str) -> str:
    from torch.utils.cpp_extension import CUDA_HOME
    return shutil.which(name) or str(Path(CUDA_HOME or "/usr/local/cuda") / "bin" / name)


INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)")  # opcode


def sass_counts(so: Path) -> dict[str, dict]:
    """Per kernel, from cuobjdump: multimem instructions, 128-bit global loads and stores, cp.async
    copies into shared memory (LDGSTS, the p2p ring's), and the distinct memory opcodes (to read when
    a count looks wrong)."""
    sass = subprocess.run([_cuda_tool("cuobjdump"), "--dump-sass", str(so)], capture_output=True,
                          text=True, check=True).stdout
    with contextlib.suppress(OSError, subprocess.CalledProcessError):  # demangle, if cu++filt is
        sass = subprocess.run([_cuda_tool("cu++filt")], input=sass, capture_output=True,
                              text=True, check=True).stdout
    counts, kernel = {}, None
    for line in sass.splitlines():
        if m := re.search(r"Function : (.+)", line):
            kernel = m.group(1).strip()
            counts[kernel] = {"multimem": 0, "LDG.128": 0, "STG.128": 0, "LDGSTS": 0, "ops": set()}
        elif kernel and (m := INSTRUCTION.search(line)):
            c, op = counts[kernel], m.group(1).split(".")
            # multimem lowers to multicast ("MC") forms of the global memory instructions
            multimem = op[0].endswith("MC") or "MC" in op[1:] or "MULTIMEM" in op
            c["multimem"] += multimem
            c["LDG.128"] += op[0] == "LDG" and "128" in op
            c["STG.128"] += op[0] == "STG" and "128" in op
            c["LDGSTS"] += op[0] == "LDGSTS"
            if multimem or op[0] in ("LD", "LDG", "ST", "STG", "RED", "REDG", "ATOM", "ATOMG", "LDGSTS"):
                c["ops"].add(m.group(1))
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    ap.add_argument("--sass", action="store_true",
                    help="after building, print per kernel the number of multimem instructions, of "
                         "128-bit global loads/stores and of cp.async copies (LDGSTS) in its SASS "
                         "(cuobjdump --dump-sass)")
    args = ap.parse_args()
    for which in SOURCES:
        t0 = time.perf_counter()
        try:
            module = load(which, verbose=args.verbose)
        except BuildError as e:
            print(f"build_ext: {e}", file=sys.stderr)
            return 1
        print(f"{module_name(which)} ready in {time.perf_counter() - t0:.1f} s: {module.so}")
        if args.sass:
            print("multimem LDG.128 STG.128 LDGSTS  kernel / memory opcodes")
            for kernel, c in sass_counts(Path(module.so)).items():
                print(f"{c['multimem']:8d} {c['LDG.128']:7d} {c['STG.128']:7d} {c['LDGSTS']:6d}  {kernel}\n"
                      f"{'':33}{' '.join(sorted(c['ops']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
