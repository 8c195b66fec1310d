import dataclasses
import math

import pytest
import torch

from nanomarkov import NanoMarkovError
from nanomarkov.model import GPT, GPTConfig

V, T, D = 11, 16, 32  # vocab, block size, width used by most tests


def cfg(**kw):
    base = dict(n_layer=2, n_head=4, n_embd=D, block_size=T, vocab_size=V)
    base.update(kw)
    return GPTConfig(**base)


def make(**kw):
    torch.manual_seed(0)
    return GPT(cfg(**kw)).eval()


def tokens(b=3, t=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g)


def expected_params(c: GPTConfig, trainable_only=False):
    """Parameter count from the architecture's description, independent of the code."""
    d, h = c.n_embd, c.mlp_ratio * c.n_embd
    ln = (2 if c.bias else 1) * d if c.use_ln else 0
    n = 0 if (c.one_hot_embed and trainable_only) else c.vocab_size * d  # token embedding
    n += c.block_size * d if c.pos_ape else 0  # positions
    per_block = 0
    if not c.mlp_only:
        per_block += ln + 3 * d * d + d * d + (4 * d if c.bias else 0)  # ln_1, qkv, proj
    if not c.attn_only:
        first_frozen = c.mlp_first_matrix_identity and trainable_only
        per_block += ln + (0 if first_frozen else d * h) + h * d  # ln_2, fc, proj
        per_block += ((0 if c.mlp_first_matrix_identity else h) + d) if c.bias else 0
    n += c.n_layer * per_block + ln  # blocks, ln_f
    n += 0 if c.lm_head_tied else c.vocab_size * d  # head
    n += c.vocab_size if c.lm_head_bias else 0  # its bias, never tied nor frozen
    n += c.n_layer * c.n_head * c.block_size if c.alibi_trained else 0  # a bias per head and distance
    return n


SWITCHES = [
    {},
    dict(bias=True),
    dict(lm_head_tied=False),
    dict(use_ln=False),
    dict(pos_ape=False),
    dict(mlp_only=True),
    dict(mlp_ratio=1),
    dict(mlp_ratio=1, mlp_first_matrix_identity=True),
    dict(mlp_ratio=1, mlp_first_matrix_identity=True, bias=True),
    dict(one_hot_embed=True),
    dict(one_hot_embed=True, lm_head_tied=False),
    dict(n_layer=0),
    dict(n_layer=3, mlp_only=True, use_ln=False, pos_ape=False, lm_head_tied=False),
    dict(lm_head_bias=True),
    dict(lm_head_bias=True, one_hot_embed=True),
    dict(lm_head_bias=True, lm_head_tied=False, n_layer=0),
    dict(attn_only=True),
    dict(attn_only=True, bias=True, mlp_ratio=1, mlp_filter="RELU3"),
    dict(attn_only=True, use_ln=False, pos_ape=False, one_hot_embed=True, lm_head_tied=False, lm_head_bias=True),
    dict(attn_only=True, n_layer=0),
    dict(alibi=True),
    dict(alibi=True, pos_ape=False, n_head=2, attn_only=True),
    dict(alibi=True, alibi_trained=True, pos_ape=False),
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "plain")
def test_parameter_counts_follow_the_switches(switches):
    c = cfg(**switches)
    model = GPT(c)
    assert model.num_params() == expected_params(c)
    assert model.num_params(trainable_only=True) == expected_params(c, trainable_only=True)


def test_plain_count_by_hand():
    # 2 blocks of width 32, MLP 128 wide, no biases, tied head, 11 tokens, 16 positions
    blocks = 2 * (32 + 4 * 32 * 32 + 32 + 2 * 32 * 128)
    assert GPT(cfg()).num_params() == 11 * 32 + 16 * 32 + blocks + 32


def test_mlp_only_has_no_attention_parameters():
    names = [n for n, _ in GPT(cfg(mlp_only=True)).named_parameters()]
    assert not any("attn" in n or "ln_1" in n for n in names)
    assert any("attn" in n for n, _ in GPT(cfg()).named_parameters())


def test_attn_only_has_no_mlp_parameters_and_adds_only_attention():
    model = make(attn_only=True)
    names = [n for n, _ in model.named_parameters()]
    assert not any("mlp" in n or "ln_2" in n for n in names) and any("attn" in n for n in names)
    idx = tokens()
    with torch.no_grad():
        x = model.wte(idx) + model.wpe.weight
        for block in model.blocks:
            x = x + block.attn(block.ln_1(x))
        assert torch.equal(model(idx)[0], model.lm_head(model.ln_f(x)))


def test_no_layernorm_anywhere_when_use_ln_off():
    model = GPT(cfg(use_ln=False))
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in GPT(cfg()).modules()) == 2 * 2 + 1


def test_pos_ape_off_has_no_position_parameter():
    assert GPT(cfg(pos_ape=False)).wpe is None
    assert not any("wpe" in n for n, _ in GPT(cfg(pos_ape=False)).named_parameters())


def test_without_attention_and_positions_each_output_depends_only_on_its_token():
    model = make(mlp_only=True, pos_ape=False)
    idx = tokens()
    logits, _ = model(idx)
    # the same token anywhere gives the same logits
    single, _ = model(idx.reshape(-1, 1))
    torch.testing.assert_close(logits.reshape(-1, V), single.reshape(-1, V))
    perm = torch.randperm(T)
    torch.testing.assert_close(model(idx[:, perm])[0], logits[:, perm])


def test_with_positions_the_same_token_differs_by_position():
    model = make(mlp_only=True)
    idx = torch.full((1, T), 3)
    logits, _ = model(idx)
    assert not torch.allclose(logits[0, 0], logits[0, 5])


@pytest.mark.parametrize("switches", [{}, dict(use_ln=False, pos_ape=False), dict(n_head=1)])
def test_causality(switches):
    model = make(**switches)
    idx = tokens()
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % V
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_attention_mixes_positions():
    # Without positions an attention model still sees its prefix, so a token's
    # output depends on what came before it.
    model = make(pos_ape=False)
    a, _ = model(torch.tensor([[1, 2, 5]]))
    b, _ = model(torch.tensor([[3, 4, 5]]))
    assert not torch.allclose(a[0, 2], b[0, 2])


def test_loss_matches_cross_entropy_and_logits_cover_every_position():
    model = make()
    idx, targets = tokens(seed=1), tokens(seed=2)
    targets[0, :4] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (3, T, V)
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    keep = targets != -1
    assert loss.item() == pytest.approx(-(picked[keep]).mean().item(), rel=1e-5)
    logits_only, none = model(idx)
    assert none is None
    torch.testing.assert_close(logits_only, logits)


def test_shorter_inputs_are_fine_and_longer_ones_rejected():
    model = make()
    assert model(tokens(t=5))[0].shape == (3, 5, V)
    with pytest.raises(NanoMarkovError, match="block_size"):
        model(tokens(t=T + 1))
    with pytest.raises(NanoMarkovError):
        model(tokens(t=4), tokens(t=5))


def one_adam_step(model):
    opt = model.configure_optimizer(weight_decay=0.1, learning_rate=0.1)
    _, loss = model.train()(tokens(), tokens(seed=3))
    loss.backward()
    opt.step()
    return opt


@pytest.mark.parametrize("tied", [True, False])
def test_one_hot_embedding_is_identity_and_stays_frozen(tied):
    model = make(n_embd=16, n_head=2, one_hot_embed=True, lm_head_tied=tied)
    eye = torch.eye(V, 16)
    assert torch.equal(model.wte.weight, eye)
    assert torch.equal(model.wte(torch.tensor([4]))[0], eye[4])
    head_before = model.lm_head.weight.detach().clone()
    opt = one_adam_step(model)
    assert torch.equal(model.wte.weight, eye) and not model.wte.weight.requires_grad
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.wte.weight) not in optimised
    # tied: the head is that same frozen one-hot table; untied: the head learns
    assert torch.equal(model.lm_head.weight, eye) == tied
    assert torch.equal(model.lm_head.weight, head_before) == tied


def test_identity_first_matrix_is_identity_and_stays_so():
    model = make(mlp_ratio=1, mlp_first_matrix_identity=True, bias=True)
    opt = one_adam_step(model)
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    for block in model.blocks:
        assert torch.equal(block.mlp.c_fc.weight, torch.eye(D))
        assert block.mlp.c_fc.bias is None
        assert id(block.mlp.c_fc.weight) not in optimised
        assert not torch.equal(block.mlp.c_proj.weight, torch.zeros(D, D))


def test_tied_head_shares_the_embedding():
    model = make()
    assert model.lm_head.weight is model.wte.weight
    untied = make(lm_head_tied=False)
    assert untied.lm_head.weight is not untied.wte.weight


@pytest.mark.parametrize("tied", [True, False])
def test_head_bias_is_added_to_the_logits_and_trains_beside_a_frozen_one_hot_head(tied):
    model = make(n_embd=16, n_head=2, one_hot_embed=True, lm_head_tied=tied, lm_head_bias=True)
    assert torch.equal(model.lm_head.bias, torch.zeros(V))  # starts as the model without it
    bias = torch.linspace(-2, 2, V)
    with torch.no_grad():
        model.lm_head.bias.copy_(bias)
        final = model.ln_f(model.blocks[1](model.blocks[0](model.wte(tokens()) + model.wpe.weight)))
        assert torch.allclose(model(tokens())[0], final @ model.lm_head.weight.T + bias, rtol=0, atol=1e-5)
    opt = one_adam_step(model)
    optimised = {id(p) for g in opt.param_groups for p in g["params"] if g["weight_decay"] == 0}
    assert id(model.lm_head.bias) in optimised and not torch.equal(model.lm_head.bias, bias)
    assert torch.equal(model.wte.weight, torch.eye(V, 16))
    assert (model.lm_head.weight is model.wte.weight) == tied


def test_optimizer_groups_decay_only_trainable_matrices():
    model = make(bias=True, one_hot_embed=True, lm_head_tied=False)
    decay, no_decay = model.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 and p.requires_grad for p in decay["params"])
    assert all(p.dim() < 2 and p.requires_grad for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params(trainable_only=True)


def test_a_trained_alibis_tables_are_not_decayed():
    model = make(alibi=True, alibi_trained=True)
    decay, no_decay = model.optimizer_groups(0.1)
    tables = [block.attn.distance_table for block in model.blocks]
    assert all(any(t is p for p in no_decay["params"]) for t in tables)
    assert not any(t is p for t in tables for p in decay["params"])


def test_residual_projections_get_the_smaller_init():
    torch.manual_seed(0)
    model = GPT(cfg(n_layer=4, n_embd=64, n_head=4))
    std_fc = model.blocks[0].mlp.c_fc.weight.std().item()
    std_proj = model.blocks[0].mlp.c_proj.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.1)
    assert std_proj == pytest.approx(0.02 / 8**0.5, rel=0.1)


FORMULAS = {
    "GELU": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
    "RELU": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "RELU2": lambda x: torch.where(x > 0, x * x, torch.zeros_like(x)),
    "RELU3": lambda x: torch.where(x > 0, x * x * x, torch.zeros_like(x)),
}


@pytest.mark.parametrize("name", list(FORMULAS))
def test_activation_matches_its_formula(name):
    model = make(mlp_filter=name)
    x = torch.linspace(-3, 3, 61)
    torch.testing.assert_close(model.blocks[0].mlp.activation(x), FORMULAS[name](x))
    # and it is the one used in the MLP's forward pass
    mlp = model.blocks[0].mlp
    h = torch.randn(2, D)
    torch.testing.assert_close(mlp(h), mlp.c_proj(FORMULAS[name](mlp.c_fc(h))))


def test_dropout_only_in_training_mode():
    model = make(dropout=0.5)
    idx = tokens()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


def test_config_round_trips_through_asdict():
    c = cfg(one_hot_embed=True, mlp_filter="RELU2")
    assert GPTConfig(**dataclasses.asdict(c)) == c


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(n_embd=8, n_head=1, one_hot_embed=True), "one_hot_embed"),
        (dict(mlp_first_matrix_identity=True), "mlp_ratio"),
        (dict(mlp_filter="relu"), "mlp_filter"),
        (dict(mlp_filter="SWISH"), "mlp_filter"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(n_embd=0), "n_embd"),
        (dict(n_head=0), "n_head"),
        (dict(block_size=0), "block_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=-1), "n_layer"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(n_embd=32.0), "n_embd"),
        (dict(n_layer=True), "n_layer"),
        (dict(use_ln="yes"), "use_ln"),
        (dict(lm_head_bias=1), "lm_head_bias"),
        (dict(attn_only=1), "attn_only"),
        (dict(attn_only=True, mlp_only=True), "attn_only and mlp_only together"),
        (dict(attn_only=True, mlp_only=True, n_layer=0), "attn_only and mlp_only together"),
        (dict(attn_only=True, mlp_ratio=1, mlp_first_matrix_identity=True), "attn_only blocks have none"),
        (dict(attn_only=True, n_embd=30, n_head=4), "divisible"),
        (dict(alibi=True, mlp_only=True), "mlp_only blocks have no attention"),
        (dict(alibi=1), "alibi"),
        (dict(alibi_trained=True), "set alibi=True too"),
    ],
)
def test_invalid_configs_are_rejected(bad, needle):
    with pytest.raises(NanoMarkovError, match=needle):
        cfg(**bad)


def attention_by_definition(attn, h, bias):
    """An attention sublayer's output computed one head, query and key at a time: the softmax, over the
    keys at or before the query, of q.k / sqrt(head width) + bias(head, query - key), times the values."""
    B, T, C = h.shape
    width = C // attn.n_head
    q, k, v = attn.c_attn(h).split(C, dim=2)
    heads = torch.zeros(B, T, C)
    for b in range(B):
        for head in range(attn.n_head):
            dims = slice(head * width, (head + 1) * width)
            for i in range(T):
                scores = torch.stack(
                    [q[b, i, dims] @ k[b, j, dims] / math.sqrt(width) + bias(head, i - j) for j in range(i + 1)]
                )
                heads[b, i, dims] = scores.softmax(0) @ v[b, : i + 1, dims]
    return attn.c_proj(heads)


@pytest.mark.parametrize("alibi, slopes", [(True, [1, 1 / 2, 1 / 4, 1 / 8]), (False, [0, 0, 0, 0])])
def test_attention_computes_its_definition_with_alibis_slopes_halving_from_one(alibi, slopes):
    model = make(alibi=alibi, bias=True)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
        h = torch.randn(2, 9, D)
        by_definition = attention_by_definition(attn, h, lambda head, distance: -slopes[head] * distance)
        torch.testing.assert_close(attn(h), by_definition, atol=1e-5, rtol=1e-5)


def test_a_trained_alibi_starts_at_the_slopes_and_adds_its_table_by_distance():
    model = make(alibi=True, alibi_trained=True)
    attn = model.blocks[0].attn
    start = [[-(2.0**-head) * distance for distance in range(T)] for head in range(4)]
    assert torch.equal(attn.distance_table, torch.tensor(start))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
        h = torch.randn(2, 9, D)
        table = attn.distance_table.clone()
        by_definition = attention_by_definition(attn, h, lambda head, distance: table[head, distance])
        torch.testing.assert_close(attn(h), by_definition, atol=1e-5, rtol=1e-5)


def test_mlp_only_ignores_head_divisibility():
    GPT(cfg(n_embd=30, n_head=4, mlp_only=True))


def test_gpt_needs_a_config():
    with pytest.raises(NanoMarkovError):
        GPT(dict(n_layer=1))


@pytest.mark.parametrize(
    "switches",
    [
        dict(),
        dict(one_hot_embed=True, n_embd=V, n_head=1),
        dict(lm_head_tied=False, lm_head_bias=True),
        dict(use_ln=False),
    ],
)
def test_a_zero_layer_model_trains_on_its_token_table_with_the_same_loss_and_gradients(switches):
    # The reference is the usual path (eval mode: every position through the head), computed separately.
    model = make(n_layer=0, pos_ape=False, **switches)
    idx, targets = tokens(b=4), tokens(b=4, seed=2)
    targets[0, :5] = -1
    reference = {}
    logits, loss = model(idx, targets)
    loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    table_logits, table_loss = model.train()(idx, targets)
    table_loss.backward()
    assert table_logits is None and model.predicts_from_token_alone()
    assert table_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert reference and {name for name, p in model.named_parameters() if p.grad is not None} == set(reference)
    for name, p in model.named_parameters():
        if name in reference:
            torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("switches", [dict(n_layer=1), dict(n_layer=0, pos_ape=True), dict(n_layer=0, dropout=0.1)])
def test_a_model_that_reads_more_than_its_token_trains_on_every_position(switches):
    model = make(**{"pos_ape": False, **switches}).train()
    logits, loss = model(tokens(), tokens(seed=2))
    assert not model.predicts_from_token_alone() and logits.shape == (3, T, V) and loss.requires_grad
