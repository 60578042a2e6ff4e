"""The model of this tree (SiT or DiT, on blocks.py): parameter names/shapes of every config, the call
contract, and safe checkpoint loading."""
import argparse

import pytest
import torch
from conftest import FAMILY, MODEL_CLASS, MODELS

from utils import UserError, load_checkpoint, load_weights, model_state_dict

CONFIGS = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "Ti": (12, 192, 3),
           "T": (6, 192, 3)}
C_OUT = {"SiT": 4, "DiT": 8}[FAMILY]  # SiT: velocity; DiT: epsilon and the variance interpolation
S2 = f"{FAMILY}-S/2"


def expected_shapes(depth, d, patch, latent=32, num_classes=1000, c_in=4, c_out=C_OUT):
    """The released parameter names and shapes (docs/checkpoints.md), written out independently of blocks.py."""
    shapes = {
        "pos_embed": (1, (latent // patch) ** 2, d),
        "x_embedder.proj.weight": (d, c_in, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
        "ap_head.linear1.weight": (2 * d, d), "ap_head.linear1.bias": (2 * d,),
        "ap_head.linear2.weight": (d, 2 * d), "ap_head.linear2.bias": (d,),
        "final_layer.linear.weight": (patch * patch * c_out, d), "final_layer.linear.bias": (patch * patch * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_config_has_the_released_names_and_shapes(name):
    size, patch = name.split("-")[1].split("/")
    depth, d, heads = CONFIGS[size]
    with torch.device("meta"):
        model = MODELS[name](input_size=32)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(depth, d, int(patch))
    assert model.blocks[0].attn.num_heads == heads
    assert not model.pos_embed.requires_grad


def test_qk_norm_adds_affine_layernorms_over_the_head_dim():
    with torch.device("meta"):
        model = MODELS[f"{FAMILY}-B/2"](input_size=32, qk_norm=True)
    state = model.state_dict()
    assert tuple(state["blocks.3.attn.q_norm.weight"].shape) == (64,)
    assert tuple(state["blocks.3.attn.k_norm.bias"].shape) == (64,)


def tiny_model(seed=0, **kwargs):
    """A 6-block model of width 64 on 8x8 latents, every weight perturbed from its (partly zero) init."""
    torch.manual_seed(seed)
    model = MODEL_CLASS(input_size=8, patch_size=2, hidden_size=64, depth=6, num_heads=4, num_classes=10, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def inputs(n=3, seed=1):
    """Latents (n, 4, 8, 8), times (SiT: in [0, 1]; DiT: steps 0..999), labels in 0..9."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.rand(n, generator=g) if FAMILY == "SiT" else torch.randint(0, 1000, (n,), generator=g)
    return x, t, torch.randint(0, 10, (n,), generator=g)


def test_s2_runs_forward_and_backward():
    model = MODELS[S2](input_size=8, num_classes=10).train()
    x, t, y = inputs()
    out, h = model(x, t, y, align_depth=4)
    assert out.shape == (3, C_OUT, 8, 8) and h.shape == (3, 16, 384)
    (out.square().mean() + h.square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_fresh_model_outputs_zero():
    torch.manual_seed(0)
    model = MODELS[S2](input_size=8, num_classes=10)
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), torch.zeros(3, C_OUT, 8, 8))


def attention_by_hand(attn, h):
    """Multi-head softmax(q k^T / sqrt(d)) v of tokens h (N, T, D) with the layer's qkv and proj weights (timm's
    Attention: qkv split as (3, heads, head dim); q and k LayerNormed over the head dim when qk_norm is on)."""
    n, tokens, width = h.shape
    heads = attn.num_heads
    F = torch.nn.functional
    q, k, v = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(n, tokens, 3, heads, width // heads).permute(
        2, 0, 3, 1, 4)
    if isinstance(attn.q_norm, torch.nn.LayerNorm):
        q = F.layer_norm(q, q.shape[-1:], attn.q_norm.weight, attn.q_norm.bias, eps=1e-5)
        k = F.layer_norm(k, k.shape[-1:], attn.k_norm.weight, attn.k_norm.bias, eps=1e-5)
    weights = torch.softmax(q @ k.transpose(-2, -1) / (width // heads) ** 0.5, dim=-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(n, tokens, width), attn.proj.weight, attn.proj.bias)


def time_embedding_by_hand(model, t):
    """The released TimestepEmbedder: cos then sin of t * 10000^(-i/128), i < 128, through Linear-SiLU-Linear."""
    F = torch.nn.functional
    angles = t[:, None].float() * torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)[None]
    mlp = model.t_embedder.mlp
    return F.linear(F.silu(F.linear(torch.cat([torch.cos(angles), torch.sin(angles)], -1), mlp[0].weight, mlp[0].bias)),
                    mlp[2].weight, mlp[2].bias)


def blocks_by_hand(model, x, t, y, depth):
    """Embedding and the first `depth` blocks written out from the DiT / SiT block equations, on the model's
    weights (attention and time embedding too)."""
    h = model.x_embedder.proj(x).flatten(2).transpose(1, 2) + model.pos_embed
    c = time_embedding_by_hand(model, t) + model.y_embedder.embedding_table.weight[y]
    for block in model.blocks[:depth]:
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = block.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        normed = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6)
        h = h + g_msa * attention_by_hand(block.attn, normed * (1 + sc_msa) + s_msa)
        normed = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6)
        h = h + g_mlp * block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(normed * (1 + sc_mlp) + s_mlp),
                                                                approximate="tanh"))
    return h


@pytest.mark.parametrize("depth, fused_attn, qk_norm", [(1, True, False), (4, True, False), (6, True, False),
                                                         (6, False, False), (6, True, True)])
def test_features_equal_the_first_blocks_applied_by_hand_and_stop_there(depth, fused_attn, qk_norm):
    model = tiny_model(fused_attn=fused_attn, qk_norm=qk_norm)
    x, t, y = inputs()
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    with torch.no_grad():
        features = model.features(x, t, y, depth=depth)
        expected = blocks_by_hand(model, x, t, y, depth)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert calls == list(range(depth)), "features() ran blocks after the requested depth"


def test_align_depth_returns_the_head_of_those_features():
    model = tiny_model()
    x, t, y = inputs()
    with torch.no_grad():
        out, aligned = model(x, t, y, align_depth=5)
        torch.testing.assert_close(aligned, model.ap_head(model.features(x, t, y, depth=5)))
        torch.testing.assert_close(out, model(x, t, y))


@pytest.mark.parametrize("depth", [0, 7, -1, None])
def test_depth_outside_the_model_is_a_clear_error(depth):
    model = tiny_model()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="outside 1..6"):
        model.features(x, t, y, depth=depth)
    if depth is not None:
        with pytest.raises(ValueError, match="outside 1..6"):
            model(x, t, y, align_depth=depth)


def test_unpatchify_lays_patch_pixels_out_as_p_p_c():
    model = MODEL_CLASS(input_size=4, patch_size=2, in_channels=3, hidden_size=12, depth=1, num_heads=2, num_classes=2,
                        learn_sigma=False)
    tokens = torch.arange(4 * 2 * 2 * 3, dtype=torch.float32).reshape(1, 4, 12)
    image = model.unpatchify(tokens)
    for token in range(4):
        r, c = divmod(token, 2)
        for p in range(2):
            for q in range(2):
                for ch in range(3):
                    assert image[0, ch, 2 * r + p, 2 * c + q] == tokens[0, token, (p * 2 + q) * 3 + ch]


def test_released_style_checkpoint_with_namespace_loads_strictly(tmp_path):
    model = tiny_model()
    path = tmp_path / "released.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {},
                "args": argparse.Namespace(model=S2, resolution=64), "steps": 10}, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["args"].model == S2
    fresh = tiny_model(seed=1)
    load_weights(fresh, model_state_dict(checkpoint), "--ckpt", f"--model {S2}")
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y), model(x, t, y))
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    load_weights(fresh, model_state_dict(load_checkpoint(tmp_path / "bare.pt")), "--ckpt", f"--model {S2}")


class Payload:
    """Stands for any object a downloaded pickle could bring in."""


def test_checkpoint_pickling_other_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"ema": {}, "extra": Payload()}, path)
    with pytest.raises(UserError, match=r"refused to load: the file pickles test_models.Payload"):
        load_checkpoint(path)


def test_truncated_and_missing_checkpoints_are_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"ema": tiny_model().state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(UserError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_another_architecture_names_the_differences():
    other_patch = MODEL_CLASS(input_size=8, patch_size=4, hidden_size=64, depth=6, num_heads=4, num_classes=10)
    with pytest.raises(UserError, match=rf"another architecture than --model {S2}: .*shapes differ.*x_embedder"):
        load_weights(tiny_model(), other_patch.state_dict(), "--ckpt a.pt", f"--model {S2}")
