"""Serving glue shared by the front doors: a thread-safe driver around the step loop."""
