"""Show that tests fail when their claim is false: copy the project, break one thing in the copy
(a literal source edit), run the tests that claim it, and report whether they failed.

    python -m tools.break_tests [NAME ...] [--list] [--json]

Each breakage names the file, the text replaced and the tests that must fail. A breakage whose tests
still pass is a test that cannot fail: the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Breakage:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BREAKAGES = [
    Breakage("residual-5pct-wrong", "the residual's mass 5% wrong: 0.95 r + 0.05 uniform over p's support",
             "cluster/sampling/acceptance.py",
             "        residual = torch.where(has_mass, residual, dist)\n",
             "        residual = torch.where(has_mass, residual, dist)\n"
             "        residual = 0.95 * residual / residual.sum(-1, keepdim=True) + 0.05 * (dist > 0).float() / "
             "(dist > 0).float().sum(-1, keepdim=True)\n",
             ("tests/unit/test_acceptance.py::test_output_is_distributed_as_target_at_every_position",
              "tests/engine/test_sampling_positions.py::test_the_rejection_rule_follows_the_target_at_every_position"
              "[model-t1]")),
    Breakage("bonus-from-residual", "a fully accepted draft treated as rejected: the bonus comes from the residual",
             "cluster/sampling/acceptance.py",
             "    rejected = num_accepted < num_draft\n",
             "    rejected = (num_accepted < num_draft) | (num_draft > 0)\n",
             # Only the unit test: through the engine, q is zero past the draft, so the "residual" at the bonus
             # position is p itself and this breakage changes nothing there (measured: the engine test passes).
             ("tests/unit/test_acceptance.py::test_output_is_distributed_as_target_at_every_position",)),
    Breakage("q-shifted", "the target reads q one position late (q misaligned at draft positions >= 2)",
             "cluster/workers/target_worker.py",
             "                q[r, :k] = p.q[:k] if p.q is not None else",
             "                q[r, :k] = p.q[:k].roll(1, 0) if p.q is not None else",
             ("tests/engine/test_sampling_positions.py::test_the_rejection_rule_follows_the_target_at_every_position"
              "[model-t1]",)),
    Breakage("shared-draft-rng", "the draft samples x ~ q with the target's acceptance uniform (same key)",
             "cluster/sampling/acceptance.py",
             "    return keyed_choices(q, seeds, positions, rule, keyed.DRAFT)\n",
             "    return keyed_choices(q, seeds, positions, rule, keyed.ACCEPT)\n",
             ("tests/unit/test_tree_rules.py::test_drafter_and_target_draws_composed_through_their_real_keys_keep_p"
              "[rejection]",)),
    Breakage("no-pipelining", "the router never pipelines", "cluster/core/scheduler.py",
             '        if self.pipelining == "off" or not any(s.drafter is not None and self.cap(s) for s in decode):\n',
             "        if True:\n",
             ("tests/cluster/test_router.py::test_pipelining_overlaps_drafting_with_verification",)),
    Breakage("abort-noop", "abort() finds the request but does not finish it", "cluster/engine.py",
             "                seq.finish_reason = reason\n                self._retire()\n                return seq\n",
             "                return seq\n",
             ("tests/cluster/test_router.py::test_abort_stops_a_request_at_once",
              "tests/api/test_grpc.py::test_cancelled_stream_stops_generation_and_frees_caches")),
    Breakage("close-noop", "closing a stream (client gone, deadline) does not cancel the request",
             "cluster/serving/driver.py",
             "            self._done = True\n            self.driver.cancel(self.request_id)\n",
             "            self._done = True\n",
             ("tests/api/test_grpc.py::test_deadline_stops_generation",
              "tests/api/test_grpc.py::test_cancelled_stream_stops_generation_and_frees_caches")),
    Breakage("verify-not-counted", "verify passes are not recorded in the metrics", "cluster/metrics.py",
             "        d, a, v = (m.labels(self.drafter) for m in (self.drafted, self.accepted, self.verifies))\n",
             "        return\n        d, a, v = (m.labels(self.drafter) for m in (self.drafted, self.accepted, self.verifies))\n",
             ("tests/cluster/test_router.py::test_metrics_report_a_known_workload",
              "tests/api/test_hardening.py::test_metrics_endpoint_reports_a_known_workload")),
    Breakage("resources-ignored", "actors are placed without their custom resources", "cluster/workers/actors.py",
             "    if pool.resources:\n", "    if False:\n",
             ("tests/cluster/test_placement.py::test_actor_without_matching_node_stays_pending",
              "tests/cluster/test_placement.py::test_drafts_and_targets_land_on_their_own_nodes")),
    Breakage("shortest-suffix-first", "prompt lookup tries the shortest suffix first", "cluster/drafters/ngram.py",
             "        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):\n",
             "        for n in range(self.ngram_min, min(self.ngram_max, len(tokens) - 1) + 1):\n",
             ("tests/unit/test_small_pure.py::test_lookup_continues_latest_match_of_longest_suffix",)),
    Breakage("crd-typo", "a misspelled key in the RayService (rayStartParamz)", "k8s/rayservice.yaml",
             "      rayStartParams:\n", "      rayStartParamz:\n",
             ("tests/k8s/test_manifests.py::test_rayservice_matches_the_kuberay_crd_schema",)),
    Breakage("penalty-history-stale", "penalties at draft positions ignore the draft tokens before them",
             "cluster/sampling/logits.py",
             "            history.advance(steps[:, t])\n", "            pass\n",
             ("tests/engine/test_sampling_params.py",)),
    Breakage("stop-not-cut", "text is not cut at a stop string found mid-pass", "cluster/text.py",
             "        self.text = self.text[:at]\n", "",
             ("tests/engine/test_requests.py::test_stop_string_completing_inside_an_accepted_draft",)),
    Breakage("eos-not-held-off", "min_tokens does not hold EOS off", "cluster/sampling/logits.py",
             "        if len(self.suppress) and self.holds_off:\n", "        if False:\n",
             ("tests/engine/test_sampling_params.py::test_min_tokens_holds_off_eos",
              "tests/engine/test_requests.py::test_eos_inside_an_accepted_draft_ends_the_request")),
    Breakage("failure-not-isolated", "a failing sequence fails its whole batch", "cluster/workers/isolation.py",
             "        if len(items) == 1:\n", "        if True:\n",
             ("tests/api/test_hardening.py::test_a_request_failing_inside_the_server_fails_alone",)),
    Breakage("tiny-temperature-nan", "temperatures below 1e-5 are not made greedy", "cluster/types.py",
             "            temperature=0.0 if self.temperature < SAMPLING_EPS else float(self.temperature),\n",
             "            temperature=float(self.temperature),\n",
             ("tests/api/test_hardening.py::test_tiny_temperature_is_greedy",)),
    Breakage("bias-rounded-twice", "small-batch products add the bias after rounding (Qwen2's large k biases)",
             "cluster/models/lean.py",
             "    if b is not None or n > MANY_BATCH:\n        return F.linear(x, w, b)\n",
             "    if b is not None and n <= SMALL_BATCH:\n        return (torch.mm(w, x.t().contiguous()) + b.unsqueeze(1)).t()\n"
             "    if b is not None or n > MANY_BATCH:\n        return F.linear(x, w, b)\n",
             ("tests/engine/test_backends.py::test_small_batch_products_round_a_large_bias_once",)),
    Breakage("native-truncates", "the native bf16 products truncate their fp32 sums instead of rounding to nearest",
             "cluster/models/bf16_kernels.c",
             "    u += 0x7FFF + ((u >> 16) & 1);  /* round to nearest even (no NaNs reach here) */\n",
             "",
             ("tests/engine/test_backends.py::test_native_products_equal_linear_on_every_shape_they_take",)),
    Breakage("native-attention-unmasked", "the native attention reads every key of a row's blocks, stale ones and "
             "other branches of a tree included", "cluster/models/bf16_kernels.c",
             "                if (!m[b * bs + i]) { sc[i] = -INFINITY; continue; }\n",
             "",
             ("tests/engine/test_backends.py::test_native_attention_is_attention_over_the_paged_pool",
              "tests/engine/test_backends.py::test_lean_logits_equal_eager_for_ragged_batches_trees_and_rollback")),
    Breakage("lease-ignores-held", "the pool manager reserves only what it offered, not what a router still honours",
             "cluster/pools/manager.py",
             "        reserved = sum(max(s.offers.get(worker, 0), s.report.held.get(worker, 0), s.report.usage.get(worker, 0))\n",
             "        reserved = sum(max(s.offers.get(worker, 0), 0)\n",
             ("tests/unit/test_pool_policy.py::test_routers_admitting_on_their_leases_never_over_commit_a_worker",)),
    Breakage("offload-cache-not-copied", "the offloaded target computes over its staging buffer without the cached rows",
             "cluster/models/offload.py",
             "        if not (self.filled[layer] and self.capacity):\n            return\n", "        return\n",
             ("tests/engine/test_offload.py::test_offloaded_logits_equal_in_memory_for_ragged_batches_trees_and_rollback[window-3-layers]",
              "tests/engine/test_offload.py::test_offloaded_logits_equal_in_memory_for_ragged_batches_trees_and_rollback[fixed-3-layers]")),
    Breakage("continuation-trusts-its-guess", "a continued draft becomes the next proposal without checking its guess",
             "cluster/core/messages.py",
             "    if tokens[task.start:end] != task.new_tokens or tokens[end] != proposal.tokens[0]:\n",
             "    if tokens[task.start:end] != task.new_tokens:\n",
             ("tests/unit/test_cost_model.py::test_a_continuation_holds_only_on_the_tokens_it_assumed",)),
    Breakage("in-flight-drafts-ignored", "a request whose draft is still running is drafted again",
             "cluster/core/scheduler.py",
             "        coming = [s for s in decode if s.proposal is None and s.request_id in in_flight]\n",
             "        coming, in_flight = [], ()\n",
             ("tests/unit/test_cost_model.py::test_a_draft_still_in_flight_is_verified_when_it_lands_never_drafted_again",)),
    Breakage("prompt-read-free", "a drafter's first read of its prompt is priced at nothing",
             "cluster/core/cost_model.py",
             "        return saved * remaining > self.draft_read_rate * read_tokens\n",
             "        return True\n",
             ("tests/unit/test_cost_model.py::test_drafters_start_reading_prompts_only_where_the_read_pays_back",)),
    Breakage("fallback-asked-everywhere", "a multi drafter's fallback member drafts every request, not only "
             "where the others found little", "cluster/drafters/multi.py",
             "        short = [i for i in range(len(batch)) if max(len(p[i]) for p in by_member.values()) < self.fallback_below]\n",
             "        short = list(range(len(batch)))\n",
             ("tests/engine/test_drafters.py::test_a_fallback_member_is_asked_only_where_the_others_found_little",)),
    Breakage("int4-draft-outside-budget", "an offloaded target's int4 draft takes its bytes without shrinking the cache",
             "cluster/models/offload.py",
             "                target.reserve(self.nbytes, f\"the int4 draft FFN (group {group})\")\n", "",
             ("tests/engine/test_offload.py::test_an_int4_draft_takes_its_bytes_from_the_budget_and_leaves_the_target_"
              "exact", "tests/engine/test_offload.py::test_a_budget_with_no_room_for_an_int4_draft_is_refused")),
    Breakage("int4-zero-dropped", "the native int4 products leave out each group's zero point",
             "cluster/models/bf16_kernels.c",
             "            c0 = _mm512_fmadd_ps(m, _mm512_loadu_ps(xs + t0 * groups + g), c0);\n", "",
             ("tests/unit/test_int4.py",)),
    Breakage("graph-padding-kept", "a graphed pass keeps the blocks its padding tokens reserved",
             "cluster/models/cuda_graphs.py",
             "            cache.truncate(r.slot, cache.lengths[r.slot])\n", "            pass\n",
             ("tests/engine/test_cuda_graphs.py::test_padded_passes_equal_eager_ones",)),
    Breakage("quantized-prompt-int4", "a copy cast from a target in its process reads prompts with int4 weights",
             "cluster/models/quantized.py",
             "        backend.dense = shared, source.get_output_embeddings().weight\n", "        pass\n",
             ("tests/unit/test_quantized.py::test_a_copy_of_a_target_in_process_reads_prompts_with_the_targets_"
              "weights",)),
    Breakage("heads-tree-unranked", "a heads tree takes its nodes in the order they were grown, not best first",
             "cluster/drafters/heads.py",
             "    order = sorted(range(len(nodes)), key=lambda n: (-nodes[n][0], nodes[n][1]))[:budget]\n",
             "    order = list(range(len(nodes)))[:budget]\n",
             ("tests/engine/test_drafters.py::test_a_heads_tree_is_its_best_nodes_parents_first",)),
    Breakage("deferred-prompt-dropped", "a deferred prefill's verify commits from where the prompt began: its "
             "keys are cut, and fed again next pass", "cluster/workers/target_worker.py",
             "            self.backend.commit(s.slot, start + skip[row], keep)",
             "            self.backend.commit(s.slot, start, keep)",
             ("tests/engine/test_core_loop.py::test_a_deferred_prefill_is_exact_and_runs_no_pass_of_its_own",)),
    Breakage("continuation-without-its-draft", "a continuation of a draft made now drafts on from before that "
             "draft: its node 0 guesses the wrong position, so it is never used", "cluster/executors/base.py",
             "            out.append(replace(task, new_tokens=task.new_tokens + drafted.tokens, after_draft=False))",
             "            out.append(replace(task, after_draft=False))",
             ("tests/engine/test_core_loop.py::"
              "test_drafting_beside_the_verify_in_one_process_is_exact_and_its_drafts_are_used",
              "tests/unit/test_cost_model.py::test_a_continuation_of_a_draft_made_now_takes_its_tokens_or_is_dropped")),
    Breakage("lone-request-verified-bare", "under continue with a fixed K, a lone request that holds no proposal "
             "is verified with none (one token for a whole pass) instead of drafting now", "cluster/core/scheduler.py",
             "(s.deferred or fixed and not (held or coming))]",
             "(s.deferred)]",
             ("tests/engine/test_core_loop.py::"
              "test_drafting_beside_the_verify_in_one_process_is_exact_and_its_drafts_are_used",
              "tests/unit/test_cost_model.py::test_continue_mode_drafts_on_from_held_proposals")),
    Breakage("approximate-offload-rereads-the-cache", "the paper's approximate inference reads every predicted "
             "neuron from storage, the ones its DRAM cache holds too", "cluster/models/approx_offload.py",
             "need = keep & ~cache.cached[li] if", "need = keep if",
             ("tests/engine/test_offload.py::test_the_papers_approximate_offload_reads_only_predicted_uncached_rows"
              "_and_is_exact_only_when_dense",)),
]


_ANYWHERE = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.egg-info")


def _skipped(directory: str, names: list[str]) -> set[str]:
    """What the copy leaves out: the environment, fetched weights and git at the top (cluster/models is
    source: a bare "models" pattern once left it out, and its breakages could not run), caches anywhere."""
    top = {".venv", "models", ".git"} if Path(directory) == ROOT else set()
    return set(_ANYWHERE(directory, names)) | (top & set(names))


def run(breakage: Breakage, python: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"break-{breakage.name}-") as tmp:
        copy = Path(tmp) / "project"
        shutil.copytree(ROOT, copy, ignore=_skipped)
        target = copy / breakage.path
        text = target.read_text()
        if breakage.old not in text:
            return {"name": breakage.name, "error": f"{breakage.path} no longer contains the text to break"}
        target.write_text(text.replace(breakage.old, breakage.new, 1))
        outcomes = []
        for test in breakage.tests:  # each on its own: every test named must fail by itself
            start = time.perf_counter()
            # -p no:cacheprovider: nothing is written back; the copy's own packages shadow the installed ones.
            result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no", test],
                                    cwd=copy, capture_output=True, text=True)
            last = (result.stdout.strip().splitlines() or [""])[-1]
            outcomes.append({"test": test, "failed": result.returncode == 1, "summary": last,
                             "seconds": round(time.perf_counter() - start, 1)})
        return {"name": breakage.name, "what": breakage.what, "tests": outcomes,
                "failed": all(o["failed"] for o in outcomes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    chosen = [b for b in BREAKAGES if not args.names or b.name in args.names]
    if args.list:
        for b in chosen:
            print(f"{b.name}: {b.what} -> {', '.join(b.tests)}")
        return 0
    rows = []
    for i, b in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {b.name} ...", file=sys.stderr, flush=True)
        rows.append(run(b, sys.executable))
        for o in rows[-1].get("tests", []):
            print(f"    {'caught' if o['failed'] else 'NOT CAUGHT'} by {o['test']}: {o['summary']}",
                  file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"rows": rows}))
    else:
        print("breakage | what | test | caught")
        for r in rows:
            for o in r.get("tests", [{"test": r.get("error"), "failed": False}]):
                print(f"{r['name']} | {r.get('what', '')} | {o['test']} | {'yes' if o['failed'] else 'NO'}")
    return 0 if all(r.get("failed") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
