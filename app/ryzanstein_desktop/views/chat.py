"""Chat: saved conversations, a model selector, answers streamed as rendered markdown with Stop, a system prompt
and generation settings remembered per conversation. Esc stops, Ctrl+N starts a new chat."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ryzanstein_desktop.bridge import Bridge, ChatStream
from ryzanstein_desktop.conversations import Conversation, ConversationStore, Message
from ryzanstein_desktop.views.conversation_list import ConversationList
from ryzanstein_desktop.widgets.error_dialog import show_error
from ryzanstein_desktop.widgets.generation_settings import GenerationSettings
from ryzanstein_desktop.widgets.markdown import to_html

STATE_NOTES = {
    "length": "hit the max tokens limit",
    "stopped": "stopped by you",
    "interrupted": "⚠ cut off: the app or the service stopped while this answer was being written — what "
                   "arrived is kept above",
    "failed": "not answered",
}
STATUS_TEXT = {"done": "done", "length": "hit max tokens", "stopped": "stopped by you"}
SAVE_EVERY_MS = 1000  # a streaming answer is written to disk this often: a crash loses at most this much
RENDER_EVERY_MS = 100  # markdown is re-rendered at most this often while tokens arrive


def message_html(message: Message, model: str) -> str:
    who = "You" if message.role == "user" else html.escape(message.model or model or "assistant")
    colour = "#2a5db0" if message.role == "user" else "#3a7d3a"
    note = STATE_NOTES.get(message.state, "")
    note_html = f'<p style="color:{"#b03a2e" if message.state in ("interrupted", "failed") else "gray"}">' \
                f"<i>{html.escape(note)}</i></p>" if note else ""
    return f'<p style="color:{colour}"><b>{who}</b></p>{to_html(message.content)}{note_html}'


class ChatView(QWidget):
    sig_generation_state = Signal(bool)  # True while an answer streams

    def __init__(self, bridge: Bridge, store: ConversationStore):
        super().__init__()
        self.bridge = bridge
        self.store = store
        self.conversation: Conversation | None = None
        self.stream: ChatStream | None = None
        self.answer = ""
        self.answer_message: Message | None = None
        self.loaded_models: set[str] = set()
        self._rendered: dict[int, str] = {}  # message id -> HTML of finished messages
        self._dirty = False
        self._last_stream: ChatStream | None = None

        self.model_box = QComboBox()
        self.model_box.setMinimumWidth(220)
        self.model_box.setPlaceholderText("waiting for the service…")
        self.refresh_button = QPushButton("↻")
        self.refresh_button.setToolTip("Reload the model list")
        self.refresh_button.setFixedWidth(32)
        self.refresh_button.clicked.connect(self.refresh_models)
        self.new_chat_button = QPushButton("New chat")
        self.new_chat_button.setToolTip("Start a new conversation (Ctrl+N); the current one stays in the list")
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
        self.transcript.setPlaceholderText("Ask something below. Ctrl+Enter sends, Esc stops, Ctrl+N starts a new "
                                           "chat.")
        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Type a message…  (Ctrl+Enter to send)")
        self.input.setMaximumHeight(110)
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop the answer (Esc)")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        QShortcut(QKeySequence("Ctrl+Return"), self.input, activated=self.send)
        for keys, slot in (("Esc", self.stop), ("Ctrl+N", self.new_chat)):
            QShortcut(QKeySequence(keys), self, activated=slot, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)
        buttons = QVBoxLayout()
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        buttons.addStretch(1)
        bottom = QHBoxLayout()
        bottom.addWidget(self.input, 1)
        bottom.addLayout(buttons)

        self.conversations = ConversationList(store)
        self.conversations.sig_open.connect(self.open_conversation)
        self.conversations.sig_deleted.connect(self._on_deleted)
        middle = QWidget()
        middle_layout = QVBoxLayout(middle)
        middle_layout.setContentsMargins(0, 0, 0, 0)
        middle_layout.addWidget(self.transcript, 1)
        middle_layout.addLayout(bottom)
        self.settings = GenerationSettings()
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.settings)
        right_layout.addStretch(1)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.conversations)
        self.splitter.addWidget(middle)
        self.splitter.addWidget(right)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 4)
        self.splitter.setStretchFactor(2, 1)
        self.splitter.setSizes([180, 660, 260])

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.splitter, 1)
        self._render_timer = QTimer(self)
        self._render_timer.timeout.connect(self._render_if_dirty)
        self._render_timer.start(RENDER_EVERY_MS)
        self._save_timer = QTimer(self)
        self._save_timer.timeout.connect(self._save_partial_answer)
        bridge.sig_connected.connect(lambda _url: self.refresh_models())
        bridge.sig_event.connect(self._on_event)
        self._open_latest()

    # -- conversations --------------------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict]:
        """The history sent with the next question."""
        return self.conversation.history() if self.conversation else []

    def _open_latest(self) -> None:
        latest = self.store.list()
        if latest:
            self.open_conversation(latest[0].id)
        if self.store.set_aside is not None:
            self.status.setText(f"the saved chats could not be read; the file is kept as {self.store.set_aside.name} "
                                "and a new one was started")
        elif self.store.interrupted_at_open:
            count = self.store.interrupted_at_open
            self.status.setText(f"{count} answer{'s' if count > 1 else ''} cut off when the app last stopped "
                                "(marked in the chat)")

    def open_conversation(self, conversation_id: int) -> None:
        if self.stream is not None:
            return  # switching while an answer streams would write it into the wrong chat
        self.conversation = self.store.get(conversation_id)
        self.settings.set_values(self.conversation.settings)
        if self.conversation.model and self.model_box.findText(self.conversation.model) >= 0:
            self.model_box.setCurrentText(self.conversation.model)
        self._rendered.clear()
        self.conversations.refresh(conversation_id)
        self._render(scroll_to_end=True)
        self.status.setText("")

    def _on_deleted(self, conversation_id: int) -> None:
        if self.conversation is not None and self.conversation.id == conversation_id:
            self.stop()
            self.conversation = None
            self.transcript.clear()

    def new_chat(self) -> None:
        self.stop()
        self.conversation = None
        self.transcript.clear()
        self.conversations.clear_selection()
        self.status.setText("")
        self.input.setFocus()

    # -- models ---------------------------------------------------------------------------------------
    def refresh_models(self) -> None:
        if self.bridge.client is not None:
            self.bridge.call(lambda c: (c.models(), c.health()), self._set_models,
                             lambda msg: self.status.setText(f"model list failed: {msg}"))

    def _set_models(self, result: tuple[list[str], dict]) -> None:
        names, health = result
        self.loaded_models = set(health.get("loaded_models", []))
        current = self.model_box.currentText() or (self.conversation.model if self.conversation else "") \
            or health.get("default_model", "")
        self.model_box.clear()
        self.model_box.addItems(names)
        if current in names:
            self.model_box.setCurrentText(current)

    def _on_event(self, kind: str, data: dict) -> None:
        if kind != "model":
            return
        name, state = data.get("name"), data.get("state")
        if state == "loaded":
            self.loaded_models.add(name)
        elif state in {"unloaded", "deleted"}:
            self.loaded_models.discard(name)
        if state in {"loaded", "failed", "imported", "deleted"}:
            self.refresh_models()
        if self.stream is not None and name == self.model_box.currentText() and not self.answer:
            if state == "loading":
                self.status.setText(f"loading {name}…")
            elif state == "loaded":
                self.status.setText("generating…")

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
        if self.conversation is None:
            self.conversation = self.store.get(self.store.create(model=model, settings=self.settings.values()))
        conversation_id = self.conversation.id
        self.store.save_settings(conversation_id, model, self.settings.values())
        self.store.add_message(conversation_id, "user", text)
        history = self.store.get(conversation_id).history()
        answer_id = self.store.add_message(conversation_id, "assistant", "", state="streaming", model=model)
        self.conversation = self.store.get(conversation_id)
        self.answer_message = self.conversation.messages[-1]
        assert self.answer_message.id == answer_id
        self.conversations.refresh(conversation_id)
        system = self.settings.system_prompt.toPlainText().strip()
        messages = ([{"role": "system", "content": system}] if system else []) + history
        body = {"model": model, "messages": messages, **self.settings.request_fields()}
        self.answer = ""
        self.stream = self.bridge.chat_stream(body)
        self.stream.sig_delta.connect(self._on_delta)
        self.stream.sig_finished.connect(self._on_finished)
        self.stream.sig_error.connect(self._on_error)
        self._set_busy(True)
        self.status.setText("generating…" if model in self.loaded_models else f"loading {model}…")
        self._render(scroll_to_end=True)
        self._save_timer.start(SAVE_EVERY_MS)
        self.stream.start()

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.stop()
            self.status.setText("stopping…")

    def _on_delta(self, text: str) -> None:
        if not self.answer:
            self.status.setText("generating…")
        self.answer += text
        self._dirty = True

    def _save_partial_answer(self) -> None:
        if self.answer_message is not None and self.answer_message.content != self.answer:
            self.answer_message.content = self.answer
            self.store.update_message(self.answer_message.id, self.answer, "streaming")

    def _finish_answer(self, state: str) -> None:
        self._save_timer.stop()
        if self.answer_message is not None:
            self.answer_message.content, self.answer_message.state = self.answer, state
            self.store.update_message(self.answer_message.id, self.answer, state)
        self.answer_message = None
        self._set_busy(False)
        self._render()

    def _on_finished(self, reason: str, usage: object) -> None:
        state = {"stop": "done", "length": "length", "stopped": "stopped"}.get(reason, "done")
        self._finish_answer(state)
        tokens = f", {usage['completion_tokens']} tokens" if isinstance(usage, dict) else ""
        self.status.setText(f"{STATUS_TEXT.get(state, reason)}{tokens}")

    def _on_error(self, message: str) -> None:
        if self.answer:
            # Part of the answer arrived before the service or the connection went away: keep it, say so.
            self._finish_answer("interrupted")
            self.status.setText("cut off — the service stopped answering")
        else:
            # Nothing arrived: the question stays visible, marked, but is not sent again as history.
            if self.answer_message is not None and self.conversation is not None:
                self.store.delete_message(self.answer_message.id)
                question = next(m for m in reversed(self.conversation.messages) if m.role == "user")
                self.store.update_message(question.id, question.content, "failed")
                self._rendered.pop(question.id, None)
                self.answer_message = None
                self.conversation = self.store.get(self.conversation.id)
            self._finish_answer("failed")
            self.status.setText("failed")
        show_error(self, "Chat failed", message)

    # -- rendering ----------------------------------------------------------------------------------------
    def _render_if_dirty(self) -> None:
        if self._dirty:
            self._dirty = False
            self._render()

    def _render(self, scroll_to_end: bool = False) -> None:
        if self.conversation is None:
            self.transcript.clear()
            return
        bar = self.transcript.verticalScrollBar()
        at_end = scroll_to_end or bar.value() >= bar.maximum() - 4
        model = self.conversation.model
        parts = []
        for message in self.conversation.messages:
            if message is self.answer_message:
                parts.append(message_html(Message(message.id, message.role, self.answer, "done", message.model),
                                          model))
            else:
                if message.id not in self._rendered:
                    self._rendered[message.id] = message_html(message, model)
                parts.append(self._rendered[message.id])
        position = bar.value()
        self.transcript.setHtml("".join(parts))
        bar.setValue(bar.maximum() if at_end else position)

    def _set_busy(self, busy: bool) -> None:
        if not busy:
            # Keep the finished stream alive: this runs inside its own signal, and freeing its QObject here
            # would skip the slots connected after ours.
            self._last_stream = self.stream
            self.stream = None
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.model_box.setEnabled(not busy)
        self.conversations.list.setEnabled(not busy)
        self.sig_generation_state.emit(busy)
