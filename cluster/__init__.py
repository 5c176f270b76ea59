"""Speculative-decoding serving engine: draft proposes, target verifies, output is exactly the target's."""
