"""The toy world's tiny pretrained backbones, rebuilt by ``mmgen toy pretrain``.

Every backbone is a standard transformers or diffusers model saved with ``save_pretrained`` under
``mmgen/assets/toy_world/<name>/`` and loaded by mmgen's components like any real checkpoint
(``name_or_path: mmgen:toy_world/<name>``): the world's tokenizer, an OPT-style and a LLaMA-style
causal LM, a CLIP, a BLIP-2-style Q-Former, a latent diffusion model and the judge that reads
shape and colour of generated images. docs/toy_world.md has what each reaches.
"""

from mmgen.components.hub import ASSETS

#: Where the shipped toy-world backbones live; each in its own folder below.
TOY_WORLD_DIR = ASSETS / "toy_world"
