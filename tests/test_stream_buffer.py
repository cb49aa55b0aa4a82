"""The device's stream buffer: its rules at one capacity, its scores, annotation and synthesis, its file (damage
detected, nothing acknowledged lost to a SIGKILL) and `bouquet device add` refusing bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from participants.buffer_rules import BufferItem
from participants.device import Device
from participants.selection_scores import ItemFeatures, embedding_entropy, item_features, _content_span
from participants.stream_buffer import BufferDamaged, StreamBuffer, load_buffer, save_buffer
from participants.stream_settings import BufferSettings, SynthesisSettings
from participants.synthesis import keep_pairs, parse_pair
from protocols.records import PersonalRecord

ROOT = Path(__file__).resolve().parents[1]
DIM = 16


def features(rng, center=None, spread=1.0, n_tokens=6) -> ItemFeatures:
    base = rng.normal(size=DIM) if center is None else center + spread * rng.normal(size=DIM)
    tokens = base + 0.3 * rng.normal(size=(n_tokens, DIM))
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    return ItemFeatures(base.astype(np.float32), tokens.astype(np.float32), n_tokens)


def record(i: int, output: str = "") -> PersonalRecord:
    return PersonalRecord("u", f"question {i}", output, id=str(i))


def new_buffer(random_seed: int | None = 0, **changes) -> StreamBuffer:
    s = replace(BufferSettings(capacity=4, domains=2, budget=2), **changes)
    return StreamBuffer.new(s, SynthesisSettings(pairs=0), "tiny-random", "hash", random_seed)


def kept_ids(buffer: StreamBuffer) -> set[str]:
    return {it.record.id for it in buffer.items}


@pytest.mark.parametrize("rule", ["sdss", "fifo", "random", "kcenter"])
def test_every_rule_keeps_at_most_its_capacity_and_learns_from_every_item(rule):
    rng, buffer = np.random.default_rng(0), new_buffer(rule=rule)
    for i in range(30):
        buffer.offer(record(i), features(rng))
    assert len(buffer.items) == 4 and buffer.seen == 30


def test_fifo_keeps_the_latest():
    rng, buffer = np.random.default_rng(0), new_buffer(rule="fifo")
    for i in range(10):
        buffer.offer(record(i), features(rng))
    assert kept_ids(buffer) == {"6", "7", "8", "9"}


def test_reservoir_sampling_keeps_every_position_equally_often():
    rng, counts, n, runs = np.random.default_rng(0), np.zeros(20), 20, 400
    feats = [features(rng) for _ in range(n)]
    for seed in range(runs):
        buffer = new_buffer(rule="random", random_seed=seed)
        for i in range(n):
            buffer.offer(record(i), feats[i])
        for it in buffer.items:
            counts[int(it.record.id)] += 1
    share = counts / runs  # 4 / 20 = 0.2 for every position
    assert abs(share[:10].mean() - 0.2) < 0.04 and abs(share[10:].mean() - 0.2) < 0.04


def test_devices_with_their_own_random_seeds_sample_and_annotate_different_positions():
    """Two devices seeing the same stream: the random rule keeps and asks for different items on each (a seed
    shared by every device, as rng-seed was, made them all annotate the same positions)."""
    rng = np.random.default_rng(0)
    feats = [features(rng) for _ in range(40)]
    kept, asked = [], []
    for seed in (1, 2):
        buffer = new_buffer(rule="random", random_seed=seed, capacity=8, budget=3)
        for i in range(40):
            buffer.offer(record(i), feats[i])
        kept.append(kept_ids(buffer))
        asked.append([it.record.id for it in buffer.requests()])
    assert kept[0] != kept[1] and asked[0] != asked[1]


def test_a_new_buffer_draws_its_random_seed_from_the_os_and_keeps_it(tmp_path):
    rng = np.random.default_rng(7)
    feats = [features(rng) for _ in range(30)]
    one, two = new_buffer(None, rule="random"), new_buffer(None, rule="random")
    assert one.random_seed != two.random_seed and one.random_seed.bit_length() > 64
    for i in range(15):
        one.offer(record(i), feats[i])
    save_buffer(tmp_path, one)
    again = load_buffer(tmp_path)  # a restart: the same seed, so the rest of the stream is decided the same
    assert again.random_seed == one.random_seed
    for i in range(15, 30):
        one.offer(record(i), feats[i])
        again.offer(record(i), feats[i])
    assert one.to_bytes() == again.to_bytes()
    with pytest.raises(ValueError, match="128"):
        new_buffer(1 << 128)


def _as_format_1(buffer: StreamBuffer, rng_seed: int) -> bytes:
    """The file an earlier bouquet wrote: rng_seed among its settings, no random seed of its own."""
    from participants.stream_buffer import _digest

    state = buffer.to_state()
    del state["random-seed"]
    state["settings"]["rng_seed"] = rng_seed
    for item in state["items"]:
        del item["tokens"]
    return json.dumps({"format": "bouquet-buffer/1", "sha256": _digest(state), "state": state}).encode()


def test_a_format_1_buffer_still_loads_and_decides_as_it_did_and_an_unknown_format_is_refused(tmp_path):
    rng = np.random.default_rng(8)
    feats = [features(rng) for _ in range(24)]
    old = new_buffer(rule="random", random_seed=5)  # format 1 drew from (rng_seed, position): the same stream
    for i in range(12):
        old.offer(record(i), feats[i])
    (tmp_path / "buffer.json").write_bytes(_as_format_1(old, 5))
    loaded = load_buffer(tmp_path)
    assert loaded.random_seed == 5 and loaded.settings == old.settings
    for i in range(12, 24):
        old.offer(record(i), feats[i])
        loaded.offer(record(i), feats[i])
    assert kept_ids(loaded) == kept_ids(old)
    save_buffer(tmp_path, loaded)
    assert json.loads((tmp_path / "buffer.json").read_bytes())["format"] == "bouquet-buffer/2"
    doc = json.loads(_as_format_1(old, 5))
    doc["format"] = "bouquet-buffer/9"
    (tmp_path / "buffer.json").write_text(json.dumps(doc))
    with pytest.raises(BufferDamaged, match="bouquet-buffer/9.*newer bouquet"):
        load_buffer(tmp_path)


def test_device_add_gives_each_device_its_own_random_seed_unless_its_policy_pins_it(tmp_path, tiny_seed):
    from participants.device_stream import add_records

    stream = _jsonl(tmp_path / "s.jsonl", [{"user": "u", "input": f"item {i}", "id": str(i)} for i in range(3)])
    seeds = {}
    for name, policy in (("a", None), ("b", None), ("c", 11), ("d", 11)):
        device = tmp_path / name
        device.mkdir()
        if policy is not None:
            (device / "policy.json").write_text(json.dumps({"pinned-seed": policy}))
        add_records(device, stream, seed_model="tiny-random", loader=lambda *a: tiny_seed,
                    given={"capacity": 2, "rule": "random", "pairs": 0})
        seeds[name] = load_buffer(device).random_seed
    assert seeds["a"] != seeds["b"] and seeds["c"] == seeds["d"] != seeds["a"]


@pytest.mark.parametrize("rule, combine", [("sdss", "idd"), ("sdss", "zsum"), ("kcenter", "zsum")])
def test_diversity_rules_keep_the_rare_items_a_run_of_near_copies_would_push_out(rule, combine):
    rng = np.random.default_rng(1)
    crowd = rng.normal(size=DIM)
    buffer = new_buffer(rule=rule, combine=combine, domains=1)
    copies = [features(rng, crowd, 0.05) for _ in range(20)]
    # the rare items' values are a copy's, reordered: the same embedding entropy, another direction (with one domain
    # DSS is 1 for all), so only their dissimilarity sets them apart
    rare = [ItemFeatures(rng.permutation(copies[k].embedding), copies[k].tokens, copies[k].n_tokens) for k in (0, 1)]
    stream = [("rare", f) for f in rare] + [("copy", f) for f in copies]
    for i, (kind, f) in enumerate(stream):
        buffer.offer(PersonalRecord("u", kind, "", id=str(i)), f)
    assert {"0", "1"} <= kept_ids(buffer)  # fifo would have kept only copies
    fifo = new_buffer(rule="fifo")
    for i, (kind, f) in enumerate(stream):
        fifo.offer(PersonalRecord("u", kind, "", id=str(i)), f)
    assert not {"0", "1"} & kept_ids(fifo)


def test_sdss_does_not_favour_the_items_that_came_first():
    """On exchangeable streams an item's place must not decide whether sdss keeps it or asks for it first. Scored
    once on arrival, the first item kept DSS = 1 (scored before any domain existed) and the buffer's first items
    kept an IDD measured on a mean that held them but not the newcomers: the first item stayed in 58% of these
    streams and was asked for first in 24% (a top-4 of 20 keeps each position in 20%, asks for it first in 5%)."""
    rng, runs, n = np.random.default_rng(0), 100, 20
    kept, asked_first = np.zeros(n), np.zeros(n)
    for _ in range(runs):
        buffer = new_buffer(rule="sdss", capacity=4, budget=2, domains=2)
        for i in range(n):
            buffer.offer(record(i), features(rng, n_tokens=int(rng.integers(4, 12))))
        for it in buffer.items:
            kept[int(it.record.id)] += 1 / runs
        asked_first[int(buffer.requests()[0].record.id)] += 1 / runs
    assert kept[0] < 0.35 and kept[:4].mean() < 0.32 and asked_first[0] < 0.12
    assert abs(kept.sum() - 4) < 1e-9


def test_sdss_lets_an_item_in_only_when_it_scores_higher_than_the_weakest():
    rng = np.random.default_rng(2)
    buffer = new_buffer(rule="sdss", combine="eoe", domains=1)
    for i in range(4):
        buffer.offer(record(i), features(rng, n_tokens=8))
    weakest = min(it.eoe for it in buffer.items)
    long_item = features(rng, n_tokens=4000)  # EOE divides by log2(n + 1): a long item scores low
    assert embedding_entropy(long_item.embedding, 4000) < weakest
    assert buffer.offer(record(10), long_item) is None
    short = features(rng, n_tokens=1)
    assert buffer.offer(record(11), short) is not None and "11" in kept_ids(buffer)


def test_annotated_items_keep_their_slots_and_record_who_annotated():
    rng, buffer = np.random.default_rng(3), new_buffer(rule="fifo")
    for i in range(4):
        buffer.offer(record(i), features(rng))
    asked = buffer.requests()
    assert [it.record.id for it in asked] == ["0", "1"]  # fifo asks oldest first, budget 2
    buffer.annotate([replace(it.record, output=f"answer {it.record.id}") for it in asked], "alice")
    for i in range(4, 20):
        buffer.offer(record(i), features(rng))
    assert {"0", "1"} <= kept_ids(buffer)
    assert [(r.id, r.output) for r in buffer.training_records()] == [("0", "answer 0"), ("1", "answer 1")]
    assert all(it.annotation["by"] == "alice" and it.annotation["round"] == 1 for it in buffer.annotated())
    with pytest.raises(ValueError, match="already annotated"):
        buffer.annotate([replace(asked[0].record, output="again")], "bob")
    with pytest.raises(ValueError, match="at most 2"):
        buffer.annotate([record(i, "x") for i in range(5, 8)], "bob")


def test_the_file_round_trips_and_a_reloaded_buffer_decides_as_the_one_in_memory(tmp_path):
    rng = np.random.default_rng(4)
    stream = [features(rng) for _ in range(24)]
    one, two = new_buffer(), new_buffer()
    for i in range(12):
        one.offer(record(i), stream[i])
        two.offer(record(i), stream[i])
    save_buffer(tmp_path, two)
    two = load_buffer(tmp_path)
    for i in range(12, 24):
        one.offer(record(i), stream[i])
        two.offer(record(i), stream[i])
    assert one.to_bytes() == two.to_bytes()


@pytest.mark.parametrize("damage", ["flip", "truncate", "edit"])
def test_a_buffer_damaged_on_disk_is_refused_on_start_saying_what_to_do(tmp_path, damage):
    rng, buffer = np.random.default_rng(5), new_buffer()
    for i in range(6):
        buffer.offer(record(i), features(rng))
    save_buffer(tmp_path, buffer)
    path = tmp_path / "buffer.json"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:  # valid JSON, one score changed by hand
        doc = json.loads(data)
        doc["state"]["items"][0]["eoe"] += 1
        data = json.dumps(doc).encode()
    path.write_bytes(bytes(data))
    with pytest.raises(BufferDamaged, match="move it aside") as err:
        load_buffer(tmp_path)
    assert str(path) in str(err.value)
    with pytest.raises(BufferDamaged):
        Device(tmp_path).history()  # a sharer stops rather than train on it
    from simulation.cli import main

    assert main(["device", "buffer", str(tmp_path)]) == 2  # one line saying what to do, no traceback
    assert path.read_bytes() == bytes(data)  # and never overwritten


def test_the_scores_read_the_items_own_words_not_the_chat_template(tiny_seed):
    from participants.chat_data import prompt_ids

    tok = tiny_seed.tokenizer
    text = "how do plants drink water?"
    ids = prompt_ids(tok, text)
    start, end = _content_span(ids, prompt_ids(tok, ""))
    assert tok.decode(ids[start:end]).strip() == text
    (f,) = item_features(tiny_seed, [text], max_len=128)
    assert f.n_tokens == end - start and f.tokens.shape == (end - start, tiny_seed.model.config.hidden_size)
    assert np.allclose(np.linalg.norm(f.tokens, axis=1), 1, atol=1e-5)


def test_synthesis_keeps_pairs_between_a_copy_and_a_drift():
    original = PersonalRecord("u", "Write a tweet about flu shots for kids", "Kids need flu shots this fall, doctors say")
    s = SynthesisSettings(pairs=3, rouge_low=0.2, rouge_high=0.7)
    replies = [f"Request: {original.input}\nAnswer: {original.output}",  # a copy
               "Request: Write a tweet about the flu vaccine for adults\nAnswer: Grown-ups should get a flu vaccine before "
               "winter, nurses say",
               "Request: explain quantum chromodynamics\nAnswer: gluons bind quarks",  # a drift
               "no form at all"]
    out = keep_pairs(original, replies, s)
    assert out.written == 4 and [p.input for p in out.kept] == ["Write a tweet about the flu vaccine for adults"]
    assert 0.2 <= out.kept[0].rouge1 <= 0.7
    assert parse_pair("request: a\n\nANSWER: b") == ("a", "b") and parse_pair("Request: a") is None


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_device_add_refuses_a_malformed_record_with_its_line_and_keeps_nothing_of_the_file(tmp_path, tiny_seed):
    from simulation.cli import main

    device = tmp_path / "dev"
    device.mkdir()
    good = _jsonl(tmp_path / "good.jsonl", [{"user": "u", "input": f"item {i}", "id": str(i)} for i in range(3)])
    assert main(["device", "add", str(device), "--data", str(good), "--seed-model", "tiny-random",
                 "--capacity", "2", "--pairs", "0"]) == 0
    before = (device / "buffer.json").read_bytes()
    bad = _jsonl(tmp_path / "bad.jsonl", [{"user": "u", "input": "fine", "id": "10"}, '{"user": "u", "input": ',
                                          {"user": "u", "input": "later", "id": "12"}])
    empty = _jsonl(tmp_path / "empty.jsonl", [{"user": "u", "input": "fine", "id": "20"},
                                              {"user": "u", "input": " ", "id": "21"}])
    held = load_buffer(device).items[0].record
    again = _jsonl(tmp_path / "again.jsonl", [{"user": "u", "input": "new", "id": "40"},
                                              {"user": "u", "input": held.input, "id": held.id}])
    for path, reason in ((bad, r"bad\.jsonl:2: not valid JSON"), (empty, r"empty\.jsonl:2: 'input' is empty"),
                         (again, "record 2 .* already in the buffer")):
        with pytest.raises(ValueError, match=reason):
            from participants.device_stream import add_records
            add_records(device, path, loader=lambda *a: tiny_seed)
        assert (device / "buffer.json").read_bytes() == before
    other = _jsonl(tmp_path / "other.jsonl", [{"user": "u", "input": "x", "id": "30"}])
    assert main(["device", "add", str(device), "--data", str(other), "--capacity", "5"]) == 2  # not its capacity
    assert (device / "buffer.json").read_bytes() == before
    assert main(["device", "add", str(device), "--data", str(good)]) == 0  # the same file again: a no-op
    assert (device / "buffer.json").read_bytes() == before


def test_annotation_rounds_and_a_sharer_training_on_the_buffer(tmp_path, tiny_seed):
    from participants.device_stream import add_records, annotate, annotation_ask, buffer_status

    device = tmp_path / "dev"
    device.mkdir()
    stream = _jsonl(tmp_path / "s.jsonl", [{"user": "u", "input": f"item {i} " * (i + 1), "id": str(i)}
                                           for i in range(6)])
    report = add_records(device, stream, seed_model="tiny-random", loader=lambda *a: tiny_seed,
                         given={"capacity": 4, "budget": 2, "pairs": 2, "synthesis_tokens": 8})
    assert (report.added, report.size, report.awaiting) == (6, 4, 4)
    asked = annotation_ask(device)
    assert len(asked) == 2 and all(r.output == "" for r in asked)
    blank = _jsonl(tmp_path / "blank.jsonl", [json.loads(r.to_json()) for r in asked])
    with pytest.raises(ValueError, match="no item has its 'output' filled in"):
        annotate(device, blank, by="alice", loader=lambda *a: tiny_seed)
    answers = _jsonl(tmp_path / "a.jsonl", [json.loads(replace(r, output=f"reply {r.id}").to_json()) for r in asked])
    done = annotate(device, answers, by="alice", loader=lambda *a: tiny_seed)
    assert [d["written"] for d in done] == [2, 2]  # the tiny random model writes garbage: nothing parses
    status = buffer_status(device)
    assert status["annotated-by"] == {"alice": 2} and status["rounds"] == 1
    history = Device(device).history()
    assert sorted(r.output for r in history) == sorted(f"reply {r.id}" for r in asked)



def test_a_dp_share_and_the_profile_count_only_the_owners_records_not_the_pairs_written_from_them(tmp_path,
                                                                                                 tiny_seed):
    """A written pair derives from one of the owner's records: in a DP release it would count that record twice,
    beyond what the per-record ε covers. Without DP a share trains on the pairs too."""
    from participants.device_privacy import release_profile, share_history
    from participants.device_stream import add_records, annotate, annotation_ask
    from participants.dp_sgd import DpSgd

    device = tmp_path / "dev"
    device.mkdir()
    stream = _jsonl(tmp_path / "s.jsonl", [{"user": "u", "input": f"item {i} " * (i + 1), "id": str(i)}
                                           for i in range(4)])
    add_records(device, stream, seed_model="tiny-random", loader=lambda *a: tiny_seed,
                given={"capacity": 4, "budget": 2, "pairs": 0})
    asked = annotation_ask(device)
    answers = _jsonl(tmp_path / "a.jsonl", [json.loads(replace(r, output=f"reply {r.id}").to_json()) for r in asked])
    annotate(device, answers, by="alice", loader=lambda *a: tiny_seed)
    buffer = load_buffer(device)
    for n, item in enumerate(buffer.annotated()):  # as if the model had written and kept two pairs for each
        item.synthetic = [{"input": f"new question {n}.{k}", "output": f"written answer {n}.{k}"} for k in range(2)]
    save_buffer(device, buffer)
    own = {f"reply {r.id}" for r in asked}
    dev = Device(device)
    written = {f"written answer {n}.{k}" for n in range(2) for k in range(2)}
    assert {r.output for r in dev.history()} == own | written
    assert [r.output for r in dev.history(with_synthetic=False)] == sorted(own)
    assert {r.output for r in share_history(dev, None)} == own | written
    assert {r.output for r in share_history(dev, DpSgd(8.0, 1e-5, 1.0))} == own
    release, _ = release_profile(dev)
    assert release.count == 2



def test_the_annotated_items_are_repeated_to_match_the_written_pairs():
    from participants.synthesis import training_mix

    own, written = [record(i, "a") for i in range(2)], [record(10 + i, "w") for i in range(5)]
    assert training_mix(own, written, True) == own * 3 + written  # 6 own against 5 written
    assert training_mix(own, written, False) == own + written
    assert training_mix(own, [], True) == own


def test_the_adapter_writes_the_pairs_and_is_gone_afterwards(monkeypatch, tiny_seed):
    """synthesis-writer adapter: the replies come from the seed with a LoRA trained on the annotated items, and the
    seed is bare again once they are written."""
    import torch

    import participants.synthesis as synthesis
    from participants.lora_training import LoraSettings

    replies = []
    monkeypatch.setattr(synthesis, "keep_pairs",
                        lambda original, mine, s: replies.append(mine) or synthesis.Synthesis(len(mine), []))
    own = [record(i, f"answer {i} " * 4) for i in range(3)]
    s = SynthesisSettings(pairs=2, synthesis_tokens=8)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = tiny_seed.model(input_ids=ids).logits
    writer = synthesis.writer_adapter(tiny_seed, own, LoraSettings(steps=3, lr=0.05, batch_size=2, max_len=32))
    synthesis.synthesize(tiny_seed, own, s, writer=writer)
    synthesis.synthesize(tiny_seed, own, s)
    assert replies[:3] != replies[3:]  # the same sampling seed: only the writer differs
    assert torch.equal(tiny_seed.model(input_ids=ids).logits, before)


def test_a_buffer_written_before_the_writer_setting_keeps_writing_with_the_seed():
    from participants.stream_buffer import _digest

    buffer = new_buffer()
    assert (buffer.synthesis.synthesis_writer, buffer.synthesis.repeat_annotated) == ("adapter", True)
    state = buffer.to_state()
    for name in ("synthesis_writer", "repeat_annotated"):
        del state["synthesis"][name]
    old = json.dumps({"format": "bouquet-buffer/2", "sha256": _digest(state), "state": state}).encode()
    again = StreamBuffer.from_bytes(old, "buffer.json")
    assert (again.synthesis.synthesis_writer, again.synthesis.repeat_annotated) == ("seed", False)


KILLER = """
import os, sys, time
from pathlib import Path
stage = sys.argv[1]
real = getattr(os, stage)
def slow(*args, **kw):
    Path(sys.argv[2]).write_text("now")
    time.sleep(60)
    return real(*args, **kw)
setattr(os, stage, slow)
from simulation.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_a_sigkill_during_an_update_loses_nothing_that_was_acknowledged(tmp_path, stage, tiny_seed):
    """A real `bouquet device add` process, killed while it writes (stopped inside the temp file's fsync, or just
    before the rename): the buffer is the one the previous, acknowledged add left, and the add can simply be
    run again."""
    from simulation.cli import main

    device = tmp_path / "dev"
    device.mkdir()
    first = _jsonl(tmp_path / "first.jsonl", [{"user": "u", "input": f"item {i}", "id": str(i)} for i in range(5)])
    second = _jsonl(tmp_path / "second.jsonl", [{"user": "u", "input": f"new {i}", "id": f"n{i}"} for i in range(5)])
    assert main(["device", "add", str(device), "--data", str(first), "--seed-model", "tiny-random", "--capacity", "3",
                 "--pairs", "0"]) == 0
    acknowledged = (device / "buffer.json").read_bytes()
    flag = tmp_path / "in-update"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", KILLER, stage, str(flag), "device", "add", str(device), "--data",
                             str(second)], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "the update never reached the write"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (device / "buffer.json").read_bytes() == acknowledged  # killed before acknowledging: as it was
    assert main(["device", "add", str(device), "--data", str(second)]) == 0  # the owner simply runs it again
    assert load_buffer(device).seen == 10


def test_a_device_made_for_a_stream_needs_no_history_and_says_where_records_come_from(tmp_path):
    from participants.device_setup import init_device

    setup = init_device(tmp_path / "dev", None)
    assert setup.history == 0 and not (setup.device.root / "history.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="device add"):
        setup.device.history()
