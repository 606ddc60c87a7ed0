"""The CLIP visual encoder: pooled output, normalisation, frozen, local folder loading."""

import torch

from conftest import TINY_CLIP_VISION, tiny_clip
from mmgen.components.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionEncoder


def test_features_are_the_pooler_output_of_normalised_pixels():
    encoder = tiny_clip()
    encoder.configure()
    images = torch.rand(3, 3, 32, 32)
    features = encoder(images)
    assert features.shape == (3, 1, 32) and encoder.feature_dim == 32
    pixels = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = encoder.model(pixel_values=pixels).pooler_output
    torch.testing.assert_close(features[:, 0], expected)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_other_sizes_are_resized_and_training_mode_keeps_the_model_in_eval():
    encoder = tiny_clip()
    encoder.configure()
    encoder.train()
    assert not encoder.model.training
    assert encoder(torch.rand(2, 3, 48, 40)).shape == (2, 1, 32)


def test_loads_from_a_local_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)).eval()
    model.save_pretrained(tmp_path / "clip")
    encoder = CLIPVisionEncoder(name_or_path=str(tmp_path / "clip"))
    encoder.configure()
    images = torch.rand(2, 3, 32, 32)
    pixels = (images - encoder.mean) / encoder.std
    torch.testing.assert_close(encoder(images)[:, 0], model(pixel_values=pixels).pooler_output)
