"""One generated token through the language model on one rank, fast.

Each decoder layer is two pieces around its attention, composed from transformers' own modules of the layer:
before it (input norm, q/k/v projections, rotary embedding) and after it (output projection, residual, norm, MLP,
residual).

On a group of one rank the whole token is one CUDA graph (`_WholeToken`): the embedding, every layer's pieces, the
new K/V written into the cache's spare rows and attention over the cache up to them (`attend_cached`, whose length
is a device tensor), the final norm. It is captured once per cache (the buffers' addresses are in the graph: a new
request, or a cache that had to grow, captures again), so a token is one graph launch and no Python per layer.

On W ranks, a layer's attention over this rank's shard is merged across ranks between its pieces, so each piece
is a graph of its own, captured once per model ("piecewise", as vLLM cuts its graphs at attention), and attention
and the merge run eagerly between them (thread ranks, which project W ranks on one GPU, run the pieces eagerly:
`Comm.replays_cuda_graphs`). On a CPU the same code runs eagerly.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from apbv.attention.decode import distributed_attention
from apbv.attention.kernels import attend_cached, cached_attention_lengths
from apbv.comm import Comm
from apbv.metrics import MetricsRecorder
from apbv.model.cache import ShardedKVCache

Piece = Callable[[], None]


def _before_attention(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """q, k, v (1, heads, 1, D) of one token: input norm, projections, rotary embedding (the model file's own)."""
    attn, d = layer.self_attn, layer.self_attn.head_dim
    x = layer.input_layernorm(hidden)
    q, k, v = (proj(x).view(1, 1, -1, d).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _after_attention(layer: nn.Module, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The layer's output: output projection and residual, post-attention norm, MLP and residual."""
    hidden = hidden + layer.self_attn.o_proj(attn_out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _heads_to_row(out: torch.Tensor) -> torch.Tensor:
    """(Hq, 1, D) attention output as the layer's (1, 1, Hq * D) input to its output projection."""
    return out.transpose(0, 1).reshape(1, 1, -1)


class _LayerPieces:
    """The static buffers and the two pieces of one decoder layer for a single token (the piecewise path)."""

    def __init__(self, layer: nn.Module, hidden_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.layer = layer
        self.hidden_in, self.cos, self.sin = hidden_in, cos, sin
        self.attn_out: torch.Tensor | None = None  # (1, 1, Hq * D), written between the pieces
        self.q = self.k = self.v = self.hidden_out = None

    def before_attention(self) -> None:
        self.q, self.k, self.v = _before_attention(self.layer, self.hidden_in, self.cos, self.sin)
        if self.attn_out is None:
            self.attn_out = torch.zeros_like(_heads_to_row(self.q[0]))

    def after_attention(self) -> None:
        self.hidden_out = _after_attention(self.layer, self.hidden_in, self.attn_out)


class DecodeStep:
    """Runs decode tokens for one model on one rank (CUDA graphs on a GPU, captured on first use)."""

    def __init__(self, text_model: nn.Module, use_graphs: bool | None = None) -> None:
        self.text = text_model
        param = next(text_model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self._pieces: list[_LayerPieces] | None = None
        self._graphs: list[tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]] | None = None
        self._prologue_graph: torch.cuda.CUDAGraph | None = None
        self._whole: _WholeToken | None = None  # the one-rank graph of the last cache decoded alone
        self.token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.position = torch.zeros((3, 1, 1), dtype=torch.long, device=self.device)

    def embed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The static token's embedding (1, 1, H) and its rotary (cos, sin) at the static position."""
        hidden = self.text.embed_tokens(self.token)
        cos, sin = self.text.rotary_emb(hidden, self.position)
        return hidden, cos, sin

    @torch.inference_mode()
    def __call__(
        self, token_id: int, position: int, comm: Comm, metrics: MetricsRecorder, cache: ShardedKVCache, is_tail: bool
    ) -> torch.Tensor:
        """The final hidden state (H,) of token `token_id` at M-RoPE position `position` (all three axes); the
        tail rank appends its K/V to `cache` first. Identical on every rank."""
        self.token.fill_(token_id)
        self.position.fill_(position)
        if comm.world_size == 1:
            return self._alone(cache)
        return self._sharded(comm, metrics, cache, is_tail)

    def _alone(self, cache: ShardedKVCache) -> torch.Tensor:
        """A group of one rank: the whole token (one graph on a GPU), its K/V written into the cache."""
        cache.make_room(1)
        if self._whole is None or not self._whole.serves(cache):
            self._whole = None  # the last cache's graph and its memory go first
            self._whole = _WholeToken(self, cache)
        hidden = self._whole.run(cache)
        cache.advance(1)
        return hidden

    def _sharded(
        self, comm: Comm, metrics: MetricsRecorder, cache: ShardedKVCache, is_tail: bool
    ) -> torch.Tensor:
        """W ranks: each layer's pieces (graphs on a GPU) around attention merged across the ranks."""
        pieces = self._ready(self.use_graphs and comm.replays_cuda_graphs)
        self._prologue() if self._prologue_graph is None else self._prologue_graph.replay()
        for i, piece in enumerate(pieces):
            if i and self._graphs is None:  # eager: read the previous layer's fresh output
                piece.hidden_in = pieces[i - 1].hidden_out
            self._run(i, 0, piece.before_attention)
            if is_tail:
                cache.append(i, piece.k[0], piece.v[0])
            keys, values = cache.get(i)
            out = distributed_attention(piece.q[0], keys, values, comm, metrics)  # (Hq, 1, D)
            piece.attn_out.copy_(_heads_to_row(out))
            self._run(i, 1, piece.after_attention)
        return self.text.norm(pieces[-1].hidden_out[:, -1])[0]

    def _prologue(self) -> None:
        """The token's embedding and rotary cos/sin, into the first layer's static inputs."""
        first = self._pieces[0]
        hidden, cos, sin = self.embed()
        first.hidden_in.copy_(hidden)
        first.cos.copy_(cos)
        first.sin.copy_(sin)

    def _run(self, layer: int, part: int, piece: Piece) -> None:
        if self._graphs is None:
            piece()
        else:
            self._graphs[layer][part].replay()

    def _ready(self, use_graphs: bool) -> list[_LayerPieces]:
        """The layers' pieces over static buffers, chained (each layer reads the previous one's output), with their
        CUDA graphs captured the first time when `use_graphs`."""
        if self._pieces is not None:
            return self._pieces
        hidden_size = self.text.config.hidden_size
        first = torch.zeros(1, 1, hidden_size, device=self.device, dtype=self.dtype)
        cos, sin = self.text.rotary_emb(first, torch.zeros((3, 1, 1), dtype=torch.long, device=self.device))
        cos, sin = cos.clone(), sin.clone()
        pieces, hidden = [], first
        for layer in self.text.layers:
            piece = _LayerPieces(layer, hidden, cos, sin)
            piece.before_attention()
            piece.after_attention()
            pieces.append(piece)
            hidden = piece.hidden_out
        self._pieces = pieces
        if use_graphs:
            pool, self._graphs = torch.cuda.graph_pool_handle(), []
            self._prologue_graph = _graph(self._prologue, pool)
            for i, piece in enumerate(pieces):
                if i:  # read the previous layer's graph output: the graphs chain without copies
                    piece.hidden_in = pieces[i - 1].hidden_out
                self._graphs.append((_graph(piece.before_attention, pool), _graph(piece.after_attention, pool)))
        return pieces


class _WholeToken:
    """One token through every layer over one cache's buffers, for a group of one rank: a CUDA graph when the
    step uses graphs (captured on the first token: two eager warm-up runs and the capture, once per request and
    whenever the cache grows), eager otherwise. The row it writes is `slot`, a device tensor set before each run,
    so the same graph serves every length the buffers have room for. It holds the buffers only weakly: a cache
    that is dropped frees its memory, and a graph over freed buffers is never replayed (`serves` is then False)."""

    def __init__(self, step: DecodeStep, cache: ShardedKVCache) -> None:
        self.step = step
        self._buffers = [(weakref.ref(k), weakref.ref(v)) for k, v in cache.buffers()]
        self.slot = torch.zeros(1, dtype=torch.long, device=step.device)  # the new token's row
        self.used = torch.zeros(1, dtype=torch.int32, device=step.device)  # rows attended: slot + 1
        self.lengths = cached_attention_lengths(step.device, cache.buffers()[0][0].shape[1])  # read by the graph
        self.hidden: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def serves(self, cache: ShardedKVCache) -> bool:
        """Whether `cache` still has the buffers this token was built over."""
        return all(k is mine_k() and v is mine_v() for (k, v), (mine_k, mine_v) in zip(cache.buffers(), self._buffers))

    def forward(self, buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        hidden, cos, sin = self.step.embed()
        for layer, (keys, values) in zip(self.step.text.layers, buffers):
            q, k, v = _before_attention(layer, hidden, cos, sin)
            keys.index_copy_(1, self.slot, k[0])
            values.index_copy_(1, self.slot, v[0])
            out = attend_cached(q[0], keys, values, self.used, layer.self_attn.scaling)
            hidden = _after_attention(layer, hidden, _heads_to_row(out))
        self.hidden = self.step.text.norm(hidden[:, -1])[0]

    def run(self, cache: ShardedKVCache) -> torch.Tensor:
        """The token written at row `cache.length` of the cache it serves; its final hidden state (H,)."""
        self.slot.fill_(cache.length)
        self.used.fill_(cache.length + 1)
        if not self.step.use_graphs:
            self.forward(cache.buffers())
            return self.hidden
        if self.graph is None:  # its warm-up runs write this same token's K/V into the same row
            self.graph = _graph(partial(self.forward, cache.buffers()), None)
        self.graph.replay()
        return self.hidden.clone()


def _graph(piece: Piece, pool: tuple | None) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `piece` in `pool` (a private pool when None), warmed up on a side stream first, as capture
    requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            piece()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        piece()
    return graph
