"""Images generated during training, logged at the end of validation epochs (GILL, MiniGPT-5).

    trainer:
      callbacks:
        - class_path: mmgen.evaluation.callback.LogGeneratedImages
          init_args:
            prompts: ["a red circle on a blue background", "a green square on a red background"]
            every_n_epochs: 1
            num_inference_steps: 10

Each prompt is asked for an image the way ``mmgen eval`` asks (the method's image tokens after the
text, ``mmgen.evaluation.generation.image_request``) and answered by ``model.answer``: the images
are those a user of the checkpoint would get. The same seed every epoch, so a sequence of
epochs shows the model changing, not the noise. Where they go: TensorBoard (``add_image``),
loggers with ``log_image`` (W&B, Neptune), and otherwise PNG files under the run's log folder
(``generated/epoch_0003/00_<prompt>.png``). Only the first process generates (no collective calls
are made, so other ranks do not wait on it beyond the epoch end).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback

from mmgen.errors import ConfigError


class LogGeneratedImages(Callback):
    """Generate an image for each of ``prompts`` after every ``every_n_epochs`` validation epochs
    and log them.

    Args:
        prompts: Texts to draw (each asks for one image).
        every_n_epochs: Log after validation epochs whose index is a multiple of this.
        num_inference_steps: Denoising steps (few are enough to follow training).
        guidance_scale: Classifier-free guidance.
        scheduler: As ``model.answer``'s (``"dpm"``).
        seed: Seed of the first prompt's image (prompt i: seed + i), the same every epoch.
    """

    def __init__(self, prompts: list[str], every_n_epochs: int = 1, num_inference_steps: int = 25,
                 guidance_scale: float = 7.5, scheduler: str | None = "dpm", seed: int = 0):
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError("LogGeneratedImages needs a non-empty list of non-empty prompts")
        if every_n_epochs < 1:
            raise ConfigError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        self.prompts = list(prompts)
        self.every_n_epochs = every_n_epochs
        self.options = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            scheduler=scheduler, seed=seed)

    def setup(self, trainer, pl_module, stage: str) -> None:
        from mmgen.evaluation.generation import image_generator_of

        image_generator_of(pl_module)  # FROMAGe cannot generate: refused when the run starts

    def images(self, pl_module) -> list:
        """The PIL images for the prompts (one each)."""
        from mmgen.evaluation.generation import _is_minigpt5, image_request
        from mmgen.inference.types import GeneratedImage

        conversations = [image_request(pl_module, [prompt]) for prompt in self.prompts]
        mode = "auto" if _is_minigpt5(pl_module) else "generate"
        was_training = pl_module.training
        pl_module.eval()
        try:
            answers = pl_module.answer(conversations, mode=mode, max_new_tokens=1, **self.options)
        finally:
            pl_module.train(was_training)
        return [next((p.image for p in a.parts if isinstance(p, GeneratedImage)), None) for a in answers]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs or not trainer.is_global_zero:
            return
        images = self.images(pl_module)
        log_images(trainer, self.prompts, images, trainer.current_epoch, trainer.global_step)


def log_images(trainer, prompts: list[str], images: list, epoch: int, step: int) -> list[Path]:
    """Send the images to the trainer's loggers (TensorBoard, ``log_image`` loggers) or, with no
    logger that takes images, save them under the log folder. Returns the files written."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    from mmgen.inference.report import slug

    pairs = [(p, im) for p, im in zip(prompts, images) if im is not None]
    taken = False
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
            for i, (prompt, image) in enumerate(pairs):
                experiment.add_image(f"generated/{i:02d}_{slug(prompt, 32)}", pil_to_tensor(image), step)
            taken = True
        elif hasattr(logger, "log_image"):  # W&B, Neptune
            logger.log_image(key="generated", images=[im for _, im in pairs], caption=[p for p, _ in pairs],
                             step=step)
            taken = True
    if taken:
        return []
    folder = Path(trainer.log_dir or trainer.default_root_dir) / "generated" / f"epoch_{epoch:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (prompt, image) in enumerate(pairs):
        path = folder / f"{i:02d}_{slug(prompt, 32)}.png"
        image.save(path)
        written.append(path)
    return written


__all__ = ["LogGeneratedImages", "log_images"]
