"""Refusing sizes that cannot fit, before anything is allocated (pure Python and torch).

`memory_needed` is a lower estimate from the config's shapes alone: the float32 tensors a run
certainly holds at once (mixing matrices, weights with their gradient and two Adam moments,
one training batch's activations, one evaluation batch's, and the evaluation plan's list of
batches). `check_memory` compares it with the device's total memory and names the field most to
blame (the one whose default value would shrink the estimate most), with the memory it would
need. A size that fits the estimate may still not fit the allocator; one that does not fit it
certainly does not fit.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import torch

from cis_lightning.core.errors import ConfigError

FLOAT = 4  # bytes of a float32
PLAN_ENTRY = 120  # bytes of one (k, step, size) tuple of the evaluation plan (a tuple and three ints)


def device_memory(accelerator: Any) -> tuple[int, str]:
    """(bytes, description) of the memory a run on `accelerator` can use: a GPU's total, else the host's RAM."""
    if str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1], f"the GPU's {_gb(torch.cuda.mem_get_info()[1])}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [(total, f"this machine's {_gb(total)} of RAM")]
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):  # a limit set on this process (ulimit -v, prlimit)
        soft = resource.getrlimit(getattr(resource, name))[0]
        if soft != resource.RLIM_INFINITY:
            limits.append((soft, f"this process's {name} of {_gb(soft)}"))
    try:  # a container's memory limit (cgroup v2)
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            limits.append((int(text), f"this container's memory limit of {_gb(int(text))}"))
    except OSError:
        pass
    return min(limits)


def memory_needed(sizes: dict[str, int], training: bool) -> dict[str, int]:
    """Bytes per term of the estimate, keyed by the config field that sets the term's size.

    sizes: instances (K), n_features (n), d_mlp (h), d_embed (d, 0 without an embedding), n_layers,
    batch_size (B), eval_batch_size (E), eval_nonempty_samples (N).
    """
    k, n, h = sizes["instances"], sizes["n_features"], sizes["d_mlp"]
    d, layers = sizes["d_embed"], sizes["n_layers"]
    weights = k * (2 * n * h if not d else d * n + layers * 2 * d * h)
    return {
        "data.n_features": FLOAT * k * n * n,  # the mixing matrices M (K, n, n)
        "model.network.init_args.d_mlp": FLOAT * weights * (4 if training else 1),  # + gradient, Adam's m and v
        "data.batch_size": FLOAT * k * sizes["batch_size"] * (n + h) if training else 0,
        "data.eval_batch_size": FLOAT * k * sizes["eval_batch_size"] * (n + h),
        "data.eval_nonempty_samples": PLAN_ENTRY * (sizes["eval_nonempty_samples"] // sizes["eval_batch_size"] + n),
    }


# The field of each size and the value it has by default: the field named is the one whose default
# value would shrink the estimate most.
FIELDS = {
    "instances": ("data.grid", 1),
    "n_features": ("data.n_features", 100),
    "d_mlp": ("model.network.init_args.d_mlp", 50),
    "d_embed": ("model.network.init_args.d_embed", 1000),
    "n_layers": ("model.network.init_args.n_layers", 1),
    "batch_size": ("data.batch_size", 2048),
    "eval_batch_size": ("data.eval_batch_size", 65536),
    "eval_nonempty_samples": ("data.eval_nonempty_samples", 1_000_000),
}


def check_memory(sizes: dict[str, int], training: bool, accelerator: Any = "cpu") -> None:
    """ConfigError naming the field most to blame if the estimate exceeds the device's memory."""
    total = sum(memory_needed(sizes, training).values())
    available, where = device_memory(accelerator)
    if total <= available:
        return

    def without(key: str) -> int:
        default = FIELDS[key][1] if key != "d_embed" or sizes["d_embed"] else 0
        return sum(memory_needed({**sizes, key: min(sizes[key], default)}, training).values())

    key = min(FIELDS, key=without)
    field, value = FIELDS[key][0], sizes[key]
    what = f"{value} instances" if key == "instances" else f"{value}"
    raise ConfigError(
        field,
        f"{what} needs about {_gb(total)} of memory (estimated from the shapes: {sizes['instances']} instance(s), "
        f"n_features={sizes['n_features']}, d_mlp={sizes['d_mlp']}, batch_size={sizes['batch_size']}), "
        f"more than {where}; make it smaller",
    )


def _gb(n_bytes: float) -> str:
    if n_bytes >= 1e12:
        return f"{n_bytes / 1e12:.3g} TB"
    return f"{n_bytes / 1e9:.3g} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.3g} MB"


def sizes_from_config(data: Any, network: Any, instances: int) -> dict[str, int] | None:
    """The sizes of `memory_needed` from the data and model.network config sections (None: not all integers)."""

    def get(section: Any, key: str, default: Any) -> Any:
        value = section.get(key, default) if section is not None else default
        return default if value is None else value

    args = get(network, "init_args", None)
    residual = str(get(network, "class_path", "")).rsplit(".", 1)[-1] == "ResidualMLP"
    mixing = get(data, "mixing", None)
    embedding = get(mixing, "kind", "none") == "embedding"
    sizes = {
        "instances": instances,
        "n_features": get(data, "n_features", 100),
        "d_mlp": get(args, "d_mlp", 50),
        "d_embed": get(args, "d_embed", 1000) if residual else (get(mixing, "d_embed", 1000) if embedding else 0),
        "n_layers": get(args, "n_layers", 1) if residual else 1,
        "batch_size": get(data, "batch_size", 2048),
        "eval_batch_size": get(data, "eval_batch_size", 65536),
        "eval_nonempty_samples": get(data, "eval_nonempty_samples", 1_000_000),
    }
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for k, v in sizes.items() if k != "d_embed")
    return sizes if ok and isinstance(sizes["d_embed"], int) and sizes["d_embed"] >= 0 else None


__all__ = ["check_memory", "device_memory", "memory_needed", "sizes_from_config"]
