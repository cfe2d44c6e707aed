"""The plots' log-y axes must carry readable plain-number labels over both narrow and wide ranges."""

import pytest

from dlqat.eval.tables import _pyplot, plain_log_y


def y_labels_in_view(low: float, high: float) -> list[float]:
    """The labelled y ticks (major and minor) that fall inside the axis after ``plain_log_y``, as numbers."""
    plt = _pyplot()  # the plots' own import (Agg backend)
    if plt is None:
        pytest.skip("matplotlib not installed")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [low, high])
    plain_log_y(ax)
    fig.canvas.draw()
    bottom, top = ax.get_ylim()
    ticks = [*ax.yaxis.get_major_ticks(), *ax.yaxis.get_minor_ticks()]
    labels = [t.label1.get_text() for t in ticks if t.label1.get_visible() and bottom <= t.get_loc() <= top]
    plt.close(fig)
    return [float(text) for text in labels if text]  # float() fails on "10^1"-style labels


def test_a_range_within_a_decade_that_crosses_ten_still_gets_several_labels():
    # 9-14 holds one decade tick (10) and no log minor tick above it (the next is 20): it once showed "9" and "10"
    labels = y_labels_in_view(9.1, 13.7)  # the W4 TinyStories panel: float 9.09, RTN 13.71
    assert len(labels) >= 4, labels
    assert max(labels) >= 12 and min(labels) <= 10


def test_a_range_over_decades_labels_plain_numbers():
    labels = y_labels_in_view(5.0, 400.0)
    assert {10.0, 100.0} <= set(labels), labels
