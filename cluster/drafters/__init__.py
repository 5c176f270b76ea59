"""Drafters behind one interface (base.py); registry.py names them for configs, without importing torch."""
