"""Teacher-side generation at real shape: the project's teacher_generation path beside plain `generate`.

    python bench/generation.py --out $OUT                 (on the GPU machine; results: docs/benchmarks.md)
    python bench/generation.py --out /tmp/g --smoke       (a tiny shape on CPU: checks the code paths)

Qwen2-1.5B shape (random init, bf16, tied embeddings), prompts of 128 random tokens, 256 sampled new
tokens each (temperature 0.7; no EOS, so every completion is 256 tokens), the workload of
`shared/measurements/README.md`:
- plain_generate_64     `model.generate` on 64 prompts at once: the seed's synthetic-generation loop
- project_<backend>_<P> `LocalTeacher.generate_tokens` (what the teacher_generation stage runs) on P
                        prompts, generation.batch_size = P, generation.backend = generate or graph (what
                        `auto` picks on CUDA); the graph variant's time includes its capture
For each: new tokens/s, mJ per new token from the NVML energy counter (timed region includes prefill; idle
not subtracted), peak memory, and new tokens per joule relative to plain_generate_64. The issue's goal:
at least 10x plain_generate_64's new tokens per joule.

`warmup_graph_16` (untimed in the ratios): the graph backend on 16 prompts x 8 tokens, so the race
sampler's one-time Triton compile is not charged to the first timed graph variant.

`agreement` (before the timed variants): greedy, 64 prompts x 64 new tokens, the graph backend's
replayed step against the same loop run eagerly (expected identical: the same kernels) and against
plain `generate`, beside plain `generate` against itself with eager attention (in bf16 on a random model
any change of kernel flips near-ties; the CPU tests check token-for-token equality in fp32).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from student_step import Meter  # bench/ is this script's folder: the same timing and NVML energy marks
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from dist_bench.teacher.interface import Decoding
from dist_bench.teacher.local import LocalTeacher

QWEN2_15B = dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True)  # fmt: skip
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer over the model's whole vocabulary (t0, t1, ...): no Hub download on the GPU machine."""
    model = WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", unk_token="t0")


def fresh_model(shape: dict[str, int], device: torch.device) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(**shape, attn_implementation="sdpa", bos_token_id=None, eos_token_id=None)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # no EOS: every completion is max_new_tokens long
    return model


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(count)
    return torch.randint(1, vocab, (count, length), generator=generator).tolist()


def plain_generate(model: Qwen2ForCausalLM, batch: list[list[int]], new: int, meter: Meter) -> int:
    device = next(model.parameters()).device
    input_ids = torch.tensor(batch, device=device)
    meter.mark()
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=0.7,
        max_new_tokens=new, pad_token_id=0,
    )  # fmt: skip
    meter.mark()
    return (out.shape[1] - input_ids.shape[1]) * out.shape[0]


def project_generate(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    batch: list[list[int]],
    new: int,
    backend: str,
    meter: Meter,
) -> int:
    teacher = LocalTeacher(model, tokenizer, batch_size=len(batch), backend=backend)
    decoding = Decoding(n=1, temperature=0.7, top_p=1.0, top_k=None, max_new_tokens=new, stop=())
    meter.mark()
    rows = teacher.generate_tokens(batch, list(range(len(batch))), decoding, seed=0)
    meter.mark()
    return sum(c.completion_tokens for samples in rows for c in samples)


def greedy_agreement(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, batch: list[list[int]], new: int
) -> dict:
    """Greedy tokens of the graph loop, replayed and eager, and of plain `generate`, compared; and, for
    scale, plain `generate` against itself with eager instead of SDPA attention: in bf16 on a random
    model near-ties are everywhere, so any change of kernel flips some argmax and the rows part."""
    decoding = Decoding(n=1, temperature=0.0, top_p=1.0, top_k=None, max_new_tokens=new, stop=())
    cache_len = max(len(ids) for ids in batch) + new
    decoder = LocalTeacher(model, tokenizer, batch_size=len(batch), backend="graph")._decoder
    replayed = decoder.decode(batch, decoding, cache_len)
    captured = sorted(decoder._state.graphs)  # the key lengths a graph was captured for
    decoder.capture, decoder._state = False, None
    eager = decoder.decode(batch, decoding, cache_len)
    plain = plain_greedy(model, batch, new)
    model.set_attn_implementation("eager")
    plain_eager_attention = plain_greedy(model, batch, new)
    model.set_attn_implementation("sdpa")
    return {
        "captured": captured,
        "replayed_equals_eager": bool(torch.equal(replayed, eager)),
        "graph_vs_generate": agreement(replayed, plain),
        "generate_eager_attention_vs_generate": agreement(plain_eager_attention, plain),
    }


def plain_greedy(model: Qwen2ForCausalLM, batch: list[list[int]], new: int) -> torch.Tensor:
    input_ids = torch.tensor(batch, device=next(model.parameters()).device)
    return model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=new,
        pad_token_id=0,
    )[:, input_ids.shape[1] :].cpu()  # fmt: skip


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    same_rows = (a == b).all(dim=1)
    first_difference = (a != b).int().argmax(dim=1)[~same_rows]
    return {
        "rows_equal": int(same_rows.sum()),
        "rows": len(a),
        "tokens_equal": round(float((a == b).float().mean()), 4),
        "median_first_difference": float(first_difference.float().median())
        if len(first_difference)
        else None,
    }


def measure(name: str, run, model: Qwen2ForCausalLM, device: torch.device) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    meter = Meter(device)
    tokens = run(meter)
    (t0, e0), (t1, e1) = meter.marks
    result = {"new_tokens": tokens, "seconds": t1 - t0, "new_tok_per_s": tokens / (t1 - t0)}
    if e0 is not None:
        result.update(mJ_per_new_token=1000 * (e1 - e0) / tokens, new_tokens_per_J=tokens / (e1 - e0),
                      avg_W=(e1 - e0) / (t1 - t0))  # fmt: skip
    if device.type == "cuda":
        result["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 1e9
    print(
        name,
        json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on whatever device there is")
    parser.add_argument(
        "--variants",
        default="generate:1024,graph:1024,graph:2048",
        help="project variants backend:prompts, comma-separated",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, prompt_len, new = (SMOKE, 16, 8) if args.smoke else (QWEN2_15B, 128, 256)
    model = fresh_model(shape, device)
    tokenizer = word_tokenizer(shape["vocab_size"])
    agreement = greedy_agreement(model, tokenizer, prompts(64, prompt_len, shape["vocab_size"]), 64)
    print("agreement", json.dumps(agreement), flush=True)
    # One-time costs out of the timed variants, as the agreement step took them out of plain generate's
    # (CUDA context, cuBLAS handles): the race sampler's Triton compile (~1 s, then cached on disk).
    warmup = measure(
        "warmup_graph_16",
        lambda m: project_generate(
            model, tokenizer, prompts(16, prompt_len, shape["vocab_size"]), 8, "graph", m
        ),
        model,
        device,
    )
    results = {
        "plain_generate_64": measure(
            "plain_generate_64",
            lambda m: plain_generate(model, prompts(64, prompt_len, shape["vocab_size"]), new, m),
            model,
            device,
        )
    }
    for variant in args.variants.split(","):
        backend, count = variant.split(":")
        batch = prompts(int(count), prompt_len, shape["vocab_size"])
        results[f"project_{backend}_{count}"] = measure(
            f"project_{backend}_{count}",
            lambda m, b=batch, k=backend: project_generate(model, tokenizer, b, new, k, m),
            model,
            device,
        )
    base = results["plain_generate_64"].get("new_tokens_per_J")
    ratios = {
        name: r["new_tokens_per_J"] / base for name, r in results.items() if base and "new_tokens_per_J" in r
    }
    report = {
        "meta": {
            "date": time.strftime("%Y-%m-%d"),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "shape": shape, "prompt_tokens": prompt_len, "new_tokens": new, "temperature": 0.7,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
        },
        "agreement": agreement,
        "warmup": warmup,
        "variants": results,
        "new_tokens_per_J_vs_plain_generate_64": ratios,
        "goal": ">= 10x plain_generate_64's new tokens per joule",
    }  # fmt: skip
    (args.out / "generation.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
