"""One generated token through the language model on one rank, fast.

Each decoder layer is run in two pieces around its attention: before it (input norm, q/k/v projections, rotary
embedding) and after it (output projection, residual, norm, MLP, residual), composed from transformers' own
modules of the layer. On a GPU each piece is a CUDA graph, captured once per model (the shapes of one token never
change), so a token costs two graph launches per layer instead of dozens of kernel launches; in between, attention
runs eagerly over this rank's shard of the KV cache and is merged across ranks by log-sum-exp (exact). On a CPU the
same pieces run eagerly. "Piecewise" graphs (cut at attention) as in vLLM: the attention's length changes every
token, the rest does not.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from apbv.attention.decode import distributed_attention
from apbv.comm import Comm
from apbv.metrics import MetricsRecorder
from apbv.model.cache import ShardedKVCache

Piece = Callable[[], None]


class _LayerPieces:
    """The static buffers and the two pieces of one decoder layer for a single token."""

    def __init__(self, layer: nn.Module, hidden_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.layer, self.attn = layer, layer.self_attn
        self.rotate = sys.modules[type(self.attn).__module__].apply_rotary_pos_emb  # the model file's own
        self.hidden_in, self.cos, self.sin = hidden_in, cos, sin
        self.attn_out: torch.Tensor | None = None  # (1, 1, Hq * D), written between the pieces
        self.q = self.k = self.v = self.hidden_out = None

    def before_attention(self) -> None:
        x = self.layer.input_layernorm(self.hidden_in)
        a, d = self.attn, self.attn.head_dim
        q, k, v = (proj(x).view(1, 1, -1, d).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        q, k = self.rotate(q, k, self.cos, self.sin)
        self.q, self.k, self.v = q, k, v
        if self.attn_out is None:
            self.attn_out = torch.zeros_like(q.transpose(1, 2).reshape(1, 1, -1))

    def after_attention(self) -> None:
        hidden = self.hidden_in + self.attn.o_proj(self.attn_out)
        self.hidden_out = hidden + self.layer.mlp(self.layer.post_attention_layernorm(hidden))


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
        self._token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._position = torch.zeros((3, 1, 1), dtype=torch.long, device=self.device)

    def _prologue(self) -> None:
        """The token's embedding and rotary cos/sin, into the first layer's static inputs."""
        first = self._pieces[0]
        hidden = self.text.embed_tokens(self._token)
        cos, sin = self.text.rotary_emb(hidden, self._position)
        first.hidden_in.copy_(hidden)
        first.cos.copy_(cos)
        first.sin.copy_(sin)

    @torch.inference_mode()
    def __call__(
        self, token_id: int, position: int, comm: Comm, metrics: MetricsRecorder, cache: ShardedKVCache, is_tail: bool
    ) -> torch.Tensor:
        """The final hidden state (H,) of token `token_id` at M-RoPE position `position` (all three axes); the
        tail rank appends its K/V to `cache` first. Identical on every rank."""
        pieces = self._ready()
        self._token.fill_(token_id)
        self._position.fill_(position)
        self._prologue() if self._prologue_graph is None else self._prologue_graph.replay()
        for i, piece in enumerate(pieces):
            if i and self._graphs is None:  # eager: read the previous layer's fresh output
                piece.hidden_in = pieces[i - 1].hidden_out
            self._run(i, 0, piece.before_attention)
            if is_tail:
                cache.append(i, piece.k[0], piece.v[0])
            keys, values = cache.get(i)
            out = distributed_attention(piece.q[0], keys, values, comm, metrics)  # (Hq, 1, D)
            piece.attn_out.copy_(out.transpose(0, 1).reshape(1, 1, -1))
            self._run(i, 1, piece.after_attention)
        return self.text.norm(pieces[-1].hidden_out[:, -1])[0]

    def _run(self, layer: int, part: int, piece: Piece) -> None:
        if self._graphs is None:
            piece()
        else:
            self._graphs[layer][part].replay()

    def _ready(self) -> list[_LayerPieces]:
        """The layers' pieces over static buffers, chained (each layer reads the previous one's output), with their
        CUDA graphs captured when graphs are in use."""
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
        if self.use_graphs:
            pool, self._graphs = torch.cuda.graph_pool_handle(), []
            self._prologue_graph = _graph(self._prologue, pool)
            for i, piece in enumerate(pieces):
                if i:  # read the previous layer's graph output: the graphs chain without copies
                    piece.hidden_in = pieces[i - 1].hidden_out
                self._graphs.append(_capture(piece, pool))
        return pieces


def _capture(piece: _LayerPieces, pool: tuple) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]:
    """CUDA graphs of a layer's two pieces, in one memory pool shared by all layers."""
    return _graph(piece.before_attention, pool), _graph(piece.after_attention, pool)


def _graph(piece: Piece, pool: tuple) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `piece` in `pool` (warmed up on a side stream first, as capture requires)."""
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
