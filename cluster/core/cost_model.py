"""How much to speculate, from measured costs (pure: no torch, no Ray).

A step costs draft time + verify time + overhead. The verify pass's time is a curve over (rows, tokens,
keys attended) measured on the backend at start and refitted from the passes actually run; the draft
time is learned from the drafter's own calls; the overhead is what the two leave unexplained. Each request's acceptance is estimated from its own verify passes, shrunk towards
the drafter's average. Budgets are then chosen greedily for the whole step: a request's draft grows by
one token while the expected tokens per second of the step go up. Starting from no drafts, a plan is
never predicted slower than plain decoding.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field


@dataclass
class CostCurve:
    """seconds ~ a + b * rows + c * tokens + d * kv, fitted by least squares (each term kept >= 0).

    tokens: new tokens in the pass (packed: padding costs nothing); kv: keys attended, summed over rows
    (each row's context plus its new tokens). Attention reads every row's whole context, so at 32 rows x
    300 tokens of context the kv term is a good part of a decode step: a curve without it mispredicts
    as contexts grow."""

    a: float
    b: float
    c: float
    d: float = 0.0
    samples: list[tuple[int, int, int, float]] = field(default_factory=list, repr=False)  # (rows, tokens, kv, s)

    def __call__(self, rows: int, tokens: int, kv: int = 0) -> float:
        return self.a + self.b * rows + self.c * tokens + self.d * kv

    @staticmethod
    def fit(samples: list[tuple[int, int, int, float]]) -> CostCurve:
        """Non-negative least squares over the four terms (the best fit among the subsets of terms whose
        coefficients all come out >= 0). One pass over the samples builds the normal equations; each
        subset is a small solve on them (the fit runs every REFIT_EVERY passes on a few hundred samples)."""
        if not samples:
            return CostCurve(0.0, 0.0, 0.0)
        features = [(1.0, r, t, kv) for r, t, kv, _ in samples]
        gram = [[sum(f[i] * f[j] for f in features) for j in range(4)] for i in range(4)]
        rhs = [sum(f[i] * s for f, (*_, s) in zip(features, samples)) for i in range(4)]
        yy = sum(s * s for *_, s in samples)
        best, best_err = [0.0, 0.0, sum(s for *_, s in samples) / max(sum(t for _, t, _, _ in samples), 1), 0.0], None
        for size in (4, 3, 2, 1):
            for terms in itertools.combinations(range(4), size):
                coef = _solve([[gram[i][j] for j in terms] for i in terms], [rhs[i] for i in terms])
                if coef is None or min(coef) < 0:
                    continue
                # |Xw - y|^2 = w'Gw - 2 w'h + y'y
                err = (sum(coef[a] * coef[b] * gram[i][j] for a, i in enumerate(terms) for b, j in enumerate(terms))
                       - 2 * sum(c * rhs[i] for c, i in zip(coef, terms)) + yy)
                if best_err is None or err < best_err:
                    full = [0.0] * 4
                    for i, c in zip(terms, coef):
                        full[i] = c
                    best, best_err = full, err
        return CostCurve(*best, samples=list(samples))

    def relative_errors(self) -> list[float]:
        return [abs(self(r, t, kv) - s) / s for r, t, kv, s in self.samples if s > 0]


@dataclass
class DraftCost:
    """Seconds of one draft call: a + per_step * steps + per_node * nodes, learned online (EMA of the
    per-node rate; a model drafter's call runs `steps` sequential forwards)."""

    a: float = 1e-4
    per_step: float = 0.0
    per_node: float = 1e-5
    seen: int = 0

    @classmethod
    def prior(cls, sequential: bool) -> DraftCost:
        """The shape before a call is timed; `observe` rescales it and keeps it. A model drafter's call is
        one forward per step with rows nearly free (the Qwen 0.5B on one core: 130 ms a step at 1, 4 or 8
        rows, 1.0 s for 8 steps); a lookup drafter's, a fixed cost and a little per node. Priced flat, a
        model drafter's 6-step draft looked 1.15x its 4-step one, not 1.5x, and continue drafted too long."""
        return cls(1e-4, 1e-3, 1e-5) if sequential else cls()

    def __call__(self, steps: int, nodes: int) -> float:
        if nodes == 0:
            return 0.0
        return self.a + self.per_step * steps + self.per_node * nodes

    def observe(self, steps: int, nodes: int, seconds: float, weight: float = 0.2) -> None:
        if nodes == 0:
            return
        predicted = self(steps, nodes)
        ratio = seconds / predicted if predicted > 0 else 1.0
        w = 1.0 if self.seen < 3 else weight  # the first calls set the scale
        scale = (1 - w) + w * ratio
        self.a, self.per_step, self.per_node = self.a * scale, self.per_step * scale, self.per_node * scale
        self.seen += 1


@dataclass
class Acceptance:
    """Per-position acceptance of one request's drafts: successes over trials, shrunk to a prior."""

    accepted: int = 0
    trials: int = 0

    def observe(self, drafted: int, accepted: int) -> None:
        self.accepted += accepted
        self.trials += accepted + (1 if accepted < drafted else 0)

    def rate(self, prior: float, strength: float = 4.0) -> float:
        return (self.accepted + strength * prior) / (self.trials + strength)


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = (1 - a^(k+1)) / (1 - a): tokens per verify pass with k drafts accepted i.i.d. at rate a."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class StepTimer:
    """measured step seconds ~ predicted verify + predicted draft + overhead, the overhead (router,
    transfers, bookkeeping) an exponential average of what the two curves leave unexplained.

    The curves carry their own scale: the verify curve is refitted from measured passes, the draft cost
    from timed draft calls. Fitting free slopes to both here (a regression on two correlated predictors)
    let one absorb the other's error: it once priced drafts at 2.8x their measured time and stopped all
    drafting at 32 streams."""

    def __init__(self, weight: float = 0.1):
        self.overhead = 0.0
        self.weight = weight
        self.steps = 0

    def predict(self, verify_s: float, draft_s: float) -> float:
        """Never below half the curves' own estimate: an early average may stray, the compute does not vanish."""
        return max(verify_s + draft_s + self.overhead, 0.5 * (verify_s + draft_s), 1e-6)

    def observe(self, verify_s: float, draft_s: float, measured_s: float) -> None:
        w = 1.0 if self.steps == 0 else self.weight
        self.overhead += w * (measured_s - verify_s - draft_s - self.overhead)
        self.steps += 1


@dataclass
class Budgets:
    ks: list[int]
    tokens: float  # expected tokens emitted by the step
    verify_s: float
    draft_s: float
    step_s: float  # predicted step time


class CostModel:
    REFIT_EVERY = 16  # verify passes between refits of the curve from measured passes

    def __init__(self, verify: CostCurve, draft: DraftCost | None = None, sequential_draft: bool = False):
        self.verify = verify
        self.draft = draft or DraftCost.prior(sequential_draft)
        self.sequential_draft = sequential_draft  # a model drafter: one forward per draft position
        self.timer = StepTimer()
        self.grid = list(verify.samples)  # the passes measured at start: the curve's global shape
        self.measured: deque[tuple[int, int, int, float]] = deque(maxlen=256)  # recent real passes
        self.passes = 0
        self.prefill_rate: float | None = None  # seconds per prompt token, measured
        self.draft_read_rate: float | None = None  # seconds per prompt token a drafter takes to read, measured
        # Accepted drafts as measured over as predicted, recent steps weighted most: the per-request
        # estimates assume i.i.d. acceptance and full-length drafts, which a lookup drafter's misses and
        # short finds break (at 32 streams: 81% of the predicted tokens arrived).
        self.token_scale = 1.0
        self._accepted = [0.0, 0.0]  # decayed sums: (measured, predicted)

    def observe_pass(self, rows: int, tokens: int, kv: int, seconds: float) -> None:
        """A verify pass as it ran: the curve is refitted from these and the start grid, so it follows the
        shapes the scheduler actually plans (and the machine's drift), not only the grid."""
        self.measured.append((rows, tokens, kv, seconds))
        self.passes += 1
        if self.passes % self.REFIT_EVERY == 0:  # not len(measured): once the window is full that is every pass
            self.verify = CostCurve.fit(self.grid + list(self.measured))

    def observe_tokens(self, predicted_accepted: float, accepted: int, decay: float = 0.95) -> None:
        """A verify pass's accepted drafts against the prediction its budgets were chosen by."""
        if predicted_accepted <= 0:
            return
        self._accepted = [decay * self._accepted[0] + accepted, decay * self._accepted[1] + predicted_accepted]
        if self._accepted[1] >= 8:  # a few drafts' worth of evidence before it moves
            self.token_scale = min(max(self._accepted[0] / self._accepted[1], 0.25), 1.5)

    def observe_prefill(self, tokens: int, seconds: float, weight: float = 0.3) -> None:
        """A prefill as it ran. Prompts run hundreds of tokens per row, far off the verify grid, so their
        cost is learned on its own: seconds per prompt token."""
        self.prefill_rate = _per_token(self.prefill_rate, tokens, seconds, weight)

    def observe_draft_read(self, tokens: int, seconds: float, weight: float = 0.3) -> None:
        """A draft call in which drafters first read `tokens` prompt tokens, its draft's share taken off."""
        self.draft_read_rate = _per_token(self.draft_read_rate, tokens, seconds, weight)

    def reading_pays(self, alphas: list[float], caps: list[int], contexts: list[int], remaining: int,
                     read_tokens: int, min_gain: float = 0.0) -> bool:
        """Whether drafters that have not read their prompts should start, where that read runs in series
        with the step: the seconds drafting saves over the `remaining` tokens the batch may still emit
        (per token: plain step / rows - the chosen plan's step / its tokens) must exceed the reads'. Short
        outputs of long prompts at a large batch, where drafting barely pays, do not earn the read back
        (the Qwen pair at 16 streams and 32 tokens: 0.81x K = 0). Unmeasured, reading is free."""
        if self.draft_read_rate is None or read_tokens <= 0:
            return True
        plan = self.choose(alphas, caps, min_gain, contexts)
        if not any(plan.ks):
            return True  # nothing drafts either way
        plain = self.step_seconds([0] * len(alphas), contexts)[0]
        saved = plain / len(alphas) - plan.step_s / max(plan.tokens, 1e-12)
        return saved * remaining > self.draft_read_rate * read_tokens

    def prefill_seconds(self, rows: int, tokens: int) -> float:
        if self.prefill_rate is None:  # nothing measured yet: the verify curve's extrapolation
            return self.verify(rows, tokens, tokens)
        return self.prefill_rate * tokens

    def pass_seconds(self, ks: list[int], contexts: list[int]) -> float:
        """Predicted verify pass over rows with ks drafts each, on contexts[i] cached tokens."""
        if not ks:
            return 0.0
        tokens = len(ks) + sum(ks)
        return self.verify(len(ks), tokens, sum(contexts) + tokens)

    def draft_seconds(self, ks: list[int]) -> float:
        nodes = sum(ks)
        return self.draft(max(ks, default=0) if self.sequential_draft else 1, nodes)

    def step_seconds(self, ks: list[int], contexts: list[int] | None = None,
                     overlapped: bool = False) -> tuple[float, float, float]:
        """(predicted step, verify, draft) seconds for one verify pass over len(ks) rows with ks drafts."""
        verify = self.pass_seconds(ks, contexts if contexts is not None else [0] * len(ks))
        draft = self.draft_seconds(ks)
        return self.timer.predict(verify, 0.0 if overlapped else draft), verify, draft

    def choose(self, alphas: list[float], caps: list[int], min_gain: float = 0.0,
               contexts: list[int] | None = None) -> Budgets:
        """Per-request draft lengths (each <= its cap) maximising expected tokens per second of the step.

        Increments are taken best first (the next token of request r is worth alpha_r^(k_r + 1) expected
        tokens) all the way to the caps, and the best prefix of that order wins: a draft call's fixed cost
        can make the first increment a loss and the first ten a gain, so stopping at the first loss is
        wrong. The empty prefix (plain decoding) is a candidate, so the plan is never predicted slower.
        A plan predicted less than `min_gain` faster than plain decoding is dropped for plain decoding:
        predictions are noisy, and a marginal draft is not worth its risk."""
        rows = len(alphas)
        context = sum(contexts) if contexts is not None else 0
        ks = [0] * rows

        def step(nodes: int, longest: int) -> tuple[float, float, float]:
            verify = self.verify(rows, rows + nodes, context + rows + nodes) if rows else 0.0
            draft = self.draft(longest if self.sequential_draft else 1, nodes)
            return self.timer.predict(verify, draft), verify, draft

        plain_step, verify, draft = step(0, 0)
        plain = Budgets(list(ks), float(rows), verify, draft, plain_step)
        best, best_rate, taken = 0, rows / max(plain_step, 1e-12), []
        tokens, nodes, longest, scale = float(rows), 0, 0, self.token_scale
        heap = [(-a, i) for i, (a, cap) in enumerate(zip(alphas, caps)) if cap > 0 and a > 0]
        heapq.heapify(heap)
        while heap:
            neg_gain, i = heapq.heappop(heap)
            ks[i] += 1
            taken.append(i)
            tokens, nodes, longest = tokens - scale * neg_gain, nodes + 1, max(longest, ks[i])
            rate = tokens / max(step(nodes, longest)[0], 1e-12)
            if rate > best_rate:
                best, best_rate = len(taken), rate
            if ks[i] < caps[i]:
                heapq.heappush(heap, (-(alphas[i] ** (ks[i] + 1)), i))
        if best == 0 or best_rate < (1 + min_gain) * rows / max(plain_step, 1e-12):
            return plain
        ks = [0] * rows
        for i in taken[:best]:
            ks[i] += 1
        step_s, verify, draft = self.step_seconds(ks, contexts)
        return Budgets(ks, rows + scale * sum(expected_tokens(a, k) - 1 for a, k in zip(alphas, ks)), verify, draft,
                       step_s)


def _per_token(rate: float | None, tokens: int, seconds: float, weight: float) -> float | None:
    """An exponential average of seconds per token; the first measurement sets it, nothing to learn keeps it."""
    if tokens <= 0 or seconds <= 0:
        return rate
    measured = seconds / tokens
    return measured if rate is None else (1 - weight) * rate + weight * measured


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Solve a x = b (a small symmetric system) by Gaussian elimination; None if singular."""
    n = len(b)
    m = [row[:] + [v] for row, v in zip(a, b)]
    scale = [abs(a[i][i]) for i in range(n)]  # each column's own scale: keys attended run to 1e5, rows to 32
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) <= 1e-10 * scale[col]:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [v - f * w for v, w in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]
