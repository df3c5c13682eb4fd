"""The native decode path: one C++ call runs a whole engine step of a llama-family model (`native_step.cpp`).

Supported: Llama, Mistral (without sliding window), Qwen2, Qwen3, Granite and Phi-3 decoders with RMSNorm,
RoPE (default, linear, YaRN or our fixed NTK: whatever inverse frequencies the model's rotary embedding holds)
and a gated SiLU MLP; weights fp32 (read in place), int8 or int4 (rewritten once as tiles of 16 outputs,
see weight_tiles); an fp32 KV cache with
dense attention. Everything else — other architectures, bf16 weights, quantized or low-rank KV caches, sparse
attention patterns, models split across the cluster, adapters — runs on the transformers path, which stays the
reference. The engine picks the native path by itself; `decode_path="reference"` at load forces transformers.

The instruction set is chosen at run time: AVX-512 VNNI, AVX-VNNI or AVX2, the best the CPU has;
`RYZANSTEIN_ISA=avx2|avxvnni|avx512vnni` forces a lower one (tests cover each path that way).
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ryzanstein.errors import InvalidRequest

log = logging.getLogger("ryzanstein.native")
SOURCES = (Path(__file__).with_name("native_step.cpp"), Path(__file__).with_name("native_isa.h"))
ISA_LEVELS = {"avx2": 1, "avxvnni": 2, "avx512vnni": 3}
ISA_ENV = "RYZANSTEIN_ISA"
THREADS_ENV = "RYZANSTEIN_NATIVE_THREADS"  # auto (measured, see ThreadPolicy) or a fixed count
SPIN = 2000  # pause instructions a waiting thread spins before it sleeps (about 0.1-0.3 ms)
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "granite", "phi3")
DECODE_PATHS = ("auto", "native", "reference")
STATIC_ROPE = ("default", "linear", "yarn", "llama3")  # inverse frequencies fixed at load
_build_lock = threading.Lock()


class NativeUnsupported(Exception):
    """The model cannot run on the native path (it runs on transformers)."""


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def available_isas() -> list[str]:
    """The paths this CPU runs, best last. AVX-VNNI (VEX) is a feature of its own: AVX-512 VNNI CPUs before
    Sapphire Rapids / Zen 5 lack it, so there its path cannot run (nor be tested)."""
    flags = cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return []
    found = ["avx2"]
    if "avx_vnni" in flags:
        found.append("avxvnni")
    if {"avx512_vnni", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        found.append("avx512vnni")
    return found


def chosen_isa() -> str:
    """The path to use: the CPU's best, or another one it runs, forced by RYZANSTEIN_ISA."""
    available = available_isas()
    if not available:
        raise NativeUnsupported("the CPU lacks AVX2/FMA")
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if not forced:
        return available[-1]
    if forced not in ISA_LEVELS:
        raise InvalidRequest(f"{ISA_ENV}={forced!r} is invalid: use one of {', '.join(ISA_LEVELS)}.", param=ISA_ENV)
    if forced not in available:
        raise InvalidRequest(f"{ISA_ENV}={forced}: this CPU does not run it (it runs {', '.join(available)}).",
                             param=ISA_ENV)
    return forced


def build_dir() -> Path:
    from ryzanstein.engine.qweights import kernel_build_dir

    return kernel_build_dir() / "native"


@cache
def extension() -> Any:
    """The compiled library (built on first use, ~1 min, then loaded from the user cache). Its name carries a
    hash of the sources, so an edited header rebuilds it."""
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:10]
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock:
        return load(name=f"ryzanstein_native_{digest}", sources=[str(SOURCES[0])], build_directory=str(folder),
                    extra_include_paths=[str(SOURCES[0].parent)], extra_cflags=["-O3", "-ffp-contract=off"],
                    verbose=False)


_build_error: list[str] = []  # a failed build is not retried in this process


def library() -> Any:
    """The extension, or NativeUnsupported when it cannot be built here (no compiler…): transformers then runs."""
    if _build_error:
        raise NativeUnsupported(_build_error[0])
    try:
        return extension()
    except Exception as exc:
        _build_error.append(f"the native library could not be built ({type(exc).__name__}: {str(exc)[:200]})")
        log.warning("%s", _build_error[0])
        raise NativeUnsupported(_build_error[0]) from exc


# -- the model's pieces ----------------------------------------------------------------------------------
EMPTY = torch.empty(0)


def linear_spec(module: Any, tiles: bool = True) -> tuple:
    """(kind, group, weight, scale, mins, bias, input_scale[, outputs, inputs]) as native_step.cpp reads a linear;
    tiles=False only checks that it fits (no tiles are made)."""
    if type(module) is not torch.nn.Linear:
        raise NativeUnsupported(f"{type(module).__name__} layers (adapters or custom linears)")
    bias = module.bias.detach() if module.bias is not None else EMPTY
    input_scale = getattr(module, "input_scale", None)
    input_scale = EMPTY if input_scale is None else input_scale.float()
    if hasattr(module, "weight_int8") or hasattr(module, "weight_int4"):
        return (1 if hasattr(module, "weight_int8") else 2, getattr(module, "int4_group", 0),
                weight_tiles(module) if tiles else EMPTY, EMPTY, EMPTY, bias, input_scale, module.out_features,
                module.in_features)
    if module.weight.dtype != torch.float32:
        raise NativeUnsupported(f"{module.weight.dtype} weights (fp32, int8 and int4 run natively)")
    if input_scale.numel():
        raise NativeUnsupported("fp32 weights with an input scale")
    return (0, 0, module.weight.detach(), EMPTY, EMPTY, bias, input_scale)


def _sources(module: Any) -> tuple[torch.Tensor, ...]:
    if hasattr(module, "weight_int4"):
        return module.weight_int4, module.weight_scale, module.weight_min
    return module.weight_int8, module.weight_scale


def _key(module: Any) -> tuple:
    """Where the weights live and how often they were written to (inference tensors keep no count)."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in _sources(module))


def weight_tiles(module: Any) -> torch.Tensor:
    """An int8 or int4 linear as the native kernels read it: tiles of 16 outputs whose vector lanes are outputs
    (scales, and int4's mins, inside). Made once per module and remade only when its weights change; once the
    decoder attaches, the store layout's codes are released (release_store_layout), so they live in memory once."""
    cached: tuple[tuple, torch.Tensor] | None = getattr(module, "_ryzanstein_tiles", None)
    if cached is not None and getattr(module, "_ryzanstein_released", False):
        return cached[1]
    key = _key(module)
    if cached is None or cached[0] != key:
        sources = _sources(module)
        tiles = (library().tile_int4(*sources, module.int4_group) if hasattr(module, "weight_int4")
                 else library().tile_int8(*sources))
        module._ryzanstein_tiles = cached = (key, tiles)
    return cached[1]


def release_store_layout(model: Any) -> None:
    """Drop the store-layout codes of every tiled linear (its tiles hold the same codes): int4/int8 weights then
    sit in memory once, plus the tiles' fp16 scales. Whatever needs the store layout again — the transformers
    path, saving, dequantizing — rebuilds it exactly (qweights.store_layout → restore_store_layout)."""
    for module in model.modules():
        if getattr(module, "_ryzanstein_tiles", None) is None or getattr(module, "_ryzanstein_released", False):
            continue
        if module._ryzanstein_tiles[0] != _key(module):
            continue  # stale tiles: the next weight_tiles remakes them
        name = "weight_int4" if hasattr(module, "weight_int4") else "weight_int8"
        codes = getattr(module, name)
        module._ryzanstein_store_shape = tuple(codes.shape)
        setattr(module, name, torch.empty(0, dtype=codes.dtype))
        module._ryzanstein_released = True


def restore_store_layout(module: Any) -> None:
    """The store-layout codes back from the tiles, bit for bit; the tiles stay valid (nothing is remade)."""
    tiles = module._ryzanstein_tiles[1]
    outputs, inputs = module.out_features, module.in_features
    with torch.inference_mode(False):  # a normal tensor, as loaded (a forward may be running in inference mode)
        if hasattr(module, "weight_int4"):
            module.weight_int4 = library().untile_int4(tiles, outputs, inputs, module.int4_group)
        else:
            module.weight_int8 = library().untile_int8(tiles, outputs, inputs)
    module._ryzanstein_released = False
    module._ryzanstein_tiles = (_key(module), tiles)


def _norm(module: Any) -> torch.Tensor:
    if type(module).__name__.endswith("GemmaRMSNorm") or not hasattr(module, "weight"):
        raise NativeUnsupported(f"{type(module).__name__} normalization")
    return module.weight.detach().float()


def _eps(module: Any) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(module, name):
            return float(getattr(module, name))
    raise NativeUnsupported(f"{type(module).__name__} has no epsilon")


def describe(model: Any, tiles: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor, tuple, list, torch.Tensor]:
    """The constructor arguments of NativeModel, or NativeUnsupported naming what does not fit (tiles=False: only
    the check, no weight tiles made)."""
    config = model.config.get_text_config()
    if config.model_type not in ARCHITECTURES:
        raise NativeUnsupported(f"architecture {config.model_type!r} (native: {', '.join(ARCHITECTURES)})")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise NativeUnsupported(f"activation {config.hidden_act!r}")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise NativeUnsupported("sliding-window attention")
    if getattr(model, "ryzanstein_split", None) is not None:
        raise NativeUnsupported("a model split across the cluster")
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        raise NativeUnsupported("tensors not in CPU memory (a meta or other device tensor)")
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if body is None or layers is None:
        raise NativeUnsupported("an unexpected module layout")
    rotary = body.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise NativeUnsupported(f"{rope_type!r} RoPE (its frequencies change with the sequence length)")
    embed = model.get_input_embeddings().weight.detach()
    if embed.dtype != torch.float32:
        raise NativeUnsupported(f"{embed.dtype} embeddings")
    first = layers[0].self_attn
    spec: dict[str, Any] = {
        "hidden": config.hidden_size, "heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": first.head_dim, "intermediate": config.intermediate_size, "eps": _eps(body.norm),
        "attention_scale": float(first.scaling), "rope_factor": float(getattr(rotary, "attention_scaling", 1.0)),
        "embedding_multiplier": float(getattr(config, "embedding_multiplier", 1.0) or 1.0),
        "residual_multiplier": float(getattr(config, "residual_multiplier", 1.0) or 1.0),
        "logits_divisor": float(getattr(config, "logits_scaling", 1.0) or 1.0),
    }
    described = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not {"input_layernorm", "post_attention_layernorm"} <= set(dict(layer.named_children())):
            raise NativeUnsupported("a layer without pre-attention and pre-MLP norms")
        if hasattr(attn, "qkv_proj"):
            qkv = [linear_spec(attn.qkv_proj, tiles)]
        else:
            qkv = [linear_spec(attn.q_proj, tiles), linear_spec(attn.k_proj, tiles), linear_spec(attn.v_proj, tiles)]
        if hasattr(mlp, "gate_up_proj"):
            gate_up = [linear_spec(mlp.gate_up_proj, tiles)]
        else:
            gate_up = [linear_spec(mlp.gate_proj, tiles), linear_spec(mlp.up_proj, tiles)]
        q_norm = _norm(attn.q_norm) if getattr(attn, "q_norm", None) is not None else EMPTY
        k_norm = _norm(attn.k_norm) if getattr(attn, "k_norm", None) is not None else EMPTY
        if q_norm.numel() and q_norm.numel() != first.head_dim:
            raise NativeUnsupported("q/k norms over the whole projection")
        described.append((_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm), q_norm, k_norm,
                          qkv, linear_spec(attn.o_proj, tiles), gate_up, linear_spec(mlp.down_proj, tiles)))
        extra_norms = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        if any(getattr(layer, n, None) is not None for n in extra_norms):
            raise NativeUnsupported("extra per-layer norms")
    head = model.get_output_embeddings()
    if head is None:
        raise NativeUnsupported("no output head")
    return spec, embed, _norm(body.norm), linear_spec(head, tiles), described, rotary.inv_freq.detach().float()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Rounds:
    """One row-count class's measurements: each choice is tried for `probe` steps and the fastest median kept.

    Trying a losing choice costs its steps (one thread on an eight-row step runs ~1.9x as long), so rounds come
    every `period` steps only while the choices are close; after a clear decision (the runner-up ≥ `clear` x the
    winner) the wait doubles, up to `max_backoff` x `period`. The machine changing is caught without waiting:
    when the kept choice's recent median leaves [1/`drift`, `drift`] x its median at the decision (other
    programs took or left the cores), a new round starts at once and the wait is back to `period`. A round
    measures the kept choice first (the first round too), and a tried choice whose first `quick` steps take
    ≥ `give_up` x the kept choice's recent median ends its probe there: a clear loser shows it in two steps.
    """

    clear, drift, max_backoff, give_up, quick = 1.25, 1.5, 8, 1.5, 2

    def __init__(self, choices: list[int], period: int, probe: int):
        self.choices, self.period, self.probe = choices, period, probe
        self.current = choices[-1]  # decided after the first round
        self.samples: dict[int, list[float]] = {c: [] for c in choices}
        # choices still to probe in this round: a first round at once, the kept choice first
        self.queue: list[int] = [self.current] + [c for c in choices if c != self.current]
        self.reference = 0.0  # the kept choice's recent median, against which a tried choice can give up
        self.since_round = 0
        self.backoff = 1  # rounds come every period * backoff steps
        self.decided = 0.0  # the kept choice's median when it was decided
        self.rounds = 0

    def next_threads(self) -> int:
        return self.queue[0] if self.queue else self.current

    def observe(self, threads: int, seconds: float) -> None:
        samples = self.samples[threads]
        samples.append(seconds)
        del samples[:-self.probe]
        if self.queue:
            if threads == self.queue[0] and (len(samples) >= self.probe or self._gave_up(threads, samples)):
                if threads == self.current and self.reference == 0.0:  # the first round's kept choice
                    self.reference = statistics.median(samples)
                self.queue.pop(0)
                if not self.queue:
                    self._decide()
            return
        self.since_round += 1
        if self.since_round >= self.period * self.backoff:
            self._start_round()
        elif threads == self.current and len(samples) >= self.probe and self._drifted(samples):
            self.backoff = 1
            self._start_round()

    def _gave_up(self, threads: int, samples: list[float]) -> bool:
        return (threads != self.current and self.reference > 0 and len(samples) >= self.quick
                and statistics.median(samples) >= self.give_up * self.reference)

    def _drifted(self, samples: list[float]) -> bool:
        ratio = statistics.median(samples) / self.decided if self.decided > 0 else 1.0
        return not 1 / self.drift <= ratio <= self.drift

    def _start_round(self) -> None:
        kept = self.samples[self.current]
        self.reference = statistics.median(kept) if kept else self.decided  # as the kept choice runs now
        self.since_round = 0
        self.queue = [c for c in self.choices if c != self.current] + [self.current]  # all, fresh
        for c in self.queue:
            self.samples[c].clear()

    def _decide(self) -> None:
        medians = {c: statistics.median(s) for c, s in self.samples.items() if s}
        self.current = min(medians, key=lambda c: medians[c])
        self.decided = medians[self.current]
        self.rounds += 1
        others = [m for c, m in medians.items() if c != self.current]
        clear = bool(others) and min(others) >= self.clear * self.decided
        self.backoff = min(self.backoff * 2, self.max_backoff) if clear else 1


class ThreadPolicy:
    """Picks the native pool's thread count from measured step times, because the best count depends on what
    else runs on the machine: with other programs busy on the same cores, two threads can be many times slower
    than one (each step waits for a descheduled peer). It also depends on the step: one decode row reads weights
    (memory-bound), eight rows multiply them (compute-bound), so steps of 1, 2–3 and 4–8 rows are measured and
    decided apart (a choice made on one-row steps once ran eight-row steps on one thread at 0.6x). Each class
    re-probes for up to `probe` steps per choice (two for a clear loser), every `period` of its steps or less
    often after clear decisions, and at once when its step times drift (see _Rounds). Prompt chunks (more rows)
    use the largest class's choice and are not counted. Results are bit-identical for any thread count (the
    pool only splits outputs), so switching never changes an answer."""

    def __init__(self, choices: list[int], period: int = 96, probe: int = 6, small_step_rows: int = 8):
        self.choices, self.small = choices, small_step_rows
        self.classes = [_Rounds(choices, period, probe) for _ in range(self._class_of(small_step_rows) + 1)]

    @staticmethod
    def _class_of(rows: int) -> int:
        return 0 if rows <= 1 else 1 if rows <= 3 else 2  # 1, 2-3, 4-8 rows

    @property
    def current(self) -> int:
        """The choice for one-row decode steps."""
        return self.classes[0].current

    @property
    def queue(self) -> list[int]:
        return self.classes[0].queue

    def decision(self, rows: int) -> int:
        return self.classes[min(self._class_of(rows), len(self.classes) - 1)].current

    def next_threads(self, rows: int = 1) -> int:
        """Threads for a step of `rows` rows: a probed choice for decode-sized steps, the decided one otherwise
        (a prompt chunk is never run with a choice that is only being tried)."""
        if rows > self.small:
            return self.classes[-1].current
        return self.classes[self._class_of(rows)].next_threads()

    def observe(self, threads: int, rows: int, seconds: float) -> None:
        if rows > self.small or len(self.choices) == 1:
            return
        self.classes[self._class_of(rows)].observe(threads, seconds)


def fixed_threads() -> int | None:
    """RYZANSTEIN_NATIVE_THREADS as a count, or None for `auto` (measured)."""
    value = os.environ.get(THREADS_ENV, "auto").strip().lower()
    if value == "auto":
        return None
    if not value.isdigit() or not 1 <= int(value) <= 256:
        raise InvalidRequest(f"{THREADS_ENV}={value!r} is invalid: use auto or a thread count from 1 to 256.",
                             param=THREADS_ENV)
    return int(value)


class NativeDecoder:
    """A model's native step: takes the engine's rows (runner.Rows), fills the fp32 caches, returns logits."""

    def __init__(self, model: Any, threads: int | None = None):
        self.model = model
        self.config = model.config.get_text_config()
        self.layers = self.config.num_hidden_layers
        args = describe(model)
        self.kv_heads, self.head_dim = args[0]["kv_heads"], args[0]["head_dim"]
        self.isa = chosen_isa()
        if -1 in self._watched():  # a head or embedding left on the meta device (a failed load): nothing to read
            raise NativeUnsupported("the model's embedding or head holds no data (meta tensor)")
        self.impl = library().NativeModel(*args)
        # the last step's logits and each kept row's greedy choice, found in the jobs that made the logits
        self.last_choices: tuple[torch.Tensor, list[int]] | None = None
        release_store_layout(model)
        self.watched = self._watched()  # the C++ side holds pointers: a replaced tensor must not go unseen
        self.impl.set_isa(ISA_LEVELS[self.isa])
        self.policy: ThreadPolicy | None = None
        if threads is None:
            threads = fixed_threads()
        if threads is None:
            choices = list(range(1, min(torch.get_num_threads(), usable_cores()) + 1))
            known = getattr(model, "ryzanstein_thread_policy", None)  # a new engine on the same model goes on
            self.policy = known if known is not None and known.choices == choices else ThreadPolicy(choices)
            model.ryzanstein_thread_policy = self.policy
            threads = self.policy.next_threads()
        self.set_threads(threads)

    def _watched(self) -> tuple[int, ...]:
        """Where the embedding and the head live (a reload or a failed load replaces them; in-place updates such
        as an adapter swap keep the storage, which the native step reads directly)."""
        head = self.model.get_output_embeddings()
        tensors = [self.model.get_input_embeddings().weight]
        tiled = getattr(head, "_ryzanstein_tiles", None)  # the tiles this step reads (a restore keeps them)
        tensors += [tiled[1] if tiled is not None else head.weight]
        return tuple(t.data_ptr() if t.device.type != "meta" else -1 for t in tensors)

    def set_threads(self, threads: int, spin: int = SPIN) -> None:
        self.impl.set_threads(max(1, threads), spin)

    @property
    def threads(self) -> int:
        return int(self.impl.threads())

    def forward(self, rows: Any) -> torch.Tensor:
        now = self._watched()
        if now != self.watched:
            where = " (now on the meta device: not loaded)" if -1 in now else ""
            raise RuntimeError(f"the model's embedding or head was replaced after the native decode path attached to "
                               f"it{where}; reload the model")
        caches: list[Any] = []
        cache_of_row: list[int] = []
        for seg in rows.segments:
            if not caches or caches[-1] is not seg.kv:
                caches.append(seg.kv)
            cache_of_row.extend([len(caches) - 1] * seg.rows)
        ends = {id(seg.kv): seg.position + seg.rows for seg in rows.segments}
        keys, values = [], []
        for kv in caches:
            k, v = kv.plain_buffers(ends[id(kv)], self.kv_heads, self.head_dim)
            keys.append(k)
            values.append(v)
        if self.policy is not None and self.policy.next_threads(len(rows.tokens)) != self.threads:
            self.set_threads(self.policy.next_threads(len(rows.tokens)))
        started = time.perf_counter()
        logits, choices = self.impl.step(torch.tensor(rows.tokens), torch.tensor(rows.positions),
                                         torch.tensor(cache_of_row), keys, values,
                                         torch.tensor(rows.keep, dtype=torch.long))
        self.last_choices = (logits, choices.tolist())
        if self.policy is not None:
            self.policy.observe(self.threads, len(rows.tokens), time.perf_counter() - started)
        return logits

    def choices_for(self, logits: torch.Tensor) -> list[int] | None:
        """Each row's first largest logit, when `logits` is what the last step returned (else None)."""
        if self.last_choices is not None and self.last_choices[0] is logits:
            return self.last_choices[1]
        return None


def prepare(model: Any) -> None:
    """At load: build (first time on this machine, about a minute) or load the library when the model can run
    natively, so the first request does not wait for the compiler."""
    if getattr(model, "ryzanstein_decode_path", "auto") == "reference":
        return
    try:
        describe(model, tiles=False)
        chosen_isa()
        library()
    except (NativeUnsupported, InvalidRequest):
        return  # the engine says why when it starts


def settings_blocker(kv_cache: str, pattern: str) -> str | None:
    """What in the load's settings keeps the native step from running (it reads fp32 or fp16 caches densely)."""
    if kv_cache not in ("fp32", "fp16"):
        return f"a {kv_cache} KV cache"
    if pattern != "dense":
        return f"the {pattern} attention pattern"
    return None


def require_native(model: Any, kv_cache: str, pattern: str, batching: bool) -> None:
    """For decode_path="native" at load: InvalidRequest naming why the native path would not run."""
    reasons = [] if batching else ["the batching engine is off"]
    blocker = settings_blocker(kv_cache, pattern)
    if blocker:
        reasons.append(blocker)
    try:
        describe(model, tiles=False)
        chosen_isa()
        library()
    except NativeUnsupported as exc:
        reasons.append(str(exc))
    if reasons:
        raise InvalidRequest(f"The native decode path cannot run this model: {'; '.join(reasons)}. Load it with "
                             "decode_path 'auto' or 'reference'.", param="decode_path")


def attach(model: Any, eligible: str | None) -> NativeDecoder | None:
    """The native decoder for this model, or None (with a log line saying why) when transformers runs it.
    `eligible`: None when the engine's own settings allow the native path, else what prevents it."""
    path = getattr(model, "ryzanstein_decode_path", "auto")
    if path == "reference":
        model.ryzanstein_decode = {"path": "reference", "reason": "decode_path 'reference' asked at load"}
        return None
    try:
        if eligible is not None:
            raise NativeUnsupported(eligible)
        decoder = NativeDecoder(model)
    except NativeUnsupported as exc:
        if path == "native":
            raise InvalidRequest(f"The native decode path cannot run this model: {exc}.", param="decode_path") from exc
        name = getattr(model.config, "name_or_path", "") or model.config.get_text_config().model_type
        log.info("native decode path not used for %s: %s", name, exc)
        model.ryzanstein_decode = {"path": "reference", "reason": str(exc)}
        return None
    log.info("native decode path: %s, %d thread(s)", decoder.isa, decoder.threads)
    model.ryzanstein_decode = {"path": "native", "isa": decoder.isa}
    return decoder
