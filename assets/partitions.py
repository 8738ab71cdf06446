"""The daily partitioning every time-sliced asset shares."""

import dagster as dg

# The generator's calendar starts here; real sources would set their own first day.
FIRST_DAY = "2026-01-01"

DAILY_PARTITIONS = dg.DailyPartitionsDefinition(start_date=FIRST_DAY)
