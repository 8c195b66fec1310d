"""A small GPT with the ablation switches the Markov-chain experiments need.

Read top to bottom: the two sublayers (attention and MLP), the pre-LayerNorm
residual block, then the model with its init, forward pass and optimizer (the
config, its checks and what a model weighs are in gpt_config.py). Everything the seed's ablations c1..c12 vary is a field of
GPTConfig; nothing here knows about Markov chains.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanomarkov.errors import NanoMarkovError
from nanomarkov.gpt_config import GPTConfig


def alibi_distances(n_head: int, size: int, device=None) -> torch.Tensor:
    """(n_head, size): alibi's bias at distances 0..size-1, -2**-h * distance in head h.

    Press et al. (2022) start at 2**(-8/n_head) and halve more slowly; these slopes start at 1, so that
    head 0 sees the last few tokens almost alone. Measured on fanizza (2 layers, 32 wide, 4 heads and a
    position table, 500 steps): 0.0044 nats of excess with these slopes, 0.030 with Press et al.'s."""
    slopes = 2.0 ** -torch.arange(n_head, dtype=torch.float32, device=device)
    return -slopes[:, None] * torch.arange(size, dtype=torch.float32, device=device)


def distance_bias(table: torch.Tensor, size: int) -> torch.Tensor:
    """(n_head, size, size) from a (n_head, >= size) table of biases by distance: table[h, i - j] for the
    scores of query i and key j <= i, and -inf for a key after the query (so it is the causal mask too)."""
    positions = torch.arange(size, device=table.device)
    distance = positions[:, None] - positions[None, :]
    return table[:, distance.clamp(min=0)].masked_fill(distance < 0, float("-inf"))


def alibi_bias(n_head: int, size: int, device=None) -> torch.Tensor:
    """(n_head, size, size): what alibi with its fixed slopes adds to the attention scores."""
    return distance_bias(alibi_distances(n_head, size, device), size)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # One matmul for queries, keys and values of all heads: fewer, larger kernels.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.alibi = config.alibi
        # Trained, alibi's lines may bend: rrxor's heads come to read every third token back, the phase it needs
        # (0.0009 nats after 2000 steps, against 0.044 with the lines fixed).
        self.distance_table = (
            nn.Parameter(alibi_distances(config.n_head, config.block_size)) if config.alibi_trained else None
        )

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): heads become a batch dimension.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if self.alibi:
            bias = self.score_bias(T, x.device).to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def score_bias(self, size: int, device=None) -> torch.Tensor:
        """(n_head, size, size): what alibi adds to the scores of a size-token input, from its fixed slopes or
        from the trained table (alibi_trained)."""
        if self.distance_table is not None:
            return distance_bias(self.distance_table, size)
        return alibi_bias(self.n_head, size, device)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        frozen = config.mlp_first_matrix_identity
        # A frozen identity has no use for a bias; a trainable one would undo the ablation.
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias and not frozen)
        if frozen:
            self.c_fc.weight.requires_grad_(False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.filter = config.mlp_filter

    def activation(self, x):
        if self.filter == "GELU":
            return F.gelu(x)
        power = {"RELU": 1, "RELU2": 2, "RELU3": 3}[self.filter]
        x = F.relu(x)
        return x if power == 1 else x**power

    def forward(self, x):
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


def _norm(config: GPTConfig) -> nn.Module:
    # Identity rather than None keeps forward() free of branches when use_ln is off.
    return nn.LayerNorm(config.n_embd, bias=config.bias) if config.use_ln else nn.Identity()


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        # With mlp_only there is no attention sublayer, with attn_only no MLP: no parameters for it at all.
        self.ln_1 = None if config.mlp_only else _norm(config)
        self.attn = None if config.mlp_only else CausalSelfAttention(config)
        self.ln_2 = None if config.attn_only else _norm(config)
        self.mlp = None if config.attn_only else MLP(config)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(self.ln_1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise NanoMarkovError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_ape else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)

        self.apply(self._init_weights)
        # Each residual sublayer adds its output to the stream; scaling their output
        # projections by 1/sqrt(count) keeps the stream's variance from growing with depth.
        n_residual = max(1, config.n_layer * (1 if config.mlp_only or config.attn_only else 2))
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(n_residual))

        # Frozen tables are set after the random init so nothing can overwrite them.
        with torch.no_grad():
            if config.one_hot_embed:
                self.wte.weight.copy_(torch.eye(config.vocab_size, config.n_embd))
                self.wte.weight.requires_grad_(False)
            for block in self.blocks:
                if config.mlp_first_matrix_identity:
                    block.mlp.c_fc.weight.copy_(torch.eye(config.n_embd))
        if config.lm_head_tied:
            # One tensor, two uses. With one_hot_embed it is frozen, so the logits are
            # simply the first vocab_size coordinates of the final residual stream: the
            # seed's c3..c12 ran that way, which makes the learned map directly readable.
            # Only the weight is shared: a head bias stays the head's own (trainable) tensor.
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count; a tied (shared) tensor is counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None).

        Logits come for every position, since evaluation compares each of them with
        the chain. Targets equal to -1 are left out of the loss. One exception: in training
        mode, with targets, a model that predicts_from_token_alone returns logits None
        (token_table_forward: nothing in training reads them, and they cost as much as the step).
        """
        if idx.dim() != 2:
            raise NanoMarkovError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        T = idx.size(1)
        if T > self.config.block_size:
            raise NanoMarkovError(
                f"input has {T} positions but block_size is {self.config.block_size}; "
                f"crop the input or build the model with a larger block_size"
            )
        if targets is not None and targets.shape != idx.shape:
            raise NanoMarkovError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        if self.training and targets is not None and self.predicts_from_token_alone():
            return self.token_table_forward(idx, targets)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def predicts_from_token_alone(self) -> bool:
        """True when a position's logits depend on its own token only: no blocks, no position
        embedding, no dropout. The whole model is then one vocab_size x vocab_size logit table."""
        return self.config.n_layer == 0 and self.wpe is None and self.config.dropout == 0

    def token_table_forward(self, idx, targets):
        """forward's result for a model that predicts_from_token_alone, at a fraction of the cost.

        The usual path multiplies every position's embedding by the head (B*T rows); here the
        head sees each of the vocab_size embeddings once, and the loss counts each (token, next
        token) pair of the batch, so a step costs the same at any batch size (MM-1000: 157 ms
        instead of 1.2 s at 8,192 tokens). Same loss and gradients; used in training only, so
        that hooks on wte, ln_f and lm_head see (B, T, ...) tensors whenever a tool looks.
        """
        vocab = self.config.vocab_size
        table = self.lm_head(self.ln_f(self.wte.weight))
        log_probs = F.log_softmax(table.float(), dim=-1)
        keep = targets.reshape(-1) >= 0
        pairs = idx.reshape(-1)[keep] * vocab + targets.reshape(-1)[keep]
        # index_add_, not bincount: MPS has it too, and counts of whole numbers add up exactly in any order.
        counts = log_probs.new_zeros(vocab * vocab).index_add_(0, pairs, log_probs.new_ones(pairs.numel()))
        return None, -(counts.view(vocab, vocab) * log_probs).sum() / keep.sum()

    def optimizer_groups(self, weight_decay: float) -> list:
        """AdamW parameter groups: decay matrices and embeddings, not biases, norms or alibi's distance tables.

        Frozen tensors (one-hot embedding, identity first matrix) are left out so the
        optimizer neither decays nor moves them.
        """
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        # A distance table is a bias per head and distance, not a matrix: decay would pull it to no bias at all.
        decays = {name: p.dim() >= 2 and not name.endswith("distance_table") for name, p in named}
        return [
            {"params": [p for name, p in named if decays[name]], "weight_decay": weight_decay},
            {"params": [p for name, p in named if not decays[name]], "weight_decay": 0.0},
        ]

    def configure_optimizer(
        self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), device_type: str = "cpu"
    ) -> torch.optim.AdamW:
        # The fused kernel exists for CUDA only; elsewhere the default implementation is used.
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(self.optimizer_groups(weight_decay), lr=learning_rate, betas=tuple(betas), **extra)
