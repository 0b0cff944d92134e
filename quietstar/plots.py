"""Plots written as plain SVG, so that every `quietstar train` can draw its learning curve without a plotting library.

`line_plot` draws one or more series against a shared x axis (training step): enough for "held-out gain against step".
"""

import html
import math
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 640, 360, 56
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(low / step) * step
    return [first + k * step for k in range(int((high - first) / step + 1e-9) + 1)]


def line_plot(
    series: dict[str, tuple[list[float], list[float]]], path: str | Path, *, title: str, xlabel: str, ylabel: str
) -> Path:
    """Write an SVG line plot of `series` {name: (xs, ys)} to `path`; a dashed line marks y = 0 when it is in range."""
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)]
    if not points:
        raise ValueError("line_plot needs at least one point.")
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(min(p[1] for p in points), 0.0), max(max(p[1] for p in points), 0.0)
    x_high, y_high = (x_high if x_high > x_low else x_low + 1), (y_high if y_high > y_low else y_low + 1)

    def px(x: float) -> float:
        return MARGIN + (x - x_low) / (x_high - x_low) * (WIDTH - 2 * MARGIN)

    def py(y: float) -> float:
        return HEIGHT - MARGIN - (y - y_low) / (y_high - y_low) * (HEIGHT - 2 * MARGIN)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">{html.escape(xlabel)}</text>',
        f'<text x="14" y="{HEIGHT / 2}" text-anchor="middle" transform="rotate(-90 14 {HEIGHT / 2})">{html.escape(ylabel)}</text>',
        f'<rect x="{MARGIN}" y="{MARGIN}" width="{WIDTH - 2 * MARGIN}" height="{HEIGHT - 2 * MARGIN}" fill="none" stroke="#888"/>',
    ]
    for x in _ticks(x_low, x_high):
        parts.append(f'<text x="{px(x):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle">{x:g}</text>')
    for y in _ticks(y_low, y_high):
        parts.append(f'<text x="{MARGIN - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    if y_low < 0 < y_high:
        parts.append(f'<line x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="#888" stroke-dasharray="4 4"/>')
    for index, (name, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        coordinates = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>' for x, y in zip(xs, ys)]
        parts.append(f'<text x="{MARGIN + 8}" y="{MARGIN + 16 + 16 * index}" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path


__all__ = ["line_plot"]
