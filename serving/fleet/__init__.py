"""Fleet simulation and capacity planning (issue 16): the farm's own scheduler in virtual time.

    traces.py   workloads: the built-in `day`, `burst`, `steady` traces and JSONL files
    sim.py      the discrete-event simulator (`simulate`) around `serving.scheduler.Scheduler`
    plan.py     the capacity planner: the cheapest fleet that meets an interactive p95 wait
    report.py   tables and JSON of a simulation or a plan
    cli.py      `i2v-farm simulate` and `i2v-farm plan`

Design notes and what the simulator leaves out: docs/fleet.md.
"""
