"""Soak the real main window: every tab in turn, Monitor fed faster than normal, chat streaming without pause.

    python scripts/soak_desktop.py --seconds 60                 # offscreen (the test suite runs this)
    DISPLAY=:99 python scripts/soak_desktop.py --seconds 1800   # under Xvfb, the long soak

The window attaches to the service named by RYZANSTEIN_SOAK_URL / RYZANSTEIN_SOAK_TOKEN, or finds or starts one
like the app does. A crash of the Qt binding aborts the interpreter (Fatal Python error), so the caller judges
by the exit status; on success the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

PROMPTS = [
    "Write a short poem about a CPU.",
    "Explain what a KV cache is, in three sentences.",
    "List five fruits, one per line.",
    "Show a tiny Python function that adds two numbers, in a code block.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--monitor-speedup", type=float, default=10.0,
                        help="Metrics samples fed to Monitor per real sample (10 = ten times the normal rate)")
    parser.add_argument("--model", default="", help="Chat model (default: the service's default model)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--tab-ms", type=int, default=700, help="Switch tab this often")
    parser.add_argument("--screenshot", default="", help="Save a screenshot of the window at the end")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    import pyqtgraph
    import PySide6
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from ryzanstein_desktop.bridge import Bridge
    from ryzanstein_desktop.client import Connection
    from ryzanstein_desktop.main_window import MainWindow

    app = QApplication(sys.argv)
    bridge = Bridge()
    window = MainWindow(bridge)  # settings and conversations under RYZANSTEIN_HOME, as the app keeps them
    window.show()

    launcher = None
    if os.environ.get("RYZANSTEIN_SOAK_URL"):
        bridge.attach(Connection(os.environ["RYZANSTEIN_SOAK_URL"], os.environ["RYZANSTEIN_SOAK_TOKEN"]))
    else:
        from ryzanstein_desktop.launcher import ServiceLauncher

        launcher = ServiceLauncher()
        bridge.attach(launcher.connect())

    stats = {"chats_done": 0, "chats_stopped": 0, "chat_errors": 0, "deltas": 0, "samples_fed": 0,
             "tab_switches": 0, "model_refreshes": 0}
    last_sample: dict = {}
    started = time.monotonic()
    prompts = itertools.cycle(PROMPTS)
    cleared_at = [-1]

    def on_metrics(sample: dict) -> None:
        last_sample.clear()
        last_sample.update(sample)

    bridge.sig_metrics.connect(on_metrics)

    def feed_monitor() -> None:
        # Extra samples between the real ones: Monitor and its plots at `monitor_speedup` x the normal rate.
        if last_sample:
            window.monitor.add_sample({**last_sample, "time": time.time()})
            stats["samples_fed"] += 1

    def switch_tab() -> None:
        window.tabs.setCurrentIndex((window.tabs.currentIndex() + 1) % window.tabs.count())
        stats["tab_switches"] += 1
        if stats["tab_switches"] % 10 == 0:
            window.models.refresh()
            stats["model_refreshes"] += 1

    def chat_step() -> None:
        chat = window.chat
        if chat.stream is not None:
            # Every fifth answer is stopped half-way, as a user would.
            if stats["chats_done"] % 5 == 4 and len(chat.answer) > 40:
                chat.stop()
            return
        if chat.model_box.count() == 0:
            return
        if args.model:
            chat.model_box.setCurrentText(args.model)
        if stats["chats_done"] % 6 == 5 and cleared_at[0] != stats["chats_done"]:
            chat.new_chat()  # keeps the prompt short; the engine still sees long histories in between
            cleared_at[0] = stats["chats_done"]
            return
        chat.settings.temperature.setValue(0.7)
        chat.settings.max_tokens.setValue(args.max_tokens)
        chat.input.setPlainText(next(prompts))
        chat.send()
        if chat.stream is not None:
            chat.stream.sig_delta.connect(lambda _t: stats.__setitem__("deltas", stats["deltas"] + 1))
            chat.stream.sig_finished.connect(on_finished)
            chat.stream.sig_error.connect(on_error)

    def on_finished(reason: str, _usage: object) -> None:
        stats["chats_done"] += 1
        stats["chats_stopped"] += reason == "stopped"

    def on_error(message: str) -> None:
        stats["chat_errors"] += 1
        print(f"chat error: {message}", file=sys.stderr, flush=True)

    # Error dialogs are modal; the soak must keep going, so they are logged instead of shown.
    import ryzanstein_desktop.views.chat as chat_module

    chat_module.show_error = lambda _parent, title, message: print(f"{title}: {message}", file=sys.stderr)

    timers = []
    for interval, fn in [(max(1, int(1000 / args.monitor_speedup)), feed_monitor), (args.tab_ms, switch_tab),
                         (200, chat_step)]:
        timer = QTimer()
        timer.timeout.connect(fn)
        timer.start(interval)
        timers.append(timer)

    def report() -> None:
        elapsed = time.monotonic() - started
        print(f"soak: {elapsed:6.0f} s  chats {stats['chats_done']}  samples {stats['samples_fed']}  "
              f"tabs {stats['tab_switches']}", flush=True)

    progress = QTimer()
    progress.timeout.connect(report)
    progress.start(30_000)
    QTimer.singleShot(int(args.seconds * 1000), app.quit)
    app.exec()

    window.chat.stop()
    if args.screenshot:
        window.grab().save(args.screenshot)
    bridge.shutdown()
    if launcher is not None:
        launcher.stop()
    summary = {"seconds": round(time.monotonic() - started, 1), "pyside6": PySide6.__version__,
               "pyqtgraph": pyqtgraph.__version__, **stats}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown, as the app does
