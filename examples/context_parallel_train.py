"""Train a small transformer with its sequences sharded across ranks (context parallelism),
composed with torch's data parallelism (DDP), and check the loss curve against one process.

    torchrun --nproc-per-node 2 examples/context_parallel_train.py                 # CPU, gloo
    torchrun --nproc-per-node 4 examples/context_parallel_train.py --cp 2          # 2-way CP x 2-way DP
    torchrun --nproc-per-node 8 examples/context_parallel_train.py --device cuda   # GPUs, NCCL

Ranks are split into data-parallel replicas of ``--cp`` ranks each (default: all ranks in one
context-parallel group). Each replica takes its own batch; inside a replica every rank holds
one zigzag shard of each sequence (tokens, labels, and RoPE positions from
``sequence_positions``) and attention runs through ``context_parallel_attention``: layer 0
causal, layer 1 a causal sliding window (the halo strategy). Every rank's loss is the mean over
its own tokens; DDP over all ranks averages those, which is the mean over every token.

After training, rank 0 trains the same model from the same seed on the whole batch in one
process (plain ``attnkern.scaled_dot_product_attention``) and prints both loss curves; the
script exits non-zero if they differ by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import attnkern
import attnkern.distributed as cp


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, H, S, E) at the given global positions (S,)."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32, device=x.device) / half))
    angle = positions.to(torch.float32)[:, None] * freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, window):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, dim // heads, window
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, positions, group):
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rope(q, positions), rope(k, positions)
        if group is None:  # one process, the whole sequence
            att = attnkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                        window_size=self.window)
        else:
            att = cp.context_parallel_attention(q, k, v, group, causal=True, window_size=self.window)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=64, dim=32, heads=4, kv_heads=2, windows=(None, (16, 0))):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, w) for w in windows)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, positions, group=None):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions, group)
        return self.head(x)


def batches(args, step):
    """The step's global batch: (replicas * batch, seq+1) tokens, the same on every rank."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + step)
    # a learnable stream: each token is the previous one plus a per-sequence stride, mod vocab
    start = torch.randint(0, 64, (args.replicas * args.batch, 1), generator=gen)
    stride = torch.randint(1, 5, (args.replicas * args.batch, 1), generator=gen)
    return (start + stride * torch.arange(args.seq + 1)) % 64


def train_distributed(args, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    cp_groups = [dist.new_group(list(range(r, r + args.cp))) for r in range(0, world, args.cp)]
    group = cp_groups[rank // args.cp]
    replica = rank // args.cp
    torch.manual_seed(args.seed)
    model = TinyLM().to(device)
    ddp = nn.parallel.DistributedDataParallel(model)  # averages over all ranks: mean over every token
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    positions = cp.sequence_positions(args.seq, group, device=device)
    losses = []
    for step in range(args.steps):
        data = batches(args, step)[replica * args.batch:(replica + 1) * args.batch].to(device)
        tokens = cp.shard_sequence(data[:, :-1], group, dim=1)
        labels = cp.shard_sequence(data[:, 1:], group, dim=1)
        logits = ddp(tokens, positions, group)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def train_single(args, device):
    torch.manual_seed(args.seed)
    model = TinyLM().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    positions = torch.arange(args.seq, device=device)
    losses = []
    for step in range(args.steps):
        data = batches(args, step).to(device)
        logits = model(data[:, :-1], positions)
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cp", type=int, default=0, help="ranks per context-parallel group (default: all)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (divisible by 2 * cp)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per data-parallel replica")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed loss difference")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    world = dist.get_world_size()
    args.cp = args.cp or world
    if world % args.cp:
        raise SystemExit(f"--cp {args.cp} must divide the number of ranks {world}")
    args.replicas = world // args.cp
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    losses = train_distributed(args, device)
    status = 0
    if dist.get_rank() == 0:
        single = train_single(args, device)
        worst = max(abs(a - b) for a, b in zip(losses, single))
        print(f"{world} ranks: {args.replicas} data-parallel x {args.cp} context-parallel, "
              f"{args.seq} tokens per sequence")
        print("step  context-parallel  single-process")
        for step, (a, b) in enumerate(zip(losses, single)):
            print(f"{step:4d}  {a:16.6f}  {b:14.6f}")
        print(f"largest difference {worst:.2e} (tolerance {args.tolerance:.0e}); "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        status = 0 if worst <= args.tolerance and math.isfinite(worst) else 1
    flag = torch.tensor([status], device=device)
    dist.broadcast(flag, 0)
    dist.destroy_process_group()
    sys.exit(int(flag.item()))


if __name__ == "__main__":
    main()
