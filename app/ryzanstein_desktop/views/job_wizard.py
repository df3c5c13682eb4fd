"""What the Quantize and Fine-tune wizards share: a run page that follows one service job — start it, show a
refusal as a failed job, cancel it, and route its events from the stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtWidgets import QPushButton, QWidget, QWizard

from ryzanstein_desktop.bridge import Bridge

ACTIVE = ("running", "queued")


class JobWizard(QWizard):
    def __init__(self, bridge: Bridge, parent: QWidget | None = None):
        super().__init__(parent)
        self.bridge = bridge
        self.job: dict | None = None
        bridge.sig_event.connect(self._on_event)

    def submit(self, call: Callable[[Any], dict], title: str) -> None:
        """Start the job; a refusal (4xx before any job exists) shows as a failed job with the service's words."""
        self.job = None
        self.bridge.call(call, self._on_job, lambda message: self._on_job(
            {"id": None, "state": "failed", "stage": "refused", "progress": 0.0, "error": message,
             "result": None, "title": title, "detail": {}}))

    def cancel_job(self) -> None:
        if self.job and self.job.get("id") and self.job["state"] in ACTIVE:
            job_id = self.job["id"]
            self.cancel_button().setEnabled(False)
            self.bridge.call(lambda c: c.cancel_job(job_id), lambda _j: None, lambda _m: None)

    def _on_event(self, kind: str, data: dict) -> None:
        if kind == "job":
            self.on_job_event(data)

    def on_job_event(self, data: dict) -> None:
        if self.job is not None and data.get("id") == self.job.get("id"):
            self._on_job(data)

    def cancel_button(self) -> QPushButton:
        raise NotImplementedError

    def _on_job(self, job: dict) -> None:
        raise NotImplementedError
