"""The one loop (issue 9): keyed randomness makes a seeded request's tokens independent of its batch,
its draft lengths and its drafter; token trees verify exactly; the cost model is measured."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.core.messages import Proposal
from cluster.drafters.base import Drafter
from cluster.engine import SpecEngine
from cluster.types import SamplingParams
from tests.engine.test_sampling_positions import check_positions

PROMPT = "def add(a, b):\n    return"
OTHERS = ["import os\n", "x", "class A:\n", "for i in range(3):\n", "raise ValueError(", "    \"\"\"Return", "y = "]
SAMPLED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234)


@pytest.fixture(scope="module")
def alone(make_engine):
    """The seeded request through target-only decoding: the reference every variant must reproduce."""
    return make_engine("ngram", k=0).generate([PROMPT], SAMPLED)[0].token_ids


@pytest.mark.parametrize("kind, k, adaptive", [("model", 1, False), ("model", 4, False), ("model", 4, True),
                                               ("ngram", 4, False), ("ngram", 4, True)])
def test_a_seeded_request_gives_the_same_tokens_alone_in_a_batch_with_any_k(make_engine, alone, kind, k, adaptive):
    engine = make_engine(kind, k=k, adaptive=adaptive)
    assert engine.generate([PROMPT], SAMPLED)[0].token_ids == alone
    batch = engine.generate([PROMPT] + OTHERS, [SAMPLED] + [SamplingParams(max_tokens=30, temperature=1.0,
                                                                          seed=i) for i in range(7)])
    assert batch[0].token_ids == alone  # 8 in the batch, other seeds and lengths beside it
    assert engine.stats.drafted > 0


def test_the_rejection_rule_is_reproducible_for_a_fixed_k(make_engine):
    a = make_engine("model", k=3, rule="rejection")
    b = make_engine("model", k=3, rule="rejection")
    alone = a.generate([PROMPT], SAMPLED)[0].token_ids
    assert b.generate([PROMPT] + OTHERS, [SAMPLED] + [SamplingParams(max_tokens=8)] * 7)[0].token_ids == alone


class TreeDrafter(Drafter):
    """Two branches per request from the noisy draft model: its top-2 first tokens, each continued by the
    draft's greedy choice. Identical siblings are merged; q is the draft's distribution (rejection rule)."""

    name = "model"

    def __init__(self, inner):
        self.inner = inner

    def propose(self, batch):
        model, out = self.inner.backend.model, [None] * len(batch)
        by_length: dict[int, list[int]] = {}  # requests of one length run as one batch (no padding)
        for i, r in enumerate(batch):
            by_length.setdefault(len(r.tokens), []).append(i)
        for rows in by_length.values():
            ids = torch.tensor([batch[i].tokens for i in rows])
            with torch.inference_mode():
                firsts = model(ids).logits[:, -1].topk(2).indices  # [G, 2]
                longer = torch.cat([ids.repeat_interleave(2, 0), firsts.reshape(-1, 1)], 1)
                nexts = model(longer).logits[:, -1].argmax(-1).view(-1, 2)
            for g, i in enumerate(rows):
                tokens, parents = [], []
                for first, nxt in zip(firsts[g].tolist(), nexts[g].tolist()):
                    tokens += [first, nxt]
                    parents += [-1, len(tokens) - 2]  # the second token's parent: the first
                out[i] = Proposal(tokens[: batch[i].budget], parents[: batch[i].budget])
        return out


@pytest.fixture(scope="module")
def tree_engine(make_engine):
    base = make_engine("model", k=4, draft="draft_noisy", max_batch_size=64, max_waiting=5000)
    return SpecEngine(base.config, tokenizer=base.tokenizer, target=base.target,
                      drafter=TreeDrafter(base.drafter.drafter))


def test_tree_proposals_are_exact_greedy(tree_engine, make_engine):
    prompts = [PROMPT] + OTHERS
    expected = make_engine("ngram", k=0).generate(prompts, SamplingParams(max_tokens=20))
    outputs = tree_engine.generate(prompts, SamplingParams(max_tokens=20))
    assert [o.token_ids for o in outputs] == [e.token_ids for e in expected]
    assert tree_engine.stats.accepted > 0  # branches were taken


def test_tree_proposals_reproduce_seeded_sampling(tree_engine, alone):
    assert tree_engine.generate([PROMPT], SAMPLED)[0].token_ids == alone


def _deferring(engine, drafter=None) -> SpecEngine:
    """The same target and drafter with each prompt fed in its request's first verify pass."""
    config = replace(engine.config, speculation=replace(engine.config.speculation, defer_prefill=True))
    return SpecEngine(config, tokenizer=engine.tokenizer, target=engine.target,
                      drafter=drafter or engine.drafter.drafter)


@pytest.mark.parametrize("kind", ["ngram", "model", "tree"])
def test_a_deferred_prefill_is_exact_and_runs_no_pass_of_its_own(make_engine, kind):
    prompts = [PROMPT] + OTHERS
    expected = [o.token_ids for o in make_engine("ngram", k=0).generate(prompts, SamplingParams(max_tokens=20))]
    # The model drafter is the target itself: its first draft, from the prompt alone, is always accepted.
    plain = make_engine("ngram" if kind == "ngram" else "model", k=4,
                        draft="target" if kind == "model" else "draft_noisy")
    deferring = _deferring(plain, TreeDrafter(plain.drafter.drafter) if kind == "tree" else None)
    backend = plain.target.backend  # shared by both engines
    fed, forward = [0], backend.forward

    def counting(rows, *args, **kwargs):
        fed[0] += sum(len(r.tokens) for r in rows)
        return forward(rows, *args, **kwargs)

    backend.forward = counting
    prompt_tokens = sum(len(plain.tokenizer.encode(p)) for p in prompts)
    for engine in (plain, deferring):
        passes, fed[0] = engine.target.passes, 0
        for prompt, want in zip(prompts, expected):  # one at a time: each pass is one request's
            assert engine.generate([prompt], SamplingParams(max_tokens=20))[0].token_ids == want
        engine.ran = engine.target.passes - passes
        # Every token fed once: the prompts, then the pending token and the proposal each pass (a deferred
        # prompt's last token is its first pass's pending one). A cache cut back too far is fed again.
        s = engine.stats
        assert fed[0] == prompt_tokens + s.drafted + s.steps - (len(prompts) if engine is deferring else 0)
    assert deferring.stats.accepted > 0
    assert deferring.ran == deferring.stats.steps  # verify passes only: the prompts rode in them
    assert plain.ran == plain.stats.steps + len(prompts)  # a prefill pass each
    # A first draft the target accepts saves the pass (the target drafting for itself: every request's);
    # prompt lookup finds nothing at these prompts' ends.
    assert {"ngram": deferring.ran == plain.ran, "model": deferring.ran == plain.ran - len(prompts),
            "tree": deferring.ran < plain.ran}[kind], (deferring.ran, plain.ran)
    batch = deferring.generate(prompts, SamplingParams(max_tokens=20))  # admitted together, verified together
    assert [o.token_ids for o in batch] == expected


def test_a_deferred_prefill_keeps_seeded_sampling(make_engine, alone):
    engine = _deferring(make_engine("model", k=4))
    assert engine.generate([PROMPT], SAMPLED)[0].token_ids == alone
    batch = engine.generate([PROMPT] + OTHERS, [SAMPLED] + [SamplingParams(max_tokens=30, temperature=1.0, seed=i)
                                                          for i in range(7)])
    assert batch[0].token_ids == alone


def test_a_deferred_prefill_is_refused_where_it_cannot_be_honoured(make_engine, tiny_models):
    from cluster.config import DrafterConfig
    from cluster.drafters.configs import HeadsConfig
    from cluster.errors import ConfigError

    engine = make_engine("ngram", k=4)
    config = replace(engine.config, speculation=replace(engine.config.speculation, defer_prefill=True))
    heads = replace(config, drafter=DrafterConfig("heads", {"heads": HeadsConfig(path="unused")}))
    with pytest.raises(ConfigError, match="defer_prefill.*hidden state"):
        heads.validate(check_paths=False)


def _beside(engine, defer: bool = False) -> SpecEngine:
    """The same target and drafter, drafting the next proposal on a thread beside each verify."""
    config = replace(engine.config, cluster=replace(engine.config.cluster, pipelining="continue"),
                     speculation=replace(engine.config.speculation, defer_prefill=defer))
    return SpecEngine(config, tokenizer=engine.tokenizer, target=engine.target, drafter=engine.drafter.drafter)


@pytest.mark.parametrize("defer", [False, True])
def test_drafting_beside_the_verify_in_one_process_is_exact_and_its_drafts_are_used(make_engine, alone, defer):
    """pipelining: continue in one process: while the target verifies a request's proposal, the drafter
    drafts on from its end on a thread. A request holding none drafts now (its pass carries nothing else)
    and drafts on from that draft. With the target as its own drafter every continuation holds, so after
    a request's first draft it never waits for one again."""
    prompts = [PROMPT] + OTHERS
    expected = [o.token_ids for o in make_engine("ngram", k=0).generate(prompts, SamplingParams(max_tokens=20))]
    plain = make_engine("model", k=4, draft="target")
    engine = _beside(plain, defer)
    assert engine.executor.overlaps and not plain.executor.overlaps
    waited = []
    propose = engine.drafter.propose

    def counting(tasks):
        waited.extend(t.seq_id for t in tasks if t.now)
        return propose(tasks)

    engine.drafter.propose = counting
    passes = engine.target.passes
    for prompt, want in zip(prompts, expected):  # one at a time: a lone request's pass is all its own
        assert engine.generate([prompt], SamplingParams(max_tokens=20))[0].token_ids == want
    used = engine.metrics.value("specdec_continued_drafts_total", outcome="used")
    assert engine.pipelined_steps == engine.stats.steps and used > 0
    assert len(waited) + used == engine.stats.steps  # every verify had a draft: made now, or beside the last one
    assert len(waited) < engine.stats.steps / 2  # most were made beside a verify
    if defer:  # the prompts rode in the verify passes: no pass of their own
        assert engine.target.passes - passes == engine.stats.steps
    batch = engine.generate(prompts, SamplingParams(max_tokens=20))  # held and fresh requests side by side
    assert [o.token_ids for o in batch] == expected
    noisy = _beside(make_engine("model", k=4), defer)  # continuations that miss: drafted now again
    bare, verify = [], noisy.target.verify_timed

    def recording(tasks):
        bare.extend(t.seq_id for t in tasks if not t.proposal)
        return verify(tasks)

    noisy.target.verify_timed = recording
    assert noisy.generate([PROMPT], SAMPLED)[0].token_ids == alone
    for prompt, want in zip(prompts, expected):
        assert noisy.generate([prompt], SamplingParams(max_tokens=20))[0].token_ids == want
    assert noisy.metrics.value("specdec_continued_drafts_total", outcome="dropped") > 0
    # alone in its pass, a request never spends it on one token (but where it may emit only one more)
    assert len(bare) <= len(prompts) + 1


@pytest.mark.slow
def test_tree_proposals_keep_the_distribution_at_every_position(tree_engine, tiny_models):
    hf_target = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()
    pvalues = check_positions(tree_engine, tree_engine.tokenizer, hf_target, dict(temperature=1.0), seeds=range(2500))
    assert (pvalues > 1e-4).all(), pvalues


def test_predicted_step_times_are_measured(make_engine):
    engine = make_engine("model", k=4, adaptive=True, max_batch_size=8)
    engine.generate([PROMPT] + OTHERS, SamplingParams(max_tokens=40))
    assert engine.metrics.value("specdec_step_predicted_seconds_count") > 10
    assert engine.metrics.value("specdec_step_measured_seconds_count") >= engine.metrics.value(
        "specdec_step_predicted_seconds_count")
    assert 0 <= engine.step_time_error() < 1.0


def test_the_engine_learns_a_drafters_prompt_read_apart_from_its_draft_cost(make_engine):
    engine = make_engine("model", k=4, adaptive=True, max_batch_size=8)  # adaptive: the cost model is built
    engine.scheduler.config.adaptive = False  # but K stays 4, so every step drafts whatever the timings say
    cost = engine.scheduler.cost
    assert cost.draft_read_rate is None and cost.draft.seen == 0
    # Prompts long enough that reading them outweighs a draft's prior cost, which the engine takes off a
    # reading call's time (with the one-line prompts the remainder fell below zero on a slower run: unlearned).
    prompts = [(p + "\n") * 12 for p in [PROMPT] + OTHERS]
    engine.generate(prompts, SamplingParams(max_tokens=12))
    assert cost.draft_read_rate is not None and cost.draft_read_rate > 0  # the first calls read the prompts
    assert cost.draft.seen > 0  # the later ones drafted from synced drafters


def test_verdicts_carry_the_hidden_state_behind_the_next_token(tiny_models):
    """Prefill and verify return, when asked, the target's last hidden state at the position whose logits
    chose the emitted token (prompt end; end of the accepted path): what parallel heads draft from."""
    from cluster.config import ModelConfig
    from cluster.core.messages import Prefill, VerifyTask
    from cluster.workers.target_worker import TargetWorker

    hf = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()
    worker = TargetWorker(ModelConfig(str(tiny_models["target"]), dtype="float32"), 2, 128)
    prompt = list(range(20, 30))
    (first,) = worker.prefill([Prefill("r", "target-0", prompt, len(prompt), SamplingParams(), 0, want_hidden=True)])

    def hidden_at(tokens, position):
        with torch.no_grad():
            return hf.model(torch.tensor([tokens])).last_hidden_state[0, position]

    assert torch.allclose(first.hidden, hidden_at(prompt, -1), atol=1e-4)
    with torch.no_grad():  # the target's own next two tokens, then one it would not choose
        greedy = hf.generate(torch.tensor([prompt + [first.token]]), max_new_tokens=2, do_sample=False)[0].tolist()
    draft = greedy[len(prompt) + 1:] + [(greedy[-1] + 1) % 384]
    (v,) = worker.verify([VerifyTask("r", "target-0", Proposal.chain(draft), want_hidden=True)])
    assert v.accepted == 2 and v.hidden.shape == (hf.config.hidden_size,)
    sequence = prompt + [first.token] + draft[:2]  # the last of these is where v.token was chosen
    assert torch.allclose(v.hidden, hidden_at(sequence, -1), atol=1e-4)
    (plain,) = worker.verify([VerifyTask("r", "target-0", Proposal())])
    assert plain.hidden is None  # only when asked
