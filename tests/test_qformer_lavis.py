"""QFormerEncoder from the LAVIS files MiniGPT-4 loads (eva_vit_g.pth, blip2_pretrained_flant5xxl.pth,
prerained_minigpt4_7b.pth), at a tiny size with random values: the loaded encoder computes what
EVA ViT-g + ln_vision + the BERT-style Q-Former + llama_proj compute, written out below from their
published equations (not from mmgen's or transformers' modules); every key is placed or reported;
missing, unknown and misshapen keys are named."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmgen.errors import ConfigError

W, HEADS, PATCH, IMAGE, MLP = 32, 2, 8, 32, 64  # ViT width, heads, patch, image size, MLP width
BLOCKS_IN_FILE, BLOCKS_USED = 3, 2  # as EVA ViT-g's 40 blocks, of which BLIP-2 uses 39
Q, Q_HEADS, Q_FFN, Q_LAYERS, N_QUERIES = 24, 2, 48, 3, 4  # Q-Former width, heads, FFN, layers, queries
E = 40  # LLM width (llama_proj output)
CROSS = [0, 2]  # cross-attention every other layer, from layer 0
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # CLIP's, as MiniGPT-4 uses
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

CONFIG = dict(
    vision_config=dict(hidden_size=W, intermediate_size=MLP, num_hidden_layers=BLOCKS_USED, num_attention_heads=HEADS,
                       image_size=IMAGE, patch_size=PATCH),
    qformer_config=dict(hidden_size=Q, intermediate_size=Q_FFN, num_hidden_layers=Q_LAYERS,
                        num_attention_heads=Q_HEADS, cross_attention_frequency=2),
    num_query_tokens=N_QUERIES,
)


# -- the LAVIS files ---------------------------------------------------------------------------------
def _weight(*shape):
    return 0.2 * torch.randn(*shape)


def _norm(dim):  # LayerNorm weight and bias away from (1, 0), so a swapped or skipped norm shows
    return {"weight": 1 + 0.1 * torch.randn(dim), "bias": 0.1 * torch.randn(dim)}


def _linear(n_out, n_in):
    return {"weight": _weight(n_out, n_in), "bias": 0.1 * torch.randn(n_out)}


def _flat(prefix, parts: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in parts.items()}


def eva_vit_file(w=W, mlp=MLP, blocks=BLOCKS_IN_FILE, image=IMAGE, patch=PATCH) -> dict[str, torch.Tensor]:
    """eva_vit_g.pth: EVA's own names, fp16, one block more than the model uses."""
    n_patches = (image // patch) ** 2
    state = {"cls_token": _weight(1, 1, w), "pos_embed": _weight(1, 1 + n_patches, w),
             "patch_embed.proj.weight": _weight(w, 3, patch, patch), "patch_embed.proj.bias": 0.1 * torch.randn(w)}
    for i in range(blocks):
        b = f"blocks.{i}."
        state.update(_flat(b + "norm1.", _norm(w)) | _flat(b + "norm2.", _norm(w)))
        state[b + "attn.qkv.weight"] = _weight(3 * w, w)  # no bias: q and v biases are separate, k has none
        state[b + "attn.q_bias"], state[b + "attn.v_bias"] = 0.1 * torch.randn(w), 0.1 * torch.randn(w)
        state.update(_flat(b + "attn.proj.", _linear(w, w)))
        state.update(_flat(b + "mlp.fc1.", _linear(mlp, w)) | _flat(b + "mlp.fc2.", _linear(w, mlp)))
    return {k: v.half() for k, v in state.items()}


def blip2_file(w=W, q=Q, ffn=Q_FFN, layers=Q_LAYERS, cross=tuple(CROSS), queries=N_QUERIES) -> dict[str, torch.Tensor]:
    """blip2_pretrained_flant5xxl.pth's 'model': ln_vision, the BERT-layout Q-Former (with the text
    side MiniGPT-4 deletes), query tokens, and the stage-1 heads."""
    state = _flat("ln_vision.", _norm(w)) | {"query_tokens": _weight(1, queries, q)}
    bert = "Qformer.bert."
    state.update(_flat(bert + "embeddings.LayerNorm.", _norm(q)))
    state[bert + "embeddings.word_embeddings.weight"] = _weight(30, q)
    state[bert + "embeddings.position_embeddings.weight"] = _weight(16, q)
    state[bert + "embeddings.position_ids"] = torch.arange(16).view(1, -1)
    for j in range(layers):
        layer = f"{bert}encoder.layer.{j}."
        for block in ["attention"] + (["crossattention"] if j in cross else []):
            kv_in = w if block == "crossattention" else q  # cross-attention keys/values read the ViT
            state.update(_flat(f"{layer}{block}.self.query.", _linear(q, q)))
            state.update(_flat(f"{layer}{block}.self.key.", _linear(q, kv_in)))
            state.update(_flat(f"{layer}{block}.self.value.", _linear(q, kv_in)))
            state.update(_flat(f"{layer}{block}.output.dense.", _linear(q, q)))
            state.update(_flat(f"{layer}{block}.output.LayerNorm.", _norm(q)))
        for suffix in ("", "_query"):  # the text feed-forward and the query one
            state.update(_flat(f"{layer}intermediate{suffix}.dense.", _linear(ffn, q)))
            state.update(_flat(f"{layer}output{suffix}.dense.", _linear(q, ffn)))
            state.update(_flat(f"{layer}output{suffix}.LayerNorm.", _norm(q)))
    state.update(_flat("Qformer.cls.predictions.transform.dense.", _linear(q, q)))
    state["Qformer.cls.predictions.bias"] = torch.zeros(30)
    state.update(_flat("vision_proj.", _linear(8, q)) | _flat("text_proj.", _linear(8, q)) | _flat("itm_head.", _linear(2, q)))
    state["temp"] = torch.tensor(0.07)
    return state


def minigpt4_file(e=E, q=Q) -> dict[str, torch.Tensor]:
    return _flat("llama_proj.", _linear(e, q))


def write_files(folder, vit=None, blip2=None, proj=None):
    """The three files as released: the ViT bare, the others under 'model'."""
    vit, blip2, proj = vit or eva_vit_file(), blip2 or blip2_file(), proj or minigpt4_file()
    paths = {"lavis_vit": folder / "eva_vit_g.pth", "lavis_qformer": folder / "blip2_pretrained_flant5xxl.pth",
             "projection": folder / "prerained_minigpt4_7b.pth"}
    torch.save(vit, paths["lavis_vit"])
    torch.save({"model": blip2}, paths["lavis_qformer"])
    torch.save({"model": proj}, paths["projection"])
    return {k: str(v) for k, v in paths.items()}, (vit, blip2, proj)


def encoder(paths):
    from mmgen.components.qformer import QFormerEncoder

    enc = QFormerEncoder(config=CONFIG, **paths)
    enc.configure(embed_dim=E)
    return enc


# -- the reference forward, from the equations --------------------------------------------------------
def attention(q, k, v, heads):
    """Multi-head scaled dot-product attention, no mask: (b, t, d), (b, s, d) -> (b, t, d)."""
    b, t, d = q.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2)  # (b, h, t, d/h)
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)  # (b, h, t, s)
    return (weights @ v).transpose(1, 2).reshape(b, t, d)


def ln(x, p, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], p[prefix + "weight"], p[prefix + "bias"], eps)


def lin(x, p, prefix):
    return F.linear(x, p[prefix + "weight"], p[prefix + "bias"])


def eva_vit(pixels, p):
    """EVA ViT-g as LAVIS runs it: patches + [CLS] + absolute positions, pre-norm blocks (LayerNorm
    eps 1e-6, fused qkv with query and value biases and no key bias, exact GELU), no final norm."""
    x = F.conv2d(pixels, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=PATCH)  # (b, w, 4, 4)
    x = x.flatten(2).transpose(1, 2)  # (b, 16, w)
    x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + p["pos_embed"]  # (b, 17, w)
    for i in range(BLOCKS_USED):
        b = f"blocks.{i}."
        h = ln(x, p, b + "norm1.", 1e-6)
        bias = torch.cat([p[b + "attn.q_bias"], torch.zeros(W), p[b + "attn.v_bias"]])
        q, k, v = F.linear(h, p[b + "attn.qkv.weight"], bias).chunk(3, dim=-1)
        x = x + lin(attention(q, k, v, HEADS), p, b + "attn.proj.")
        h = ln(x, p, b + "norm2.", 1e-6)
        x = x + lin(F.gelu(lin(h, p, b + "mlp.fc1.")), p, b + "mlp.fc2.")
    return x


def qformer(image, p):
    """BERT layers over the query tokens alone (post-norm, eps 1e-12): self-attention, cross-
    attention to the image in layers 0, 2, ..., and the query feed-forward."""
    bert = "Qformer.bert."
    h = ln(p["query_tokens"].expand(image.shape[0], -1, -1), p, bert + "embeddings.LayerNorm.", 1e-12)
    for j in range(Q_LAYERS):
        layer = f"{bert}encoder.layer.{j}."
        for block in ["attention"] + (["crossattention"] if j in CROSS else []):
            s = f"{layer}{block}."
            source = image if block == "crossattention" else h  # keys and values: the image, or the queries
            a = attention(lin(h, p, s + "self.query."), lin(source, p, s + "self.key."), lin(source, p, s + "self.value."), Q_HEADS)
            h = ln(lin(a, p, s + "output.dense.") + h, p, s + "output.LayerNorm.", 1e-12)
        f = F.gelu(lin(h, p, layer + "intermediate_query.dense."))
        h = ln(lin(f, p, layer + "output_query.dense.") + h, p, layer + "output_query.LayerNorm.", 1e-12)
    return h


def minigpt4_visual_path(images, vit, blip2, proj):
    """MiniGPT-4's encode_img in float32: ViT -> ln_vision (eps 1e-5) -> Q-Former -> llama_proj."""
    vit = {k: v.float() for k, v in vit.items()}
    pixels = (images - MEAN) / STD
    image = ln(eva_vit(pixels, vit), blip2, "ln_vision.", 1e-5)  # (b, 17, w)
    return lin(qformer(image, blip2), proj, "llama_proj.")  # (b, queries, e)


# -- tests ---------------------------------------------------------------------------------------------
def test_lavis_files_compute_the_reference_visual_path(tmp_path):
    paths, (vit, blip2, proj) = write_files(tmp_path)
    enc = encoder(paths)
    images = torch.rand(2, 3, IMAGE, IMAGE)
    torch.testing.assert_close(enc(images), minigpt4_visual_path(images, vit, blip2, proj))
    assert not any(p.requires_grad for p in enc.parameters())

    summary = "\n".join(enc.load_summary)
    for name, state in (("eva_vit_g.pth", vit), ("blip2_pretrained_flant5xxl.pth", blip2),
                        ("prerained_minigpt4_7b.pth", proj)):
        for key in state:  # every source key placed or reported
            assert f"{name}:{key} -> " in summary or f"{name}:{key}: not used (" in summary, key
    assert "eva_vit_g.pth:blocks.2.mlp.fc1.weight: not used (ViT block 2: the model uses the first 2" in summary
    assert "Qformer.bert.encoder.layer.1.intermediate.dense.weight: not used (the Q-Former's text feed-forward" in summary
    assert "eva_vit_g.pth:blocks.0.attn.q_bias -> vision_model.encoder.layers.0.self_attn.qkv.bias (query third)" in summary
    qkv_bias = enc.vision_model.encoder.layers[1].self_attn.qkv.bias
    assert not qkv_bias[W : 2 * W].any()  # EVA has no key bias


def test_ln_vision_uses_lavis_eps_and_the_blocks_keep_theirs():
    from mmgen.components.qformer import QFormerEncoder

    enc = QFormerEncoder(config=CONFIG)  # random weights: the eps is the architecture's, not the file's
    enc.configure(embed_dim=E)
    assert enc.vision_model.post_layernorm.eps == 1e-5
    assert {layer.layer_norm1.eps for layer in enc.vision_model.encoder.layers} == {1e-6}
    x = 1e-3 * torch.randn(3, W)  # variance near eps: 1e-5 and 1e-6 give visibly different outputs
    norm = enc.vision_model.post_layernorm
    torch.testing.assert_close(norm(x), F.layer_norm(x, (W,), norm.weight, norm.bias, 1e-5))
    assert not torch.allclose(norm(x), F.layer_norm(x, (W,), norm.weight, norm.bias, 1e-6), rtol=1e-3, atol=1e-3)


def test_full_size_mapping_fills_every_tensor():
    """At BLIP-2 FlanT5-XXL's size (39 ViT blocks, 12 Q-Former layers, 6 of them cross-attending),
    the LAVIS names cover every tensor of the encoder, and nothing twice."""
    from mmgen.components.hub import random_weights_only
    from mmgen.components.lavis import lavis_key_map
    from mmgen.components.qformer import QFormerEncoder

    enc = QFormerEncoder(lavis_vit="eva_vit_g.pth", lavis_qformer="blip2_pretrained_flant5xxl.pth")
    with random_weights_only(), torch.device("meta"):
        enc.configure(embed_dim=4096)
    mapping = lavis_key_map(enc.vision_model, enc.qformer)
    assert {t for t, _ in mapping.values()} == set(enc.state_dict())
    assert len(set(mapping.values())) == len(mapping)
    assert "visual_encoder.blocks.38.attn.v_bias" in mapping and "visual_encoder.blocks.39.norm1.weight" not in mapping
    assert "Qformer.bert.encoder.layer.10.crossattention.self.key.weight" in mapping
    assert "Qformer.bert.encoder.layer.11.crossattention.self.key.weight" not in mapping
    assert tuple(enc.qformer.encoder.layer[0].crossattention.attention.key.weight.shape) == (768, 1408)


def test_a_missing_key_is_named_and_nothing_loads(tmp_path):
    vit = eva_vit_file()
    del vit["blocks.1.attn.v_bias"]
    paths, _ = write_files(tmp_path, vit=vit)
    with pytest.raises(ConfigError, match=r"no value for \['vision_model.encoder.layers.1.self_attn.qkv.bias "
                                          r"\(LAVIS: visual_encoder.blocks.1.attn.v_bias\)'\]"):
        encoder(paths)
    paths, _ = write_files(tmp_path)
    del paths["lavis_qformer"]  # ln_vision and the Q-Former are only in the BLIP-2 file
    with pytest.raises(ConfigError, match=r"ln_vision.weight"):
        encoder(paths)


def test_unknown_keys_and_wrong_shapes_are_named(tmp_path):
    blip2 = blip2_file()
    blip2["Qformer.bert.encoder.layer.0.surprise.weight"] = torch.zeros(2)
    paths, _ = write_files(tmp_path, blip2=blip2)
    with pytest.raises(ConfigError, match=r"blip2_pretrained_flant5xxl.pth: keys with no place in QFormerEncoder.*"
                                          r"Qformer.bert.encoder.layer.0.surprise.weight"):
        encoder(paths)
    vit = eva_vit_file()
    vit["pos_embed"] = torch.zeros(1, 26, W).half()  # another image size: LAVIS would interpolate
    paths, _ = write_files(tmp_path, vit=vit)
    with pytest.raises(ConfigError, match=r"eva_vit_g.pth:pos_embed has shape \(1, 26, 32\), "
                                          r"vision_model.embeddings.position_embedding needs \(1, 17, 32\)"):
        encoder(paths)
    blip2 = blip2_file()
    blip2["Qformer.bert.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(3, Q)
    paths, _ = write_files(tmp_path, blip2=blip2)
    with pytest.raises(ConfigError, match="relative-key position embeddings"):
        encoder(paths)


def test_minigpt4_checkpoint_loads_last_and_replaces_earlier_values(tmp_path):
    """MiniGPT-4 loads its checkpoint over the BLIP-2 weights (strict=False): a tensor it also
    holds wins, and the replaced one is reported as superseded."""
    proj = minigpt4_file() | {"query_tokens": _weight(1, N_QUERIES, Q), "llama_model.model.norm.weight": torch.ones(E)}
    paths, _ = write_files(tmp_path, proj=proj)
    enc = encoder(paths)
    torch.testing.assert_close(enc.query_tokens, proj["query_tokens"])
    summary = "\n".join(enc.load_summary)
    assert "blip2_pretrained_flant5xxl.pth:query_tokens: superseded by prerained_minigpt4_7b.pth:query_tokens" in summary
    assert "llama_model.model.norm.weight: not used (a language model" in summary


def test_pickled_objects_are_refused(tmp_path):
    paths, _ = write_files(tmp_path)
    torch.save({"model": minigpt4_file(), "scheduler": _Scheduler()}, paths["projection"])
    with pytest.raises(ConfigError, match="prerained_minigpt4_7b.pth: cannot be read with torch.load.weights_only=True.. "
                                          "It pickles Python objects"):
        encoder(paths)


class _Scheduler:  # stands for an object a training checkpoint pickles
    pass
