"""A fixed-width text table of a results.json: ``python -m aunn_fast.bench.summary results.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def status(row: dict[str, Any]) -> str:
    """ok / INCORRECT / ERROR / skipped."""
    if row["skipped"]:
        return "skipped"
    if row.get("error"):
        return "ERROR"
    return "ok" if row["correct"] else "INCORRECT"


def table(rows: list[dict[str, Any]]) -> str:
    """One line per row that ran; skipped providers are counted at the end."""
    lines = [
        f"{'config':<9}{'workload':<10}{'batch':>10}  {'provider/precision':<20}{'ms':>10}{'M idx/s':>10}"
        f"{'vs eager':>9}{'vs comp':>9}{'rel err':>9}  status"
    ]
    for row in rows:
        if row["skipped"]:
            continue
        lines.append(
            f"{row['config']:<9}{row['workload']:<10}{row['batch']:>10}  "
            f"{row['provider'] + '/' + row['precision']:<20}{_fmt(row['ms'], '10.4g')}"
            f"{_fmt(row['items_per_s'] and row['items_per_s'] / 1e6, '10.4g')}"
            f"{_fmt(row['vs_eager'], '9.2f')}{_fmt(row['vs_compile'], '9.2f')}"
            f"{_fmt(row['max_rel_err'], '9.1e')}  {status(row)}"
        )
    skipped = sorted({f"{r['provider']} ({r['skipped']})" for r in rows if r["skipped"]})
    lines += [f"skipped: {s}" for s in skipped]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m aunn_fast.bench.summary RESULTS_JSON", file=sys.stderr)
        return 2
    print(table(json.loads(Path(args[0]).read_text())["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
