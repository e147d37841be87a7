"""Markdown tables for the analyses' `<kind>.md` files and the paper report."""

from __future__ import annotations

from collections.abc import Sequence


def cell(v, fmt: str = ".4f") -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return format(v, fmt)
    return str(v).replace("|", "\\|")  # a pipe inside a cell would end it


def md_table(header: Sequence[str], rows: Sequence[Sequence], fmt: str = ".4f") -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v, fmt) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def matrix_table(matrix, rows: Sequence, cols: Sequence, corner: str = "", fmt: str = ".3f") -> str:
    """matrix[i][j] with row labels `rows` and column labels `cols`."""
    return md_table([corner, *map(str, cols)], [[str(r), *map(float, line)] for r, line in zip(rows, matrix)], fmt)
