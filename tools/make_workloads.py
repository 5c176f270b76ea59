"""Write the drafter benchmark's workloads (benchmarks/workloads/*.jsonl) from text on this machine:
Python's own standard library. Deterministic; no downloads.

    python -m tools.make_workloads [--out benchmarks/workloads]

  edit.jsonl   30+ code edits: a stdlib function and an instruction (rename, add a docstring, type hints...)
  agent.jsonl  a replayed 120-request tool-use session: each request repeats the growing transcript of
               earlier tool results and answers, as agent loops do (later outputs repeat earlier ones)
  chat.jsonl   30+ open questions about Python
  code.jsonl   30+ completions: the start of a stdlib function, to be continued
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from pathlib import Path

MODULES = ["textwrap.py", "argparse.py", "dataclasses.py", "functools.py", "json/decoder.py", "shlex.py",
           "fnmatch.py", "calendar.py", "heapq.py", "bisect.py", "glob.py", "string.py", "csv.py", "difflib.py"]
EDITS = [
    "Rename the variable `{var}` to `{new}` everywhere in this function and return the whole function.",
    "Add a one-line docstring to this function and return the whole function unchanged otherwise.",
    "Add type hints to the parameters of this function and return the whole function.",
    "Replace every double-quoted string with a single-quoted one in this function and return it.",
]
QUESTIONS = [
    "What is the difference between a list and a tuple in Python?", "When should I use a generator?",
    "How does Python's garbage collector work?", "What is a decorator, with an example?",
    "Explain the GIL in two paragraphs.", "How do I read a CSV file and sum a column?",
    "What does `if __name__ == '__main__':` do?", "How are dictionaries implemented?",
    "What is the difference between `is` and `==`?", "How do context managers work?",
    "When would you use a dataclass instead of a dict?", "What is duck typing?",
    "How do I profile a slow Python function?", "Explain list comprehensions to a beginner.",
    "What are *args and **kwargs?", "How does `functools.lru_cache` decide what to evict?",
    "What is the difference between threads and processes in Python?", "How do I write a unit test?",
    "What is a virtual environment and why use one?", "Explain exceptions and `finally`.",
    "How does `asyncio` schedule coroutines?", "What is a closure?", "How do I sort a list of dicts by a key?",
    "What is the walrus operator for?", "How do slots save memory?", "What is monkey patching?",
    "How do I parse command-line arguments?", "What does `yield from` do?", "Explain the MRO.",
    "How do I make a class iterable?", "What is the difference between `copy` and `deepcopy`?",
    "Why are mutable default arguments a problem?",
]


def functions(limit: int, min_lines: int = 8, max_lines: int = 30) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in MODULES:
        source = (stdlib / name).read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and min_lines <= node.end_lineno - node.lineno + 1 <= max_lines:
                out.append("\n".join(lines[node.lineno - 1 : node.end_lineno]))
    random.Random(0).shuffle(out)
    return out[:limit]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks" / "workloads")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    funcs = functions(80)
    edits = []
    for i, f in enumerate(funcs[:32]):
        names = sorted({n.id for n in ast.walk(ast.parse(f.strip() if not f.startswith(" ") else "if 1:\n" + f))
                        if isinstance(n, ast.Name) and len(n.id) > 2} or {"value"})
        var = rng.choice(names)
        edits.append({"prompt": EDITS[i % len(EDITS)].format(var=var, new=var + "_renamed") + "\n\n" + f,
                      "source": "stdlib function, edit instruction"})
    write(out / "edit.jsonl", edits)
    write(out / "chat.jsonl", [{"prompt": q, "source": "written for this benchmark"} for q in QUESTIONS])
    write(out / "code.jsonl", [{"prompt": "\n".join(f.splitlines()[: max(2, len(f.splitlines()) // 3)]) + "\n",
                                "source": "stdlib function, first third"} for f in funcs[32:64]])
    # The agent: a session over a few files; every request carries the transcript so far (tool results and
    # the agent's notes), so later requests repeat earlier text, as real agent loops do.
    tools = funcs[64:80]
    transcript = "You are a coding agent. Tools: read(file), summarize(code). Answer with the next action.\n"
    agent = []
    for step in range(120):
        code = tools[step % len(tools)]
        if step % 3 == 0:
            transcript += f"\n### read(file_{step % len(tools)}.py)\n{code}\n"
        elif step % 3 == 1:
            transcript += f"\n### note {step}: the function above is part of the module under review.\n"
        agent.append({"prompt": transcript[-3000:] + "\n### next action:", "turn": step,
                      "source": "replayed tool-use session over stdlib functions"})
    write(out / "agent.jsonl", agent)
    (out / "README.md").write_text(
        "# Drafter workloads\n\nWritten by `python -m tools.make_workloads` from Python's own standard library "
        "(the functions of " + ", ".join(MODULES) + "), with a fixed seed; no downloads.\n\n"
        "- `edit.jsonl` (32): a stdlib function and an edit instruction (rename, docstring, type hints, quotes): "
        "the answer copies most of the prompt.\n"
        "- `agent.jsonl` (120): a replayed tool-use session; each request carries the growing transcript of "
        "earlier tool results and notes, so later requests repeat earlier text.\n"
        "- `chat.jsonl` (32): open questions about Python, written for this benchmark.\n"
        "- `code.jsonl` (32): the first third of a stdlib function, to be completed.\n")
    for name in ("edit", "agent", "chat", "code"):
        print(name, sum(1 for _ in open(out / f"{name}.jsonl")))


if __name__ == "__main__":
    main()
