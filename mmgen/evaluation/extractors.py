"""The networks evaluation measures images with: CLIP (image-image similarity, image-text
relevance), Inception (FID, Inception Score) and LPIPS's AlexNet.

Each is a registered component of kind ``feature_extractor``: it loads real weights from a hub
id or a local folder/file, or builds random weights (``random_weights: true`` or an explicit
``config``), so tests run offline with tiny ones. torchmetrics' own FID, IS and LPIPS download
their backbones from fixed URLs when constructed; mmgen hands torchmetrics these modules instead
(``FrechetInceptionDistance(feature=module)``, ``InceptionScore(feature=module)``) and builds
LPIPS's network itself, so nothing is fetched behind the user's back.

Every extractor takes images as float RGB in [0, 1], (n, 3, h, w), at any size, and resizes them
itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mmgen.components.clip_vision import CLIP_MEAN, CLIP_STD, normalized_pixels
from mmgen.components.hub import random_weights_requested, resolve_name
from mmgen.errors import ConfigError
from mmgen.registry import Component


class FeatureExtractor(Component, kind="feature_extractor"):
    """Images (n, 3, h, w) in [0, 1] -> features (n, num_features). Frozen, always in eval mode."""

    num_features: int = 0

    def train(self, mode: bool = True):
        return super().train(False)  # a measuring instrument never trains (no dropout, no BN updates)


class CLIPFeatures(FeatureExtractor):
    """CLIP's projected image (and text) embeddings, L2-normalised: GILL's and MiniGPT-5's CLIP
    image-image similarity ("CLIP-I") and the image-text relevance score.

    Args:
        name_or_path: Hub id or folder of a full CLIP model (both towers); the papers use
            ``openai/clip-vit-large-patch14``.
        config: ``CLIPConfig`` values (``text_config``, ``vision_config``, ``projection_dim``)
            for random weights, e.g. a tiny model in tests.
        tokenizer: Hub id, folder or ``mmgen:NAME`` of the tokenizer (default: ``name_or_path``).
        random_weights: Build ``name_or_path``'s architecture with random weights.
    """

    def __init__(self, name_or_path: str | None = "openai/clip-vit-large-patch14", config: dict | None = None,
                 tokenizer: str | None = None, random_weights: bool = False):
        super().__init__()
        self.name_or_path = resolve_name(name_or_path)
        self.config_overrides = config
        self.tokenizer_name = resolve_name(tokenizer) if tokenizer else self.name_or_path
        self.random_weights = random_weights
        self.model = None
        self.tokenizer = None
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def configure(self) -> None:
        if self.model is not None:
            return
        from transformers import CLIPConfig, CLIPModel

        from mmgen.components.hub import require_local_folder

        if self.config_overrides is not None or random_weights_requested(self.random_weights):
            if self.config_overrides is not None:
                config = CLIPConfig(**self.config_overrides)
            else:
                config = CLIPConfig.from_pretrained(self.name_or_path)
            model = CLIPModel(config)
        else:
            require_local_folder(self.name_or_path, "CLIP model")
            model = CLIPModel.from_pretrained(self.name_or_path)
        self.model = model.requires_grad_(False).eval()
        self.num_features = int(model.config.projection_dim)

    def _tokenizer(self):
        if self.tokenizer is None:
            if self.tokenizer_name is None:
                raise ConfigError("CLIPFeatures needs a tokenizer to embed text (give `tokenizer`)")
            from mmgen.components.tokenizers import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_name)
        return self.tokenizer

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) in [0, 1] -> (n, projection_dim), unit norm."""
        self.configure()
        size = self.model.config.vision_config.image_size
        pixels = normalized_pixels(images.float(), size, self.mean, self.std, torch.float32)
        # transformers 5: get_image_features returns an output object, not a tensor (this is what
        # breaks torchmetrics' CLIPScore); the projected embedding is its pooler_output.
        out = self.model.get_image_features(pixel_values=pixels)
        embeds = out if isinstance(out, torch.Tensor) else out.pooler_output  # (n, e)
        return F.normalize(embeds.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (n, projection_dim), unit norm (cut at CLIP's 77 positions)."""
        self.configure()
        limit = self.model.config.text_config.max_position_embeddings
        batch = self._tokenizer()(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        batch = {k: v.to(self.mean.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        out = self.model.get_text_features(**batch)
        embeds = out if isinstance(out, torch.Tensor) else out.pooler_output  # (n, e)
        return F.normalize(embeds.float(), dim=-1)


class InceptionFeatures(FeatureExtractor):
    """Inception v3 (torchvision's architecture) as FID's feature extractor (its 2048-d pooled
    features) and the Inception Score's classifier (its logits; :meth:`logits`).

    Args:
        name_or_path: Weights: a hub id holding ``model.safetensors`` with torchvision's key names
            (``timm/inception_v3.tv_in1k``), a local folder with that file, or a weights file
            (``.safetensors`` or a torch state dict).
        image_size: Side images are resized to (299; at least 75).
        random_weights: Random weights (tests).

    FID's reference numbers use the TensorFlow Inception of 2015 (``pt_inception-2015-12-05``);
    FIDs computed with another Inception are comparable with each other, not with the papers'.
    """

    def __init__(self, name_or_path: str | None = "timm/inception_v3.tv_in1k", image_size: int = 299,
                 random_weights: bool = False):
        super().__init__()
        self.name_or_path = resolve_name(name_or_path)
        self.image_size = image_size
        self.random_weights = random_weights
        self.model = None
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)

    def _weights_file(self) -> str:
        source = Path(self.name_or_path)
        if source.is_file():
            return str(source)
        if source.is_dir():
            if not (source / "model.safetensors").is_file():
                raise ConfigError(f"{source}: no model.safetensors (Inception v3 weights) in this folder")
            return str(source / "model.safetensors")
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(self.name_or_path, "model.safetensors")
        except Exception as error:  # offline, unknown repo
            raise ConfigError(f"{self.name_or_path}: cannot get Inception v3 weights from the hub ({error}); "
                              "give a local folder or file") from error

    def configure(self) -> None:
        if self.model is not None:
            return
        from torchvision.models import inception_v3

        random = random_weights_requested(self.random_weights) or self.name_or_path is None
        model = inception_v3(weights=None, aux_logits=False, init_weights=random)
        if not random:
            from mmgen.checkpoints import read_tensors

            state = {k: v for k, v in read_tensors(self._weights_file(), "Inception v3 weights").items()
                     if not k.startswith("AuxLogits.")}
            model.load_state_dict(state)
        self.classifier = model.fc  # logits for the Inception Score
        model.fc = torch.nn.Identity()  # the model itself returns the pooled features
        self.model = model.requires_grad_(False).eval()
        self.classifier.requires_grad_(False)
        self.num_features = int(self.classifier.in_features)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        images = images.float()
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) in [0, 1] -> pooled features (n, 2048)."""
        self.configure()
        return self.model(self._pixels(images)).double()  # FID accumulates in float64

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) in [0, 1] -> class logits (n, 1000), for the Inception Score."""
        self.configure()
        return self.classifier(self.model(self._pixels(images))).double()


class _Logits(torch.nn.Module):
    """An InceptionFeatures seen through its logits (InceptionScore's ``feature=`` module)."""

    def __init__(self, extractor: InceptionFeatures):
        super().__init__()
        self.extractor = extractor

    def forward(self, images):
        return self.extractor.logits(images)


class LPIPSAlex(FeatureExtractor):
    """LPIPS (v0.1) distance with its AlexNet backbone, as the GILL paper measures (256 px).

    The learned linear layers are the ones torchmetrics ships inside its package (no download);
    the AlexNet is torchvision's, loaded from ``backbone_weights``: a local ``.pth`` state dict of
    ``torchvision.models.alexnet`` (``alexnet-owt-7be5be79.pth``), or ``"torchvision"`` to let
    torchvision fetch it into its cache; ``random_weights`` builds a random backbone (tests).

    ``forward(a, b)`` -> (n,) distances of image pairs (0: identical).
    """

    def __init__(self, backbone_weights: str | None = "torchvision", image_size: int = 256,
                 random_weights: bool = False):
        super().__init__()
        self.backbone_weights = backbone_weights
        self.image_size = image_size
        self.random_weights = random_weights
        self.net = None

    def configure(self) -> None:
        if self.net is not None:
            return
        from torchmetrics.functional.image.lpips import _LPIPS
        from torchvision.models import AlexNet_Weights, alexnet

        # pnet_rand=True: torchmetrics would download AlexNet otherwise; we fill it below.
        net = _LPIPS(pretrained=True, net="alex", pnet_rand=True)
        if not random_weights_requested(self.random_weights):
            if self.backbone_weights == "torchvision":
                features = alexnet(weights=AlexNet_Weights.IMAGENET1K_V1).features
            else:
                from mmgen.checkpoints import read_tensors

                features = alexnet().features
                state = read_tensors(self.backbone_weights, "AlexNet weights")
                state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
                features.load_state_dict(state)
            # the LPIPS slices hold AlexNet's feature layers under their own indices
            for slice_ in (net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5):
                for name, _ in list(slice_.named_children()):
                    slice_._modules[name] = features[int(name)]
        self.net = net.requires_grad_(False).eval()
        self.num_features = 1

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Two batches (n, 3, h, w) in [0, 1] -> (n,) LPIPS distances at ``image_size`` px."""
        self.configure()
        size = self.image_size

        def prepare(x):
            x = x.float()
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            return x

        return self.net(prepare(a), prepare(b), normalize=True).reshape(-1)  # normalize: [0,1] -> [-1,1]
