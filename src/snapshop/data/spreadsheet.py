"""CSV files written for people, who open them in a spreadsheet: cells it would run as
formulas are written as text.

A text cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula
to Excel, LibreOffice or Google Sheets (OWASP, "CSV injection"): a sku such as
``=HYPERLINK("http://evil.example", "x")`` becomes a live link or a command. Such a cell gets
a single quote in front, which the spreadsheet shows and does not run. A cell that already
starts with a quote gets one too, so every value reads back exactly by dropping one leading
quote from a text cell that has one. Numbers are written as they are (a score of -0.5 is a
number to a spreadsheet, not a formula).

The similar-products and duplicates exports use this; ``spreadsheet_safe=False`` writes the
values exactly, for programs that read the CSV. Files snapshop reads back itself (evaluation
manifests, the demo catalog) are data, not exports, and are written exactly.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from snapshop.errors import ConfigError

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
TEXT_MARK = "'"


def spreadsheet_cell(value: object) -> object:
    """``value`` as a spreadsheet shows it without running it: text that starts a formula (or
    with the quote added here) with a quote in front; anything else as it is."""
    if isinstance(value, str) and value.startswith((*FORMULA_STARTS, TEXT_MARK)):
        return TEXT_MARK + value
    return value


def csv_text(rows: Iterable[Sequence[object]], *, spreadsheet_safe: bool = True) -> str:
    """``rows`` as CSV text; with ``spreadsheet_safe``, each cell through
    :func:`spreadsheet_cell`."""
    if not isinstance(spreadsheet_safe, bool):
        raise ConfigError(f"spreadsheet_safe must be true or false, not {spreadsheet_safe!r}")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow([spreadsheet_cell(v) for v in row] if spreadsheet_safe else row)
    return buffer.getvalue()
