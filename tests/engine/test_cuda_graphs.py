"""The CUDA graphs' padded passes (cluster/models/cuda_graphs.py) give what the eager passes give: rows
padded to a bucket, tokens to the widest row, keys to the whole capacity. Without a GPU they run eagerly
(graphs="padded"); on a GPU the same passes are captured and replayed (graphs="auto")."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.engine import SpecEngine
from cluster.models.backend import Row
from cluster.models.lean import LeanBackend
from cluster.types import SamplingParams
from cluster.workers.target_worker import TargetWorker

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODE = "auto" if DEVICE == "cuda" else "padded"


@pytest.fixture(scope="module")
def model(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval().to(DEVICE)


def test_padded_passes_equal_eager_ones(model):
    eager, graphed = LeanBackend(model, 4, 96, graphs="off"), LeanBackend(model, 4, 96, graphs=MODE)
    slots = {name: [b.cache.allocate() for _ in range(3)] for name, b in (("eager", eager), ("graphed", graphed))}
    # 14 tokens, then a decode step: the second row's 1-token verify below, padded to 5, crosses into a block
    # of its own (16 positions a block) that only the padding uses
    prompts = [list(range(5, 23)), list(range(30, 44)), [40, 41, 42, 43]]
    steps = [  # (tokens a row, last_only); rows of one step may differ in width (a verify of drafts)
        (prompts, False),  # the prompts: one is 18 wide, past MAX_WIDTH: eager in both
        ([[1], [2], [3]], True),  # a decode step: 3 rows -> the 4-row graph
        ([[4, 5, 6], [7], [8, 9, 10, 11, 12]], False),  # a ragged verify: every row padded to 5
        ([[13], [14]], False),  # 2 rows
    ]
    for tokens, last_only in steps:
        out = {}
        for name, b in (("eager", eager), ("graphed", graphed)):
            out[name] = b.forward([Row(s, t) for s, t in zip(slots[name], tokens)], last_only=last_only)
        assert out["eager"].shape == out["graphed"].shape
        assert (out["eager"].index is None) == (out["graphed"].index is None)
        assert torch.allclose(out["eager"].logits, out["graphed"].logits, atol=1e-4, rtol=1e-4)
        assert [eager.cache.lengths[s] for s in slots["eager"]] == [graphed.cache.lengths[s] for s in slots["graphed"]]
        # only the real tokens' blocks are held: the padding's went back to the pool
        assert [len(eager.cache.tables[s]) for s in slots["eager"]] == \
            [len(graphed.cache.tables[s]) for s in slots["graphed"]]
    assert graphed.graphs.replays == 3 and len(graphed.graphs.graphs) == 3
    # a rollback (rejected drafts), then a step: the graph reads only what the row still has
    for b, s in ((eager, slots["eager"][2]), (graphed, slots["graphed"][2])):
        b.cache.truncate(s, b.cache.lengths[s] - 3)
    a = eager.forward([Row(s, [60]) for s in slots["eager"]], last_only=True).logits
    c = graphed.forward([Row(s, [60]) for s in slots["graphed"]], last_only=True).logits
    assert torch.allclose(a, c, atol=1e-4, rtol=1e-4) and graphed.graphs.replays == 4


def test_passes_graphs_do_not_take_run_eagerly(model):
    graphed = LeanBackend(model, 2, 40, graphs=MODE)
    slot = graphed.cache.allocate()
    graphed.forward([Row(slot, list(range(1, 20)))])  # 19 new tokens: wider than MAX_WIDTH
    graphed.forward([Row(slot, [1, 2, 3], [-1, 0, 0])])  # a tree
    graphed.forward([Row(slot, [4])], hidden=True)  # hidden states asked for
    graphed.forward([Row(slot, list(range(5, 21)))])  # 16 wide: a graph's
    assert graphed.graphs.replays == 1
    with pytest.raises(ValueError, match="overflow"):  # a pass past the capacity fails as it does eagerly
        graphed.forward([Row(slot, [1, 2])])


def test_the_engine_on_padded_passes_is_exact(make_engine, tiny_models, model):
    base = make_engine("ngram", k=4)
    plain = make_engine("ngram", k=0)
    config = base.config
    capacity = config.limits.max_model_len + config.speculation.k_max + 1
    backend = LeanBackend(model, config.limits.max_batch_size, capacity, graphs=MODE)
    target = TargetWorker(config.target, config.limits.max_batch_size, backend.cache.capacity, model=model,
                          backend=backend)
    engine = SpecEngine(config, tokenizer=base.tokenizer, target=target)
    prompts = ["def add(a, b):\n    return", "for i in range(10):\n    print(i)\nfor i in range(10):\n", "import os\n"]
    greedy = SamplingParams(max_tokens=24)
    assert [o.token_ids for o in engine.generate(prompts, greedy)] == \
        [o.token_ids for o in plain.generate(prompts, greedy)]
    assert backend.graphs.replays > 0


@pytest.mark.slow
def test_the_gpu_benchmark_checks_what_it_claims():
    """benchmarks/gpu.py's products and exactness parts, here on the CPU (on a GPU they run there): every
    drafter exact and identical to target-only, and the quantized products near the CPU's."""
    from benchmarks.gpu import main

    result = main(["--device", DEVICE, "--quick", "--parts", "products", "exactness", "--json"])
    assert all(v["int4_rel_err"] < 0.02 and v["fp8_rel_err"] < 0.02 for v in result["products"].values())
    exactness = result["exactness"]
    assert exactness["target_only"]["identical_without_graphs"] and exactness["target_only"]["failed"] == 0
    for name in ("ngram", "model", "quantized_int4", "quantized_fp8"):
        row = exactness[name]
        assert row["exact"] and row["failed"] == 0 and row["positions"] > 0, (name, row)
        assert row["identical_to_target_only"] and row["sampled_identical_to_target_only"], (name, row)
