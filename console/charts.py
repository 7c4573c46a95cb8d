"""Server-side SVG charts of publish / deliver / ack rates: no JavaScript, no CDN.

Only numbers computed here go into the markup (format_html escapes the rest), so a chart can
never carry user input.
"""

from __future__ import annotations

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from console.rates import BUCKET_SECONDS, Series

KINDS = (("published", "publish"), ("delivered", "deliver"), ("acked", "ack"))


def _points(values: list[int], peak: float, width: float, height: float, pad: float) -> str:
    step = width / max(len(values) - 1, 1)
    usable = height - 2 * pad
    return " ".join(f"{i * step:.1f},{height - pad - (v / peak) * usable:.1f}" for i, v in enumerate(values))


def _lines(series: Series, width: float, height: float, pad: float) -> tuple[SafeString, int]:
    peak = max(1, *series.published, *series.delivered, *series.acked)
    lines = format_html_join(
        "",
        '<polyline class="rate-{}" fill="none" stroke-width="1.5" points="{}"></polyline>',
        ((kind, _points(getattr(series, kind), peak, width, height, pad)) for kind, _ in KINDS),
    )
    return lines, peak


def sparkline(series: Series, *, label: str, width: int = 120, height: int = 28) -> SafeString:
    """A small chart of one destination's last minutes."""
    lines, peak = _lines(series, width, height, 2)
    minutes = len(series.published) * BUCKET_SECONDS // 60
    title = f"{label}: publish, deliver, ack; peak {peak / BUCKET_SECONDS:g}/s over the last {minutes} min"
    return format_html(
        '<svg class="spark" role="img" width="{}" height="{}" viewBox="0 0 {} {}"><title>{}</title>{}</svg>',
        width, height, width, height, title, lines,
    )  # fmt: skip


def broker_chart(series: Series, *, width: int = 640, height: int = 140) -> SafeString:
    """The whole broker's rates, with the peak and the time span labelled."""
    lines, peak = _lines(series, width, height - 16, 4)
    minutes = len(series.published) * BUCKET_SECONDS // 60
    return format_html(
        '<svg class="broker-chart" role="img" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
        "<title>Messages per second, whole broker, last {m} minutes</title>"
        '<line x1="0" y1="{base}" x2="{w}" y2="{base}" class="axis"></line>{lines}'
        '<text x="2" y="12" class="label">{peak}/s</text>'
        '<text x="2" y="{bottom}" class="label">-{m} min</text>'
        '<text x="{w}" y="{bottom}" class="label" text-anchor="end">now</text></svg>',
        w=width, h=height, base=height - 16 - 4, bottom=height - 2,
        lines=lines, peak=f"{peak / BUCKET_SECONDS:g}", m=minutes,
    )  # fmt: skip
