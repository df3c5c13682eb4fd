"""Chat: model selector, streamed answers with Stop, new chat, system prompt and generation settings."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeySequence, QShortcut, QTextCursor
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ryzanstein_desktop.bridge import Bridge, ChatStream
from ryzanstein_desktop.widgets.error_dialog import show_error


class GenerationSettings(QGroupBox):
    def __init__(self) -> None:
        super().__init__("Generation settings")
        form = QFormLayout(self)
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("Optional system prompt, e.g. 'Answer briefly.'")
        self.system_prompt.setMaximumHeight(90)
        self.temperature = self._double(0.0, 2.0, 0.7, 0.05, "0 = greedy (deterministic)")
        self.top_p = self._double(0.01, 1.0, 0.95, 0.01, "Nucleus sampling: keep tokens up to this mass")
        self.top_k = self._int(0, 1000, 40, "0 = off")
        self.repetition_penalty = self._double(0.5, 2.0, 1.1, 0.05, "1 = off; above 1 discourages repeats")
        self.max_tokens = self._int(1, 8192, 512, "Longest answer in tokens")
        self.seed = self._int(-1, 2**31 - 1, -1, "-1 = random each time")
        self.seed.setSpecialValueText("random")
        form.addRow("System prompt", self.system_prompt)
        for label, widget in [("Temperature", self.temperature), ("Top p", self.top_p), ("Top k", self.top_k),
                              ("Repetition penalty", self.repetition_penalty), ("Max tokens", self.max_tokens),
                              ("Seed", self.seed)]:
            form.addRow(label, widget)

    @staticmethod
    def _double(lo: float, hi: float, value: float, step: float, tip: str) -> QDoubleSpinBox:
        box = QDoubleSpinBox()
        box.setRange(lo, hi)
        box.setSingleStep(step)
        box.setValue(value)
        box.setToolTip(tip)
        return box

    @staticmethod
    def _int(lo: int, hi: int, value: int, tip: str) -> QSpinBox:
        box = QSpinBox()
        box.setRange(lo, hi)
        box.setValue(value)
        box.setToolTip(tip)
        return box

    def request_fields(self) -> dict:
        fields = {"temperature": self.temperature.value(), "top_p": self.top_p.value(),
                  "top_k": self.top_k.value(), "repetition_penalty": self.repetition_penalty.value(),
                  "max_tokens": self.max_tokens.value()}
        if self.seed.value() >= 0:
            fields["seed"] = self.seed.value()
        return fields


class ChatView(QWidget):
    sig_generation_state = Signal(bool)  # True while an answer streams

    def __init__(self, bridge: Bridge):
        super().__init__()
        self.bridge = bridge
        self.messages: list[dict] = []
        self.stream: ChatStream | None = None
        self.answer = ""

        self.model_box = QComboBox()
        self.model_box.setMinimumWidth(260)
        self.model_box.setPlaceholderText("waiting for the service…")
        self.refresh_button = QPushButton("↻")
        self.refresh_button.setToolTip("Reload the model list")
        self.refresh_button.setFixedWidth(32)
        self.refresh_button.clicked.connect(self.refresh_models)
        self.new_chat_button = QPushButton("New chat")
        self.new_chat_button.clicked.connect(self.new_chat)
        self.status = QLabel("")
        self.status.setStyleSheet("color: gray")
        top = QHBoxLayout()
        top.addWidget(QLabel("Model"))
        top.addWidget(self.model_box)
        top.addWidget(self.refresh_button)
        top.addStretch(1)
        top.addWidget(self.status)
        top.addWidget(self.new_chat_button)

        self.transcript = QTextBrowser()
        self.transcript.setOpenExternalLinks(False)
        self.transcript.setPlaceholderText("Ask something below. Ctrl+Enter sends.")
        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Type a message…  (Ctrl+Enter to send)")
        self.input.setMaximumHeight(110)
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        QShortcut(QKeySequence("Ctrl+Return"), self.input, activated=self.send)
        buttons = QVBoxLayout()
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        buttons.addStretch(1)
        bottom = QHBoxLayout()
        bottom.addWidget(self.input, 1)
        bottom.addLayout(buttons)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(self.transcript, 1)
        left_layout.addLayout(bottom)
        self.settings = GenerationSettings()
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.settings)
        right_layout.addStretch(1)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(left)
        self.splitter.addWidget(right)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 1)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.splitter, 1)
        bridge.sig_connected.connect(lambda _url: self.refresh_models())
        bridge.sig_event.connect(self._on_event)

    # -- models ---------------------------------------------------------------------------------------
    def refresh_models(self) -> None:
        if self.bridge.client is not None:
            self.bridge.call(lambda c: (c.models(), c.health()), self._set_models,
                             lambda msg: self.status.setText(f"model list failed: {msg}"))

    def _set_models(self, result: tuple[list[str], dict]) -> None:
        names, health = result
        current = self.model_box.currentText() or health.get("default_model", "")
        self.model_box.clear()
        self.model_box.addItems(names)
        if current in names:
            self.model_box.setCurrentText(current)

    def _on_event(self, kind: str, data: dict) -> None:
        if kind == "model" and data.get("state") in {"loaded", "failed"}:
            self.refresh_models()

    # -- chatting ---------------------------------------------------------------------------------------
    def send(self) -> None:
        text = self.input.toPlainText().strip()
        if not text or self.stream is not None:
            return
        model = self.model_box.currentText()
        if not model:
            show_error(self, "No model", "No model is available yet. Wait for the service to load one.")
            return
        self.input.clear()
        self.messages.append({"role": "user", "content": text})
        self._append_html(f"<p><b>You</b><br>{html.escape(text).replace(chr(10), '<br>')}</p>"
                          f"<p><b>{html.escape(model)}</b><br></p>")
        system = self.settings.system_prompt.toPlainText().strip()
        messages = ([{"role": "system", "content": system}] if system else []) + self.messages
        body = {"model": model, "messages": messages, **self.settings.request_fields()}
        self.answer = ""
        self.stream = self.bridge.chat_stream(body)
        self.stream.sig_delta.connect(self._on_delta)
        self.stream.sig_finished.connect(self._on_finished)
        self.stream.sig_error.connect(self._on_error)
        self._set_busy(True)
        self.stream.start()

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.stop()
            self.status.setText("stopping…")

    def new_chat(self) -> None:
        self.stop()
        self.messages.clear()
        self.transcript.clear()
        self.status.setText("")

    def _on_delta(self, text: str) -> None:
        self.answer += text
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(text)
        self.transcript.setTextCursor(cursor)
        self.transcript.ensureCursorVisible()

    def _on_finished(self, reason: str, usage: object) -> None:
        self.messages.append({"role": "assistant", "content": self.answer})
        tokens = f", {usage['completion_tokens']} tokens" if isinstance(usage, dict) else ""
        label = {"stop": "done", "length": "hit max tokens", "stopped": "stopped by you"}.get(reason, reason)
        self.status.setText(f"{label}{tokens}")
        self._set_busy(False)

    def _on_error(self, message: str) -> None:
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()  # the question stays visible but is not sent again as history
        self.status.setText("failed")
        self._set_busy(False)
        show_error(self, "Chat failed", message)

    def _append_html(self, fragment: str) -> None:
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertHtml(fragment)
        self.transcript.setTextCursor(cursor)

    def _set_busy(self, busy: bool) -> None:
        if not busy:
            self.stream = None
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.model_box.setEnabled(not busy)
        if busy:
            self.status.setText("generating…")
        self.sig_generation_state.emit(busy)
