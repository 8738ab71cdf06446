"""The daily partitioning every time-sliced asset shares."""

import dagster as dg

from keel.schema import FIRST_DAY

# The generator's calendar starts here; real sources would set their own first day.
DAILY_PARTITIONS = dg.DailyPartitionsDefinition(start_date=FIRST_DAY)
