"""Plain worker classes (testable without Ray); `actors.py` is the only place they become Ray actors."""
