"""Teacher sampling for healing: `count` sequences of `seq` tokens the teacher writes itself (softmax(logits / T),
T = temperature, from random first tokens), made in chunks of `batch` rows.

Chunk c draws its first tokens and every sample from its own generator, seeded seed * 1000003 + c, so the pool
does not depend on how the chunks are spread over processes: under torchrun process r samples chunks r, r + N, ...
and every process gets the whole pool (all_gather).

Two decoders with the same numerics (tests/test_heal_sampling.py: same logits to 1e-5, same tokens):
- CachedDecoder: PuzzleDecoder.forward_step, whose KV cache grows by concatenation at every step (copied whole each
  time); it is the one that runs an FSDP-sharded teacher (every process then steps in lockstep).
- StaticDecoder: keys and values preallocated for all `seq` positions of each attention layer (none for
  attention-free layers) and written in place at the step's position; attention reads every position, those after
  the current one masked to -inf (exp(-inf) = 0: the same softmax). On a GPU one decode step is captured in a CUDA
  graph and replayed, so a step costs one launch; the sampling itself (softmax, multinomial) runs outside the graph.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from models.decoder import PuzzleDecoder, rotate_half
from models.heal_dist import Ranks, is_sharded

SEED_STRIDE = 1_000_003          # chunk c of seed s draws from generator seed s * SEED_STRIDE + c


class CachedDecoder:
    """Decode steps through PuzzleDecoder.forward_step (a KV cache grown by concatenation)."""

    def __init__(self, model: PuzzleDecoder, rows: int, device: torch.device):
        self.model, self.rows, self.device = model, rows, device
        self.reset()

    def reset(self) -> None:
        """An empty cache, for a new sequence."""
        config, dtype = self.model.config, next(self.model.parameters()).dtype
        self.past = [(torch.zeros(self.rows, config.kv_heads(i), 0, config.head_dim, device=self.device, dtype=dtype),) * 2
                     for i in self.model.attention_layers]

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [rows, vocab] of the token after `tokens` [rows, 1], which sit at `position` (steps in order)."""
        logits, self.past = self.model.forward_step(tokens, self.past)
        return logits[:, -1]


class StaticDecoder:
    """Decode steps over a preallocated KV cache of `seq` positions, optionally replayed from a CUDA graph."""

    def __init__(self, model: PuzzleDecoder, rows: int, seq: int, device: torch.device, graph: bool):
        config, dtype = model.config, model.embed_tokens.weight.dtype
        self.model, self.rows = model, rows
        self.cache = {i: tuple(torch.zeros(rows, config.kv_heads(i), seq, config.head_dim, device=device, dtype=dtype)
                               for _ in range(2)) for i in model.attention_layers}
        self.keys = torch.arange(seq, device=device)
        self.cos, self.sin = model.rope(self.keys, dtype)       # [seq, head_dim], read at the step's position
        self.tokens = torch.zeros(rows, 1, dtype=torch.int64, device=device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.graph = self._capture() if graph else None

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, then record one step (its output stays in self.logits)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward()
        return graph

    def reset(self) -> None:
        """Nothing to clear: a position's key and value are written before any query reads them."""

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [rows, vocab] of the token after `tokens` [rows, 1] at `position` (read before the next step)."""
        self.tokens.copy_(tokens)
        self.position.fill_(position)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits

    def _forward(self) -> torch.Tensor:
        """One step of PuzzleDecoder.forward_step's layers on the static cache."""
        model = self.model
        x = model.embed_tokens(self.tokens)
        cos, sin = self.cos.index_select(0, self.position), self.sin.index_select(0, self.position)
        masked = self.keys > self.position                     # key position after the query's: may not attend
        for i, layer in enumerate(model.layers):
            if i in self.cache:
                x = x + self._attend(layer.attn, layer.attn_norm(x), cos, sin, masked, *self.cache[i])
            if layer.has_ffn:
                x = x + layer.ffn(layer.ffn_norm(x))
        return model.head(x)[:, -1]

    def _attend(self, attn, x, cos, sin, masked, keys, values) -> torch.Tensor:
        """models.decoder.Attention.step for one new token, its key and value written into the cache at the
        position. The query heads of a key/value head are the rows of one matrix product ([groups, hd] x [hd, seq])
        rather than a broadcast, which torch.matmul would copy the whole cache for."""
        b, kv, hd = x.shape[0], attn.kv_heads, attn.head_dim
        q = attn.q_proj(x).view(b, kv, attn.num_heads // kv, hd)          # query head j = kv * groups + g
        k = attn.k_proj(x).view(b, kv, 1, hd)
        q = q * cos + rotate_half(q, hd // 2) * sin
        keys.index_copy_(2, self.position, (k * cos + rotate_half(k, hd // 2) * sin).to(keys.dtype))
        values.index_copy_(2, self.position, attn.v_proj(x).view(b, kv, 1, hd).to(values.dtype))
        scores = torch.matmul(q, keys.transpose(-1, -2)) * (hd**-0.5)     # [b, kv, groups, seq]
        scores = scores.masked_fill(masked, float("-inf"))
        if scores.dtype == torch.float32:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        return attn.o_proj(torch.matmul(probs, values).reshape(b, 1, -1))


@torch.no_grad()
def sample_rows(decoder, seq: int, vocab: int, gen: torch.Generator, temperature: float, bar) -> torch.Tensor:
    """[rows, seq] int64 (on the CPU): random first tokens, then `seq - 1` tokens sampled from the decoder."""
    decoder.reset()
    ids = torch.randint(0, vocab, (decoder.rows, 1), generator=gen, device=gen.device)
    out, step = [ids], ids
    for position in range(seq - 1):
        probs = torch.softmax(decoder.step(step, position).float() / temperature, -1)
        step = torch.multinomial(probs, 1, generator=gen)
        out.append(step)
        bar.update(decoder.rows)
    return torch.cat(out, 1).cpu()


def make_decoder(teacher: PuzzleDecoder, rows: int, seq: int, device: torch.device, static: bool,
                 graphs: bool | None):
    """A StaticDecoder (CUDA graph on a GPU unless graphs=False) or, with static=False or a sharded teacher, a
    CachedDecoder."""
    if not static or is_sharded(teacher):
        return CachedDecoder(teacher, rows, device)
    return StaticDecoder(teacher, rows, seq, device, device.type == "cuda" if graphs is None else graphs)


@torch.no_grad()
def sample_pool(teacher: PuzzleDecoder, count: int, seq: int, device: torch.device, batch: int, seed: int, autocast,
                *, temperature: float = 1.0, ranks: Ranks = Ranks(), static: bool = True,
                graphs: bool | None = None) -> torch.Tensor:
    """`count` sequences of `seq` tokens the teacher samples (see the module docstring), [count, seq] int64 on the
    CPU in every process; a tqdm bar of the tokens made (main process, on a terminal)."""
    from tqdm import tqdm
    device = torch.device(device)
    chunks = [min(batch, count - start) for start in range(0, count, batch)]
    rounds = math.ceil(len(chunks) / ranks.world)
    lockstep = is_sharded(teacher)              # a sharded teacher's steps gather weights from every process
    mine = {}
    bar = tqdm(total=sum(chunks[ranks.rank::ranks.world]) * (seq - 1), desc="sampling", unit="tok", unit_scale=True,
               disable=None if ranks.main else True)
    decoder = None
    with autocast():
        for c in range(ranks.rank, rounds * ranks.world if lockstep else len(chunks), ranks.world):
            rows = chunks[c] if c < len(chunks) else 1          # past the last chunk: keep step with the others
            if decoder is None or decoder.rows != rows:
                decoder = None                                  # free the previous cache (and graph) first
                decoder = make_decoder(teacher, rows, seq, device, static, graphs)
            gen = torch.Generator(device=device).manual_seed(seed * SEED_STRIDE + c)
            sampled = sample_rows(decoder, seq, teacher.config.vocab_size, gen, temperature,
                                  bar if c < len(chunks) else tqdm(disable=True))
            if c < len(chunks):
                mine[c] = sampled
    bar.close()
    if ranks.world > 1:
        parts = [None] * ranks.world
        dist.all_gather_object(parts, mine)
        mine = {c: rows for part in parts for c, rows in part.items()}
    return torch.cat([mine[c] for c in sorted(mine)])
