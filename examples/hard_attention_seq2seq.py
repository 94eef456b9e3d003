"""Hard attention learns sequence tasks that need one source position per output token.

A small encoder-decoder whose only view of the source is ``attnkern.nn.HardAttention``
(keys: token + position embeddings; queries: a GRU decoder's states) learns

* ``reverse``: output t is source token L - 1 - t;
* ``copy-offset``: output t is source token (t + 3) mod L;

trained either with Gumbel-softmax straight-through (``mode="gumbel"``) or by sampling with
REINFORCE (``mode="sample"``, each output token's loss as its negative reward, the batch mean
as baseline). Both decode in eval mode, where the module takes the argmax (on attnkern's
fused top-k kernel). With the attention switched off the decoder cannot see the source and
stays near chance (1 / 18).

    python examples/hard_attention_seq2seq.py          # all four runs and the control
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import attnkern  # noqa: E402

VOCAB, LENGTH, EMBED, HIDDEN, BOS, OFFSET = 20, 12, 32, 64, 1, 3
TASKS = ("reverse", "copy-offset")


def make_batch(task: str, n: int, generator: torch.Generator):
    src = torch.randint(2, VOCAB, (n, LENGTH), generator=generator)
    tgt = src.flip(1) if task == "reverse" else src.roll(-OFFSET, 1)
    return src, tgt


class HardSeq2Seq(torch.nn.Module):
    def __init__(self, mode: str, attention_on: bool = True, temperature: float = 1.0):
        super().__init__()
        self.attention_on = attention_on
        self.embed = torch.nn.Embedding(VOCAB, EMBED)
        self.position = torch.nn.Embedding(LENGTH, EMBED)
        self.encoder = torch.nn.Linear(EMBED, HIDDEN)
        self.decoder = torch.nn.GRU(EMBED, HIDDEN, batch_first=True)
        self.attention = attnkern.nn.HardAttention(HIDDEN, score="general", mode=mode, temperature=temperature)
        self.out = torch.nn.Linear(2 * HIDDEN, VOCAB)

    def _inputs(self, tokens, start):
        return self.embed(tokens) + self.position(torch.arange(start, start + tokens.shape[-1]))

    def _predict(self, states, keys):
        """Logits, and for sampling the attended position's log-probability and the entropy of
        the attention distribution (else None, None)."""
        if not self.attention_on:
            return self.out(torch.cat([torch.zeros_like(states), states], -1)), None, None
        context, _, log_prob = self.attention(states, keys)
        entropy = None
        if log_prob is not None:
            log_p = torch.log_softmax(self.attention.scores(states, keys) / self.attention.temperature, -1)
            entropy = -(log_p.exp() * log_p).sum(-1)
        return self.out(torch.cat([context, states], -1)), log_prob, entropy

    def _keys(self, src):
        return torch.tanh(self.encoder(self._inputs(src, 0)))

    def forward(self, src, tgt_in):  # teacher forcing
        states, _ = self.decoder(self._inputs(tgt_in, 0))
        return self._predict(states, self._keys(src))

    @torch.no_grad()
    def greedy(self, src):
        keys = self._keys(src)
        token, hidden, out = torch.full((src.shape[0], 1), BOS), None, []
        for t in range(LENGTH):
            state, hidden = self.decoder(self._inputs(token, t), hidden)
            token = self._predict(state, keys)[0].argmax(-1)
            out.append(token)
        return torch.cat(out, 1)


def train(mode: str, task: str, attention_on: bool = True, steps: int = 200, batch: int = 64, seed: int = 0,
          temperature: float = 1.0, entropy_bonus: float = 0.05) -> float:
    """Seeded training run; returns the greedy token accuracy on 1000 fresh sequences (eval mode)."""
    torch.manual_seed(seed)
    model = HardSeq2Seq(mode, attention_on, temperature)
    data = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        src, tgt = make_batch(task, batch, data)
        tgt_in = torch.cat([torch.full((batch, 1), BOS), tgt[:, :-1]], 1)
        logits, log_prob, entropy = model(src, tgt_in)
        token_loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view_as(tgt)
        loss = token_loss.mean()
        if log_prob is not None:  # REINFORCE: reward -token_loss, baseline its batch mean per position
            advantage = (token_loss - token_loss.mean(0, keepdim=True)).detach()
            # the entropy bonus keeps every decoder step exploring until its reward signal arrives
            loss = loss + (advantage * log_prob).mean() - entropy_bonus * entropy.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src, tgt = make_batch(task, 1000, data)
    return (model.greedy(src) == tgt).double().mean().item()


if __name__ == "__main__":
    torch.set_num_threads(1)  # ops this small only lose to thread hand-offs
    for mode in ("gumbel", "sample"):
        for task in TASKS:
            start = time.perf_counter()
            acc = train(mode, task)
            print(f"{mode:6s} {task:11s} greedy token accuracy {acc:.4f} ({time.perf_counter() - start:.1f} s)")
    print(f"attention off, reverse: {train('gumbel', 'reverse', attention_on=False):.4f} (chance {1 / 18:.3f})")
