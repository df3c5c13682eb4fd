"""Screenshots of the Fine-tune wizard on the default model: a real run against a running service.

Usage: QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/screenshot_finetune.py URL TOKEN OUTPUT_DIR [MAX_STEPS]
(MAX_STEPS 0 or absent = one full epoch of the sample dataset with the fast preset). Writes finetune-dataset.png,
finetune-training.png and finetune-result.png; the ones in docs/screenshots/ come from this script.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QEventLoop, QTimer
from PySide6.QtWidgets import QApplication

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.client import Connection
from ryzanstein_desktop.views.finetune_wizard import FinetuneWizard

MODEL = "smollm2-135m-instruct"


def wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        loop = QEventLoop()
        QTimer.singleShot(100, loop.quit)
        loop.exec()
    if not condition():
        raise SystemExit(f"timed out after {timeout} s")


def main(url: str, token: str, out: Path, max_steps: int) -> None:
    app = QApplication([])  # noqa: F841 (kept alive for the widgets)
    bridge = Bridge()
    bridge.attach(Connection(url, token))
    wizard = FinetuneWizard(bridge, [MODEL], MODEL)
    wizard.show()
    wait(lambda: bool(wizard.presets), 30)
    wizard.base_page.name.setText("assistant-fast")
    wizard.next()
    wizard.dataset_page.sample.click()
    wait(lambda: wizard.dataset_page.report is not None, 60)
    wizard.dataset_page.grab().save(str(out / "finetune-dataset.png"))
    wizard.next()
    wizard.preset_page.buttons["fast"].setChecked(True)
    wizard.preset_page.max_steps.setValue(max_steps)
    wait(lambda: "Forecast:" in wizard.preset_page.forecast.text(), 60)
    print(wizard.preset_page.forecast.text())
    wizard.next()
    wait(lambda: wizard.job is not None and wizard.job["state"] not in ("running", "queued"), 3600)
    print(wizard.job["state"], wizard.job.get("error") or "")
    wizard.grab().save(str(out / "finetune-training.png"))
    wizard.next()
    wizard.grab().save(str(out / "finetune-result.png"))
    if wizard.job["state"] == "succeeded":
        print(json.dumps(wizard.job["result"]["metrics"]), json.dumps(wizard.job["result"]["samples"], indent=1))
    bridge.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
