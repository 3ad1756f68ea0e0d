"""The e2e tests' shared farm: one `i2v-farm up` for the package (its start is ~35 s on 2 cores).

`test_farm_up.py` and `test_web.py` use the same farm (`farm_up`); the test that stops it with
Ctrl-C (`test_farm_up.py::test_ctrl_c_stops_the_farm`) is moved after every other test of this
package, and the fixture stops the farm anyway when the package is done."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
#: The test that stops the shared farm: it runs after the package's other tests.
STOPS_THE_FARM = "test_ctrl_c_stops_the_farm"


@pytest.fixture(scope="package")
def farm_up(tmp_path_factory):
    """`i2v-farm up` with the embedded defaults (tiny-random, ./outputs) and Ray's dashboard, on a
    free port: (process, base URL, its working directory, port)."""
    from cluster.simulated import free_port
    from tests.e2e.test_farm_up import Proc

    cwd = tmp_path_factory.mktemp("farm-up")
    port = free_port()
    proc = Proc(["up", "--port", str(port), "--dashboard"], cwd)
    try:
        proc.wait_for("ready at", timeout=240)
        yield proc, f"http://127.0.0.1:{port}", cwd, port
    finally:
        proc.stop()


def pytest_collection_modifyitems(items):
    """Move the test that stops the shared farm to just after this package's last other test."""
    stops = [item for item in items if item.name == STOPS_THE_FARM and HERE in item.path.parents]
    if not stops:
        return
    for item in stops:
        items.remove(item)
    last = max((n for n, item in enumerate(items) if HERE in item.path.parents), default=len(items) - 1)
    items[last + 1:last + 1] = stops
