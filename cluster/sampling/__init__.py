"""Pure math: logits processing, acceptance rules, theoretical speed-up. No models, no state."""

from cluster.sampling.acceptance import verify_draft
from cluster.sampling.logits import process_logits, sample_from
from cluster.sampling.theory import expected_speedup, expected_tokens_per_pass

__all__ = ["expected_speedup", "expected_tokens_per_pass", "process_logits", "sample_from", "verify_draft"]
