"""A small GPT with the ablation switches the Markov-chain experiments need.

Read top to bottom: the config and its checks, the two sublayers (attention and
MLP), the pre-LayerNorm residual block, then the model with its init, forward
pass and optimizer. Everything the seed's ablations c1..c12 vary is a field of
GPTConfig; nothing here knows about Markov chains.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanomarkov.errors import NanoMarkovError

MLP_FILTERS = ("GELU", "RELU", "RELU2", "RELU3")
# GPTConfig fields newer than the first checkpoints and exports: a file without one means its default,
# which builds the model that file was written from.
ADDED_FIELDS = ("lm_head_bias", "attn_only")


@dataclass
class GPTConfig:
    n_layer: int = 2  # residual blocks; 0 leaves embed -> head, i.e. a bigram model
    n_head: int = 8  # attention heads per block (unused when mlp_only)
    n_embd: int = 128  # width of the residual stream
    block_size: int = 255  # longest input accepted; positions 0..block_size-1 get an embedding
    vocab_size: int = 101  # output classes: the K states plus the BOS token
    dropout: float = 0.0  # on embeddings, attention weights and sublayer outputs, in [0, 1)
    bias: bool = False  # biases in the Linear and LayerNorm layers
    use_ln: bool = True  # LayerNorm before every sublayer and before the head; False removes all
    pos_ape: bool = True  # add a learned absolute position embedding to the token embedding
    mlp_only: bool = False  # blocks have no attention at all, so a position sees only itself
    attn_only: bool = False  # blocks have no MLP and no second LayerNorm (mlp_ratio, mlp_filter unused)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd
    mlp_filter: str = "GELU"  # MLP nonlinearity: GELU, RELU, RELU2 = relu(x)**2, RELU3 = relu(x)**3
    mlp_first_matrix_identity: bool = False  # MLP's first Linear is a frozen identity (needs mlp_ratio 1)
    one_hot_embed: bool = False  # frozen token embedding whose row i is e_i (needs vocab_size <= n_embd)
    lm_head_tied: bool = True  # the head reuses the token embedding (with one_hot_embed: a frozen readout)
    lm_head_bias: bool = False  # learned bias on the logits; its own tensor when tied, trained under one_hot_embed

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise NanoMarkovError(f"GPTConfig.{name} must be an integer, got {value!r}")
            if value < (0 if name == "n_layer" else 1):
                raise NanoMarkovError(f"GPTConfig.{name} must be positive, got {value}")
        for name in (
            "bias",
            "use_ln",
            "pos_ape",
            "mlp_only",
            "attn_only",
            "mlp_first_matrix_identity",
            "one_hot_embed",
            "lm_head_tied",
            "lm_head_bias",
        ):
            if not isinstance(getattr(self, name), bool):
                raise NanoMarkovError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise NanoMarkovError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.mlp_filter not in MLP_FILTERS:
            raise NanoMarkovError(
                f"GPTConfig.mlp_filter must be one of {', '.join(MLP_FILTERS)}, got {self.mlp_filter!r}"
            )
        if self.attn_only and self.mlp_only:
            raise NanoMarkovError(
                "attn_only and mlp_only together leave a block with nothing in it; set one of them to False "
                "(n_layer=0 is the model without blocks)"
            )
        if self.attn_only and self.mlp_first_matrix_identity:
            raise NanoMarkovError(
                "mlp_first_matrix_identity sets the first matrix of an MLP, and attn_only blocks have none; "
                "set one of them to False"
            )
        if not self.mlp_only and self.n_embd % self.n_head != 0:
            raise NanoMarkovError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) so the heads "
                f"split the residual stream evenly; change one of them or set mlp_only=True"
            )
        if self.mlp_first_matrix_identity and self.mlp_ratio != 1:
            raise NanoMarkovError(
                f"mlp_first_matrix_identity needs a square first matrix, i.e. mlp_ratio=1 "
                f"(got mlp_ratio={self.mlp_ratio})"
            )
        if self.one_hot_embed and self.vocab_size > self.n_embd:
            raise NanoMarkovError(
                f"one_hot_embed needs one residual dimension per token: vocab_size ({self.vocab_size}) "
                f"> n_embd ({self.n_embd}); raise n_embd to at least {self.vocab_size}"
            )


# Values a training step keeps for backward per token, per layer and per unit of width: Korthikanti
# et al. (2022, "Reducing activation recomputation") count 34 bytes of 16-bit activations, i.e. 17
# values, leaving out the attention matrix that scaled_dot_product_attention never holds whole.
ACTIVATION_VALUES_PER_WIDTH = 17
# Values per token and vocabulary entry: the logits, their softmax and its gradient.
LOGIT_VALUES_PER_TOKEN = 3
FLOAT32_BYTES = 4


def weight_count(config: GPTConfig) -> int:
    """The values GPT(config) allocates, from its sizes alone (an upper bound: every bias and norm counted).

    The head's matrix is counted even when tied: it is built before the tie replaces it."""
    width, hidden = config.n_embd, config.mlp_ratio * config.n_embd
    attention = 0 if config.mlp_only else 4 * width * width
    per_layer = attention + 2 * width * hidden + hidden + 9 * width
    embeddings = config.vocab_size * width + (config.block_size * width if config.pos_ape else 0)
    return embeddings + config.n_layer * per_layer + config.vocab_size * (width + 1) + 2 * width


def training_bytes(config: GPTConfig, batch_size: int) -> int:
    """The bytes one float32 training step on `batch_size` sequences of block_size tokens holds, estimated
    from the sizes alone: the weights, their gradients and AdamW's two moments (4 values a weight), the
    activations (ACTIVATION_VALUES_PER_WIDTH a token, layer and unit of width) and the logits."""
    tokens = batch_size * config.block_size
    per_token = config.n_embd * max(config.n_layer, 1) * ACTIVATION_VALUES_PER_WIDTH
    per_token += config.vocab_size * LOGIT_VALUES_PER_TOKEN
    return FLOAT32_BYTES * (4 * weight_count(config) + tokens * per_token)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # One matmul for queries, keys and values of all heads: fewer, larger kernels.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): heads become a batch dimension.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


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
        the chain. Targets equal to -1 are left out of the loss.
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

    def optimizer_groups(self, weight_decay: float) -> list:
        """AdamW parameter groups: decay matrices and embeddings, not biases or norms.

        Frozen tensors (one-hot embedding, identity first matrix) are left out so the
        optimizer neither decays nor moves them.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def configure_optimizer(
        self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), device_type: str = "cpu"
    ) -> torch.optim.AdamW:
        # The fused kernel exists for CUDA only; elsewhere the default implementation is used.
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(self.optimizer_groups(weight_decay), lr=learning_rate, betas=tuple(betas), **extra)
