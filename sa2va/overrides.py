"""Hydra command-line overrides: the ones this job was started with, the keys a sweep varies,
and a short label for a run. Shared by the W&B logger and the run comparison."""

from __future__ import annotations

from collections.abc import Iterable

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override


def _parse(lines: Iterable[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides(list(lines))


def _key(override: Override) -> str:
    """The key without its ``+``/``++``/``~`` prefix, with an explicit package if any."""
    if override.package is None:
        return override.key_or_group
    return f"{override.key_or_group}@{override.package}"


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """Hydra command-line overrides -> {key: value}, parsed by Hydra's own grammar
    (values in Hydra's string form)."""
    return {_key(o): o.get_value_element_as_str() for o in _parse(lines)}


def swept_keys(lines: Iterable[str]) -> set[str]:
    """Keys that sweep overrides vary (``loss=a,b``, ``seed=range(3)``, globs)."""
    return {_key(o) for o in _parse(lines) if o.is_sweep_override()}


def override_label(
    lines: Iterable[str], exclude: Iterable[str] = (), only: Iterable[str] | None = None
) -> str:
    """``k=v`` pairs sorted and comma-joined: ``only`` these keys if given, less ``exclude``."""
    items = parse_overrides(lines)
    keep = set(items if only is None else only) - set(exclude)
    return ",".join(f"{k}={v}" for k, v in sorted(items.items()) if k in keep)


def hydra_overrides() -> list[str]:
    """The command-line overrides of this job ([] when called outside a Hydra app)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def quoted(value: object) -> str:
    """``value`` as a quoted override value: a sweep's run dirs hold ``=`` and ``,``."""
    return "'" + str(value).replace("'", "\\'") + "'"
