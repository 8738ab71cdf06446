"""Cost per step, run, asset materialisation and model version, measured and priced.

`measure` reads what a step used from the kernel, `prices` turns it into money per profile,
`store` keeps one row per step and sums them, `dagster` measures every Dagster step and puts
the figures in asset metadata, and `cli` is ``keel cost``.
"""
