"""MiniGPT-5 components: Q-Former encoder, voken mapper, Min-SNR weights, LoRA / prefix adapters."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_LLAMA, TOY_TOKENIZER



TINY_BLIP2 = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8),
    qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        cross_attention_frequency=2),
    num_query_tokens=4,
)


# -- Q-Former encoder ------------------------------------------------------------------------------
def test_qformer_encoder_shapes_and_frozen():
    from mmgen.components.qformer import QFormerEncoder

    enc = QFormerEncoder(config=TINY_BLIP2)
    enc.configure(embed_dim=48)
    out = enc(torch.rand(3, 3, 40, 40))  # resized to 32 inside
    assert out.shape == (3, 4, 48) and enc.n_tokens == 4 and enc.feature_dim == 48
    assert not any(p.requires_grad for p in enc.parameters())


def test_qformer_full_size_shapes_on_meta():
    from mmgen.components.hub import random_weights_only
    from mmgen.components.qformer import QFormerEncoder

    enc = QFormerEncoder("Salesforce/blip2-flan-t5-xxl")
    with random_weights_only(), torch.device("meta"):
        enc.configure(embed_dim=4096)
    assert enc.n_tokens == 32 and enc.image_size == 224
    assert enc.vision_model.config.num_hidden_layers == 39 and enc.vision_model.config.hidden_size == 1408
    assert enc.qformer.config.hidden_size == 768 and tuple(enc.llama_proj.weight.shape) == (4096, 768)


def test_qformer_loads_blip2_folder_and_projection(tmp_path):
    from transformers import Blip2Config, Blip2Model

    from mmgen.components.qformer import QFormerEncoder

    config = Blip2Config(vision_config=TINY_BLIP2["vision_config"],
                         qformer_config=dict(TINY_BLIP2["qformer_config"], encoder_hidden_size=32),
                         text_config=dict(model_type="opt", vocab_size=64, hidden_size=16, ffn_dim=32,
                                          num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16),
                         num_query_tokens=4)
    blip2 = Blip2Model(config)
    blip2.save_pretrained(tmp_path / "blip2")
    proj = {"model": {"llama_proj.weight": torch.randn(24, 32), "llama_proj.bias": torch.randn(24)}}
    torch.save(proj, tmp_path / "proj.pth")
    enc = QFormerEncoder(str(tmp_path / "blip2"), projection=str(tmp_path / "proj.pth"))
    enc.configure(embed_dim=24)
    torch.testing.assert_close(enc.query_tokens, blip2.query_tokens)
    torch.testing.assert_close(enc.qformer.layernorm.weight, blip2.qformer.layernorm.weight)
    first = "encoder.layers.0.self_attn.qkv.weight"
    torch.testing.assert_close(enc.vision_model.state_dict()[first], blip2.vision_model.state_dict()[first])
    torch.testing.assert_close(enc.llama_proj.weight, proj["model"]["llama_proj.weight"])
    # the folder's config says 1e-6 (transformers uses the blocks' eps); LAVIS's ln_vision has 1e-5
    assert blip2.vision_model.post_layernorm.eps == 1e-6 and enc.vision_model.post_layernorm.eps == 1e-5
    assert any(line.startswith("blip2:vision_model.post_layernorm.weight -> ") for line in enc.load_summary)


def test_qformer_blip2_folder_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import Blip2Config, Blip2Model

    from mmgen.components.qformer import QFormerEncoder
    from mmgen.errors import ConfigError

    config = Blip2Config(vision_config=TINY_BLIP2["vision_config"], qformer_config=TINY_BLIP2["qformer_config"],
                         text_config=dict(model_type="opt", vocab_size=64, hidden_size=16, ffn_dim=32,
                                          num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16),
                         num_query_tokens=4)
    Blip2Model(config).save_pretrained(tmp_path / "blip2")
    weights = load_file(tmp_path / "blip2" / "model.safetensors")
    del weights["qformer.layernorm.bias"]
    save_file(weights, tmp_path / "blip2" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"no value for \['qformer.layernorm.bias"):
        QFormerEncoder(str(tmp_path / "blip2")).configure(embed_dim=24)


# -- voken mapper -------------------------------------------------------------------------------------
def test_mapper_full_size_parameter_count():
    from mmgen.components.voken_mapper import VokenMapper

    mapper = VokenMapper()
    with torch.device("meta"):
        mapper.configure(in_dim=4096, out_dim=1024)
    n = sum(p.numel() for p in mapper.parameters())
    assert n == 122_899_456  # the paper: about 122.9M
    assert mapper.transformer.encoder.layers[0].linear1.out_features == 4096
    assert tuple(mapper.queries.weight.shape) == (1, 77, 1024)


def test_mapper_shapes_cfg_rate_and_negative_embedding():
    from mmgen.components.voken_mapper import VokenMapper

    mapper = VokenMapper(num_heads=2, num_encoder_layers=1, num_decoder_layers=1, cfg_drop_prob=0.1)
    mapper.configure(in_dim=16, out_dim=8)
    out = mapper(torch.randn(3, 8, 16))
    assert out.shape == (3, 77, 8)
    drops = mapper.sample_drop(20_000, torch.Generator().manual_seed(0))
    assert abs(drops.float().mean().item() - 0.1) < 0.01
    negative = mapper.negative_embedding(2, 8)
    torch.testing.assert_close(negative, mapper(torch.zeros(2, 8, 16)))
    assert not torch.allclose(negative[0], out[0])


# -- Min-SNR --------------------------------------------------------------------------------------------
def test_min_snr_weights_by_hand():
    from mmgen.components.stable_diffusion import min_snr_weights

    alphas = torch.tensor([0.99, 0.9, 0.5, 0.1])
    t = torch.tensor([0, 1, 2, 3])
    # SNR = a / (1 - a) = 99, 9, 1, 1/9; weight = min(SNR, 5) / SNR
    expected = torch.tensor([5 / 99, 5 / 9, 1.0, 1.0])
    torch.testing.assert_close(min_snr_weights(alphas, t, gamma=5.0), expected)
    # v-prediction: min(SNR, 5) / (SNR + 1)
    torch.testing.assert_close(min_snr_weights(alphas, t, 5.0, "v_prediction"),
                               torch.tensor([5 / 100, 5 / 10, 1 / 2, (1 / 9) / (10 / 9)]))


def test_generator_ldm_loss_uses_min_snr_weights():
    """The SD component's loss = mean over samples of min_snr_weight * per-sample MSE, replayed by hand."""
    import torch.nn.functional as F

    from mmgen.components.stable_diffusion import StableDiffusion, tiny_sd_config
    from mmgen.components.stable_diffusion import min_snr_weights

    sd = StableDiffusion(config=tiny_sd_config(), tokenizer=TOY_TOKENIZER)
    sd.configure()
    images, cond = torch.rand(3, 3, 32, 32), torch.randn(3, 77, 32)
    torch.manual_seed(5)
    loss = sd.ldm_loss(images, cond, snr_gamma=5.0)
    torch.manual_seed(5)
    with torch.no_grad():
        latents = sd.vae.encode(images * 2 - 1).latent_dist.sample() * sd.vae.config.scaling_factor
        noise = torch.randn(latents.shape)  # layout-free, as the component draws it
        t = torch.randint(0, 1000, (3,))
        pred = sd.unet(sd.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    expected = (min_snr_weights(sd.scheduler.alphas_cumprod, t, 5.0) * per_sample).mean()
    torch.testing.assert_close(loss, expected)


# -- adapters: training and generation -------------------------------------------------------------
def _llm(adapter):
    from mmgen.components.causal_lm import CausalLM

    llm = CausalLM(config=dict(TINY_LLAMA), tokenizer=TOY_TOKENIZER, adapter=adapter)
    llm.configure(new_tokens=["[IMG0]", "[IMG1]"], new_token_init="mean")
    return llm


def _adapters():
    from mmgen.components.lora import LoRA
    from mmgen.components.prefix_tuning import PrefixTuning

    return {"lora": lambda: LoRA(r=4, alpha=8, dropout=0.05),
            "prefix": lambda: PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=16)}


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_adapter_trains_adapter_and_token_rows_only(kind):
    llm = _llm(_adapters()[kind]())
    groups = llm.parameter_groups()
    assert groups["tokens"] and groups["adapter"]
    trainable = [p for ps in groups.values() for p in ps]
    assert {id(p) for p in llm.parameters() if p.requires_grad} == {id(p) for p in trainable}
    with torch.no_grad():  # LoRA B starts at zero: give the adapter an effect to train through
        for p in groups["adapter"]:
            p.add_(0.05 * torch.randn_like(p))
    frozen = {n: p.detach().clone() for n, p in llm.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)
    ids = torch.tensor([[1, 5, 6, 7, llm.token_id("[IMG0]"), llm.token_id("[IMG1]")]])
    before = [p.detach().clone() for p in trainable]
    llm.train()
    out = llm(llm.embed(ids), torch.ones_like(ids), labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in trainable)
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))
    assert all(torch.equal(frozen[n], p) for n, p in llm.named_parameters() if n in frozen)


def _reference_greedy(llm, embeds, mask, steps):
    """Step-by-step greedy decoding through the training forward (peft's own path), no cache."""
    out_ids = []
    for _ in range(steps):
        logits = llm(embeds, mask).logits[:, -1]
        nxt = logits.argmax(-1)
        out_ids.append(nxt)
        embeds = torch.cat([embeds, llm.embed(nxt[:, None])], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return torch.stack(out_ids, 1)


def _cached_greedy(llm, embeds, mask, steps):
    out, past = llm.forward_cached(embeds, mask)
    out_ids = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1)
        out_ids.append(nxt)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out, past = llm.forward_cached(llm.embed(nxt[:, None]), mask, past)
    return torch.stack(out_ids, 1)


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_adapter_generation_equals_reference_decode(kind):
    torch.manual_seed(1)
    llm = _llm(_adapters()[kind]())
    with torch.no_grad():  # a trained-looking adapter: its effect must show in the tokens
        for p in llm.parameter_groups()["adapter"]:
            p.add_(0.5 * torch.randn_like(p))
    llm.eval()
    ids = torch.tensor([[1, 5, 9, 12, 7, 20]])
    embeds, mask = llm.embed(ids), torch.ones_like(ids)
    with torch.no_grad():
        reference = _reference_greedy(llm, embeds, mask, 8)
        cached = _cached_greedy(llm, embeds, mask, 8)
        torch.testing.assert_close(llm.forward_cached(embeds, mask)[0].logits, llm(embeds, mask).logits)
    assert torch.equal(cached, reference)


def test_prefix_cached_decoding_with_left_padding_matches_unpadded():
    from mmgen.components.prefix_tuning import PrefixTuning

    torch.manual_seed(2)
    llm = _llm(PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=16))
    with torch.no_grad():
        for p in llm.parameter_groups()["adapter"]:
            p.add_(0.5 * torch.randn_like(p))
    llm.eval()
    short, long = torch.tensor([[1, 5, 9]]), torch.tensor([[1, 7, 8, 12, 20]])
    padded = torch.tensor([[0, 0, 1, 5, 9], [1, 7, 8, 12, 20]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        batch = _cached_greedy(llm, llm.embed(padded), mask, 6)
        alone = [_cached_greedy(llm, llm.embed(x), torch.ones_like(x), 6) for x in (short, long)]
    assert torch.equal(batch, torch.cat(alone))
