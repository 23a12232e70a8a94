"""The regime report as a PNG heatmap (attention modules x heads), drawn with PIL.

PIL is imported inside `render_heatmap`, so peft_core stays importable with torch alone. Cells are
coloured by rho on a green -> yellow -> red scale with the label thresholds marked on the colour bar;
each cell shows its value; a heavy black border marks a head the adapter moved to a costlier regime.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from peft_core.analysis.thresholds import EXACT_MIN_RHO, LOW_RANK_MAX_RHO
from peft_core.io import atomic_write_bytes

if TYPE_CHECKING:
    from peft_core.analysis.regime import RegimeReport

# (rho, RGB) stops: green through the low-rank range, yellow at the transition's middle, red beyond.
COLOUR_STOPS = (
    (0.0, (26, 152, 80)),
    (0.5, (166, 217, 106)),
    (1.0, (254, 224, 139)),
    (1.5, (244, 109, 67)),
    (3.0, (165, 0, 38)),
)
MISSING = (220, 220, 220)
CELL_W, CELL_H, PAD = 46, 22, 8
FOOTER = (
    f"low-rank <= {LOW_RANK_MAX_RHO} < transition <= {EXACT_MIN_RHO} < exact;  "
    "black border: the adapter moved the head across"
)


def colour(value: float) -> tuple[int, int, int]:
    if value is None or not math.isfinite(value):
        return MISSING
    for (low, low_rgb), (high, high_rgb) in zip(COLOUR_STOPS, COLOUR_STOPS[1:]):
        if value <= high:
            t = max(0.0, (value - low) / (high - low))
            return tuple(round(a + t * (b - a)) for a, b in zip(low_rgb, high_rgb))
    return COLOUR_STOPS[-1][1]


def _short(name: str, limit: int = 64) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]


def render_heatmap(report: RegimeReport, path: str | os.PathLike, value: str = "rho") -> Path:
    """Write the heatmap of `value` (a HeadStats field: rho, rho_frozen, gamma_q, ...) to `path`."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    title_font = ImageFont.load_default(size=13)
    rows: dict[str, list] = {}
    kinds: dict[str, str] = {}
    for head in report.heads:
        rows.setdefault(head.site, []).append(head)
        kinds[head.site] = head.kind
    columns = max((len(heads) for heads in rows.values()), default=1)
    labels = [f"{_short(site)} ({kinds[site]})" for site in rows]
    label_w = max((int(font.getlength(label)) for label in labels), default=60) + 2 * PAD
    top, bar_h = 44, 60
    width = max(label_w + columns * CELL_W + PAD, int(font.getlength(FOOTER)) + 2 * PAD)
    height = top + CELL_H * (len(rows) + 1) + bar_h + PAD
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    summary = report.summary()
    draw.text(
        (PAD, 6),
        f"attention regime: {value} per head (rho = max(G_Q, G_K) / sqrt(ln L_k))",
        fill="black",
        font=title_font,
    )
    draw.text(
        (PAD, 24),
        f"{summary['heads']} heads: {summary['low-rank']} low-rank, {summary['transition']} transition, "
        f"{summary['exact']} exact; max rho {summary['max_rho'] or 0:.2f}",
        fill=(60, 60, 60),
        font=font,
    )
    for column in range(columns):
        draw.text((label_w + column * CELL_W + CELL_W // 2 - 8, top), f"h{column}", fill="black", font=font)
    for row, heads in enumerate(rows.values()):
        y = top + CELL_H * (row + 1)
        draw.text((PAD, y + 5), labels[row], fill="black", font=font)
        for head in heads:
            x = label_w + head.head * CELL_W
            cell = getattr(head, value)
            # gammas are coloured by the rho they would give alone: gamma / sqrt(ln L_k)
            scaled = (
                cell if cell is None or value.startswith("rho") else cell / math.sqrt(math.log(max(head.key_length, 2)))
            )
            draw.rectangle((x, y, x + CELL_W - 2, y + CELL_H - 2), fill=colour(scaled))
            text = "-" if cell is None or not math.isfinite(cell) else f"{cell:.2f}"
            draw.text((x + 6, y + 5), text, fill="black", font=font)
            if head.crossed:
                draw.rectangle((x, y, x + CELL_W - 2, y + CELL_H - 2), outline="black", width=3)
    # Colour bar over rho in [0, 3] with the label thresholds.
    bar_y, bar_x, bar_w = height - bar_h + 6, label_w, max(columns * CELL_W, 300)
    bar_w = min(bar_w, width - bar_x - PAD)
    for i in range(bar_w):
        draw.line((bar_x + i, bar_y, bar_x + i, bar_y + 12), fill=colour(3.0 * i / bar_w))
    for threshold, name in (
        (0.0, "0"),
        (LOW_RANK_MAX_RHO, f"{LOW_RANK_MAX_RHO}"),
        (EXACT_MIN_RHO, f"{EXACT_MIN_RHO}"),
        (3.0, "3"),
    ):
        x = bar_x + round(threshold / 3.0 * (bar_w - 1))
        draw.line((x, bar_y - 2, x, bar_y + 16), fill="black")
        draw.text((x - 6, bar_y + 18), name, fill="black", font=font)
    draw.text((PAD, bar_y), "rho", fill="black", font=font)
    draw.text((PAD, bar_y + 34), FOOTER, fill=(60, 60, 60), font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
