"""The list of saved conversations beside the chat: open, rename, delete, export as Markdown or JSON."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ryzanstein_desktop.conversations import ConversationStore, to_json, to_markdown
from ryzanstein_desktop.widgets.error_dialog import show_error


class ConversationList(QWidget):
    sig_open = Signal(int)  # conversation id
    sig_deleted = Signal(int)

    def __init__(self, store: ConversationStore):
        super().__init__()
        self.store = store
        self.list = QListWidget()
        self.list.setToolTip("Saved conversations, newest first. Double-click to rename.")
        self.list.itemClicked.connect(lambda item: self.sig_open.emit(item.data(Qt.ItemDataRole.UserRole)))
        self.list.itemDoubleClicked.connect(lambda _item: self.rename_selected())
        self.rename_button = QPushButton("Rename")
        self.rename_button.clicked.connect(self.rename_selected)
        self.delete_button = QPushButton("Delete")
        self.delete_button.clicked.connect(lambda: self.delete_selected(confirm=True))
        self.export_button = QPushButton("Export")
        self.export_button.setToolTip("Save the conversation as Markdown (.md) or JSON (.json)")
        self.export_button.clicked.connect(self.export_selected)
        buttons = QHBoxLayout()
        buttons.setSpacing(2)
        for button in (self.rename_button, self.delete_button, self.export_button):
            button.setMinimumWidth(10)  # the panel stays narrow: the chat gets the width
            buttons.addWidget(button)
        self.setMinimumWidth(150)
        self.setMaximumWidth(320)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.list, 1)
        layout.addLayout(buttons)
        self.list.currentItemChanged.connect(lambda *_: self._update_buttons())
        self.refresh()

    def refresh(self, select: int | None = None) -> None:
        selected = select if select is not None else self.selected_id()
        self.list.blockSignals(True)
        self.list.clear()
        for conversation in self.store.list():
            item = QListWidgetItem(conversation.title)
            item.setData(Qt.ItemDataRole.UserRole, conversation.id)
            item.setToolTip(f"{conversation.title}\nmodel: {conversation.model or '—'}")
            self.list.addItem(item)
            if conversation.id == selected:
                self.list.setCurrentItem(item)
        self.list.blockSignals(False)
        self._update_buttons()

    def selected_id(self) -> int | None:
        item = self.list.currentItem()
        return None if item is None else int(item.data(Qt.ItemDataRole.UserRole))

    def clear_selection(self) -> None:
        self.list.setCurrentItem(None)
        self._update_buttons()

    def _update_buttons(self) -> None:
        has = self.selected_id() is not None
        for button in (self.rename_button, self.delete_button, self.export_button):
            button.setEnabled(has)

    def rename_selected(self, title: str | None = None) -> None:
        conversation_id = self.selected_id()
        if conversation_id is None:
            return
        if title is None:
            current = self.list.currentItem().text()
            title, ok = QInputDialog.getText(self, "Rename conversation", "Title:", text=current)
            if not ok:
                return
        try:
            self.store.rename(conversation_id, title)
        except ValueError as exc:
            show_error(self, "Not renamed", str(exc))
            return
        self.refresh(conversation_id)

    def delete_selected(self, confirm: bool = True) -> None:
        conversation_id = self.selected_id()
        if conversation_id is None:
            return
        title = self.list.currentItem().text()
        if confirm and QMessageBox.question(self, "Delete conversation", f"Delete “{title}”? This cannot be "
                                            "undone.") != QMessageBox.StandardButton.Yes:
            return
        self.store.delete(conversation_id)
        self.refresh()
        self.sig_deleted.emit(conversation_id)

    def export_selected(self, path: str | None = None) -> Path | None:
        conversation_id = self.selected_id()
        if conversation_id is None:
            return None
        conversation = self.store.get(conversation_id)
        if path is None:
            safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in conversation.title).strip() or "chat"
            path, _ = QFileDialog.getSaveFileName(self, "Export conversation", f"{safe}.md",
                                                  "Markdown (*.md);;JSON (*.json)")
            if not path:
                return None
        target = Path(path)
        text = to_json(conversation) if target.suffix.lower() == ".json" else to_markdown(conversation)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
        except OSError as exc:
            show_error(self, "Export failed", f"Could not write {target}: {exc.strerror or exc}")
            return None
        return target
