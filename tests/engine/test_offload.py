"""Targets larger than memory (issue 12): the offloaded backend streams its FFN from a flash bundle and
keeps hot neurons in DRAM; its logits are the in-memory model's, its DRAM stays within the budget, its
reads bypass the page cache, and speculation with its own sparse hot-neuron draft is exact."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.config import DrafterConfig, EngineConfig, ModelConfig, SpeculationConfig
from cluster.drafters.configs import SparseConfig
from cluster.engine import SpecEngine
from cluster.models.backend import Row
from cluster.models.flash_store import (ALIGN, BundleLayout, EmbeddingRows, SlowDisk, byte_ranges,
                                        drop_from_page_cache, resident_fraction, runs)
from cluster.models.lean import LeanBackend
from cluster.models.offload import (EMBED_CACHE_ROWS, OffloadedBackend, SparseDraftBackend, load_skeleton,
                                    resident_bytes)
from cluster.types import SamplingParams
from tests.engine.helpers import assert_same_or_near_tie
from tools.bundle_ffn import bundle

PROMPTS = ["def add(a, b):\n    return", "import os\n", "for i in range(10):\n    print(i)\nfor i in range(10):\n",
           "x", "class A:\n    def f(self):\n        return self\n\nclass B:\n"]


@pytest.fixture(scope="module")
def flash(tiny_models, tmp_path_factory):
    """The tiny target bundled by the real script (neurons ranked on stdlib text), fp32."""
    out = tmp_path_factory.mktemp("flash") / "target"
    bundle(tiny_models["target"], out, "float32", calibration_tokens=512)
    return out


@pytest.fixture(scope="module")
def flash3(tiny_models, tmp_path_factory):
    """A 3-layer model, bundled: with two staging buffers, each layer's buffer then last held another
    layer, so a pass that did not copy its cached rows in would compute over the wrong weights (the
    2-layer target keeps one buffer per layer, which hides that)."""
    from tools.make_tiny_models import make_llama

    base = AutoTokenizer.from_pretrained(tiny_models["target"], local_files_only=True)
    source = tmp_path_factory.mktemp("three") / "model"
    make_llama(len(base), hidden=64, layers=3, seed=5, eos=base.eos_token_id).save_pretrained(source)
    base.save_pretrained(source)
    out = source.parent / "flash"
    bundle(source, out, "float32", calibration_tokens=256)
    return source, out


def _budget_gb(skeleton, layout: BundleLayout, neurons: int) -> float:
    """The budget that leaves room for `neurons` cached rows per layer."""
    embed = min(EMBED_CACHE_ROWS, layout.embed_rows) * layout.hidden * layout.element_size
    held = resident_bytes(skeleton) + embed + 2 * layout.layer_bytes
    return (held + neurons * layout.layers * layout.row_bytes) / 1e9


def _offloaded(flash, neurons: int, **kw) -> OffloadedBackend:
    skeleton = load_skeleton(flash, torch.float32)
    layout = BundleLayout.load(flash)
    return OffloadedBackend(skeleton, 4, 128, flash, _budget_gb(skeleton, layout, neurons) + 1e-9, **kw)


def test_the_bundle_holds_the_models_ffn_row_by_row(tiny_models, flash):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()
    layout = BundleLayout.load(flash)
    raw = torch.frombuffer(bytearray((flash / "ffn.bin").read_bytes()), dtype=torch.uint8)
    order = load_file(flash / "neurons.safetensors")
    for li, layer in enumerate(model.model.layers):
        rows = raw[layout.layer_offsets[li]:layout.layer_offsets[li] + layout.layer_bytes].view(torch.float32)
        rows = rows.view(layout.intermediate, 3, layout.hidden)
        ids = order[f"layer.{li}.order"].long()
        assert sorted(ids.tolist()) == list(range(layout.intermediate))
        assert torch.equal(rows[:, 0], layer.mlp.gate_proj.weight[ids])
        assert torch.equal(rows[:, 1], layer.mlp.up_proj.weight[ids])
        assert torch.equal(rows[:, 2], layer.mlp.down_proj.weight[:, ids].t())
        hot = order[f"layer.{li}.hotness"]
        assert torch.all(hot[:-1] >= hot[1:]) and hot[0] > 0  # hottest first, from real activations


@pytest.mark.parametrize("prefetch,decay,layers", [(True, 0.9, 2), (False, 0.9, 2), (True, 1.0, 2), (True, 0.9, 3),
                                                  (True, 1.0, 3)],
                         ids=["window", "window-no-read-ahead", "fixed-hot-set", "window-3-layers", "fixed-3-layers"])
def test_offloaded_logits_equal_in_memory_for_ragged_batches_trees_and_rollback(tiny_models, flash, flash3, prefetch,
                                                                               decay, layers):
    """A scattered window cache makes reads go through most cached rows; a fixed hot set is skipped by the
    reads, so there the cached rows alone supply the head of each layer."""
    source, flash = (tiny_models["target"], flash) if layers == 2 else flash3
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True).eval()
    lean, off = LeanBackend(model, 4, 128), _offloaded(flash, 40, prefetch=prefetch, window_decay=decay)
    assert 0 < off.neurons.capacity < off.layout.intermediate
    for b in (lean, off):
        b.slots = [b.cache.allocate() for _ in range(3)]
    prompts = [[5, 17, 40, 22, 9], [3], [8, 8, 8, 8, 8, 8, 8, 8, 1, 2, 3]]
    outs = [b.forward([Row(s, p) for s, p in zip(b.slots, prompts)]).logits for b in (lean, off)]
    for i, p in enumerate(prompts):
        assert (outs[0][i, : len(p)] - outs[1][i, : len(p)]).abs().max() < 1e-4
    for step in range(6):  # the cache changes between passes; the logits must not
        starts = [list(b.cache.lengths) for b in (lean, off)]
        rows = lambda b: [Row(b.slots[0], [22, 7, 9, 11, 4], [-1, 0, 0, 2, 2]), Row(b.slots[1], [6, 2, 9 + step]),  # noqa: E731
                          Row(b.slots[2], [5 + step])]
        outs = [b.forward(rows(b)).logits for b in (lean, off)]
        for i, n in enumerate((5, 3, 1)):
            assert (outs[0][i, :n] - outs[1][i, :n]).abs().max() < 1e-4
        for b, st in zip((lean, off), starts):
            b.commit(b.slots[0], st[b.slots[0]], [0, 2, 4])
            b.commit(b.slots[1], st[b.slots[1]], [0])
    assert (off.neurons.swaps > 0) == (decay < 1)  # the window moved neurons in and out of DRAM meanwhile
    assert off.passes == 7


def test_the_budget_bounds_what_is_held_and_reads_skip_the_cache_and_the_page_cache(flash):
    drop_from_page_cache(flash / "ffn.bin")  # another test read the file through the page cache
    off = _offloaded(flash, 40)  # no draft: a fixed hot set, the first 40 rows of each layer
    assert off.held_bytes <= off.budget_bytes
    assert off.neurons.capacity == 40
    skeleton = load_skeleton(flash, torch.float32)
    with pytest.raises(ValueError, match="memory_budget_gb"):  # not even room for resident + buffers
        OffloadedBackend(skeleton, 4, 128, flash, resident_bytes(skeleton) / 1e9)
    slot = off.cache.allocate()
    off.forward([Row(slot, [1, 2, 3])])  # the first pass reads every row (nothing cached yet)
    off.settle()
    lay = off.layout
    assert off.reader.bytes_read >= lay.ffn_bytes
    before = off.reader.bytes_read
    off.forward([Row(slot, [4])])
    off.settle()
    read = off.reader.bytes_read - before
    # after it, only the uncached rows 40..127, rounded out to 4 KiB
    first = 40 * lay.row_bytes // ALIGN * ALIGN
    assert read == lay.layers * (lay.layer_bytes - first)
    assert resident_fraction(flash / "ffn.bin") < 0.05  # the page cache does not quietly hold the model


def test_between_passes_the_next_pass_first_two_layers_are_read_once_each(flash3):
    """While the draft runs, both staging buffers are free: the next pass's layers 0 and 1 are read into
    them then, and no layer is read twice in a pass."""
    off = _offloaded(flash3[1], 40)
    lay = off.layout
    uncached = lay.layer_bytes - 40 * lay.row_bytes // ALIGN * ALIGN  # a layer's reads once it is cached
    slot = off.cache.allocate()
    off.forward([Row(slot, [1, 2, 3])])  # reads every row of every layer (nothing cached yet)
    for tokens in ([4], [5, 6]):
        assert [layer for layer, _, _ in off._ahead] == [0, 1]
        assert len({buf.data_ptr() for _, _, buf in off._ahead}) == 2
        off.settle()
        before = off.reader.bytes_read
        off.forward([Row(slot, tokens)])
        off.settle()
        assert off.reader.bytes_read - before == lay.layers * uncached  # layer 2, then the next pass's 0 and 1


def test_embedding_rows_are_read_once_while_cached_least_recently_used_out(flash):
    lay = BundleLayout.load(flash)
    assert lay.embed_rows  # the tiny target's embedding is untied: it lives on storage
    rows, plain = EmbeddingRows(flash / "embed.bin", lay, cache_rows=2), EmbeddingRows(flash / "embed.bin", lay)
    ids = torch.tensor([5, 7, 5])
    assert torch.equal(rows(ids), plain(ids))
    read = rows.bytes_read
    assert torch.equal(rows(torch.tensor([7])), plain(torch.tensor([7])))  # both held: no read
    assert torch.equal(rows(torch.tensor([5])), plain(torch.tensor([5])))
    assert rows.bytes_read == read and rows.hits == 2
    rows(torch.tensor([9]))  # the least recently used (7) makes room
    read = rows.bytes_read
    rows(torch.tensor([5, 9]))
    assert rows.bytes_read == read
    assert torch.equal(rows(torch.tensor([7])), plain(torch.tensor([7]))) and rows.bytes_read > read
    assert rows.cache_bytes == 2 * lay.hidden * lay.element_size
    off = _offloaded(flash, 40)  # the backend's cache is DRAM it holds: counted with the resident weights
    assert off.resident_bytes == resident_bytes(load_skeleton(flash, torch.float32)) + off.embed_rows.cache_bytes > 0
    assert off.embed_rows.cache_rows == min(EMBED_CACHE_ROWS, lay.embed_rows)


def test_byte_ranges_align_and_merge():
    assert byte_ranges([(0, 3)], 1000, 1 << 20) == [(0, 4096)]
    assert byte_ranges([(0, 1), (5, 6)], 1000, 1 << 20) == [(0, 8192)]  # rounded ranges overlap: one read
    assert byte_ranges([(0, 1), (20, 21)], 1000, 1 << 20) == [(0, 4096), (16384, 24576)]
    assert byte_ranges([(0, 1), (20, 21)], 1000, 1 << 20, merge_bytes=16384) == [(0, 24576)]
    assert byte_ranges([(30, 32)], 1000, 31000) == [(28672, 31000)]  # never past the layer's block


def test_naive_streaming_reads_every_layer_every_pass(flash):
    naive = _offloaded(flash, 0, prefetch=False)
    slot = naive.cache.allocate()
    for n in range(3):
        naive.forward([Row(slot, [1 + n])])
    assert naive.reader.bytes_read >= 3 * naive.layout.ffn_bytes


def test_an_emulated_disk_queues_requests_at_its_latency_and_bandwidth():
    now, slept = [0.0], []
    disk = SlowDisk(mb_s=1.0, latency_us=1000.0, clock=lambda: now[0], sleep=slept.append)  # 1 byte/us, 1 ms each
    disk.done(1000, started=0.0)  # 1 ms + 1 ms
    assert slept == [pytest.approx(0.002)]
    now[0] = 0.0005
    disk.done(2000, started=0.0005)  # queued behind the first: 2 ms + 1 ms + 2 ms
    assert slept[-1] == pytest.approx(0.005 - 0.0005)
    now[0] = 1.0
    disk.done(1000, started=0.999)  # idle device, a real read that itself took 1 ms: it counts inside
    assert slept[-1] == pytest.approx(0.001)
    now[0] = 2.0
    disk.done(10, started=0.0)  # the real read was slower than the device: no sleep
    assert len(slept) == 3 and (disk.requests, disk.bytes) == (4, 4010)
    mb_s, latency_us = SlowDisk.fit(16 << 20, 756, 32 << 10, 239)  # the two figures
    assert (16 << 20) / (mb_s * 1e6) + latency_us * 1e-6 == pytest.approx((16 << 20) / 756e6)
    assert (32 << 10) / (mb_s * 1e6) + latency_us * 1e-6 == pytest.approx((32 << 10) / 239e6)
    with pytest.raises(ValueError, match="mb_s"):
        SlowDisk(0)


def test_an_emulated_disk_sees_every_read_and_changes_no_logits(flash):
    real, slow = _offloaded(flash, 40), _offloaded(flash, 40)
    slept = []
    slow.emulate_disk(SlowDisk(mb_s=1.0, latency_us=50.0, sleep=slept.append))  # far slower than any disk
    before = slow.reader.bytes_read
    outs = []
    for off in (real, slow):
        slot = off.cache.allocate()
        outs.append([off.forward([Row(slot, toks)]).logits for toks in ([1, 2, 3], [4], [5, 6])])
        off.settle()
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    disk = slow.reader.disk
    assert disk is slow.embed_rows.disk if slow.embed_rows else True  # one device under both files
    embedded = slow.embed_rows.bytes_read if slow.embed_rows else 0
    assert disk.bytes == slow.reader.bytes_read - before + embedded > 0
    assert disk.requests >= slow.reader.reads and sum(slept) == pytest.approx(disk.waited_s)
    assert disk.waited_s > 0.9 * disk.bytes / 1e6  # 1 MB/s: every byte was waited for (real reads are faster)


def test_read_runs_merge_short_gaps():
    ids = torch.tensor([0, 1, 2, 5, 6, 20, 21, 40])
    assert runs(ids) == [(0, 3), (5, 7), (20, 22), (40, 41)]
    assert runs(ids, merge_gap=3) == [(0, 7), (20, 22), (40, 41)]
    assert runs(torch.tensor([], dtype=torch.long)) == []


def test_the_sparse_draft_uses_only_cached_neurons(flash):
    off = _offloaded(flash, 40)
    slot = off.cache.allocate()
    off.forward([Row(slot, [5, 17, 40])])  # fills the cache
    draft = SparseDraftBackend(off, 2, 128)
    assert draft.layers is off.layers or draft.layers == off.layers  # shared resident weights
    d = draft.cache.allocate()
    first = draft.forward([Row(d, [5, 17, 40])], last_only=True).logits
    for buf in off._buffers:  # what the target streams does not matter to it
        buf.fill_(0x7F)
    draft.cache.truncate(d, 0)
    again = draft.forward([Row(d, [5, 17, 40])], last_only=True).logits
    assert torch.equal(first, again)
    off.neurons.rows[0].mul_(0.0)  # but the cached ones do
    draft.cache.truncate(d, 0)
    assert not torch.equal(first, draft.forward([Row(d, [5, 17, 40])], last_only=True).logits)


def _offload_engine(flash, k: int, base: SpecEngine, ffn: str = "hot", defer: bool = False,
                    pipelining: str = "auto") -> SpecEngine:
    skeleton = load_skeleton(flash, torch.float32)
    budget = _budget_gb(skeleton, BundleLayout.load(flash), 48) + 1e-9
    config = EngineConfig(
        target=ModelConfig(str(flash), dtype="float32", backend="offload", memory_budget_gb=budget),
        drafter=DrafterConfig("sparse", {"sparse": SparseConfig(ffn=ffn, group=32)}),
        speculation=SpeculationConfig(k=k, k_max=8, adaptive=False, defer_prefill=defer),
    )
    config.cluster.pipelining = pipelining
    return SpecEngine(config.validate(), tokenizer=base.tokenizer)


@pytest.mark.parametrize("ffn, defer, pipelining", [("hot", False, "auto"), ("int4", False, "auto"),
                                                    ("int4", True, "auto"), ("int4", True, "continue"),
                                                    ("hot", False, "continue")])
def test_speculation_with_the_sparse_draft_equals_the_dense_model(tiny_models, flash, make_engine, ffn, defer,
                                                                  pipelining):
    """With a deferred prefill, a prompt and its first draft share one weight pass. With pipelining
    `continue`, the draft runs on a thread while the target streams its weights (the hot-neuron draft then
    reads cache rows the verify may be swapping: that costs acceptance, never output)."""
    dense = make_engine("ngram", k=0)  # the in-memory target
    spec = _offload_engine(flash, 6, dense, ffn, defer, pipelining)
    assert spec.target.backend.name == "offload"
    assert spec.executor.overlaps == (pipelining == "continue")
    greedy = SamplingParams(max_tokens=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()
    for prompt, want, got in zip(PROMPTS, dense.generate(PROMPTS, greedy), spec.generate(PROMPTS, greedy)):
        assert_same_or_near_tie(model, dense.tokenizer.encode(prompt), want.token_ids, got.token_ids)
    assert spec.stats.drafted > 0 and spec.stats.accepted > 0
    passes = spec.metrics.value("specdec_offload_passes")
    assert passes == spec.target.backend.passes > 0
    assert spec.metrics.value("specdec_offload_read_bytes") >= passes * 0.5 * BundleLayout.load(flash).ffn_bytes
    assert 0 < spec.metrics.value("specdec_offload_dram_bytes") <= spec.target.backend.budget_bytes
    sampled = [SamplingParams(max_tokens=32, temperature=0.9, seed=i) for i in range(len(PROMPTS))]
    plain = _offload_engine(flash, 0, dense)
    assert [o.token_ids for o in spec.generate(PROMPTS, sampled)] == \
        [o.token_ids for o in plain.generate(PROMPTS, sampled)]
    if pipelining == "continue":
        assert spec.metrics.value("specdec_continued_drafts_total", outcome="used") > 0


def test_a_sparse_draft_without_an_offloaded_target_is_refused(make_engine):
    base = make_engine("ngram", k=4)
    config = base.config
    config.drafter = DrafterConfig("sparse", {"sparse": SparseConfig()})
    with pytest.raises(ValueError, match="backend: offload"):
        SpecEngine(config, tokenizer=base.tokenizer, target=base.target)


def test_offload_config_needs_a_budget_and_a_bundle(tiny_models):
    from cluster.errors import ConfigError, ModelNotFoundError
    from cluster.model_config import check_model_dir

    with pytest.raises(ConfigError, match="memory_budget_gb"):
        ModelConfig(str(tiny_models["target"]), backend="offload").validate("target")
    with pytest.raises(ConfigError, match="only backend offload"):
        ModelConfig(str(tiny_models["target"]), memory_budget_gb=1.0).validate("target")
    with pytest.raises(ModelNotFoundError, match="bundle.json"):
        check_model_dir("target", ModelConfig(str(tiny_models["target"]), backend="offload", memory_budget_gb=1))


def test_a_frequency_ordered_head_gives_the_same_target_logits_and_a_smaller_draft_vocabulary(tiny_models, flash):
    """The bundle stores an untied head most frequent token first; the target puts its logits back in
    token order, and a draft over the first rows proposes only those tokens, with the same logits there."""
    order = load_file(flash / "neurons.safetensors")["vocab.order"].long()
    assert sorted(order.tolist()) == list(range(len(order)))
    off = _offloaded(flash, 40)
    slot = off.cache.allocate()
    off.forward([Row(slot, [5, 17, 40])])
    full, small = SparseDraftBackend(off, 2, 128), SparseDraftBackend(off, 2, 128, vocab=100)
    a, b = (d.forward([Row(d.cache.allocate(), [5, 17, 40])], last_only=True).logits[0] for d in (full, small))
    kept = order[:100]
    assert torch.isfinite(a).all()
    assert torch.allclose(a[kept], b[kept], atol=1e-5)
    assert torch.isinf(b[order[100:]]).all() and b[order[100:]].max() < 0


def test_the_predictor_script_trains_per_layer_predictors_and_reports_the_fidelity_curve(tiny_models, flash):
    from tools.train_predictors import main as train_predictors

    report = train_predictors([str(tiny_models["target"]), str(flash), "--tokens", "512", "--eval-tokens", "256",
                               "--rank", "8", "--steps", "100", "--density", "0.3", "--curve", "0.1", "0.7"])
    weights = load_file(flash / "predictors.safetensors")
    layout = BundleLayout.load(flash)
    assert weights["layer.0.a"].shape == (layout.hidden, 8)
    assert weights["layer.1.b"].shape == (8 + 1, layout.intermediate)  # the last row is the bias
    assert report["mean_recall"] > 0.3  # better than a random 30% of neurons
    low, high = report["curve"]
    assert high["oracle_magnitude"] > low["oracle_magnitude"]  # more neurons, closer to the dense model
    assert 0 <= low["hot_set"] <= 1 and 0 <= high["predictor"] <= 1


def test_a_tied_model_keeps_its_embedding_resident_and_its_head_in_order(tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(tiny_models["target"]).save_pretrained(tmp_path / "tied")
    bundle(tmp_path / "tied", tmp_path / "flash", "float32", calibration_tokens=256)
    assert not (tmp_path / "flash" / "embed.bin").exists()
    assert "vocab.order" not in load_file(tmp_path / "flash" / "neurons.safetensors")
    tied = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", local_files_only=True).eval()
    lean, off = LeanBackend(tied, 2, 64), _offloaded(tmp_path / "flash", 16)
    assert off.embed_rows is None and off.vocab_order is None
    a, b = (x.forward([Row(x.cache.allocate(), [5, 17, 40, 3])]).logits for x in (lean, off))
    assert (a - b).abs().max() < 1e-4


def test_a_sparse_draft_turns_the_window_on_and_without_one_the_hot_set_stays(flash):
    off = _offloaded(flash, 40)
    slot = off.cache.allocate()
    for n in range(3):
        off.forward([Row(slot, [5 + n, 17, 40])])
    assert off.neurons.swaps == 0 and off.neurons.ids[0].tolist() == list(range(40))
    SparseDraftBackend(off, 2, 128)
    for n in range(3):
        off.forward([Row(slot, [9 + n, 2, 3])])
    assert off.neurons.swaps > 0  # recent tokens' neurons replace calibration's


def test_an_int4_draft_takes_its_bytes_from_the_budget_and_leaves_the_target_exact(tiny_models, flash):
    off = _offloaded(flash, 40)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()
    lean = LeanBackend(model, 4, 128)
    draft = SparseDraftBackend(off, 2, 128, ffn="int4", group=32)
    assert off.reserved_bytes == draft.int4.nbytes == sum(q.nbytes for q in draft.int4.gate_up + draft.int4.down) > 0
    assert off.neurons.capacity < 40 and off.held_bytes <= off.budget_bytes  # the cache made room
    row = [5, 17, 40, 3]
    dense = lean.forward([Row(lean.cache.allocate(), row)]).logits
    target = off.forward([Row(off.cache.allocate(), row)]).logits
    assert (dense - target).abs().max() < 1e-4  # a smaller cache changes what is read, not the logits
    assert off.neurons.swaps == 0 and off.neurons.decay == 1.0  # no window: the cache only saves reads
    d = draft.cache.allocate()
    drafted = draft.forward([Row(d, row)]).logits
    assert (drafted - dense).abs().max() < 0.1 * dense.abs().max()  # close to the model: int4 FFN only
    assert not torch.equal(drafted, dense)
    off.neurons.rows[0].zero_()  # the draft computes every neuron from its own copy, not from the cache
    draft.cache.truncate(d, 0)
    assert torch.equal(drafted, draft.forward([Row(d, row)]).logits)


def test_a_budget_with_no_room_for_an_int4_draft_is_refused(flash):
    off = _offloaded(flash, 0)
    with pytest.raises(ValueError, match="int4 draft FFN .* does not fit"):
        SparseDraftBackend(off, 2, 128, ffn="int4", group=32)
    assert off.reserved_bytes == 0


def test_the_int4_fidelity_script_runs_and_its_own_model_agrees_with_itself(tiny_models):
    from tools.int4_fidelity import main

    result = main(["--model", str(tiny_models["target"]), "--groups", "32", "--prompts", "2", "--tokens", "8"])
    itself, int4 = result["rows"]
    assert itself["agreement"] >= 0.9 and itself["ffn"] == "bf16 (itself)"
    assert int4["ffn"] == "int4, group 32" and 0.0 <= int4["agreement"] <= 1.0


@pytest.fixture
def approx_bundle(flash, tmp_path):
    """The tiny bundle with random (untrained) predictors: the mechanics are tested, not the predictions."""
    import shutil

    from safetensors.torch import save_file

    out = tmp_path / "bundle"
    shutil.copytree(flash, out)
    lay = BundleLayout.load(out)
    gen = torch.Generator().manual_seed(0)
    save_file({f"layer.{i}.{name}": torch.randn(*shape, generator=gen) for i in range(lay.layers)
               for name, shape in (("a", (lay.hidden, 4)), ("b", (5, lay.intermediate)))},
              out / "predictors.safetensors")
    return out


def _approximate(bundle, neurons: int, density: float):
    from cluster.models.approx_offload import ApproximateOffloadedBackend

    skeleton = load_skeleton(bundle, torch.float32)
    lay = BundleLayout.load(bundle)
    predictors = lay.layers * (lay.hidden * 4 + 5 * lay.intermediate) * 4
    return ApproximateOffloadedBackend(skeleton, 4, 128, bundle, _budget_gb(skeleton, lay, neurons)
                                       + predictors / 1e9 + 1e-9, density=density, merge_bytes=0)


def _masked_logits(model, order: list[torch.Tensor], passes: list[tuple[list[int], list[torch.Tensor]]]):
    """The in-memory model run pass by pass (its KV cache carried), each layer's FFN activations zeroed outside
    that pass's kept neurons (bundle order -> the model's via `order`): the last pass's last logits."""
    masks: list[torch.Tensor] = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args, li=li: (args[0] * masks[li],))
             for li, layer in enumerate(model.model.layers)]
    past = None
    try:
        for ids, kept in passes:
            masks[:] = [torch.zeros(len(o)).index_fill_(0, o[k.nonzero().flatten()], 1.0) for o, k in zip(order, kept)]
            with torch.inference_mode():
                out = model(torch.tensor([ids]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    finally:
        for h in hooks:
            h.remove()
    return out.logits[0, -1]


def test_the_papers_approximate_offload_reads_only_predicted_uncached_rows_and_is_exact_only_when_dense(
        tiny_models, flash, approx_bundle):
    exact = _offloaded(flash, 40)
    dense = _approximate(approx_bundle, 40, density=1.0)
    sparse = _approximate(approx_bundle, 40, density=0.05)
    assert sparse.neurons.capacity == 40 and sparse.held_bytes <= sparse.budget_bytes  # predictors in the budget
    kept: list[torch.Tensor] = []
    active = sparse.active
    sparse.active = lambda li, h: kept.append(active(li, h)) or kept[-1]
    logits, first_kept = {}, []
    for name, b in (("exact", exact), ("dense", dense), ("sparse", sparse)):
        slot = b.cache.allocate()
        b.forward([Row(slot, [1, 2, 3])])  # the first pass reads every row and fills the hot set
        b.settle()
        before, first_kept, kept[:] = b.reader.bytes_read, kept[:], []
        logits[name] = b.forward([Row(slot, [4])]).logits[0, -1]
        b.settle()
        logits[name + "_read"] = b.reader.bytes_read - before
    lay = sparse.layout
    # every neuron kept: the exact backend's logits, reading what it reads
    assert torch.allclose(logits["dense"], logits["exact"], atol=1e-5)
    assert logits["dense_read"] == logits["exact_read"]
    # 5%: each layer keeps its 6 predicted neurons and reads only those outside the hot set, 4 KiB-aligned
    k = int(0.05 * lay.intermediate)
    assert [int(keep.sum()) for keep in kept] == [k] * lay.layers
    want = sum(hi - lo for keep in kept
               for lo, hi in byte_ranges(runs(keep[40:].nonzero().flatten() + 40), lay.row_bytes, lay.layer_bytes))
    assert logits["sparse_read"] == want < logits["exact_read"]
    assert not torch.allclose(logits["sparse"], logits["exact"], atol=1e-3)  # approximate: never served
    # what it computes: the model with each pass's FFN cut to that pass's kept neurons (cached or read)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()
    neurons = load_file(approx_bundle / "neurons.safetensors")
    order = [neurons[f"layer.{i}.order"].long() for i in range(lay.layers)]
    reference = _masked_logits(model, order, [([1, 2, 3], first_kept), ([4], kept)])
    assert torch.allclose(logits["sparse"], reference, atol=1e-4)


def test_the_approximate_offload_refuses_a_bundle_without_predictors_and_a_bad_density(approx_bundle):
    with pytest.raises(ValueError, match="density"):
        _approximate(approx_bundle, 40, density=0.0)
    (approx_bundle / "predictors.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="train_predictors"):
        _approximate(approx_bundle, 40, density=0.5)
