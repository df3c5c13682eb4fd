"""The compute thread is shared: an engine runs its steps there back to back, and lets any other call in
between two steps (another model's engine, a load, an embedding) instead of holding the thread for a whole
generation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ryzanstein import compute
from ryzanstein.engine.batching import BatchEngine, EngineConfig, holding
from ryzanstein.engine.generate import StreamChunk
from ryzanstein.engine.params import GenerationParams
from ryzanstein.models.loader import load_model_folder


def test_a_long_generation_lets_other_compute_work_in_between_its_steps(tiny_llama_dir: Path, tmp_path: Path):
    lm = load_model_folder("tiny", tiny_llama_dir)
    engine = BatchEngine("tiny", lambda: holding(lm), config=EngineConfig(speculation="off"), swap_dir=tmp_path)
    tokens: list[int] = []
    finished = threading.Event()

    def emit(item: object) -> None:
        if isinstance(item, StreamChunk) and item.token_id is not None:
            tokens.append(item.token_id)
        if isinstance(item, BaseException) or (isinstance(item, StreamChunk) and item.finish_reason):
            finished.set()

    try:
        engine.submit([5, 6, 7], GenerationParams(max_tokens=600, temperature=0.0), emit, lm.tokenizer, set())
        deadline = time.monotonic() + 120
        while len(tokens) < 5:
            assert time.monotonic() < deadline and not finished.is_set()
            time.sleep(0.001)
        ran_at = compute.call(lambda: len(tokens))  # queued behind the engine's running steps
        assert finished.wait(120)
        assert len(tokens) == 600 and ran_at < 600  # the call ran mid-generation, and the generation went on
    finally:
        engine.close()
