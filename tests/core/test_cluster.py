"""The cluster in one process: two real nodes on loopback (their own config dirs, real TLS listeners), pairing,
refusals at the handshake and on the wire, and a split model whose greedy output equals the unsplit model's."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import torch

from ryzanstein.cluster import pairing
from ryzanstein.cluster.coordinator import Coordinator
from ryzanstein.cluster.identity import load_or_create_identity
from ryzanstein.cluster.links import open_channel, request
from ryzanstein.cluster.node import ClusterNode
from ryzanstein.cluster.transport import client_context, connect
from ryzanstein.cluster.wire import PREFIX, Channel, PeerGone, ProtocolError
from ryzanstein.errors import ClusterError, NodeLost, PairingFailed
from ryzanstein.models.manager import ModelManager
from ryzanstein.models.store import ModelStore
from tests.core.test_batching_equivalence import Outcome


def make_node(root: Path, name: str, store: ModelStore | None = None) -> ClusterNode:
    manager = ModelManager(store or ModelStore(root / name / "data" / "models"))
    return ClusterNode(config_dir=root / name / "config", data_dir=root / name / "data", manager=manager,
                       host="127.0.0.1", port=0, name=name, discovery=False)


@pytest.fixture
def pair_of_nodes(tmp_path: Path, tiny_llama_dir: Path):
    store = ModelStore(tmp_path / "a" / "data" / "models")
    store.import_hf_folder(tiny_llama_dir, "tiny")
    a, b = make_node(tmp_path, "a", store), make_node(tmp_path, "b")
    yield a, b
    a.coordinator and a.coordinator.stop()
    a.close()
    b.close()


def paired(a: ClusterNode, b: ClusterNode) -> str:
    record = a.add_manual(b.address)
    a.request_pairing(record["node_id"])
    a.pair(record["node_id"], b.offers.active()[0].pin)
    return record["node_id"]


def test_identity_is_stable_and_a_copied_folder_gets_a_new_one(tmp_path: Path):
    import shutil

    first = load_or_create_identity(tmp_path / "c")
    assert load_or_create_identity(tmp_path / "c").node_id == first.node_id
    assert (tmp_path / "c" / "node-key.pem").stat().st_mode & 0o777 == 0o600
    shutil.copytree(tmp_path / "c", tmp_path / "copy")
    copy = load_or_create_identity(tmp_path / "copy")
    assert copy.node_id != first.node_id and copy.fingerprint != first.fingerprint


def test_pairing_right_wrong_and_used_up_pins(pair_of_nodes):
    a, b = pair_of_nodes
    node_id = a.add_manual(b.address)["node_id"]
    with pytest.raises(ClusterError, match="unknown"):
        a.pair("ffff0000", "123456")
    a.request_pairing(node_id)
    pin = b.offers.active()[0].pin
    wrong = f"{(int(pin) + 1) % 10**6:06d}"
    with pytest.raises(PairingFailed, match="wrong PIN \\(4 tries left\\)"):
        a.pair(node_id, wrong)
    assert a.peers.get(node_id) is None and b.peers.all() == []
    with pytest.raises(PairingFailed, match="6 digits"):
        a.pair(node_id, "12ab56")
    for _ in range(4):
        with pytest.raises(PairingFailed):
            a.pair(node_id, wrong)
    with pytest.raises(PairingFailed, match="no PIN is shown"):  # used up: even the right PIN is refused now
        a.pair(node_id, pin)
    a.request_pairing(node_id)  # a new PIN, a new count
    peer = a.pair(node_id, b.offers.active()[0].pin)
    assert peer.node_id == b.identity.node_id and b.peers.get(a.identity.node_id) is not None
    assert (a.peers.path.stat().st_mode & 0o777) == 0o600
    assert any("wrong PIN" in r["reason"] for r in b.refused)


def test_expired_pin_and_rate_limit():
    offers = pairing.Offers(ttl_s=0.05)
    offers.create("abc", "n", "x")
    time.sleep(0.1)
    with pytest.raises(pairing.PairingRefused, match="expired"):
        offers.take_try("abc")
    offers = pairing.Offers()
    for i in range(pairing.MAX_WRONG_PER_WINDOW):
        offer = offers.create(f"n{i}", "n", "x")
        offers.take_try(f"n{i}")
        offers.wrong(offer)
    with pytest.raises(pairing.PairingRefused, match="too many wrong PINs"):
        offers.create("another", "n", "x")


def test_unpaired_certificate_is_refused_at_the_handshake(pair_of_nodes, tmp_path: Path):
    a, b = pair_of_nodes
    node_id = paired(a, b)
    stranger = load_or_create_identity(tmp_path / "stranger")
    peer = a.peers.get(node_id)
    assert peer is not None
    # the stranger knows b's certificate but b does not know the stranger's
    with pytest.raises((PeerGone, ssl.SSLError, ConnectionError)):
        channel = open_channel(stranger, peer, b.address)
        request(channel, {"op": "ping"})
    # and a certificate other than the pinned one is refused by the client side
    impostor = load_or_create_identity(tmp_path / "impostor")
    fake = type(peer)(peer.node_id, peer.name, impostor.cert_pem, impostor.fingerprint, peer.address)
    with pytest.raises(PeerGone):
        open_channel(a.identity, fake, b.address)
    # without a certificate only hello and pairing are answered
    channel, _ = connect(b.address, client_context(None, None))
    channel.send({"op": "forward"})
    assert channel.receive().header["message"].startswith("not paired")
    channel.close()
    assert request(open_channel(a.identity, peer, b.address), {"op": "ping"}).op == "pong"  # b still healthy


def test_replayed_truncated_and_malformed_frames_are_refused(pair_of_nodes):
    a, b = pair_of_nodes
    peer = a.peers.get(paired(a, b))
    assert peer is not None
    channel = open_channel(a.identity, peer, b.address)
    assert request(channel, {"op": "ping"}).op == "pong"
    channel.sent -= 1  # send the next frame with the previous sequence number: a replay
    channel.send({"op": "ping"})
    with pytest.raises(PeerGone):
        channel.receive()
    assert any("out of sequence" in r["reason"] for r in b.refused)
    channel = open_channel(a.identity, peer, b.address)  # a frame that promises more bytes than it sends
    head = b'{"op":"x","seq":1}'
    channel.sock.sendall(PREFIX.pack(b"RYZ1", len(head), 1000) + head + b"short")
    channel.close()
    deadline = time.monotonic() + 10
    while not any("truncated" in r["reason"] for r in b.refused):
        assert time.monotonic() < deadline, b.refused
        time.sleep(0.05)
    channel = open_channel(a.identity, peer, b.address)  # tensor bytes that do not match their shape
    channel.send({"op": "forward", "tensors": [{"name": "hidden", "dtype": "float32", "shape": [1, 9, 64],
                                                "offset": 0, "nbytes": 8}]}, payload=b"12345678")
    with pytest.raises(PeerGone):
        channel.receive()
    channel = open_channel(a.identity, peer, b.address)
    channel.send({"op": "forward"})  # well-formed, but no stage is loaded
    assert "no stage" in channel.receive().header["message"]
    assert request(channel, {"op": "ping"}).op == "pong"


def run_requests(lm, prompts: list[list[int]], tmp: Path, max_tokens: int = 16) -> list[Outcome]:
    from ryzanstein.engine.batching import BatchEngine, EngineConfig, holding, model_eos
    from ryzanstein.engine.params import GenerationParams

    engine = BatchEngine("t", lambda: holding(lm), config=EngineConfig(speculation="off", prefill_chunk=16),
                         swap_dir=tmp, autostart=False)
    runner = engine.make_runner(lm.model)
    outcomes = [Outcome() for _ in prompts]
    try:
        for prompt, out in zip(prompts, outcomes, strict=True):
            engine.submit(prompt, GenerationParams(max_tokens=max_tokens), out, lm.tokenizer, model_eos(lm))
        for _ in range(500):
            if not engine.step(runner):
                break
    finally:
        runner.close()
    return outcomes


PROMPTS = [list(range(5, 30)), list(range(40, 47)), list(range(100, 160)), [7, 8, 9]]


def test_split_model_answers_like_one_node_alone_and_batched(pair_of_nodes, tiny_llama_dir: Path, tmp_path: Path):
    from ryzanstein.models.loader import load_model_folder

    a, b = pair_of_nodes
    node_id = paired(a, b)
    coordinator = a.coordinator = Coordinator(a, a.manager)
    plan = coordinator.plan("tiny", [node_id])
    assert [o["nodes"] for o in plan["options"]] == [1, 2] and all(o["fits"] for o in plan["options"])
    assert plan["nodes"][1]["rtt_ms"] > 0 and plan["nodes"][1]["layer_ms"] > 0
    coordinator.start("tiny", [node_id], [{"node_id": "local", "layers": [0, 1]},
                                           {"node_id": node_id, "layers": [1, 2]}])
    stage = coordinator.run["stages"][1]
    assert "sent by the coordinator, verified" in stage["source"]  # b's store is empty: weights were sent
    reference = load_model_folder("tiny", tiny_llama_dir)
    split = a.manager.get("tiny")
    for prompt in PROMPTS:  # alone
        expected = run_requests(reference, [prompt], tmp_path)[0].tokens
        assert run_requests(split, [prompt], tmp_path)[0].tokens == expected
    together = run_requests(split, PROMPTS, tmp_path)  # 4 concurrent
    assert [o.tokens for o in together] == [o.tokens for o in run_requests(reference, PROMPTS, tmp_path)]
    assert all(o.error is None and len(o.tokens) == 16 for o in together)
    link = coordinator.links[0]
    assert link.steps > 0 and link.channel.bytes_out > 0
    staged = [session.stage for session in b.sessions if session.stage is not None]  # not the heartbeat's
    assert len(staged) == 1 and not staged[0].caches  # every request's cache was released
    coordinator.stop()
    assert a.manager.entry("tiny") is None
    deadline = time.monotonic() + 10
    while b.status()["stages"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.status()["stages"] == []  # the worker released the stage with the coordinator's connection
    # the next start finds the layers in b's cluster cache, checked by hash
    coordinator.start("tiny", [node_id], [{"node_id": "local", "layers": [0, 1]},
                                           {"node_id": node_id, "layers": [1, 2]}])
    assert "cluster cache" in coordinator.run["stages"][1]["source"]


def test_lost_worker_fails_the_step_clearly_and_the_cluster_replans(pair_of_nodes, tmp_path: Path):
    a, b = pair_of_nodes
    node_id = paired(a, b)
    coordinator = a.coordinator = Coordinator(a, a.manager)
    coordinator.start("tiny", [node_id], [{"node_id": "local", "layers": [0, 1]},
                                           {"node_id": node_id, "layers": [1, 2]}])
    split = a.manager.get("tiny")
    b.close()  # the worker goes away (its listener and every connection)
    started = time.monotonic()
    outcome = run_requests(split, [PROMPTS[0]], tmp_path)[0]
    assert isinstance(outcome.error, NodeLost) and "stopped answering" in outcome.error.message
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 30
    while not (coordinator.state == "running" and coordinator.run and len(coordinator.run["stages"]) == 1):
        assert time.monotonic() < deadline, coordinator.status()
        time.sleep(0.1)
    alone = run_requests(a.manager.get("tiny"), [PROMPTS[0]], tmp_path)[0]  # the re-planned model: a alone
    assert alone.error is None and len(alone.tokens) == 16


def test_tensor_frames_round_trip_exactly():
    left, right = socket.socketpair()
    sender, receiver = Channel(left), Channel(right)
    tensors = {"h": torch.randn(1, 3, 8), "p": torch.arange(3), "b": torch.randn(2, 2).bfloat16()}
    sender.send({"op": "x"}, tensors)
    frame = receiver.receive()
    assert all(torch.equal(frame.tensors[k], v) for k, v in tensors.items())
    with pytest.raises(ProtocolError, match="do not fit"):
        from ryzanstein.cluster.wire import decode_tensors

        decode_tensors([{"name": "h", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 8}], b"12345678")


class DirectLink:
    """A worker stage called in-process (no network): isolates the stage arithmetic of each architecture."""

    def __init__(self, stage):
        from ryzanstein.cluster.stage import SegmentSpec

        self.stage, self.parse = stage, SegmentSpec.parse
        self.lock = threading.Lock()  # one step at a time, as a real link's connection
        self.calls = 0

    def forward(self, hidden, positions, specs, mode):
        with self.lock:
            self.calls += 1
            return self.stage.forward(hidden.clone(), positions.clone(), [self.parse(s) for s in specs], mode)

    def release(self, request_id: str) -> None:
        self.stage.release(request_id)

    def swap_out(self, request_id: str) -> None:
        self.stage.swap_out(request_id)

    def swap_in(self, request_id: str, capacity: int) -> None:
        self.stage.swap_in(request_id, capacity)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite"])
def test_every_splittable_architecture_answers_like_one_node(model_type: str, tmp_path: Path, default_model_dir):
    """Each architecture in SPLIT_MODEL_TYPES, split after its first layer, gives transformers' unsplit greedy
    tokens (alone and 4 concurrent) through the batching engine."""
    from transformers import AutoConfig

    from ryzanstein.cluster.stage import (
        SPLIT_MODEL_TYPES,
        RemoteBlock,
        WorkerStage,
        linear_shapes,
        load_partial,
        probe_shapes,
    )
    from ryzanstein.models.loader import LoadedModel, load_model_folder
    from tests.helpers import save_tiny_model

    assert model_type in SPLIT_MODEL_TYPES
    folder = save_tiny_model(tmp_path / model_type, model_type, default_model_dir)
    if model_type == "mistral":  # the tiny config uses a sliding window, which the engine refuses
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    reference = load_model_folder("ref", folder)
    total = reference.model.config.num_hidden_layers
    regimes = probe_shapes(linear_shapes(AutoConfig.from_pretrained(folder)))
    worker = WorkerStage(load_partial(folder, range(1, total), head=False), range(1, total), regimes, tmp_path / "w")
    link = DirectLink(worker)
    head = load_partial(folder, range(0, 1), head=True)
    for i in range(1, total):
        head.get_decoder().layers[i] = RemoteBlock(link, i, first=i == 1)
    head.ryzanstein_regimes, head.ryzanstein_split = regimes, link
    split = LoadedModel(name="split", model=head, tokenizer=reference.tokenizer, path=folder)
    for prompt in PROMPTS[:2]:
        expected = run_requests(reference, [prompt], tmp_path)[0].tokens
        assert run_requests(split, [prompt], tmp_path)[0].tokens == expected
    link.calls = 0
    assert [o.tokens for o in run_requests(split, PROMPTS, tmp_path)] == \
        [o.tokens for o in run_requests(reference, PROMPTS, tmp_path)]
    assert link.calls >= 2 * 15  # 4 sequences, 16 tokens: two micro-batches per step (overlapped stages)
    assert worker.caches == {}  # released with their requests


def test_a_model_over_one_nodes_budget_runs_split(tmp_path: Path, tiny_llama_dir: Path):
    """Budgets too small for the whole model on either node: the plan says one node does not fit, proposes
    two, and the split answers like the unsplit model; a worker refuses a stage beyond its own budget."""
    from ryzanstein.cluster.stage import stage_bytes
    from ryzanstein.errors import ClusterError as Refused
    from ryzanstein.models.loader import load_model_folder

    store = ModelStore(tmp_path / "a" / "data" / "models")
    store.import_hf_folder(tiny_llama_dir, "tiny")
    folder = Path(store.get("tiny").path)
    context = 8192
    layer = stage_bytes(folder, range(0, 1), head=False, context_tokens=context)
    head = stage_bytes(folder, range(0, 0), head=True, context_tokens=context)
    whole = stage_bytes(folder, range(0, 2), head=True, context_tokens=context)
    a = ClusterNode(config_dir=tmp_path / "a" / "config", data_dir=tmp_path / "a" / "data",
                    manager=ModelManager(store, budget_bytes=head + layer + layer // 2), host="127.0.0.1",
                    name="a", discovery=False)
    b = ClusterNode(config_dir=tmp_path / "b" / "config", data_dir=tmp_path / "b" / "data",
                    manager=ModelManager(ModelStore(tmp_path / "b" / "data" / "models"), budget_bytes=layer + 1024),
                    host="127.0.0.1", name="b", discovery=False)
    try:
        assert whole > a.manager.budget_bytes and whole > b.manager.budget_bytes
        node_id = paired(a, b)
        coordinator = a.coordinator = Coordinator(a, a.manager)
        plan = coordinator.plan("tiny", [node_id], context)
        assert plan["options"][0]["fits"] is False and plan["options"][1]["fits"] is True
        assert plan["proposed"]["stages"] == [{"node_id": "local", "name": "a", "layers": [0, 1]},
                                              {"node_id": node_id, "name": "b", "layers": [1, 2]}]
        coordinator.start("tiny", [node_id])
        reference = load_model_folder("ref", tiny_llama_dir)
        got = run_requests(a.manager.get("tiny"), PROMPTS, tmp_path)
        assert [o.tokens for o in got] == [o.tokens for o in run_requests(reference, PROMPTS, tmp_path)]
        coordinator.stop()
        with pytest.raises(Refused, match="budget"):  # two layers do not fit b: refused with the numbers
            coordinator.start("tiny", [node_id], [{"node_id": node_id, "layers": [0, 2]}])
        assert a.manager.entry("tiny") is None and coordinator.state == "failed"
    finally:
        a.coordinator and a.coordinator.stop()
        a.close()
        b.close()


def test_a_model_the_engine_cannot_batch_is_refused_before_any_worker_loads(pair_of_nodes, tmp_path: Path,
                                                                           default_model_dir: Path):
    from tests.helpers import save_tiny_model

    a, b = pair_of_nodes
    node_id = paired(a, b)
    a.manager.store.import_hf_folder(save_tiny_model(tmp_path / "m", "mistral", default_model_dir), "windowed")
    coordinator = a.coordinator = Coordinator(a, a.manager)
    with pytest.raises(ClusterError, match="sliding-window"):
        coordinator.start("windowed", [node_id], [{"node_id": "local", "layers": [0, 1]},
                                                   {"node_id": node_id, "layers": [1, 2]}])
    assert b.status()["stages"] == [] and a.manager.entry("windowed") is None


def test_weights_that_do_not_match_their_hash_are_refused(pair_of_nodes, tmp_path: Path):
    from transformers import AutoConfig

    from ryzanstein.cluster.stage import layer_hashes, layer_tensors, linear_shapes, read_config

    a, b = pair_of_nodes
    peer = a.peers.get(paired(a, b))
    assert peer is not None
    folder = Path(a.manager.store.get("tiny").path)
    config = read_config(folder)
    channel = open_channel(a.identity, peer, b.address)
    reply = request(channel, {"op": "load-stage", "model": "tiny", "config": config, "layers": [1, 2],
                              "hashes": layer_hashes(folder), "context_tokens": 64,
                              "shapes": linear_shapes(AutoConfig.from_pretrained(folder))})
    assert reply.op == "need-weights"
    tensors = layer_tensors(folder, range(1, 2))
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0  # one weight changed on the way
    with pytest.raises(ClusterError, match="do not match their hash"):
        request(channel, {"op": "weights", "layer": 1}, tensors)
    assert b.status()["stages"] == [] and not list((b.cache_dir).glob("*"))  # nothing loaded, nothing cached
    assert request(channel, {"op": "ping"}).op == "pong"


def test_split_rows_halves_whole_sequences_in_order():
    from ryzanstein.engine.kvcache import SequenceKV
    from ryzanstein.engine.runner import build_rows, split_rows

    kvs = [SequenceKV(2, name=str(i)) for i in range(4)]
    rows = build_rows([(kvs[0], [1, 2, 3], 0, False, "last"), (kvs[1], [4], 7, True, "all"),
                       (kvs[2], [5, 6], 3, True, "all"), (kvs[3], [7], 9, True, "all")])
    first, second = split_rows(rows)
    assert first.tokens + second.tokens == rows.tokens and first.positions + second.positions == rows.positions
    assert [s.kv.name for s in first.segments] == ["0"] and [s.kv.name for s in second.segments] == ["1", "2", "3"]
    assert [s.row for s in second.segments] == [0, 1, 3] and second.keep == [0, 1, 2, 3] and first.keep == [2]
    assert len(first.keep) + len(second.keep) == len(rows.keep)


def test_every_node_of_an_option_gets_a_layer_even_a_slow_one_on_a_shallow_model():
    from ryzanstein.cluster.coordinator import NodeMeasure, allocate

    fast = NodeMeasure("local", "alpha", "", 1.0, 0.0, 1e9, 2**34)
    slow = NodeMeasure("b", "beta", "", 3.0, 0.1, 1e9, 2**34)
    assert allocate(2, [fast, slow], 1000, 1000) == [1, 1]  # shares 1.5 / 0.5 used to round to [2, 0]
    deep = allocate(30, [fast, slow], 1000, 1000)
    assert deep is not None and sum(deep) == 30 and abs(deep[0] - 22.5) <= 1  # deeper models stay proportional (3:1)
    assert allocate(1, [fast, slow], 1000, 1000) == [1, 0]  # fewer layers than nodes: what fits
