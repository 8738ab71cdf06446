"""The closed-loop scenario's code location on the team profile (see keel.team.scenario).

``dagster-daemon run -m keel.team.scenario_location`` and the Celery workers load it; the
scenario itself comes from ``KEEL_TEAM_SCENARIO``.
"""

from keel.team.scenario import location_definitions

defs = location_definitions()
