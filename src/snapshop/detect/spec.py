"""Parsing the text after ``name:`` in a detector spec (``"yolo:m.onnx,conf=0.3"``).

Its own module so that backends can parse their arguments without importing the registry in
``detect.factory``, which imports the backends.
"""

from __future__ import annotations

from snapshop.errors import ConfigError


def parse_spec_args(args: str, allowed: set[str]) -> tuple[list[str], dict[str, str]]:
    """``"a.cfg,b.weights,names=x.txt"`` -> (["a.cfg", "b.weights"], {"names": "x.txt"})."""
    positional: list[str] = []
    kwargs: dict[str, str] = {}
    for part in (p.strip() for p in args.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if eq and key.strip().isidentifier():
            key = key.strip().lower()
            if key not in allowed:
                raise ConfigError(f"unknown detector option {key!r}; allowed: {sorted(allowed)}")
            kwargs[key] = value.strip()
        elif kwargs:
            raise ConfigError(f"positional detector argument {part!r} after key=value options")
        else:
            positional.append(part)
    return positional, kwargs
