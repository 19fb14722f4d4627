"""Peak memory and time per block of ``optimize(..., calibration=..., inplace=True)`` on a decoder LM.

The model is a random-init Llama-architecture decoder of about 1.1 B parameters (TinyLlama's
shape: 22 blocks, width 2048, MLP 5632, 32 heads, 4 key/value heads, vocabulary 32000); random
weights serve for memory and speed (no pretrained decoder can be downloaded here).  The resident
set size (RSS) is sampled every 50 ms by a thread while the call runs; the figure is the peak RSS
over the RSS with the model loaded, as a multiple of the model's bytes.

    python benchmarks/bench_llm_memory.py                    # the 1.1 B model (tens of minutes on 2 cores)
    python benchmarks/bench_llm_memory.py --layers 2         # the same width, 2 blocks (a quick check)
    python benchmarks/bench_llm_memory.py --whole            # the whole-model path, for comparison
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import threading
import time

import torch

import autorank


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    def __init__(self, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, rss(), threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every)


class BlockTimes(logging.Handler):
    pattern = re.compile(r"block (\d+)/(\d+) .*: (moments and curves|built).*, ([0-9.]+)s$")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.curves: list[float] = []
        self.build: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = self.pattern.search(record.getMessage())
        if m:
            (self.curves if m.group(3) == "moments and curves" else self.build).append(float(m.group(4)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--budget", type=float, default=0.7)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max-groups", type=int, default=8, help="CurveConfig.max_groups (ALDS's largest k)")
    ap.add_argument("--whole", action="store_true", help="DataAware(streaming=False)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    times = BlockTimes()
    logging.getLogger("autorank").addHandler(times)
    logging.getLogger("autorank").setLevel(logging.INFO)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    t = time.perf_counter()
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {n_params / 1e9:.3f} B parameters, {model_bytes / 2 ** 30:.2f} GiB fp32, "
          f"built in {time.perf_counter() - t:.0f}s")
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, cfg.vocab_size, (args.batch_size, args.tokens), generator=g),
                "attention_mask": torch.ones(args.batch_size, args.tokens, dtype=torch.long)}
               for _ in range(args.batches)]
    example = {k: v[:1] for k, v in batches[0].items()}
    gc.collect()
    base = rss()
    sampler = Sampler()
    sampler.start()
    t = time.perf_counter()
    result = autorank.optimize(
        model, args.budget, example, calibration=batches, inplace=True, progress=False,
        compression=autorank.Compression(curves=autorank.CurveConfig(max_groups=args.max_groups)),
        data=autorank.DataAware(streaming=False) if args.whole else None)
    wall = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    growth = (sampler.peak - base) / model_bytes
    plan = result.plan
    print(f"path: {'whole model' if args.whole else 'block by block'}; calibration {args.batches} x "
          f"{args.batch_size} x {args.tokens} tokens; budget {args.budget} of the parameters")
    print(f"RSS with the model loaded {base / 2 ** 30:.2f} GiB, peak {sampler.peak / 2 ** 30:.2f} GiB: "
          f"growth {growth:.2f} x the model's bytes (target <= 1.0)")
    print(f"kept {plan.totals['params'] / plan.totals['params_before']:.4f} of the parameters; "
          f"largest layer error {plan.max_error:.4f}; wall {wall:.0f}s")
    if times.curves:
        print(f"per block: pass 1 (moments + curves) median {sorted(times.curves)[len(times.curves) // 2]:.1f}s, "
              f"pass 2 (build + refit) median {sorted(times.build)[len(times.build) // 2]:.1f}s "
              f"over {len(times.curves)} blocks")
    print("timings:", {k: round(v, 1) for k, v in result.timings.items()})


if __name__ == "__main__":
    main()
