"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

A query ``x`` is labelled by attention over the support set ``S = {(x_i, y_i)}``:

    a(x, x_i) = softmax_i( cos(f(x, S), g(x_i, S)) / T ),      P(y = c | x, S) = sum_{i: y_i = c} a(x, x_i),

i.e. the attention-weighted sum of the support one-hot labels. The module outputs ``log P`` (computed as a
log-sum-exp of the log-attention over each class's support examples, which never takes the log of a zero), and trains
on its negative log-likelihood on the query set. ``T = 1`` is the paper; it can be set or learned.

Without full-context embeddings (FCE), ``f = g = f'`` is the backbone. With ``fce=True`` (the paper's appendix):

* ``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)``: a bidirectional LSTM (hidden size = embedding size) reads the
  support embeddings ``g'(x_i)`` in support order (grouped by class, as the datamodules give them);
* ``f(x, S) = attLSTM(f'(x), g(S), K)``: ``K`` processing steps of an LSTM whose input is always ``f'(x)`` and whose
  recurrent input is ``[h_{k-1}, r_{k-1}]``, with the read-out ``r_{k-1} = sum_i softmax_i(h_{k-1}^T g(x_i)) g(x_i)``,

      h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1}),     h_k = h^_k + f'(x),     f(x, S) = h_K,

  starting from ``h_0 = f'(x)`` (so the first read already attends with the query) and ``c_0 = 0``.

``nn.LSTM`` has no batching rule under ``torch.func.vmap`` ("Batching rule not implemented for aten::lstm.input. We
could not generate a fallback", torch 2.14), so the LSTM cells here are written with plain tensor ops
(:class:`LSTMCell`): they run under ``vmap`` with exact (higher-order) gradients, and FCE works with
``vectorize=True``. Every LSTM parameter takes part in every step, so DDP needs no ``find_unused_parameters``;
without FCE no LSTM is built.

How support and query pass through the batch-statistics backbone: see :mod:`lit_meta.algorithms.embedding`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.errors import require_positive
from datamodules.task_batch import TaskBatch
from lit_meta.algorithms.embedding import EmbeddingMetaLearner, one_hot
from lit_meta.algorithms.protonet import Temperature, cosine_similarities


class LSTMCell(nn.Module):
    """An LSTM cell in plain tensor ops (safe under ``vmap``), with a recurrent input of its own size.

    ``gates = W_ih x + W_hh r + b`` split into input, forget, cell and output gates (PyTorch's order and
    initialisation, ``U(-1/sqrt(H), 1/sqrt(H))``); ``c' = sigma(f) c + sigma(i) tanh(g)``, ``h' = sigma(o) tanh(c')``.
    ``r`` is the previous hidden state, or anything of size ``recurrent_size`` (the attention LSTM feeds
    ``[h, r]``).

    Args:
        input_size: size of ``x``.
        hidden_size: size of ``h`` and ``c``.
        recurrent_size: size of the recurrent input (``hidden_size`` for a plain LSTM).
    """

    def __init__(self, input_size: int, hidden_size: int, recurrent_size: int | None = None) -> None:
        super().__init__()
        recurrent_size = hidden_size if recurrent_size is None else recurrent_size
        self.hidden_size = hidden_size
        bound = 1.0 / math.sqrt(hidden_size)
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, recurrent_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size).uniform_(-bound, bound))

    def forward(self, x: Tensor, recurrent: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        """One step: ``(h', c')`` from input ``x``, recurrent input and cell state (any leading dimensions)."""
        gates = x @ self.weight_ih.t() + recurrent @ self.weight_hh.t() + self.bias
        i, f, g, o = gates.chunk(4, dim=-1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cell), cell


class FullContextEmbedding(nn.Module):
    """FCE of Vinyals et al. (appendix A): a bidirectional support LSTM and a K-step attention LSTM for queries.

    Args:
        dim: the embedding size (also the LSTMs' hidden size, so that the skip connections add up).
        steps: ``K``, the attention LSTM's processing steps.
    """

    def __init__(self, dim: int, steps: int = 5) -> None:
        super().__init__()
        require_positive(fce_steps=steps)
        self.steps = steps
        self.support_forward = LSTMCell(dim, dim)
        self.support_backward = LSTMCell(dim, dim)
        self.query_lstm = LSTMCell(dim, dim, recurrent_size=2 * dim)

    def _run(self, cell: LSTMCell, sequence: list[Tensor]) -> list[Tensor]:
        h = torch.zeros_like(sequence[0])
        c = torch.zeros_like(sequence[0])
        outputs = []
        for x in sequence:
            h, c = cell(x, h, c)
            outputs.append(h)
        return outputs

    def support(self, support_z: Tensor) -> Tensor:
        """``g(x_i, S)`` for the ``[S, D]`` support embeddings ``g'(x_i)``."""
        # A Python loop over the (few) support positions; each step is batched over the tasks by vmap.
        sequence = list(support_z.unbind(0))
        forward = self._run(self.support_forward, sequence)
        backward = self._run(self.support_backward, sequence[::-1])[::-1]
        return torch.stack(forward) + torch.stack(backward) + support_z

    def query(self, query_z: Tensor, support_g: Tensor) -> Tensor:
        """``f(x, S)`` for the ``[Q, D]`` query embeddings ``f'(x)``, given the ``[S, D]`` support ``g(x_i, S)``."""
        h, c = query_z, torch.zeros_like(query_z)
        for _ in range(self.steps):
            read = torch.softmax(h @ support_g.transpose(-1, -2), dim=-1) @ support_g
            h_hat, c = self.query_lstm(query_z, torch.cat([h, read], dim=-1), c)
            h = h_hat + query_z
        return h


class MatchingNet(EmbeddingMetaLearner):
    """Matching Networks, with optional full-context embeddings.

    Args:
        backbone: an embedding network (``out_features: null``).
        fce: use full-context embeddings (builds the LSTMs; needs ``embedding_dim`` or ``backbone.embedding_dim``).
        fce_steps: ``K``, processing steps of the attention LSTM.
        embedding_dim: the backbone's embedding size, where it has no ``embedding_dim`` attribute (FCE only).
        temperature: cosine similarities are divided by it before the softmax (1.0 is the paper).
        learn_temperature: make the temperature a trained parameter.
        joint_embedding: embed support and query as one batch (see :mod:`lit_meta.algorithms.embedding`).
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner` (optimizer, lr_scheduler, vectorize, chunk_size).
    """

    def __init__(
        self,
        backbone: nn.Module,
        fce: bool = False,
        fce_steps: int = 5,
        embedding_dim: int | None = None,
        temperature: float = 1.0,
        learn_temperature: bool = False,
        joint_embedding: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, joint_embedding=joint_embedding, **kwargs)
        self.fce = FullContextEmbedding(self.embedding_dim(embedding_dim), fce_steps) if fce else None
        self.temperature = Temperature(temperature, learn_temperature)

    def contextual_embeddings(self, support_x: Tensor, query_x: Tensor, training: bool = False) -> tuple[Tensor, Tensor]:
        """``g(x_i, S)`` ``[S, D]`` and ``f(x, S)`` ``[Q, D]`` of one task (the plain embeddings without FCE)."""
        support_z, query_z = self.embed_task(support_x, query_x, training)
        if self.fce is None:
            return support_z, query_z
        support_g = self.fce.support(support_z)
        return support_g, self.fce.query(query_z, support_g)

    def attention_logits(self, query_f: Tensor, support_g: Tensor) -> Tensor:
        """``[Q, S]`` pre-softmax attention: cosine similarities over the temperature."""
        return self.temperature(cosine_similarities(query_f, support_g))

    def attention(self, support_x: Tensor, query_x: Tensor) -> Tensor:
        """``[Q, S]`` attention of one task's queries over its support examples (rows sum to one)."""
        support_g, query_f = self.contextual_embeddings(support_x, query_x)
        return self.attention_logits(query_f, support_g).softmax(dim=-1)

    def log_probabilities(self, attention_logits: Tensor, support_y: Tensor, ways: int) -> Tensor:
        """``[Q, N]`` ``log sum_{i: y_i = c} a_i``, as a log-sum-exp of log-attention (no log of zero)."""
        log_attention = attention_logits.log_softmax(dim=-1)  # [Q, S]
        in_class = one_hot(support_y, ways, torch.bool)  # [S, N]
        masked = torch.where(in_class, log_attention.unsqueeze(-1), float("-inf"))  # [Q, S, N]
        return torch.logsumexp(masked, dim=-2)

    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        support_g, query_f = self.contextual_embeddings(support_x, query_x, training)
        log_probs = self.log_probabilities(self.attention_logits(query_f, support_g), support_y, self.ways_of(support_y))
        return F.nll_loss(log_probs, query_y), log_probs

    def task_metrics(self, batch: TaskBatch) -> dict[str, Tensor]:
        # Nothing adapts with gradients: evaluation needs no graph.
        with torch.no_grad():
            return super().task_metrics(batch)
