"""Server-rendered SVG bar charts for the portals: no script, no CDN, readable without styles.

Each bar carries a ``<title>`` (the day and its value), which browsers show on hover and screen
readers read; the chart as a whole is an ``img`` with a label saying what it shows.
"""

from __future__ import annotations

from html import escape

from markupsafe import Markup

__all__ = ["bar_chart"]

_W, _H, _PAD, _AXIS = 560, 140, 4, 18


def bar_chart(points: list[tuple[str, float]], *, label: str, unit: str) -> Markup:
    """One bar per (day, value); the tallest bar fills the height, and the peak is written on top."""
    peak = max((v for _, v in points), default=0.0)
    n = max(len(points), 1)
    slot = (_W - 2 * _PAD) / n
    bars = []
    for i, (day, value) in enumerate(points):
        height = 0.0 if peak <= 0 else (value / peak) * (_H - _AXIS - 2 * _PAD)
        x = _PAD + i * slot + slot * 0.1
        y = _H - _AXIS - height
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" height="{max(height, 0.5):.1f}" '
            f'fill="#3e7cb1"><title>{escape(day)}: {value:g} {escape(unit)}</title></rect>'
        )
    first = escape(points[0][0]) if points else ""
    last = escape(points[-1][0]) if points else ""
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="100%" role="img" '
        f'aria-label="{escape(label)}" style="max-width:{_W}px">'
        f'<line x1="0" y1="{_H - _AXIS}" x2="{_W}" y2="{_H - _AXIS}" stroke="#9aa5b1"/>'
        + "".join(bars)
        + f'<text x="{_PAD}" y="{_H - 4}" font-size="11" fill="#52606d">{first}</text>'
        f'<text x="{_W - _PAD}" y="{_H - 4}" font-size="11" fill="#52606d" text-anchor="end">{last}</text>'
        f'<text x="{_PAD}" y="12" font-size="11" fill="#52606d">peak {peak:g} {escape(unit)}</text>'
        "</svg>"
    )
    return Markup(svg)  # noqa: S704 - built from numbers and escaped text only
