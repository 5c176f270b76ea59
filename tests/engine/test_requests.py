"""Request handling through the engine API: bad input, stop conditions, streaming, cancel, drafter faults."""

import pytest

from cluster.config import DrafterConfig
from cluster.drafters.base import Drafter
from cluster.core.messages import Proposal
from cluster.engine import SpecEngine
from cluster.types import FinalDelta
from cluster.errors import EngineOverloadedError, InvalidRequestError, UnknownDrafterError
from cluster.types import SamplingParams

PROMPT = "class Parser:\n    def __init__(self, text):\n"


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("model", k=4, draft="draft_noisy", max_model_len=64, max_tokens=100)


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", SamplingParams(max_tokens=4), "prompt"),
        ([], SamplingParams(max_tokens=4), "prompt"),
        ("word " * 200, SamplingParams(max_tokens=4), "prompt"),  # longer than max_model_len
        ([10**9], SamplingParams(max_tokens=4), "prompt"),
        (PROMPT, SamplingParams(max_tokens=0), "max_tokens"),
        (PROMPT, SamplingParams(max_tokens=-3), "max_tokens"),
        (PROMPT, SamplingParams(max_tokens=101), "max_tokens"),
        (PROMPT, SamplingParams(max_tokens=4, temperature=-0.1), "temperature"),
        (PROMPT, SamplingParams(max_tokens=4, temperature=float("nan")), "temperature"),
        (PROMPT, SamplingParams(max_tokens=4, top_p=0.0), "top_p"),
        (PROMPT, SamplingParams(max_tokens=4, top_p=1.5), "top_p"),
        (PROMPT, SamplingParams(max_tokens=4, top_k=-1), "top_k"),
        (PROMPT, SamplingParams(max_tokens=4, seed=-1), "seed"),
        (PROMPT, SamplingParams(max_tokens=4, stop=("",)), "stop"),
    ],
)
def test_bad_input_raises_typed_error_and_engine_stays_usable(engine, prompt, params, field):
    with pytest.raises(InvalidRequestError) as err:
        engine.generate([PROMPT, prompt], [SamplingParams(max_tokens=4), params])
    assert err.value.field == field
    assert not engine.has_unfinished()  # nothing half-queued
    out = engine.generate([PROMPT], SamplingParams(max_tokens=5))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_unknown_drafter_kind():
    with pytest.raises(UnknownDrafterError, match="medusa"):
        DrafterConfig.from_data({"kind": "medusa"}, "drafter")


def test_overload_is_typed(make_engine):
    engine = make_engine("ngram", k=2, max_waiting=2)
    engine.add_request(PROMPT)
    engine.add_request(PROMPT)
    with pytest.raises(EngineOverloadedError):
        engine.add_request(PROMPT)


def test_batch_larger_than_the_queue_is_rejected_whole(make_engine):
    engine = make_engine("ngram", k=2, max_waiting=2)
    with pytest.raises(EngineOverloadedError):
        engine.generate([PROMPT] * 3, SamplingParams(max_tokens=2))
    assert not engine.has_unfinished()  # nothing half-queued
    assert len(engine.generate([PROMPT] * 2, SamplingParams(max_tokens=2))) == 2


def test_generation_stops_exactly_at_context_end(engine):
    no_eos = tuple((e, -100.0) for e in engine.eos_ids)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=100, logit_bias=no_eos))[0]
    assert out.finish_reason == "length"
    assert out.prompt_tokens + len(out.token_ids) == engine.max_model_len


def test_stream_deltas_add_up_to_final_output(engine):
    expected = engine.generate([PROMPT], SamplingParams(max_tokens=20))[0]
    deltas = list(engine.stream(PROMPT, SamplingParams(max_tokens=20)))
    assert isinstance(deltas[-1], FinalDelta) and all(d.finish_reason is None for d in deltas[:-1])
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text == deltas[-1].full_text
    assert len(deltas) > 1


@pytest.fixture(scope="module")
def self_draft(make_engine):
    """Draft = target, K = 4: the first verify pass accepts all 4 drafts (output tokens 1..4) plus a bonus."""
    return make_engine("model", k=4, draft="target", max_model_len=128, max_tokens=100)


def _boundaries(engine, tokens) -> list[int]:
    """Character offset where each output token's text ends."""
    return [len(engine.tokenizer.decode(tokens[:i])) for i in range(len(tokens) + 1)]


def test_stop_string_completing_inside_an_accepted_draft(self_draft):
    full = self_draft.generate([PROMPT], SamplingParams(max_tokens=30))[0]
    ends = _boundaries(self_draft, full.token_ids)
    start = next(i for i in range(1, 4) if ends[i] < ends[i + 1])
    stop = full.text[ends[start]:ends[4]]  # completes with output token 3, mid-pass
    assert full.text.find(stop) == ends[start]
    steps = self_draft.stats.steps
    out = self_draft.generate([PROMPT], SamplingParams(max_tokens=30, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == full.text[: ends[start]]
    assert out.token_ids == full.token_ids[:4]  # the rest of the accepted draft and the bonus are dropped
    assert self_draft.stats.steps - steps == 1  # found inside the first verify pass, which ended the request
    streamed = "".join(d.text for d in self_draft.stream(PROMPT, SamplingParams(max_tokens=30, stop=(stop,))))
    assert streamed == out.text  # a held-back partial stop string is never streamed


def test_several_stop_strings_and_a_long_one(self_draft):
    full = self_draft.generate([PROMPT], SamplingParams(max_tokens=60))[0].text
    a, b = full[20:24], full[9:12]
    assert full.find(b) < full.find(a)
    out = self_draft.generate([PROMPT], SamplingParams(max_tokens=60, stop=(a, b)))[0]
    assert out.text == full[: full.find(b)]  # the earliest wins, whatever the order given
    long = full[10:10 + 80]
    assert len(long) == 80 and full.find(long) == 10
    assert self_draft.generate([PROMPT], SamplingParams(max_tokens=60, stop=(long,)))[0].text == full[:10]


def test_eos_inside_an_accepted_draft_ends_the_request(self_draft):
    """EOS biased up and held off for 3 tokens: the draft proposes it at draft position 3, the target
    accepts it inside the pass, and the tokens after it are dropped."""
    eos = sorted(self_draft.eos_ids)
    params = SamplingParams(max_tokens=30, min_tokens=3, logit_bias=tuple((e, 30.0) for e in eos))
    steps = self_draft.stats.steps
    out = self_draft.generate([PROMPT], params)[0]
    assert out.finish_reason == "eos" and len(out.token_ids) == 4 and out.token_ids[-1] in eos
    assert self_draft.stats.steps - steps == 1


def test_closing_a_stream_cancels_and_frees_caches(engine):
    stream = engine.stream(PROMPT, SamplingParams(max_tokens=50))
    next(stream)
    assert engine.target.backend.cache.occupied == 1
    stream.close()
    assert engine.target.backend.cache.occupied == 0 and engine.drafter.num_sequences == 0
    assert not engine.has_unfinished()


def test_abort_waiting_and_running(engine):
    a = engine.add_request(PROMPT, SamplingParams(max_tokens=50))
    engine.step()
    b = engine.add_request(PROMPT, SamplingParams(max_tokens=50))
    assert engine.abort(b) and engine.abort(a)
    assert not engine.abort("no-such-request")
    assert engine.target.backend.cache.occupied == 0 and not engine.has_unfinished()


class _FlakyDrafter(Drafter):
    """Proposes a few good-looking tokens, then fails every call: stands in for a dead draft worker."""

    def __init__(self, fail_after: int):
        self.calls, self.fail_after = 0, fail_after

    def propose(self, batch):
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("draft worker died")
        return [Proposal.chain([7] * r.budget) for r in batch]


def test_failing_drafter_falls_back_to_exact_target_only(make_engine, caplog):
    base = make_engine("ngram", k=0)
    expected = base.generate([PROMPT, "import os\n"], SamplingParams(max_tokens=24))
    flaky = make_engine("ngram", k=4)
    flaky = SpecEngine(flaky.config, model=flaky.target.backend.model, tokenizer=flaky.tokenizer, drafter=_FlakyDrafter(2))
    outputs = flaky.generate([PROMPT, "import os\n"], SamplingParams(max_tokens=24))
    assert [o.token_ids for o in outputs] == [e.token_ids for e in expected]
    assert not flaky.drafting  # disabled after repeated failures: target-only from then on
    assert flaky.metrics.value("specdec_drafting_enabled") == 0 and flaky.metrics.value("specdec_draft_failures_total") > 0
    assert "drafting disabled" in caplog.text
