"""Parity, speed and peak memory of "sdpa", "eager" and "attnkern" on a transformers model.

    python examples/hf_parity_speed.py                      # random-init Mistral-style config
    python examples/hf_parity_speed.py /path/to/checkpoint  # a local checkpoint (nothing is downloaded)
    python examples/hf_parity_speed.py --seq 4096 --window 512 --batch 1 --reps 5

For each attention implementation it runs a forward (eval, no grad) and a training step
(forward + backward on the causal-LM loss) on the same weights and tokens, and reports:
the relative error of the logits and of the gradients against "eager", the median time
(the implementations are timed in rotation, so drift in the machine's speed hits all
alike), the ratio to "sdpa", and the peak memory the step added (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the rise of the process's peak resident set,
after returning freed heap to the OS and resetting the peak through /proc/self/clear_refs).
Timings and memory describe this machine only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnkern  # noqa: E402
from attnkern.integrations import hf  # noqa: E402

IMPLS = ("sdpa", "eager", "attnkern")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="local checkpoint directory (default: a random-init config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--window", type=int, default=256, help="sliding window of the random config (0: none)")
    p.add_argument("--layers", type=int, default=2, help="layers of the random config")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="auto", help="attnkern backend")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_model(args, dtype):
    import transformers

    if args.model:
        config = transformers.AutoConfig.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype,
                                                                  attn_implementation="eager")
    else:  # Mistral-style: GQA (8 query heads, 2 key/value heads) and a sliding window
        config = transformers.MistralConfig(
            vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=args.layers,
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=max(4096, args.seq),
            sliding_window=args.window or None, attention_dropout=0.0, tie_word_embeddings=False,
        )
        model = transformers.MistralForCausalLM(config).to(dtype)
    return model.to(args.device), config


class PeakMemory:
    """Peak memory a block adds on top of what is in use when it starts."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.libc = None
        if self.device.type == "cpu":
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:
                pass

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            if self.libc is not None:
                self.libc.malloc_trim(0)  # freed heap goes back to the OS, so reuse shows up as growth
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak resident set (VmHWM) to the current one
                self.start = self._status("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = None if self.start is None else self._status("VmHWM") - self.start
        return False


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_of(fn, device):
    with PeakMemory(device) as mem:
        fn()
    return mem.peak


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    args = parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    hf.register(backend=args.backend)
    torch.manual_seed(args.seed)
    model, config = build_model(args, dtype)
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    window = getattr(config, "sliding_window", None)
    print(f"model: {args.model or 'random-init ' + type(config).__name__}, layers {config.num_hidden_layers}, "
          f"heads {config.num_attention_heads}/{getattr(config, 'num_key_value_heads', config.num_attention_heads)} "
          f"(q/kv), sliding window {window}, batch {args.batch}, seq {args.seq}, {dtype}, device {args.device}, "
          f"torch {torch.__version__}, attnkern backends {attnkern.available_backends()}")

    def forward():
        model.eval()
        with torch.no_grad():
            return model(ids).logits.float()

    def train_step():
        model.train()  # attention dropout is 0 in the random config; a checkpoint's is kept
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

    # parity and peak memory, one implementation at a time (eager first: it is the reference)
    results, reference = {}, {}
    for impl in ("eager",) + tuple(i for i in IMPLS if i != "eager"):
        model.set_attn_implementation(impl)
        logits, grads = forward(), train_step()
        if impl == "eager":
            reference = {"logits": logits, "grads": grads}
        results[impl] = dict(logits_err=rel(logits, reference["logits"]), grad_err=rel(grads, reference["grads"]),
                             fwd_mem=peak_of(forward, args.device), train_mem=peak_of(train_step, args.device),
                             fwd=[], train=[])
        model.zero_grad(set_to_none=True)
    # timings in rotation, so a machine that speeds up or slows down affects every implementation alike
    for rep in range(args.warmup + args.reps):
        for impl in IMPLS:
            model.set_attn_implementation(impl)
            fwd, train = time_once(forward, args.device), time_once(train_step, args.device)
            if rep >= args.warmup:
                results[impl]["fwd"].append(fwd)
                results[impl]["train"].append(train)
    for r in results.values():
        r["fwd"], r["train"] = statistics.median(r["fwd"]), statistics.median(r["train"])

    base = results["sdpa"]
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"
    print(f"\n{'impl':<9} {'fwd ms':>9} {'vs sdpa':>8} {'fwd peak MiB':>13} {'train ms':>10} {'vs sdpa':>8} "
          f"{'train peak MiB':>15} {'logits err':>11} {'grad err':>10}")
    for impl in IMPLS:
        r = results[impl]
        print(f"{impl:<9} {r['fwd'] * 1e3:>9.1f} {base['fwd'] / r['fwd']:>7.2f}x {mib(r['fwd_mem']):>13} "
              f"{r['train'] * 1e3:>10.1f} {base['train'] / r['train']:>7.2f}x {mib(r['train_mem']):>15} "
              f"{r['logits_err']:>11.2e} {r['grad_err']:>10.2e}")
    print("\n'vs sdpa': sdpa's time / this time (above 1: faster). errors: relative norm against eager.")


if __name__ == "__main__":
    main()
