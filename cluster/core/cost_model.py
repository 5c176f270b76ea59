"""How much to speculate, from measured costs (pure: no torch, no Ray).

A step costs draft time + verify time + overhead. The verify pass's time is a curve over (rows, tokens)
measured on the backend at start; the draft time is learned from the drafter's own calls; a small
recursive least-squares fit maps those predictions to the step times actually measured (absorbing
overhead and drift). Each request's acceptance is estimated from its own verify passes, shrunk towards
the drafter's average. Budgets are then chosen greedily for the whole step: a request's draft grows by
one token while the expected tokens per second of the step go up. Starting from no drafts, a plan is
never predicted slower than plain decoding.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class CostCurve:
    """seconds ~ a + b * rows + c * tokens, fitted by least squares (each term kept >= 0)."""

    a: float
    b: float
    c: float
    samples: list[tuple[int, int, float]] = field(default_factory=list, repr=False)

    def __call__(self, rows: int, tokens: int) -> float:
        return self.a + self.b * rows + self.c * tokens

    @staticmethod
    def fit(samples: list[tuple[int, int, float]]) -> CostCurve:
        """Non-negative least squares over the three terms (the best fit among the subsets of terms whose
        coefficients all come out >= 0)."""
        if not samples:
            return CostCurve(0.0, 0.0, 0.0)
        y = [s for _, _, s in samples]
        features = [[1.0, r, t] for r, t, _ in samples]
        best, best_err = [0.0, 0.0, sum(y) / max(sum(t for _, t, _ in samples), 1)], float("inf")
        for terms in ([0, 1, 2], [0, 2], [0, 1], [1, 2], [0], [2]):
            coef = _least_squares([[row[i] for i in terms] for row in features], y)
            if coef is None or min(coef) < 0:
                continue
            full = [0.0, 0.0, 0.0]
            for i, c in zip(terms, coef):
                full[i] = c
            err = sum((full[0] + full[1] * r + full[2] * t - s) ** 2 for r, t, s in samples)
            if err < best_err:
                best, best_err = full, err
        return CostCurve(*best, samples=list(samples))

    def relative_errors(self) -> list[float]:
        return [abs(self(r, t) - s) / s for r, t, s in self.samples if s > 0]


@dataclass
class DraftCost:
    """Seconds of one draft call: a + per_step * steps + per_node * nodes, learned online (EMA of the
    per-node rate; a model drafter's call runs `steps` sequential forwards)."""

    a: float = 1e-4
    per_step: float = 0.0
    per_node: float = 1e-5
    seen: int = 0

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
    """measured step seconds ~ x0 + x1 * predicted verify + x2 * predicted draft, by recursive least
    squares with forgetting: the overhead and any bias of the curves, learned from every step."""

    def __init__(self, forgetting: float = 0.9):
        self.theta = [0.0, 1.0, 1.0]
        self.p = [[1e2 if i == j else 0.0 for j in range(3)] for i in range(3)]
        self.forgetting = forgetting
        self.steps = 0

    def predict(self, verify_s: float, draft_s: float) -> float:
        """Never below half the curves' own estimate: an early fit may stray, the compute does not vanish."""
        x = (1.0, verify_s, draft_s)
        return max(sum(t * v for t, v in zip(self.theta, x)), 0.5 * (verify_s + draft_s), 1e-6)

    def observe(self, verify_s: float, draft_s: float, measured_s: float) -> None:
        x = (1.0, verify_s, draft_s)
        px = [sum(self.p[i][j] * x[j] for j in range(3)) for i in range(3)]
        denom = self.forgetting + sum(x[i] * px[i] for i in range(3))
        gain = [v / denom for v in px]
        error = measured_s - sum(t * v for t, v in zip(self.theta, x))
        self.theta = [t + g * error for t, g in zip(self.theta, gain)]
        self.p = [[(self.p[i][j] - gain[i] * px[j]) / self.forgetting for j in range(3)] for i in range(3)]
        self.steps += 1


@dataclass
class Budgets:
    ks: list[int]
    tokens: float  # expected tokens emitted by the step
    verify_s: float
    draft_s: float
    step_s: float  # predicted step time


class CostModel:
    def __init__(self, verify: CostCurve, draft: DraftCost | None = None, sequential_draft: bool = False):
        self.verify = verify
        self.draft = draft or DraftCost()
        self.sequential_draft = sequential_draft  # a model drafter: one forward per draft position
        self.timer = StepTimer()

    def draft_seconds(self, ks: list[int]) -> float:
        nodes = sum(ks)
        return self.draft(max(ks, default=0) if self.sequential_draft else 1, nodes)

    def step_seconds(self, ks: list[int], overlapped: bool = False) -> tuple[float, float, float]:
        """(predicted step, verify, draft) seconds for one verify pass over len(ks) rows with ks drafts."""
        verify = self.verify(len(ks), len(ks) + sum(ks)) if ks else 0.0
        draft = self.draft_seconds(ks)
        return self.timer.predict(verify, 0.0 if overlapped else draft), verify, draft

    def choose(self, alphas: list[float], caps: list[int], min_gain: float = 0.0) -> Budgets:
        """Per-request draft lengths (each <= its cap) maximising expected tokens per second of the step.
        A plan predicted less than `min_gain` faster than plain decoding is dropped for plain decoding:
        predictions are noisy, and a marginal draft is not worth its risk."""
        ks = [0] * len(alphas)
        tokens = float(len(alphas))
        step, verify, draft = self.step_seconds(ks)
        plain = Budgets(list(ks), tokens, verify, draft, step)
        # The next token of request r is worth alpha_r^(k_r + 1) expected tokens: best first.
        heap = [(-a, i) for i, (a, cap) in enumerate(zip(alphas, caps)) if cap > 0 and a > 0]
        heapq.heapify(heap)
        while heap:
            neg_gain, i = heapq.heappop(heap)
            ks[i] += 1
            new_step, new_verify, new_draft = self.step_seconds(ks)
            if new_step <= 0 or (tokens - neg_gain) / new_step <= tokens / max(step, 1e-12):
                ks[i] -= 1  # the best remaining increment does not pay: none does
                break
            tokens, step, verify, draft = tokens - neg_gain, new_step, new_verify, new_draft
            if ks[i] < caps[i]:
                heapq.heappush(heap, (-(alphas[i] ** (ks[i] + 1)), i))
        if min_gain and tokens / max(step, 1e-12) < (1 + min_gain) * plain.tokens / max(plain.step_s, 1e-12):
            return plain
        return Budgets(ks, tokens, verify, draft, step)


def _least_squares(x: list[list[float]], y: list[float]) -> list[float] | None:
    """Solve the normal equations by Gaussian elimination; None if singular."""
    n = len(x[0])
    a = [[sum(r[i] * r[j] for r in x) for j in range(n)] + [sum(r[i] * v for r, v in zip(x, y))] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]
