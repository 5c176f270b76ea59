"""MEGABYTE (issue 13) on tiny random weights: caches at both levels, rollback, loading, the byte codec,
speculative patches, and the training script end to end."""

import random

import pytest
import torch

from cluster.config import DrafterConfig, EngineConfig, ModelConfig, SpeculationConfig
from cluster.core.messages import Proposal
from cluster.engine import SpecEngine
from cluster.models.backend import Row
from cluster.models.loader import build_backend, load_model, load_tokenizer
from cluster.models.megabyte import ByteTokenizer, MegabyteConfig, MegabyteForCausalLM, save_byte_tokenizer
from cluster.text import TextStream
from cluster.types import SamplingParams, TokenDelta

PROMPTS = ["def f(x):\n    return x", "ab", "hello hello hello hello", "x = [1, 2, 3]\ny = [1, 2, 3]\nz = ["]


@pytest.fixture(scope="module")
def tiny_megabyte(tmp_path_factory):
    torch.manual_seed(0)
    cfg = MegabyteConfig(patch_size=4, global_dim=64, global_layers=2, global_heads=2, local_dim=32, local_layers=1,
                         local_heads=2, max_patches=64)
    model = MegabyteForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked logits: few near-ties, so greedy comparisons are meaningful
        model.head.weight.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("megabyte")
    model.save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def _engine(path, k: int, rule: str = "coupled", kind: str = "ngram") -> SpecEngine:
    config = EngineConfig(target=ModelConfig(str(path), dtype="float32"), drafter=DrafterConfig(kind),
                          speculation=SpeculationConfig(k=k, k_max=8, adaptive=False, rule=rule))
    config.limits.max_model_len = 256
    return SpecEngine(config.validate())


def test_it_loads_through_from_pretrained_with_its_byte_tokenizer(tiny_megabyte):
    model = load_model(ModelConfig(str(tiny_megabyte), dtype="float32"))
    assert isinstance(model, MegabyteForCausalLM)
    tok = load_tokenizer(ModelConfig(str(tiny_megabyte)))
    assert isinstance(tok, ByteTokenizer) and tok.encode("ab") == [ord("a") + 3, ord("b") + 3]  # nothing appended
    assert build_backend(model, None, 2, 128).name == "megabyte"


def test_cached_passes_equal_the_teacher_forced_model_at_every_byte(tiny_megabyte):
    """Ragged passes across patch boundaries, with rollbacks to arbitrary bytes, give the logits a full
    recompute gives (the global cache keeps only complete patches below the new length)."""
    model = load_model(ModelConfig(str(tiny_megabyte), dtype="float32"))
    backend = build_backend(model, None, 2, 256)
    rng = random.Random(0)
    slots = [backend.cache.allocate(), backend.cache.allocate()]
    seqs = {s: [] for s in slots}
    for step in range(30):
        rows = []
        for s in slots:
            if step and rng.random() < 0.3:  # roll back to any byte
                keep = rng.randint(1, len(seqs[s]))
                backend.commit(s, 0, list(range(keep)))
                seqs[s] = seqs[s][:keep]
            rows.append(Row(s, [rng.randrange(3, 259) for _ in range(rng.randint(1, 9))]))
        out = backend.forward(rows).logits
        for i, (s, r) in enumerate(zip(slots, rows)):
            seqs[s] += r.tokens
            with torch.no_grad():
                reference = model(torch.tensor([seqs[s]])).logits[0, -len(r.tokens):]
            assert torch.allclose(out[i, : len(r.tokens)], reference, atol=1e-4), (step, s)


@pytest.mark.parametrize("k", [0, 4])
def test_generation_equals_recompute_per_byte(tiny_megabyte, k):
    """Cached decoding (k = 0) and speculative patches (prompt lookup over bytes, verified by one global
    pass over the drafted patches and a teacher-forced local pass) both give the recompute-per-byte
    greedy output."""
    engine = _engine(tiny_megabyte, k)
    model = engine.target.backend.model
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=48))
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == model.generate_recompute(engine.tokenizer.encode(prompt), 48)[: len(out.token_ids)]
        assert len(out.token_ids) == 48 or out.finish_reason == "eos"
    if k:
        assert engine.stats.drafted > 0


def test_seeded_sampling_is_the_same_with_and_without_speculative_patches(tiny_megabyte):
    params = [SamplingParams(max_tokens=40, temperature=0.8, seed=i) for i in range(len(PROMPTS))]
    plain = [o.token_ids for o in _engine(tiny_megabyte, 0).generate(PROMPTS, params)]
    assert [o.token_ids for o in _engine(tiny_megabyte, 4).generate(PROMPTS, params)] == plain


def test_tree_drafts_are_refused_clearly(tiny_megabyte):
    backend = _engine(tiny_megabyte, 0).target.backend
    slot = backend.cache.allocate()
    with pytest.raises(ValueError, match="chains only"):
        backend.forward([Row(slot, [5, 6, 7], parents=[-1, 0, 0])])


def test_a_tree_drafter_verifies_its_first_branch_on_megabyte(tiny_megabyte):
    """The suffix drafter proposes trees; the target worker checks their first branch on a chains-only
    backend (it used to fail every request), exact greedy and seeded-sampled."""
    assert Proposal([5, 6, 7, 8], [-1, 0, 0, 1]).first_branch().tokens == [5, 6, 8]
    prompts = [p * 3 for p in PROMPTS]  # repetition, so the suffix drafter finds matches
    for params in (SamplingParams(max_tokens=40), SamplingParams(max_tokens=40, temperature=0.8, seed=3)):
        plain = [o.token_ids for o in _engine(tiny_megabyte, 0).generate(prompts, params)]
        engine = _engine(tiny_megabyte, 4, kind="suffix")
        outputs = engine.generate(prompts, params)
        assert [o.token_ids for o in outputs] == plain and all(o.finish_reason != "error" for o in outputs)
        assert engine.stats.drafted > 0


def test_the_byte_codec_round_trips_utf8_and_streams_whole_characters():
    tok = ByteTokenizer()
    rng = random.Random(1)
    alphabet = "aZ09 \n\t" + "éß€漢字🙂Ω" + "\u0301"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tok.encode(text)
        assert tok.decode(ids) == text and len(ids) == len(text.encode())
        stream = TextStream(tok, "r", SamplingParams(max_tokens=100), 0, 0)
        pieces = []
        cut = 0
        while cut < len(ids):  # deltas of 1-3 bytes: characters are split across deltas, never across pieces
            step = rng.randint(1, 3)
            done = cut + step >= len(ids)
            delta = stream.feed(TokenDelta("r", ids[cut: cut + step], None, "length" if done else None))
            pieces.append(delta.text)
            cut += step
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_the_training_script_runs_end_to_end(tmp_path):
    from tools.train_megabyte import main

    out, base = tmp_path / "mb", tmp_path / "gpt"
    result = main(["--model", "both", "--out", str(out), "--baseline-out", str(base), "--minutes", "5",
                   "--max-steps", "4", "--context", "64", "--batch", "2", "--patch", "4", "--global-dim", "32",
                   "--global-layers", "1", "--local-dim", "16", "--local-layers", "1", "--baseline-dim", "32",
                   "--baseline-layers", "1", "--held-out-windows", "4", "--eval-every", "2", "--limit-bytes", "20000"])
    for name, path in (("megabyte", out), ("baseline", base)):
        assert result[name]["steps"] == 4 and 0 < result[name]["bits_per_byte"] < 12
        assert (path / "train_record.json").is_file() and (path / "tokenizer_config.json").is_file()
    assert isinstance(load_model(ModelConfig(str(out), dtype="float32")), MegabyteForCausalLM)


def test_two_tiers_in_process_equal_plain_megabyte(tiny_megabyte):
    """The local model drafting each patch from the target's conditioning (the two-tier split, here in
    one process) gives plain MEGABYTE's output, greedy and seeded, with (nearly) every draft accepted."""
    config = EngineConfig(target=ModelConfig(str(tiny_megabyte), dtype="float32"),
                          drafter=DrafterConfig("megabyte_local"), speculation=SpeculationConfig(k=8, k_max=8, adaptive=False))
    config.limits.max_model_len = 256
    tiers = SpecEngine(config.validate())
    plain = _engine(tiny_megabyte, 0)
    greedy = SamplingParams(max_tokens=40)
    assert [o.token_ids for o in tiers.generate(PROMPTS, greedy)] == [o.token_ids for o in plain.generate(PROMPTS, greedy)]
    assert tiers.stats.drafted > 0 and tiers.stats.accepted >= 0.95 * tiers.stats.drafted
    patch = tiers.target.backend.config.patch_size
    assert tiers.stats.steps <= sum(-(-40 // patch) + 1 for _ in PROMPTS) + len(PROMPTS)  # about one pass per patch
    sampled = [SamplingParams(max_tokens=40, temperature=0.9, seed=i) for i in range(len(PROMPTS))]
    assert [o.token_ids for o in tiers.generate(PROMPTS, sampled)] == \
        [o.token_ids for o in plain.generate(PROMPTS, sampled)]
