"""An Evidently metric that records one figure of a Keel report as it is.

The daily reports are computed on every row by Keel (keel.monitoring); the dashboards plot those
figures rather than Evidently's recomputation on a sample. Evidently's built-in statistics
would also draw a distribution plot per figure (0.1 s and a large snapshot each); this metric
draws a counter. Imported only where a snapshot is made: it imports Evidently.
"""

from __future__ import annotations

from typing import Any

from evidently.core.metric_types import SingleValueCalculation, SingleValueMetric
from evidently.legacy.model.widget import BaseWidgetInfo
from evidently.legacy.renderers.html_widgets import CounterData, WidgetSize, counter


class DailyFigure(SingleValueMetric):
    """The value of ``column`` in a one-row frame of a day's figures."""

    column: str


class DailyFigureCalculation(SingleValueCalculation[DailyFigure]):
    """Reads the figure and shows it as a counter."""

    def calculate(self, context: Any, current_data: Any, reference_data: Any):
        values = current_data.column(self.metric.column).data
        if len(values) != 1:
            raise ValueError(f"{self.metric.column}: one figure per report, got {len(values)}")
        result = self.result(float(values.iloc[0]))
        widget: BaseWidgetInfo = counter(
            counters=[CounterData.float(self.metric.column, result.value, 4)],
            title=self.display_name(),
            size=WidgetSize.HALF,
        )
        result.widget = [widget]
        return result

    def display_name(self) -> str:
        return self.metric.column
