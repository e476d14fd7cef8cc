"""Text tables for ``deltatune plan``: parameter counts, the memory breakdown, recommendations."""
from __future__ import annotations

from typing import Any, Sequence

MiB = 2**20
GiB = 2**30


def fmt_bytes(n: float) -> str:
    """``1.23 GiB`` / ``456.7 MiB`` / ``12.0 KiB``."""
    n = float(n)
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def parse_bytes(text: str | int | float) -> int:
    """``"24GiB"``, ``"24 GB"``, ``"512MiB"`` or a plain number of bytes -> bytes.

    GB and GiB are both read as 2**30 (GPU memory is quoted in GiB whatever the label says).

    Raises:
        ValueError: the text is not a size.
    """
    import re

    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 24GiB, 80GB or 512MiB")
    unit = (m.group(2) or "b").rstrip("b").rstrip("i")
    return int(float(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A plain text table; ``align`` is one char per column, ``l`` or ``r`` (default: first left)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def memory_table(estimate: Any) -> str:
    """The memory breakdown of a :class:`~deltatune.plan.memory.MemoryEstimate`."""
    rows = [(c.name, fmt_bytes(c.bytes), fmt_bytes(c.at_peak) if c.at_peak else "-", c.note)
            for c in estimate.components]
    rows.append(("peak", "", fmt_bytes(estimate.peak_bytes), f"set by the {estimate.peak_phase}"))
    return table(("component", "size", "at peak", "how"), rows, "lrrl")
