"""GPTConfig: the shape of a GPT and its ablation switches, checked; what a model of that shape weighs
(weight_count) and what a training step of it holds (training_bytes), from the sizes alone.

Apart from model.py so that what reads or writes a config (config.py, the command line's help) never
imports torch. Knows no process.
"""

from dataclasses import dataclass

from nanomarkov.errors import NanoMarkovError

MLP_FILTERS = ("GELU", "RELU", "RELU2", "RELU3")
# GPTConfig fields newer than the first checkpoints and exports: a file without one means its default,
# which builds the model that file was written from.
ADDED_FIELDS = ("lm_head_bias", "attn_only", "alibi", "alibi_trained")


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
    alibi: bool = False  # head h's attention scores fall by 2**-h per token of distance (ALiBi, steeper slopes)
    alibi_trained: bool = False  # alibi's bias is a trained table per layer, head and distance, started at its slopes
    mlp_only: bool = False  # blocks have no attention at all, so a position sees only itself
    attn_only: bool = False  # blocks have no MLP and no second LayerNorm (mlp_ratio, mlp_filter unused)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd
    mlp_filter: str = "GELU"  # MLP nonlinearity: GELU, RELU, RELU2 = relu(x)**2, RELU3 = relu(x)**3
    mlp_first_matrix_identity: bool = False  # MLP's first Linear is a frozen identity (needs mlp_ratio 1)
    one_hot_embed: bool = False  # frozen token embedding whose row i is e_i (needs vocab_size <= n_embd)
    lm_head_tied: bool = True  # the head reuses the token embedding (with one_hot_embed: a frozen readout)
    lm_head_bias: bool = False  # learned bias on the logits; its own tensor when tied, trained under one_hot_embed

    def __post_init__(self):
        self._check_types()
        self._check_combinations()

    def _check_types(self):
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
            "alibi",
            "alibi_trained",
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

    def _check_combinations(self):
        if self.attn_only and self.mlp_only:
            raise NanoMarkovError(
                "attn_only and mlp_only together leave a block with nothing in it; set one of them to False "
                "(n_layer=0 is the model without blocks)"
            )
        if self.alibi and self.mlp_only:
            raise NanoMarkovError(
                "alibi biases attention scores, and mlp_only blocks have no attention; set one of them to False"
            )
        if self.alibi_trained and not self.alibi:
            raise NanoMarkovError("alibi_trained trains alibi's bias, which is off; set alibi=True too")
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
# With alibi, attention takes a kernel that does hold the (T x T) matrix of each head: the scores, their
# softmax and its gradient, like the logits.
ATTENTION_VALUES_PER_PAIR = 3
FLOAT32_BYTES = 4


def weight_count(config: GPTConfig) -> int:
    """The values GPT(config) allocates, from its sizes alone (an upper bound: every bias and norm counted).

    The head's matrix is counted even when tied: it is built before the tie replaces it."""
    width, hidden = config.n_embd, config.mlp_ratio * config.n_embd
    attention = 0 if config.mlp_only else 4 * width * width
    per_layer = attention + 2 * width * hidden + hidden + 9 * width
    per_layer += config.n_head * config.block_size if config.alibi_trained else 0
    embeddings = config.vocab_size * width + (config.block_size * width if config.pos_ape else 0)
    return embeddings + config.n_layer * per_layer + config.vocab_size * (width + 1) + 2 * width


def training_bytes(config: GPTConfig, batch_size: int) -> int:
    """The bytes one float32 training step on `batch_size` sequences of block_size tokens holds, estimated
    from the sizes alone: the weights, their gradients and AdamW's two moments (4 values a weight), the
    activations (ACTIVATION_VALUES_PER_WIDTH a token, layer and unit of width), the logits and, with alibi,
    each head's attention matrix."""
    tokens = batch_size * config.block_size
    per_token = config.n_embd * max(config.n_layer, 1) * ACTIVATION_VALUES_PER_WIDTH
    per_token += config.vocab_size * LOGIT_VALUES_PER_TOKEN
    if config.alibi:
        per_token += config.n_layer * config.n_head * config.block_size * ATTENTION_VALUES_PER_PAIR
    return FLOAT32_BYTES * (4 * weight_count(config) + tokens * per_token)
