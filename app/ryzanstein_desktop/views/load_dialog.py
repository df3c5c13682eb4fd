"""Load with options: context length, RoPE scaling, attention pattern and KV-cache policy, each explained in one
line, with the KV memory one sequence will hold predicted as the choices change."""

from __future__ import annotations

from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

PATTERN_HELP = {
    "dense": "Every token sees every earlier token: exact, but cost and memory grow with the context.",
    "window": "Each token sees the first few tokens and the last `window`: flat decode cost; far facts are lost.",
    "strided": "The window plus every `stride`-th earlier token: a coarse view of the far past.",
    "block_sparse": "The window plus the most relevant earlier blocks per head: far facts stay reachable at a "
                    "fraction of dense cost.",
    "pooled": "The window plus the far past averaged in blocks (one entry per block): a blurred memory of "
              "everything, with eviction growing block times slower than dense.",
}
POLICY_HELP = {
    "keep": "Keep every token's keys and values (dense, strided and block-sparse need them).",
    "evict": "Window and pooled only: drop keys and values that left the window (pooled keeps their averages), "
             "so memory stays flat or grows slowly.",
}
KV_HELP = {"fp16": "Half of fp32's memory, near-exact (KL 3.5e-7). The default, as in llama.cpp.",
           "fp32": "Exact.",
           "int8": "A quarter of the memory; near-exact.", "int4": "A seventh of the memory; small drift.",
           "lowrank": "Keys and values in a basis fitted at load; the rank is the smallest that keeps answers within "
                      "0.01 nats of fp32 on calibration text (its memory is known once loaded)."}
ROPE_HELP = {"auto": "YaRN when the context is longer than the model was trained on, else nothing.",
             "yarn": "Interpolates slow rotations only and sharpens attention: the usual best choice.",
             "ntk": "A larger rotary base, fixed for the chosen length (NTK-aware).",
             "linear": "Divides every position by the factor: simple, blurs nearby positions.",
             "none": "As trained: the context cannot exceed the native length."}
KV_BYTES_FACTOR = {"fp32": 1.0, "fp16": 0.5, "int8": 0.27, "int4": 0.16,  # codes + per-token scales, head_dim 64
                   "lowrank": 0.5}  # a typical rank; the real one is chosen by measured error at load
PREFILL_CHUNK = 256
DECODE_HELP = {
    "auto": "The native C++ step where it applies (Llama, Mistral, Qwen2/3, Phi-3, Granite with an fp32 or fp16 "
            "KV cache and dense attention), else transformers.",
    "native": "Only the native step: the load is refused, with the reason, where it cannot run.",
    "reference": "Always transformers (the reference path; slower).",
}


def held_tokens(context: int, pattern: str, policy: str, window: int, sinks: int, block: int) -> int:
    """KV rows one sequence holds at most (the service's held_kv_tokens; a test keeps the two equal)."""
    if pattern == "window" and policy == "evict":
        return min(context, sinks + 2 * window + PREFILL_CHUNK)
    if pattern == "pooled" and policy == "evict":
        segments = max(0, context - 1 - window + 1 - sinks) // block
        return min(context, sinks + 2 * window + PREFILL_CHUNK + block + segments)
    return context


class LoadOptionsDialog(QDialog):
    def __init__(self, row: dict, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle(f"Load {row['name']}")
        estimate = row.get("estimate") or {}
        tokens = estimate.get("context_tokens") or 0
        self.bytes_per_token = (estimate.get("kv_cache_bytes") or 0) / tokens if tokens else 0.0
        self.native = int(row.get("native_context") or 0)

        self.kv_cache = self._combo(list(KV_HELP))
        self.context = QComboBox()
        self.context.addItem("as the service allows", None)
        for value in (4096, 8192, 16384, 32768, 65536):
            self.context.addItem(f"{value // 1024}K tokens", value)
        self.rope = self._combo(list(ROPE_HELP))
        self.pattern = self._combo(list(PATTERN_HELP))
        self.policy = self._combo(list(POLICY_HELP))
        self.window = self._spin(16, 1 << 20, 1024)
        self.sinks = self._spin(0, 1024, 4)
        self.stride = self._spin(2, 1 << 16, 64)
        self.block = self._spin(8, 4096, 64)
        self.top_k = self._spin(1, 1024, 16)
        self.decode = self._combo(list(DECODE_HELP))
        self.help = {name: QLabel() for name in ("kv", "rope", "pattern", "policy", "decode")}
        for label in self.help.values():
            label.setWordWrap(True)
            label.setStyleSheet("color: palette(mid);")
        self.prediction = QLabel()
        self.prediction.setWordWrap(True)

        form = QFormLayout()
        form.addRow("KV cache", self.kv_cache)
        form.addRow("", self.help["kv"])
        form.addRow("Context length", self.context)
        form.addRow("RoPE scaling", self.rope)
        form.addRow("", self.help["rope"])
        form.addRow("Attention", self.pattern)
        form.addRow("", self.help["pattern"])
        form.addRow("Window (tokens)", self.window)
        form.addRow("Sink tokens", self.sinks)
        form.addRow("Stride", self.stride)
        form.addRow("Block size", self.block)
        form.addRow("Blocks per head (top-k)", self.top_k)
        form.addRow("KV policy", self.policy)
        form.addRow("", self.help["policy"])
        form.addRow("Decode path", self.decode)
        form.addRow("", self.help["decode"])
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Load")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.prediction)
        layout.addWidget(buttons)
        for combo in (self.kv_cache, self.context, self.rope, self.pattern, self.policy, self.decode):
            combo.currentIndexChanged.connect(self.update_view)
        for spin in (self.window, self.sinks, self.stride, self.block, self.top_k):
            spin.valueChanged.connect(self.update_view)
        self.update_view()

    def _combo(self, items: list[str]) -> QComboBox:
        box = QComboBox()
        for item in items:
            box.addItem(item, item)
        return box

    def _spin(self, low: int, high: int, value: int) -> QSpinBox:
        spin = QSpinBox()
        spin.setRange(low, high)
        spin.setValue(value)
        return spin

    def update_view(self) -> None:
        pattern, policy = self.pattern.currentData(), self.policy.currentData()
        self.help["kv"].setText(KV_HELP[self.kv_cache.currentData()])
        self.help["rope"].setText(ROPE_HELP[self.rope.currentData()])
        self.help["pattern"].setText(PATTERN_HELP[pattern])
        self.help["policy"].setText(POLICY_HELP[policy])
        self.help["decode"].setText(DECODE_HELP[self.decode.currentData()])
        sparse = pattern != "dense"
        for spin in (self.window, self.sinks):
            spin.setEnabled(sparse)
        self.stride.setEnabled(pattern == "strided")
        self.block.setEnabled(pattern in ("block_sparse", "pooled"))
        self.top_k.setEnabled(pattern == "block_sparse")
        evictable = pattern in ("window", "pooled")
        self.policy.model().item(1).setEnabled(evictable)  # eviction: patterns that never read old rows exactly
        if policy == "evict" and not evictable:
            self.policy.setCurrentIndex(0)
        self.prediction.setText(self.predicted_text())

    def predicted_text(self) -> str:
        context = self.context.currentData() or self.native or 0
        if not context or not self.bytes_per_token:
            return "Predicted KV memory: unknown for this model."
        held = held_tokens(context, self.pattern.currentData(), self.policy.currentData(), self.window.value(),
                           self.sinks.value(), self.block.value())
        per_sequence = held * self.bytes_per_token * KV_BYTES_FACTOR[self.kv_cache.currentData()]
        note = " (flat: older tokens are dropped)" if held < context else ""
        return (f"Predicted KV memory per sequence at {context:,} tokens: {per_sequence / 2**20:,.0f} MiB{note}. "
                f"Each sequence of a batch holds its own.")

    def options(self) -> dict:
        """The load request's fields (only what differs from a plain load)."""
        pattern = self.pattern.currentData()
        chosen: dict = {"kv_cache": self.kv_cache.currentData()}
        if self.decode.currentData() != "auto":
            chosen["decode_path"] = self.decode.currentData()
        if self.context.currentData():
            chosen["context_tokens"] = self.context.currentData()
            chosen["rope_scaling"] = self.rope.currentData()
        if pattern != "dense":
            chosen.update(attention=pattern, window=self.window.value(), sinks=self.sinks.value(),
                          kv_policy=self.policy.currentData())
            if pattern == "strided":
                chosen["stride"] = self.stride.value()
            if pattern == "block_sparse":
                chosen.update(block=self.block.value(), top_k=self.top_k.value())
            if pattern == "pooled":
                chosen["block"] = self.block.value()
        return chosen
