"""The Cluster view against two real cluster services on loopback: the other node appears by itself, Pair with
its PIN, a plan, a split model started from the view and plotted live (screenshot in docs/screenshots/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import QSettings

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.client import Connection
from ryzanstein_desktop.conversations import ConversationStore
from ryzanstein_desktop.main_window import MainWindow
from tests.e2e.test_cluster_services import api, complete
from tests.helpers import cluster_services

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshots" / "cluster.png"


@pytest.fixture
def nodes(tmp_path_factory, tiny_llama_dir: Path, service):
    homes = [tmp_path_factory.mktemp(f"view-{name}") for name in ("alpha", "beta")]
    with cluster_services(homes, ["alpha", "beta"], tiny_llama_dir) as procs:
        yield procs


def test_cluster_view_pairs_plans_and_starts_a_split_model(qtbot, nodes, tmp_path: Path):
    alpha, beta = nodes
    bridge = Bridge()
    win = MainWindow(bridge, QSettings(str(tmp_path / "gui.ini"), QSettings.Format.IniFormat),
                     ConversationStore(tmp_path / "conversations.sqlite3"))
    qtbot.addWidget(win)
    win.resize(1300, 900)
    win.show()
    bridge.attach(Connection(alpha.url, alpha.token))
    view = win.cluster
    win.tabs.setCurrentWidget(view)
    qtbot.waitUntil(lambda: any(n["name"] == "beta" for n in view.nodes), timeout=40_000)  # found by zeroconf
    assert "This node: alpha" in view.me.text()
    row = next(i for i, n in enumerate(view.nodes) if n["name"] == "beta")
    view.table.selectRow(row)
    view.ask_pin = lambda name: api(beta, "GET", "/api/cluster").json()["pins"][0]["pin"]  # read off beta's screen
    view.pair_button.click()
    qtbot.waitUntil(lambda: any(n["paired"] for n in view.nodes), timeout=30_000)
    qtbot.waitUntil(lambda: view.model_box.findText("tiny") >= 0, timeout=20_000)
    view.model_box.setCurrentText("tiny")
    row = next(i for i, n in enumerate(view.nodes) if n["name"] == "beta")
    view.table.selectRow(row)
    view.plan_button.click()
    qtbot.waitUntil(lambda: view.plan_table.rowCount() == 2, timeout=120_000)
    assert "Proposed" in view.message.text()
    view.plan_table.selectRow(1)  # the two-node split (the tiny model alone is faster on one node)
    assert view.chosen_option()["nodes"] == 2
    view.start_button.click()
    qtbot.waitUntil(lambda: (view.status.get("run") or {}).get("state") == "running", timeout=120_000)
    for attempt in range(30):  # traffic between two polls of the view gives a point per node
        assert complete(alpha, f"Prompt number {attempt}", max_tokens=24).status_code == 200
        qtbot.wait(300)
        if view.step_plot.sample_count("beta (round trip)") >= 1:
            break
    assert view.step_plot.sample_count("beta (round trip)") >= 1, (view.status.get("run"), view.message.text())
    assert "running" in view.message.text() and "beta" in view.message.text()
    qtbot.waitUntil(lambda: view.plan_table.item(1, 3).text() != "", timeout=10_000)  # measured beside the split
    assert view.plan_table.item(0, 3).text() == ""  # and not beside the option that does not run
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert win.grab().save(str(SCREENSHOT))
