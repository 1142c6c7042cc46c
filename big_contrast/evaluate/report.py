"""Showing and saving evaluation results (a flat dict {'<prefix>/<metric>': float})."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping


def format_table(results: Mapping[str, float], *, digits: int = 4) -> str:
    """A plain-text table with one row per metric, grouped by evaluator prefix.

    >>> print(format_table({"imagenet/top1": 0.5, "coco/i2t_recall@1": 0.25}))
    eval      metric        value
    --------  ------------  ------
    coco      i2t_recall@1  0.2500
    imagenet  top1          0.5000
    """
    rows = []
    for name in sorted(results):
        prefix, _, metric = name.rpartition("/")
        value = results[name]
        shown = f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)
        rows.append((prefix, metric, shown))
    header = ("eval", "metric", "value")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_json(results: Mapping[str, float], path: str | os.PathLike, **extra: Any) -> None:
    """Write {'results': {...}, **extra} (e.g. step=..., checkpoint=...) as indented JSON."""
    from big_contrast import paths

    document = {**extra, "results": {k: float(v) for k, v in sorted(results.items())}}
    paths.write_bytes(path, (json.dumps(document, indent=2) + "\n").encode())
