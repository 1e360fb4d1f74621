"""Reading config text that may be hostile: capped, decoded with a check, duplicate keys refused.

PyYAML shares a node among all its aliases, so a few lines of nested aliases (a "billion laughs")
load instantly and then hang whatever walks, copies or prints the expanded tree. `check_yaml`
counts the nodes of the expanded tree on the composed graph (each shared node's size computed
once), so a bomb is refused after a pass over its few hundred written nodes. Every problem is a
ConfigError naming the source (a file or a field) and the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cis_lightning.core.errors import ConfigError, require

# A config of this package is a few hundred bytes to a few kilobytes, and expands to a few hundred nodes.
MAX_CONFIG_BYTES = 1 << 20
MAX_EXPANDED_NODES = 10_000  # the largest config here has under 100; jsonargparse takes ms per value
MAX_DEPTH = 64
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_config_text(path: str | Path, field: str = "config") -> str:
    """The text of the config file at `path`: at most MAX_CONFIG_BYTES of UTF-8, else ConfigError(field)."""
    path = Path(path)
    require(path.exists(), field, f"{path} does not exist")
    require(path.is_file(), field, f"{path} is not a file")
    size = path.stat().st_size
    require(size <= MAX_CONFIG_BYTES, field, f"{path} has {size} bytes; a config may have at most {MAX_CONFIG_BYTES}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(field, f"{path} cannot be read ({error.strerror})") from None
    return decode(data, field, str(path))


def decode(data: bytes, field: str, what: str) -> str:
    """`data` (`what`: the file) as UTF-8 text; ConfigError(field) naming the first bad byte (binary is no config)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        problem = f"{what} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})"
        raise ConfigError(field, problem) from None
    require("\x00" not in text, field, f"{what} holds NUL bytes: it is not a text file")
    return text


def check_yaml(text: str, source: str = "config") -> yaml.Node | None:
    """ConfigError(source) if `text` is larger than the caps, expands its aliases beyond MAX_EXPANDED_NODES,
    nests deeper than MAX_DEPTH or repeats a key in a mapping; else its composed root node (None: empty or
    not valid YAML, whose syntax error is left to the YAML loader)."""
    require(
        len(text) <= MAX_CONFIG_BYTES,
        source,
        f"the YAML has {len(text)} characters; at most {MAX_CONFIG_BYTES} are read",
    )
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return None  # the loader that follows reports the syntax error with its line
    except RecursionError:
        raise ConfigError(source, f"the YAML nests deeper than {MAX_DEPTH} levels") from None
    if root is not None:
        _expanded_size(root, {}, (), source)
    return root


def _expanded_size(node: yaml.Node, sizes: dict[int, int], path: tuple[int, ...], source: str) -> int:
    """Nodes in the tree under `node` with every alias expanded; `sizes` keeps each shared node's size."""
    if id(node) in sizes:
        return sizes[id(node)]
    require(id(node) not in path, source, f"the YAML refers to itself (a recursive alias at line {_line(node)})")
    require(len(path) < MAX_DEPTH, source, f"the YAML nests deeper than {MAX_DEPTH} levels (line {_line(node)})")
    size = 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                first = seen.get((key.tag, key.value))
                require(
                    first is None,
                    source,
                    f"duplicate key {key.value!r} at line {_line(key)} (first at line {first}): give each key once",
                )
                seen[(key.tag, key.value)] = _line(key)
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    inner = (*path, id(node))
    for child in children:
        size += _expanded_size(child, sizes, inner, source)
        require(
            size <= MAX_EXPANDED_NODES,
            source,
            f"the YAML expands to more than {MAX_EXPANDED_NODES} values (line {_line(node)}; aliases count "
            "once per use): a cis config is far smaller",
        )
    sizes[id(node)] = size
    return size


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def load_yaml_text(text: str, source: str = "config") -> Any:
    """`yaml.safe_load(text)` after `check_yaml`; a syntax error becomes a ConfigError(source) with its line."""
    check_yaml(text, source)
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(source, f"not valid YAML: {' '.join(str(error).split())}") from None


def load_config_file(path: str | Path, field: str = "config") -> Any:
    """The YAML file at `path`, read with every check of this module (`load_run`'s config.yaml)."""
    return load_yaml_text(read_config_text(path, field), f"{field}: {path}")


# Options whose value is a checkpoint file (binary, read by `loading.read_checkpoint`), not a config.
CHECKPOINT_OPTIONS = ("ckpt_path", "model.init_from")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a value too long or odd to be a path
        return False


def check_arguments(args: list[str]) -> None:
    """ConfigError naming the option for a command line whose config files or values fail the checks above.

    `--config FILE` (and any option but a checkpoint's whose value is an existing file: jsonargparse
    reads `--data FILE` as that section's config) is read with `read_config_text` and `check_yaml`;
    every other value with `check_yaml` (a grid given inline).
    """
    option = None
    for arg in args[1:]:
        if arg.startswith("--"):
            option, _, value = arg[2:].partition("=")
            if not _:
                continue
        elif option is None:
            continue
        else:
            value = arg
        field, option = option, None
        path = Path(value)
        if field == "config" or (field not in CHECKPOINT_OPTIONS and _is_file(path)):
            if field == "config" and value == "-":
                continue
            root = check_yaml(read_config_text(path, field), f"{field}: {path}")
            kind = type(root).__name__.removesuffix("Node").lower()
            require(
                field != "config" or root is None or isinstance(root, yaml.MappingNode),
                field,
                f"{path} holds a YAML {kind}, not a mapping of sections (model:, data:, trainer:)",
            )
        elif len(value) > 1:
            check_yaml(value, field)


# -- the configs that ship with the package ---------------------------------------------------------
def config_folders() -> dict[str, Path]:
    """Where the shipped configs are: {"configs": the model and experiment configs, "callbacks": the
    callback presets}. An installed wheel holds them inside the package (cis_lightning/configs/, its
    callbacks/ subfolder: pyproject's package-dir mapping); a checkout (an editable install) has them
    at the top level, beside cis_lightning/."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"
    if installed.is_dir():
        return {"configs": installed, "callbacks": installed / "callbacks"}
    return {"configs": package.parent / "configs", "callbacks": package.parent / "callbacks"}


def shipped_configs() -> list[str]:
    """The names of the shipped configs, as `find_config` takes them: configs/mlp_gaussian.yaml,
    configs/experiments/sigma_sweep.yaml, callbacks/alignment.yaml, ..."""
    names = []
    for prefix, folder in config_folders().items():
        for path in sorted(folder.rglob("*.yaml")):
            relative = path.relative_to(folder)
            if prefix == "configs" and relative.parts[0] == "callbacks":
                continue  # the presets inside an installed package: listed under callbacks/
            names.append(f"{prefix}/{relative.as_posix()}")
    return names


def find_config(name: str) -> str:
    """The file for a `--config` value: `name` itself if it is a file, else the shipped config it names
    (with or without the configs/ prefix and the .yaml suffix: `mlp_gaussian`, `experiments/sigma_sweep`,
    `callbacks/alignment`), else `name` unchanged (the reader then says that it does not exist)."""
    if Path(name).exists():
        return name
    folders = config_folders()
    relative = Path(name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    first, rest = relative.parts[0], Path(*relative.parts[1:]) if len(relative.parts) > 1 else None
    candidates = [folders["configs"] / relative]
    if rest is not None and first in folders:
        candidates.insert(0, folders[first] / rest)
    return str(next((c for c in candidates if c.is_file()), name))
