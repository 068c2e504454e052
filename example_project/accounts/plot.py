"""The demo's picture: when each event of some accounts finished, under plain Celery and ordered_tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

LATE = "#d62728"
LINE = "#b0b0b0"


@dataclass(frozen=True)
class Point:
    """One handled event, ``at`` seconds after the run published its first event."""

    account: int
    seq: int
    at: float
    late: bool
    failed: bool


@dataclass
class Timeline:
    """The handled events of one run."""

    label: str
    caption: str
    points: list[Point]
    inconsistent: set[int] = field(default_factory=set)


def plot(path: Path, timelines: list[Timeline], accounts: list[int], events: dict[int, str],
         title: str) -> None:
    """Draw one panel per run: a row per account, each event a disc numbered by its publish sequence.

    ``events`` names the event of each sequence number. A line joins each account's events in
    publish order, so an event that ran after a later one shows as a red line going back in time
    and a red ring; a failed event is a hollow disc; an account left inconsistent has a red label.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colours = colormaps["viridis"].resampled(max(len(events), 2))
    rows = {account: row for row, account in enumerate(accounts)}
    fig = Figure(figsize=(10, 1.6 + 0.26 * len(accounts) * len(timelines)), layout="constrained")
    axes = fig.subplots(len(timelines), 1, squeeze=False)[:, 0]
    for ax, timeline in zip(axes, timelines, strict=True):
        by_account: dict[int, list[Point]] = {a: [] for a in accounts}
        for point in timeline.points:
            if point.account in by_account:
                by_account[point.account].append(point)
        for account, points in by_account.items():
            y = rows[account]
            points.sort(key=lambda p: p.seq)
            for before, after in pairwise(points):
                back = after.at < before.at
                ax.plot([before.at, after.at], [y, y], color=LATE if back else LINE,
                        linewidth=1.6 if back else 1.0, zorder=1)
            for point in points:
                colour = colours(point.seq - 1)
                z = 2 + 2 * (point.seq + (len(events) if point.late else 0))  # late ones on top
                ax.scatter([point.at], [y], s=150, zorder=z,
                           facecolor="white" if point.failed else colour,
                           edgecolor=LATE if point.late else colour,
                           linewidth=2.4 if point.late else 1.4)
                ax.annotate(str(point.seq), (point.at, y), ha="center", va="center", fontsize=7,
                            fontweight="bold", color=colour if point.failed else "white", zorder=z + 1)
        ax.set_yticks(range(len(accounts)))
        ax.set_yticklabels([f"account {a}" for a in accounts], fontsize=8)
        for label, account in zip(ax.get_yticklabels(), accounts, strict=True):
            if account in timeline.inconsistent:
                label.set_color(LATE)
                label.set_fontweight("bold")
        ax.set_ylim(len(accounts) - 0.5, -0.5)
        ax.grid(axis="x", color="#eeeeee")
        ax.set_axisbelow(True)
        ax.set_title(f"{timeline.label}: {timeline.caption}", loc="left", fontsize=10)
        ax.set_xlabel("seconds since the run published its first event", fontsize=8)
    handles = [Line2D([], [], linestyle="", marker="o", markersize=9, color=colours(seq - 1),
                      label=f"{seq} {name}") for seq, name in sorted(events.items())]
    handles += [
        Line2D([], [], linestyle="", marker="o", markersize=9, markerfacecolor="white",
               markeredgecolor=LATE, markeredgewidth=2, label="ran after a later event"),
        Line2D([], [], linestyle="", marker="o", markersize=9, markerfacecolor="white",
               markeredgecolor="#555555", label="failed"),
        Line2D([], [], color=LATE, label="back in time"),
        Line2D([], [], linestyle="", marker=r"$\mathbf{A}$", markersize=8, color=LATE,
               label="account left inconsistent"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)
