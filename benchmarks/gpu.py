"""The GPU paths on one CUDA device, in one run: are they right, and what do they cost.

It runs where a GPU is, without Ray (the project's device machine has torch and transformers, no Ray and
no model hub). Exactness uses the tiny trained test target (tools/make_tiny_models). Costs use the real
shapes (SmolLM2-135M, Qwen2.5-Coder-1.5B: their config.json) with the real weights where a model directory
holds them, else random weights, which cost what real ones do; a random model's acceptance means nothing,
so none is reported for it.

1. products: the int4 copy (torch's tinygemm kernel) and the fp8 copy (`torch._scaled_mm`) against the
   same quantized weights multiplied on the CPU.
2. exact: the engine on the GPU with the tiny target in fp32 (CUDA graphs on, as by default): greedy
   speculative output against target-only for the n-gram, model, int4 and fp8 drafters (teacher-forced,
   near-ties counted), seeded sampled output identical to target-only (the coupled rule), and target-only
   output with graphs against without.
3. cost: ms per pass over a 256-token context (new tokens 1..64, rows 1 and 8), for the lean backend
   eager and with CUDA graphs, Hugging Face eager, all bf16, and for the int4 and fp8 copies (lean, with
   graphs): the cost curve the scheduler reads, and c, a draft step's cost over a target pass.
4. decode: target-only greedy tokens/s through the engine (one request; eight at once), with CUDA graphs
   and without, against HF `generate` on the same model, the SmolLM2 shape.

    python -m benchmarks.gpu [--models models] [--json] [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.backends import time_pass
from benchmarks.exactness import check_outputs
from benchmarks.report import emit
from cluster.config import DrafterConfig, EngineConfig, ModelConfig, SpeculationConfig
from cluster.drafters.configs import ModelDrafterConfig, QuantizedConfig
from cluster.engine import SpecEngine
from cluster.models.backend import HFBackend
from cluster.models.lean import LeanBackend
from cluster.models.quantized import backend_linear_bytes, quantized_backend
from cluster.types import FINISH_ERROR, SamplingParams

SHAPES = ("smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct")
PROMPTS = ["def add(a, b):\n    return", "import os\n", "for i in range(10):\n    print(i)\nfor i in range(10):\n",
           "class A:\n    def f(self):\n        return self\n\nclass B:\n"]
CONTEXT = 256


def log(msg: str) -> None:
    print(msg, flush=True, file=__import__("sys").stderr)


def part(results: dict, name: str, fn) -> None:
    """Run one part; a failure is recorded with its traceback and the others still run."""
    start = time.perf_counter()
    log(f"== {name}")
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - the report says what broke; the other parts still measure
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        log(results[name]["traceback"])
    log(f"   {time.perf_counter() - start:.1f} s")


def products(device: str) -> dict:
    """Each GPU copy's product against the same quantized weights multiplied on the CPU."""
    from cluster.models import int4
    from cluster.models.quantized import Fp8Linear

    torch.manual_seed(0)
    out = {}
    for label, (n, k) in (("smollm2_down", (576, 1536)), ("qwen_gate_up", (17920, 1536))):
        w = torch.randn(n, k) * 0.02
        x = torch.randn(8, k, dtype=torch.bfloat16)
        ref4 = x.float() @ int4.quantize(w.to(torch.bfloat16), 32, use_native=False).dequantize().float().t()
        got4 = int4.quantize(w.to(torch.bfloat16).to(device), 32)(x.to(device)).float().cpu()
        ref8 = Fp8Linear(w)(x.float())
        got8 = Fp8Linear(w.to(device))(x.to(device)).float().cpu()
        out[label] = {"int4_rel_err": float((got4 - ref4).norm() / ref4.norm()),
                     "fp8_rel_err": float((got8 - ref8.float()).norm() / ref8.float().norm())}
    return out


def exactness(device: str, quick: bool) -> dict:
    from tools.make_tiny_models import build

    tiny = build(Path(tempfile.mkdtemp(prefix="tiny_models_")))
    drafters = {
        "ngram": DrafterConfig("ngram"),
        "model": DrafterConfig("model", {"model": ModelDrafterConfig(str(tiny["draft_noisy"]), dtype="float32")}),
        "quantized_int4": DrafterConfig("quantized", {"quantized": QuantizedConfig("int4")}),
        "quantized_fp8": DrafterConfig("quantized", {"quantized": QuantizedConfig("fp8")}),
    }

    def engine(drafter: DrafterConfig, k: int, graphs: bool = True) -> SpecEngine:
        target = ModelConfig(str(tiny["target"]), dtype="float32", device=device, cuda_graphs=graphs)
        config = EngineConfig(target=target, drafter=drafter,
                              speculation=SpeculationConfig(k=k, k_max=8, adaptive=False))
        return SpecEngine(config.validate())

    def replays(e: SpecEngine) -> int | None:
        graphs = getattr(e.target.backend, "graphs", None)
        return None if graphs is None else graphs.replays

    base = engine(DrafterConfig("ngram"), 0)
    model = base.target.backend.model
    greedy = SamplingParams(max_tokens=16 if quick else 48)
    sampled = [SamplingParams(max_tokens=greedy.max_tokens, temperature=0.9, seed=i) for i in range(len(PROMPTS))]
    prompt_ids = [base.build(p).tokens for p in PROMPTS]
    first = base.generate(PROMPTS, greedy)
    reference = [o.token_ids for o in first]
    reference_sampled = [o.token_ids for o in base.generate(PROMPTS, sampled)]
    eager = [o.token_ids for o in engine(DrafterConfig("ngram"), 0, graphs=False).generate(PROMPTS, greedy)]
    out = {"target_device": str(next(model.parameters()).device),
           "target_only": {**check_outputs(model, prompt_ids, reference), "failed": failed(first),
                           "graph_replays": replays(base), "identical_without_graphs": eager == reference}}
    for name, drafter in drafters.items():
        spec = engine(drafter, 4)
        results = spec.generate(PROMPTS, greedy)
        tokens = [o.token_ids for o in results]
        drafted, accepted = sum(o.stats.drafted for o in results), sum(o.stats.accepted for o in results)
        out[name] = {**check_outputs(model, prompt_ids, tokens), "failed": failed(results),
                     "identical_to_target_only": tokens == reference,
                     "sampled_identical_to_target_only":
                         [o.token_ids for o in spec.generate(PROMPTS, sampled)] == reference_sampled,
                     "drafter_device": str(getattr(getattr(spec.drafter.drafter, "backend", None), "device", "none")),
                     "acceptance": round(accepted / max(drafted, 1), 3), "graph_replays": replays(spec)}
        log(f"   {name}: {out[name]}")
    return out


def failed(results) -> int:
    """Requests that ended in an error (their outputs are cut short: an exactness check alone would pass)."""
    return sum(r.finish_reason == FINISH_ERROR for r in results)


def shape_model(models: Path, name: str, device: str):
    """(model, tokenizer, real): the real weights where the directory holds them, else random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = models / name
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else None
    if any(path.glob("*.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, local_files_only=True)
        return model.to(device).eval(), tokenizer, True
    config = AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval(), tokenizer, False


def median_ms(backend, rows: int, new_tokens: int, repeats: int) -> float:
    slots = [backend.cache.allocate() for _ in range(rows)]
    try:
        for _ in range(2):
            time_pass(backend, slots, new_tokens)
        return round(1e3 * statistics.median(time_pass(backend, slots, new_tokens) for _ in range(repeats)), 3)
    finally:
        for s in slots:
            backend.cache.free(s)


def costs(models: Path, device: str, quick: bool) -> dict:
    tokens = (1, 4, 16) if quick else (1, 2, 4, 8, 16, 32, 64)
    repeats = 3 if quick else 10
    out = {}
    for name in SHAPES[:1] if quick else SHAPES:
        model, _, real = shape_model(models, name, device)
        capacity = CONTEXT + max(tokens) + 1
        rows = []
        for backend_name, make in (("lean", lambda m: LeanBackend(m, 8, capacity, graphs="off")),
                                   ("lean_graphs", lambda m: LeanBackend(m, 8, capacity)),
                                   ("hf", lambda m: HFBackend(m, 8, capacity)),
                                   ("int4_copy", lambda m: quantized_backend(m, "int4", 32, 8, capacity)),
                                   ("fp8_copy", lambda m: quantized_backend(m, "fp8", 32, 8, capacity))):
            backend = None
            try:
                backend = make(model)
                for n_rows in (1, 8):
                    for t in tokens if not backend_name.endswith("copy") else (1, 2, 4):
                        rows.append({"backend": backend_name, "rows": n_rows, "new_tokens": t,
                                     "ms": median_ms(backend, n_rows, t, repeats),
                                     "linear_gb": round(backend_linear_bytes(backend) / 1e9, 3)})
            except Exception as exc:  # noqa: BLE001 - e.g. fp8 on a GPU without fp8 tensor cores
                rows.append({"backend": backend_name, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-1500:]})
            log(f"   {name} {backend_name}: "
                f"{[r.get('ms', r.get('error')) for r in rows if r['backend'] == backend_name]}")
            del backend
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        one = {r["backend"]: r["ms"] for r in rows if r.get("rows") == 1 and r.get("new_tokens") == 1}
        best = min(one.get(k, float("inf")) for k in ("lean", "lean_graphs", "hf"))
        out[name] = {"real_weights": real, "rows": rows,
                     "c": {k: round(one[k] / best, 3) for k in ("int4_copy", "fp8_copy") if k in one}}
        del model
    return out


def decode(models: Path, device: str, quick: bool) -> dict:
    name = SHAPES[0]
    model, tokenizer, real = shape_model(models, name, device)
    max_tokens = 16 if quick else 64
    prompts = [[1 + (7 * i + j) % 1000 for j in range(32)] for i in range(8)]
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens)  # random weights may say EOS early
    out = {"real_weights": real, "max_tokens": max_tokens}
    for graphs in (True, False):
        config = EngineConfig(target=ModelConfig(str(models / name), dtype="bfloat16", device=device,
                                                 cuda_graphs=graphs), speculation=SpeculationConfig(k=0))
        config.validate(check_paths=False)
        engine = SpecEngine(config, model=model, tokenizer=tokenizer)
        for batch in (prompts[:1], prompts):  # warm-up (and, with graphs, their capture)
            engine.generate(batch, params)
        tag = "" if graphs else "_no_graphs"
        for label, batch in (("one", prompts[:1]), ("eight", prompts)):
            start = time.perf_counter()
            results = engine.generate(batch, params)
            out[f"failed_{label}{tag}"] = failed(results)
            out[f"engine_tokens_per_s_{label}{tag}"] = round(sum(len(r.token_ids) for r in results)
                                                             / (time.perf_counter() - start), 1)
        engine.shutdown()
    ids = torch.tensor(prompts[:1], device=device)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        gen = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    out["hf_generate_tokens_per_s_one"] = round((gen.shape[1] - ids.shape[1]) / (time.perf_counter() - start), 1)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models", help="where the shapes' model directories are (config.json "
                                                           "at least; the weights are used where present)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and shapes (a smoke run)")
    parser.add_argument("--parts", nargs="+", default=["products", "exactness", "costs", "decode"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    models = Path(args.models)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
              "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    runs = {"products": lambda: products(args.device), "exactness": lambda: exactness(args.device, args.quick),
            "costs": lambda: costs(models, args.device, args.quick),
            "decode": lambda: decode(models, args.device, args.quick)}
    for name in args.parts:
        part(result, name, runs[name])
    table = [{"shape": shape, **row} for shape, v in result.get("costs", {}).items() if isinstance(v, dict)
             for row in v.get("rows", [])]
    if args.json or not table:
        print(__import__("json").dumps(result, indent=None if args.json else 1))
    else:
        emit({**result, "rows": [r for r in table if "ms" in r]}, False,
             ["shape", "backend", "rows", "new_tokens", "ms"])
    return result


if __name__ == "__main__":
    main()
