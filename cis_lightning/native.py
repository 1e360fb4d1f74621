"""The CPU training step's host work as C kernels (`native.c`), built on first use and called by ctypes.

A training step of the 100 x 50 model at batch 2048 is about a millisecond on a CPU, most of it the
per-call cost of some 60 numpy and torch operations on a few thousand numbers: the sparse draw, the
bookkeeping of the active entries (dropping empty samples, grouping by row and by feature) and the
embedding bags of the fused loss. `native.c` does each of those in one call. The matrix products
stay torch's (MKL).

The library is compiled with the system's C compiler (`$CC`, else `cc`) for this CPU (`-march=native`)
into `$CIS_NATIVE_CACHE` (default `~/.cache/cis_lightning`), once per source, compiler and CPU, and
loaded from there afterwards; a compile takes about a second. Where there is no compiler or the build
fails, `library()` warns once and returns None, and the numpy and torch forms run instead: the same
draw bit for bit, the same loss up to float rounding (tests/test_native.py). `CIS_NATIVE=0` turns
the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cis_lightning import rng

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared")

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "cis_active_entries": ([_I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR], None),
    "cis_prepare": ([_I64] * 4 + [_PTR] * 6, _I64),
    "cis_hidden_cross": ([_I64] * 5 + [_PTR] * 12, None),
    "cis_feature_grads": ([_I64] * 4 + [_PTR] * 11, None),
}


def cache_dir() -> Path:
    if os.environ.get("CIS_NATIVE_CACHE"):
        return Path(os.environ["CIS_NATIVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cis_lightning"


_turned_off = False


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (turned off, or no build: one warning, then the numpy/torch forms)."""
    return None if _turned_off or os.environ.get("CIS_NATIVE", "1") == "0" else _library()


@contextlib.contextmanager
def turned_off() -> Iterator[None]:
    """The numpy and torch forms instead of the C kernels, inside (for comparing the two)."""
    global _turned_off
    before, _turned_off = _turned_off, True
    try:
        yield
    finally:
        _turned_off = before


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"cis: the C kernels of the CPU path could not be built ({first_line}); using the numpy and torch "
            "forms (the same results, slower steps)",
            stacklevel=2,
        )
        return None
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    return lib


def _build() -> Path:
    """The shared library for this source, compiler and CPU: built once, atomically, into cache_dir()."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (set CC or install cc)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()):
        digest.update(part)
    target = cache_dir() / f"native-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private name, then one rename: ranks that build at once never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (an -march=native build runs only where they match)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor() + platform.machine()


def _ptr(a: Tensor | np.ndarray) -> int:
    """The address of a's first element: the kernels read every array as dense and row-major."""
    if not (a.flags.c_contiguous if isinstance(a, np.ndarray) else a.is_contiguous()):
        raise ValueError(f"the C kernels take contiguous arrays, got one of shape {tuple(a.shape)} with other strides")
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()


def _dense(a: Tensor | None) -> Tensor | None:
    """a laid out as the kernels read it (a copy only if a is a strided view)."""
    return None if a is None else a.contiguous()


def active_entries(
    lib: ctypes.CDLL,
    base: np.ndarray,
    step: int,
    log1m_p: np.ndarray,
    counters: np.ndarray,
    total: int,
    count: int,
    n: int,
    local: int,
    rank: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """`task._active_entries` on host arrays with the key of `step` (`rng.step_key(base, step)`, made
    in C): base (K,) int64 and log1m_p (K,) float64, dense. The same bits."""
    k = base.shape[0]
    row, feature = torch.empty(k, count, dtype=torch.int64), torch.empty(k, count, dtype=torch.int64)
    value = torch.empty(k, count, dtype=torch.float32)
    lib.cis_active_entries(
        k,
        _ptr(base),
        rng.step_hash(step),
        _ptr(log1m_p),
        _ptr(counters),
        count,
        total,
        n,
        local,
        rank,
        row.data_ptr(),
        feature.data_ptr(),
        value.data_ptr(),
    )
    return row, feature, value


def prepare(lib: ctypes.CDLL, row: Tensor, feature: Tensor, value: Tensor, batch_size: int, n: int) -> tuple:
    """`fused.drop_empty_rows(sources=False, merge_single=True)` then `_Entries.on_host` (row,
    feature int64 and value float32, each (K, C)): (R, feature, row, value, relu_value, row_start,
    u_sq, row_by_feature, value_by_feature, relu_value_by_feature, feature_start), the arrays flat and
    stacked (K W entries: W <= C columns, the padding past the fullest instance dropped)."""
    k, c = row.shape
    row, feature = row.contiguous().long(), feature.contiguous().long()
    value = value.contiguous().float()
    ints = torch.empty(3 * k * c + 2 * k * n + k * (batch_size + 1), dtype=torch.int64)
    floats = torch.empty(4 * k * c + k * (batch_size + 1), dtype=torch.float32)
    width = ctypes.c_int64()
    r = lib.cis_prepare(
        k,
        c,
        batch_size,
        n,
        _ptr(row),
        _ptr(feature),
        _ptr(value),
        ctypes.addressof(width),
        ints.data_ptr(),
        floats.data_ptr(),
    )
    if r < 0:
        raise MemoryError("cis_prepare: no memory for its scratch arrays")
    # The arrays lie one after another in the two arenas (`cis_prepare`): one split each.
    e, kn, rows = k * width.value, k * n, k * (r + 1)
    feature, row, row_by_feature, feature_start, _, row_start, _ = ints.split(
        [e, e, e, kn, kn, rows, ints.shape[0] - 3 * e - 2 * kn - rows]
    )
    value, relu_value, value_by_feature, relu_by_feature, u_sq, _ = floats.split(
        [e, e, e, e, rows, floats.shape[0] - 4 * e - rows]
    )
    return (
        r,
        feature,
        row,
        value,
        relu_value,
        row_start,
        u_sq,
        row_by_feature,
        value_by_feature,
        relu_by_feature,
        feature_start,
    )


def hidden_cross(
    lib: ctypes.CDLL,
    entries,
    a_table: Tensor,
    w_table: Tensor,
    t_table: Tensor | None,
    rt_table: Tensor | None,
    keep_u: bool,
    k: int,
    n: int,
    m: int,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """h = ReLU(A x) and q = W^T u (each (K rows, m)), u = ReLU(x) + R x ((K rows, n) if keep_u, else
    None) and sum_b ||u_b||^2 - 2 h_b . q_b per instance (K,), from the entries by row (`fused._Entries`
    of `prepare`, whose arrays are dense) and the stacked tables A^T, W, T = R^T W (K n, m) and R^T
    (K n, n), float32 (made dense here if they are strided views); t_table and rt_table None for
    labels without R x."""
    rows = entries.n_rows // k
    a_table, w_table, t_table, rt_table = (_dense(a) for a in (a_table, w_table, t_table, rt_table))
    h, q = torch.empty(2, k * rows, m, dtype=torch.float32).unbind(0)
    u = torch.empty(k * rows, n, dtype=torch.float32) if keep_u and rt_table is not None else None
    labels = torch.empty(k, dtype=torch.float32)
    lib.cis_hidden_cross(
        k,
        rows,
        m,
        n,
        entries.feature.shape[0],
        *(a.data_ptr() for a in (entries.row_start, entries.feature, entries.value, entries.relu_value)),
        *(None if a is None else a.data_ptr() for a in (a_table, w_table, t_table, rt_table, h, q, u, labels)),
    )
    return h, q, u, labels


def feature_grads(
    lib: ctypes.CDLL, entries, scale: Tensor, gh: Tensor, q: Tensor, h: Tensor, with_t: bool, k: int, n: int, m: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Over the entries c of every feature f (r their rows): scale_k sum_c value_c [h_r > 0] (gh_r -
    q_r) as (K, m, n) (A's layout: column f), and as (K n, m) scale_k sum_c ReLU(value_c) h_r and (with_t,
    else None) scale_k sum_c value_c h_r; gh = h G, q and h (K, rows, m) float32, scale (K,) float32
    (made dense here if strided); the entries as for `hidden_cross`."""
    scale, gh, q, h = (_dense(a) for a in (scale, gh, q, h))
    grads = torch.empty(3 if with_t else 2, k * n * m, dtype=torch.float32).unbind(0)
    lib.cis_feature_grads(
        k,
        n,
        m,
        entries.row_by_feature.shape[0],
        *(a.data_ptr() for a in (entries.feature_start, entries.row_by_feature, entries.value_by_feature)),
        *(a.data_ptr() for a in (entries.relu_value_by_feature, scale, gh, q, h, *grads[:2])),
        grads[2].data_ptr() if with_t else None,
    )
    return grads[0].view(k, m, n), grads[1].view(k * n, m), grads[2].view(k * n, m) if with_t else None
