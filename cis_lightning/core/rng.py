"""Counter-based random numbers: every draw is a pure function of (seed, stream, step, index).

Training data must be reproducible from one seed, identical for any number of ranks, resumable
at any step, and independent per instance while K instances are drawn in one batched kernel.
torch.Generator gives none of that cheaply, so we hash counters with SplitMix64
(Steele, Lea and Flood 2014): state = key + (index + 1) * golden, output = mix(state).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned `value`."""
    return value - (1 << 64) if value >= 1 << 63 else value


_MUL1_BITS, _MUL2_BITS = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(_MUL1_BITS)
_MUL2 = _signed(_MUL2_BITS)
_LOW_BITS = {shift: (1 << (64 - shift)) - 1 for shift in (30, 27, 31, 11)}


def _shift_right(z: Tensor, shift: int) -> Tensor:
    """Logical right shift of int64 (>> of a signed integer is arithmetic)."""
    return (z >> shift) & _LOW_BITS[shift]


def mix64(z: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    z = (z ^ _shift_right(z, 30)) * _MUL1
    z = (z ^ _shift_right(z, 27)) * _MUL2
    return z ^ _shift_right(z, 31)


def _mix64_int(value: int) -> int:
    """mix64 of one number on the host: the same 64 bits as the tensor version (as an unsigned int)."""
    mask = (1 << 64) - 1
    z = value & mask
    z = ((z ^ (z >> 30)) * _MUL1_BITS) & mask
    z = ((z ^ (z >> 27)) * _MUL2_BITS) & mask
    return z ^ (z >> 31)


def stream_base(seeds: Tensor, stream: int) -> Tensor:
    """The part of stream_key that does not depend on the step (callers may keep it)."""
    return mix64(seeds * _GOLDEN + stream)


def step_hash(step: int) -> int:
    """The step's part of step_key, as an int64 (hashed on the host)."""
    return _signed(_mix64_int(step))


def step_key(base: Tensor, step: int) -> Tensor:
    """stream_key from stream_base: the step is hashed on the host, so this is one device pass."""
    return mix64(base ^ step_hash(step))


def stream_key(seeds: Tensor, stream: int, step: int) -> Tensor:
    """Key of one (seed, stream, step) cell, shape of `seeds` (int64)."""
    return step_key(stream_base(seeds, stream), step)


def uniform(key: Tensor, index: Tensor) -> Tensor:
    """Uniform float64 numbers in (0, 1): 53 random bits of mix64(key + (index + 1) * golden).

    key broadcasts against index; the result never is exactly 0 or 1, so log() is safe.
    """
    return uniform_at(key, counters(index))


def counters(index: Tensor) -> Tensor:
    """(index + 1) * golden: the per-index part of `uniform`."""
    return (index + 1) * _GOLDEN


def uniform_at(key: Tensor, index_counters: Tensor) -> Tensor:
    """uniform(key, index) from counters(index) (key broadcasts against them)."""
    return _to_unit(mix64(key + index_counters))


@functools.lru_cache(maxsize=16)
def range_counters(count: int, device: torch.device | str, start: int = 0) -> Tensor:
    """counters(arange(start, start + count)) on `device`, kept: the draws ask for
    the same range every step. A torch.compile graph gets them as an input: inductor would fold these
    64-bit products of an arange into an index expression, which overflows."""
    return counters(torch.arange(start, start + count, device=device))


def _to_unit(z: Tensor) -> Tensor:
    bits = _shift_right(z, 11)
    bits = bits.to(torch.float64)
    return (bits + 0.5) * 2.0**-53
