"""Loading a :class:`MoEConfig` from YAML, with ``base:`` inheritance.

A file may name a base file (``base: relative/path.yaml``, relative to the file itself). The
file's keys are merged over its base's, key by key within each section, and a base may have a
base of its own. Keys are checked file by file, so an unknown key is reported in the file that
contains it; a bad value is reported in the file that last set it, and a broken rule between
fields in the file that was loaded.
"""
import os
from typing import Any, Dict, Tuple, Union

import yaml

from .errors import ConfigError, located_in
from .schema import MoEConfig, apply_overrides, check_keys, resolve_field_name

Tree = Dict[str, Dict[str, Any]]
Origins = Dict[str, str]
"""``section.field`` -> the file (or ``overrides``) that set it."""

OVERRIDES_SOURCE = "overrides"


def load_config(path: Union[str, "os.PathLike[str]"], **overrides: Any) -> MoEConfig:
    """Load the YAML config at ``path`` (merged over its bases), then apply ``overrides``.

    Overrides are keyed like :meth:`MoEConfig.replace`: ``expert_parallel=4`` or
    ``**{"parallel.expert_parallel": 4}``. Everything is validated once, after merging.
    """
    source = os.fspath(path)
    tree, origins = _read_with_bases(source, chain=())
    with located_in(OVERRIDES_SOURCE):
        tree = apply_overrides(tree, overrides)
    origins.update({resolve_field_name(name): OVERRIDES_SOURCE for name in overrides})
    try:
        return MoEConfig.from_dict(tree, source=source)
    except ConfigError as error:
        origin = origins.get(error.key, source)
        raise ConfigError(error.message, source=origin, key=error.key) from None


def _read_with_bases(path: str, chain: Tuple[str, ...]) -> Tuple[Tree, Origins]:
    """The tree of ``path`` merged over its bases, and which file set each key.

    ``chain`` holds the files that led here (each names the next as its base), to detect cycles.
    """
    _reject_cycle(path, chain)
    document = _read_yaml(path)
    with located_in(path):
        check_keys(document, allow_base=True)
    if document.get("base") is None:
        tree: Tree = {}
        origins: Origins = {}
    else:
        tree, origins = _read_with_bases(_base_path(path, document["base"]), chain + (path,))
    for section, body in document.items():
        if section == "base" or body is None:
            continue
        tree.setdefault(section, {}).update(body)
        origins.update({f"{section}.{key}": path for key in body})
    return tree, origins


def _reject_cycle(path: str, chain: Tuple[str, ...]) -> None:
    """Raise if ``path`` is already in the chain of files that named their bases."""
    real_chain = [os.path.realpath(link) for link in chain]
    if os.path.realpath(path) in real_chain:
        cycle = chain[real_chain.index(os.path.realpath(path)):] + (path,)
        raise ConfigError(f"base files form a cycle: {' -> '.join(cycle)}", source=chain[-1],
                          key="base")


def _base_path(path: str, base: Any) -> str:
    """The path of the base file named in ``path``, which must exist."""
    if not isinstance(base, str) or not base:
        raise ConfigError(f"base = {base!r} is not allowed; expected the path of a YAML file, "
                          f"relative to this file", source=path, key="base")
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), base))
    if not os.path.isfile(resolved):
        raise ConfigError(f"base file '{base}' not found (looked for '{resolved}')", source=path,
                          key="base")
    return resolved


def _read_yaml(path: str) -> Any:
    """The parsed content of one YAML file (safe_load), which must not be empty."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: '{path}'") from None
    except UnicodeDecodeError:
        raise ConfigError("the file is not UTF-8 text", source=path) from None
    except OSError as error:
        raise ConfigError(f"cannot read config file '{path}': {error.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(_describe_yaml_error(error), source=path) from None
    if document is None:
        raise ConfigError("the file is empty; expected a mapping of sections", source=path)
    return document


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    """'invalid YAML at line L, column C: problem' (1-based), from a PyYAML error."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    return f"invalid YAML{where}: {problem}"
