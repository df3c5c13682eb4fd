"""The chat's generation settings panel: system prompt, sampling, max tokens, seed; saved per conversation."""

from __future__ import annotations

from PySide6.QtWidgets import QDoubleSpinBox, QFormLayout, QGroupBox, QPlainTextEdit, QSpinBox


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

    def values(self) -> dict:
        """Everything on this panel, as saved with a conversation."""
        return {"system_prompt": self.system_prompt.toPlainText(), "temperature": self.temperature.value(),
                "top_p": self.top_p.value(), "top_k": self.top_k.value(),
                "repetition_penalty": self.repetition_penalty.value(), "max_tokens": self.max_tokens.value(),
                "seed": self.seed.value()}

    def set_values(self, values: dict) -> None:
        """Restore a conversation's settings; unknown or missing keys keep the current value."""
        if isinstance(values.get("system_prompt"), str):
            self.system_prompt.setPlainText(values["system_prompt"])
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed"):
            value = values.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                box = getattr(self, name)
                box.setValue(type(box.value())(value))

    def request_fields(self) -> dict:
        fields = {"temperature": self.temperature.value(), "top_p": self.top_p.value(),
                  "top_k": self.top_k.value(), "repetition_penalty": self.repetition_penalty.value(),
                  "max_tokens": self.max_tokens.value()}
        if self.seed.value() >= 0:
            fields["seed"] = self.seed.value()
        return fields
