"""Pure math: keyed randomness, logits processing, acceptance rules, theoretical speed-up. No models, no state."""
