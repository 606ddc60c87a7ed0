"""The benchmarks, one function per task: read the items, ask the model, score, and return
``(settings, baseline, data)`` for ``mmgen.evaluation.run`` to print and write."""

from __future__ import annotations

from pathlib import Path

import torch

from mmgen.errors import ConfigError
from mmgen.evaluation import metrics
from mmgen.evaluation.generation import (
    GenerationCache, GenerationOptions, _path_key, answer_texts, baseline_images, generate_images, image_generator_of,
    rank_images,
)
from mmgen.evaluation.tasks import Item, caption_items, mmdialog_items, visdial_settings, vist_settings
from mmgen.inference.report import Report, slug
from mmgen.inference.types import Answer, GeneratedImage, ImageRef, TextPart

SCORE_SIZE = 256  # images are compared at 256 px (GILL's LPIPS protocol); CLIP resizes to its own size


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pixels(paths, device, size: int = SCORE_SIZE) -> torch.Tensor:
    from mmgen.methods.formats import pixels_of

    return pixels_of([ImageRef(str(p)) for p in paths], size).to(device)  # (n, 3, size, size)


def _batches(paths, batch_size: int, device):
    for start in range(0, len(paths), batch_size):
        yield _pixels(paths[start:start + batch_size], device)


def _progress(total: int, desc: str):
    from mmgen.evaluation.run import Progress

    return Progress(total, desc)


# -- retrieval ---------------------------------------------------------------------------------
def _index(model, candidates: list[Path], folder: Path, batch_size: int):
    """The candidates' retrieval index, reused from ``folder`` when this model made it for them."""
    from mmgen.inference.index import RetrievalIndex

    wanted = sorted(_path_key(c) for c in candidates)
    if (folder / "index.json").is_file():
        try:
            index = RetrievalIndex.load(folder)
            index.check_model(model)
            if sorted(_path_key(index.path_of(r)) for r in range(len(index))) == wanted:
                return index.to(_device(model))
        except (ConfigError, ValueError, AttributeError):
            pass  # another model or other images: embedded again
    index = RetrievalIndex.build(model, [str(Path(c).resolve()) for c in candidates], batch_size=batch_size,
                                 progress=True)
    index.save(folder, dtype="float32")
    return index.to(_device(model))


def _retrieval(model, options, out: Path, settings: dict, candidates: list[Path], data: dict):
    index = _index(model, candidates, out / options.task / "index", options.batch_size)
    results = {}
    for name, items in settings.items():
        bar = _progress(len(items), f"{name}")
        ranked = rank_images(model, items, index, k=max(metrics.RECALL_KS), batch_size=options.batch_size,
                             progress=bar)
        bar.close()
        results[name] = {"n": len(items), "metrics": metrics.recall_at_k(ranked, [_path_key(i.target_image)
                                                                                for i in items])}
    return results, None, {**data, "candidates": len(candidates)}


def vist_retrieval(model, options, out: Path):
    settings, candidates = vist_settings(options.data, options.image_dir, options.image_mapping, options.limit)
    return _retrieval(model, options, out, settings, candidates, {"file": options.data, "stories": len(
        next(iter(settings.values())))})


def _rounds(options) -> tuple[int, ...]:
    try:
        rounds = tuple(int(r) for r in str(options.rounds).split(","))
    except ValueError:
        raise ConfigError(f"--rounds must be comma-separated numbers, got {options.rounds!r}") from None
    if not rounds or min(rounds) < 1:
        raise ConfigError(f"--rounds must be positive numbers, got {options.rounds!r}")
    return rounds


def visdial_retrieval(model, options, out: Path):
    settings, candidates = visdial_settings(options.data, options.image_dir, options.limit, _rounds(options))
    return _retrieval(model, options, out, settings, candidates, {"file": options.data})


# -- generation --------------------------------------------------------------------------------
def _generation_options(options) -> GenerationOptions:
    return GenerationOptions(options.seed, options.guidance_scale, options.steps, options.scheduler)


def _shard(items: list[Item], shard: str | None) -> list[int] | None:
    if not shard:
        return None
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be K/N (e.g. 0/4), got {shard!r}") from None
    if not 0 <= k < n:
        raise ConfigError(f"--shard {shard}: K must be in 0..N-1")
    return [i for i in range(len(items)) if i % n == k]


def _make(fn, model, items, folder: Path, options) -> list[Path] | None:
    """Images of ``items`` made by ``fn`` (generate_images or baseline_images), cached in
    ``folder``; with ``--shard`` only the shard's items, and None."""
    cache = GenerationCache(folder, str(options.model))
    gen_options = _generation_options(options)
    chosen = _shard(items, options.shard)
    bar = _progress(len(items) if chosen is None else len(chosen), folder.name)
    if chosen is None:
        paths, _ = fn(model, items, cache, gen_options, options.batch_size, bar)
        bar.close()
        return paths
    # a shard: the same item numbers (names and seeds) as the whole run, others left alone
    for n in chosen:
        _single(fn, model, items, n, cache, gen_options)
        bar(1)
    bar.close()
    return None


def _single(fn, model, items, n, cache, gen_options):
    """Item n alone, with its whole-run number (file name) and seed."""
    from dataclasses import replace

    class _Offset(GenerationCache):
        def _stem(self, m, item):
            return super()._stem(n, item)

        def record(self, prompt, seed, options):
            return super().record(prompt, gen_options.seed + n, gen_options)

    offset = _Offset(cache.folder, cache.model_source)
    fn(model, [items[n]], offset, replace(gen_options, seed=gen_options.seed + n), 1, None)


def _score_images(generated: list[Path], items: list[Item], clip, lpips, batch_size: int, device) -> dict:
    clip_i, lp = [], []
    for start in range(0, len(items), batch_size):
        fake = _pixels(generated[start:start + batch_size], device)
        real = _pixels([i.target_image for i in items[start:start + batch_size]], device)
        clip_i.append(metrics.clip_image_similarity(clip, fake, real).cpu())
        if lpips is not None:
            lp.append(lpips(fake, real).cpu())
    scores = {"CLIP-I": float(torch.cat(clip_i).mean())}
    if lpips is not None:
        scores["LPIPS"] = float(torch.cat(lp).mean())
    return scores


def _sheet(out: Path, title: str, rows: list[tuple[str, Item, Path, str]], limit: int) -> Path | None:
    """The contact sheet: context, the generated image and the true one, per item."""
    if limit <= 0 or not rows:
        return None
    from PIL import Image

    report = Report(out, title=title)
    for setting, item, image, note in rows:
        with Image.open(image) as opened:
            generated = GeneratedImage(opened.convert("RGB"))
        conversation = [*item.context, "true image:", ImageRef(str(item.target_image))]
        report.add(f"{setting} / {item.id}", conversation, Answer([TextPart(note), generated]))
    return report.finish()


def _generation(model, options, out: Path, settings: dict, data: dict):
    from mmgen.evaluation.run import build_extractor

    image_generator_of(model)
    base = out / options.task / "generations"
    made, made_baseline = {}, {}
    for name, items in settings.items():
        made[name] = _make(generate_images, model, items, base / slug(name), options)
        if options.baseline and all(i.caption for i in items):
            made_baseline[name] = _make(baseline_images, model, items, base / f"baseline_{slug(name)}", options)
    if options.shard:
        return None, None, data
    device = _device(model)
    clip = build_extractor(options.clip, "CLIPFeatures").to(device)
    lpips = build_extractor(options.lpips, "LPIPSAlex").to(device)
    results, baseline, rows = {}, {}, []
    for name, items in settings.items():
        results[name] = {"n": len(items), "metrics": _score_images(made[name], items, clip, lpips,
                                                                   options.batch_size, device)}
        rows += [(name, item, path, "generated") for item, path in list(zip(items, made[name]))[:options.sheet]]
        if name in made_baseline:
            baseline[name] = {"n": len(items), "metrics": _score_images(made_baseline[name], items, clip, lpips,
                                                                        options.batch_size, device)}
            rows += [(f"{name} (baseline)", item, path, "text-to-image baseline")
                     for item, path in list(zip(items, made_baseline[name]))[:options.sheet]]
    sheet = _sheet(out / options.task / "sheet", f"{options.task}: generated and true images", rows, options.sheet)
    data = {**data, "sheet": str(sheet) if sheet else None}
    return results, (baseline if options.baseline else None), data


def vist_generation(model, options, out: Path):
    settings, _ = vist_settings(options.data, options.image_dir, options.image_mapping, options.limit)
    return _generation(model, options, out, settings, {"file": options.data})


def visdial_generation(model, options, out: Path):
    settings, _ = visdial_settings(options.data, options.image_dir, options.limit, _rounds(options))
    return _generation(model, options, out, settings, {"file": options.data})


# -- CC3M --------------------------------------------------------------------------------------
def _fid_is(generated: list[Path], items: list[Item], inception, batch_size: int, device) -> dict:
    fid = metrics.fid(inception, _batches([i.target_image for i in items], batch_size, device),
                      _batches(generated, batch_size, device))
    mean, std = metrics.inception_score(inception, _batches(generated, batch_size, device))
    return {"FID": fid, "IS": mean, "IS-std": std}


def _caption_prompt(model, options) -> str:
    if options.caption_prompt is not None:
        return options.caption_prompt
    from mmgen.evaluation.generation import _is_minigpt5

    return "Describe this image." if _is_minigpt5(model) else ""


def cc3m(model, options, out: Path):
    from mmgen.evaluation.run import build_extractor

    items = caption_items(options.data, options.image_dir, limit=options.limit)
    device = _device(model)
    results, baseline = {}, None
    can_generate = getattr(model, "image_generator", None) is not None or getattr(model, "generator", None) is not None
    if can_generate:
        base = out / options.task / "generations"
        made = _make(generate_images, model, items, base / "captions", options)
        made_baseline = _make(baseline_images, model, items, base / "baseline", options) if options.baseline else None
        if options.shard:
            return None, None, {}
        inception = build_extractor(options.inception, "InceptionFeatures").to(device)
        results["generation"] = {"n": len(items), "metrics": _fid_is(made, items, inception, options.batch_size,
                                                                      device)}
        if made_baseline is not None:
            baseline = {"generation": {"n": len(items), "metrics": _fid_is(made_baseline, items, inception,
                                                                            options.batch_size, device)}}
    if getattr(model, "visual_encoder", None) is not None:
        prompt = _caption_prompt(model, options)
        conversations = [[ImageRef(str(i.target_image)), prompt] for i in items]
        bar = _progress(len(items), "captioning")
        answers = answer_texts(model, conversations, options.batch_size, options.seed, options.max_new_tokens, bar)
        bar.close()
        results["captioning"] = {"n": len(items), "metrics": metrics.text_scores(
            [a.text for a in answers], [i.target_text for i in items])}
    if not results:
        raise ConfigError(f"{type(model).__name__} can neither generate images nor read them")
    return results, baseline, {"file": options.data, "rows": len(items)}


# -- MMDialog ----------------------------------------------------------------------------------
def mmdialog(model, options, out: Path):
    from mmgen.evaluation.run import build_extractor
    from mmgen.methods.formats import pixels_of

    items = mmdialog_items(options.data, options.image_dir, options.limit)
    bar = _progress(len(items), "answering")
    answers = answer_texts(model, [i.context for i in items], options.batch_size, options.seed,
                           options.max_new_tokens, bar)
    bar.close()
    device = _device(model)
    scores = metrics.text_scores([a.text for a in answers], [i.target_text for i in items], bleu=(1, 2), cider=False)
    generated = [[p.image for p in a.parts if isinstance(p, GeneratedImage)] for a in answers]
    flat = [image for images in generated for image in images]
    if len(flat) >= 2:
        inception = build_extractor(options.inception, "InceptionFeatures").to(device)
        batches = [pixels_of(flat[s:s + options.batch_size], SCORE_SIZE).to(device)
                   for s in range(0, len(flat), options.batch_size)]
        scores["IS"], scores["IS-std"] = metrics.inception_score(inception, batches)
    else:
        scores["IS"] = None
    clip = build_extractor(options.clip, "CLIPFeatures",
                           **({"tokenizer": options.clip_tokenizer} if options.clip_tokenizer else {})).to(device)
    predicted, reference = [], []
    for item, answer, images in zip(items, answers, generated):
        predicted.append(([answer.text] if answer.text else []) + [t for t in _pixels_list(images, device)])
        reference.append([item.target_text] + ([_pixels([item.target_image], device)[0]] if item.target_image else []))
    scores["MM-Relevance"] = metrics.clip_f1(clip, predicted, reference)
    rows = [("responses", item, None, answer) for item, answer in zip(items, answers)][:options.sheet]
    if rows:
        report = Report(out / options.task / "sheet", title="mmdialog: responses")
        for _, item, _, answer in rows:
            report.add(item.id, item.context + (["reference:", item.target_text] +
                                                ([ImageRef(str(item.target_image))] if item.target_image else [])),
                       answer)
        report.finish()
    return {"responses": {"n": len(items), "metrics": scores}}, None, {"file": options.data, "turns": len(items)}


def _pixels_list(images, device) -> list[torch.Tensor]:
    from mmgen.methods.formats import pixels_of

    return list(pixels_of(images, SCORE_SIZE).to(device)) if images else []
