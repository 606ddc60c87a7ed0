"""Webdataset shards: converters, every method training from shards, splitting over processes and
workers (each sample once per epoch), exact resume at the sample where a run stopped, clear errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from mmgen.cli import build_cli, main
from mmgen.data import shards as shards_module
from mmgen.data.shards import CaptionDecoder, ShardDataModule, ShardStream, resolve_source
from mmgen.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN = 48


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from mmgen.data.toy import write_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root, N_TRAIN, 8, 32, 0)
    return root


@pytest.fixture(scope="module")
def caption_shards(toy, tmp_path_factory) -> Path:
    """8 shards of 6 caption samples, written by the CLI converter."""
    out = tmp_path_factory.mktemp("shards")
    main(["shards", "from-tsv", "--tsv", str(toy / "train.tsv"), "--image-dir", str(toy / "images"),
          "--out", str(out), "--shard-size", "6"])
    return out


def keys_of(stream) -> list[str]:
    return [item["key"] for item in stream]


# -- converters ----------------------------------------------------------------------------------
def test_tsv_converter_keeps_every_row_in_order(toy, caption_shards):
    urls, counts, kind = resolve_source(str(caption_shards))
    assert (len(urls), counts, kind) == (8, [6] * 8, "captions")
    stream = ShardStream(urls, CaptionDecoder(32), counts, batch_size=1, train=False)
    items = list(stream)
    captions = [line.split("\t")[0] for line in (toy / "train.tsv").read_text().splitlines()[1:]]
    assert [i["caption"] for i in items] == captions
    assert items[0]["image"].shape == (3, 32, 32) and 0 <= items[0]["image"].min() <= items[0]["image"].max() <= 1
    from mmgen.data.captions import CaptionImageDataset  # the same pixels as the TSV reader's

    torch.testing.assert_close(items[5]["image"], CaptionImageDataset(toy / "train.tsv", toy / "images", 32)[5]["image"])


def test_img2dataset_converters(toy, caption_shards, tmp_path):
    # "files" output: NNNNN/KEY.jpg|.txt|.json, failed downloads leave a .json without image
    files = tmp_path / "i2d_files" / "00000"
    files.mkdir(parents=True)
    for i, image in enumerate(sorted((toy / "images").glob("*"))[:5]):
        (files / f"00000000{i}{image.suffix}").write_bytes(image.read_bytes())
        (files / f"00000000{i}.txt").write_text(f"caption {i}")
        (files / f"00000000{i}.json").write_text(json.dumps({"caption": f"caption {i}"}))
    (files / "000000009.json").write_text("{}")
    index = main(["shards", "from-img2dataset", "--input", str(tmp_path / "i2d_files"), "--out", str(tmp_path / "a"),
                  "--shard-size", "2"])
    urls, counts, _ = resolve_source(str(index))
    assert counts == [2, 2, 1]
    assert [i["caption"] for i in ShardStream(urls, CaptionDecoder(32), counts, train=False)] == [f"caption {i}" for i in range(5)]
    # "webdataset" output: tars with _stats.json are indexed where they are
    web = tmp_path / "i2d_web"
    web.mkdir()
    for i, tar in enumerate(sorted(caption_shards.glob("*.tar"))[:2]):
        (web / f"{i:05d}.tar").write_bytes(tar.read_bytes())
    (web / "00000_stats.json").write_text(json.dumps({"successes": 6}))  # the other one is counted
    urls, counts, _ = resolve_source(str(main(["shards", "from-img2dataset", "--input", str(web), "--out", str(tmp_path / "b")])))
    assert counts == [6, 6] and all(Path(u).parent == web for u in urls)


# -- splitting -----------------------------------------------------------------------------------
def simulate(urls, counts, world, workers, epoch, monkeypatch, **kwargs) -> list[list[str]]:
    """The keys each (rank, worker) reader yields in ``epoch``, readers simulated in-process."""
    out = []
    for rank in range(world):
        for worker in range(workers):
            monkeypatch.setattr(shards_module, "get_worker_info",
                                lambda w=worker: SimpleNamespace(id=w, num_workers=workers))
            stream = ShardStream(urls, CaptionDecoder(8), counts, batch_size=4, seed=3, **kwargs)
            stream.world, stream.rank, stream.epoch = world, rank, epoch
            out.append(keys_of(stream))
    return out


def test_two_processes_with_two_workers_read_each_sample_once_per_epoch(caption_shards, monkeypatch):
    urls, counts, _ = resolve_source(str(caption_shards))
    orders = []
    for epoch in (0, 1):
        readers = simulate(urls, counts, 2, 2, epoch, monkeypatch, shuffle_buffer=4)
        keys = [k for reader in readers for k in reader]
        assert sorted(keys) == [f"{i:09d}" for i in range(N_TRAIN)]  # every sample, once
        assert len(readers[0]) + len(readers[1]) == len(readers[2]) + len(readers[3]) == 24  # equal steps per rank
        orders.append(keys)
    assert orders[0] != orders[1]  # another shard order and buffer in the next epoch


def test_declared_epoch_shorter_and_longer_than_the_data(caption_shards, monkeypatch):
    urls, counts, _ = resolve_source(str(caption_shards))
    short = simulate(urls, counts, 2, 1, 0, monkeypatch, epoch_size=16)
    assert [len(r) for r in short] == [8, 8] and len(set(short[0] + short[1])) == 16
    long = simulate(urls, counts, 1, 1, 0, monkeypatch, epoch_size=80)[0]  # passes over the shards again
    assert len(long) == 80 and set(long) == {f"{i:09d}" for i in range(N_TRAIN)}
    assert sorted(long[:N_TRAIN]) == [f"{i:09d}" for i in range(N_TRAIN)]  # a whole pass first


def test_real_workers_split_and_resume(caption_shards):
    """torchdata's StatefulDataLoader with 2 worker processes: each sample once; a loader restored
    from a mid-epoch state continues with exactly the remaining batches."""
    data = ShardDataModule(str(caption_shards), batch_size=4, num_workers=2, shuffle_buffer=5, image_size=8)
    data.setup("fit")
    loader = data.train_dataloader()
    assert len(loader) == N_TRAIN // 4
    batches = [b["keys"] for b in loader]
    assert sorted(k for b in batches for k in b) == [f"{i:09d}" for i in range(N_TRAIN)]
    loader = ShardDataModule(str(caption_shards), batch_size=4, num_workers=2, shuffle_buffer=5, image_size=8).train_dataloader()
    it = iter(loader)
    head = [next(it)["keys"] for _ in range(5)]
    state = loader.state_dict()
    resumed = ShardDataModule(str(caption_shards), batch_size=4, num_workers=2, shuffle_buffer=5, image_size=8).train_dataloader()
    resumed.load_state_dict(state)
    assert head + [b["keys"] for b in resumed] == batches


# -- every method trains from shards ------------------------------------------------------------------
def fit(config: str, data: ShardDataModule, tmp_path: Path, max_steps: int = 2, callbacks=(), ckpt_path=None,
        overrides=(), max_epochs=None):
    cli = build_cli(["--config", str(ROOT / "configs" / config), "--trainer.logger=false", *overrides], run=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=max_epochs, logger=False,
                         enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=list(callbacks),
                         enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
                         num_sanity_val_steps=0)
    trainer.fit(cli.model, datamodule=data, ckpt_path=ckpt_path)
    return trainer


class Record(pl.Callback):
    """The sample keys and loss of every training step."""

    def __init__(self):
        self.keys, self.losses = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.keys.append(list(batch["keys"]))
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("config", ["fromage_tiny.yaml", "gill_tiny.yaml"])
def test_caption_methods_train_from_shards(config, caption_shards, tmp_path):
    record = Record()
    data = ShardDataModule(str(caption_shards), val=str(caption_shards), batch_size=8, image_size=32)
    trainer = fit(config, data, tmp_path, max_steps=3, callbacks=[record])
    assert trainer.global_step == 3 and len(record.losses) == 3
    assert all(torch.isfinite(torch.tensor(record.losses)))


def test_minigpt5_trains_from_interleaved_shards(tmp_path):
    """Stage-1 samples of a config (CC3M-style captions, with instruction samples) written as
    interleaved shards, then a MiniGPT-5 run from them."""
    overrides = [f"--data.init_args.train.init_args.root={tmp_path / 'toy5'}",
                 "--data.init_args.train.init_args.n_train=16", "--data.init_args.train.init_args.n_val=0",
                 "--data.init_args.train.init_args.instruction_every=4"]
    index = main(["shards", "from-samples", "--config", str(ROOT / "configs/minigpt5_stage1_tiny.yaml"),
                  "--out", str(tmp_path / "s"), "--shard-size", "5", *overrides])
    urls, counts, kind = resolve_source(str(index))
    assert kind == "samples" and sum(counts) == 20  # 16 captions + 4 instruction samples
    first = next(iter(ShardStream(urls, shards_module.SampleDecoder(32, 32), counts, train=False)))
    assert first["target"].startswith("[IMG0]") and first["output_images"].shape == (1, 3, 32, 32)
    class Losses(pl.Callback):
        losses = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    # One epoch without max_steps: MiniGPT-5's linear schedule takes its length from the shards
    # (20 samples, batches of 4: 5 steps), not lr 0 from an unknown length.
    data = ShardDataModule(str(index), batch_size=4, input_image_size=32, output_image_size=32)
    trainer = fit("minigpt5_stage1_tiny.yaml", data, tmp_path, max_steps=-1, max_epochs=1, callbacks=[Losses()],
                  overrides=[*overrides, "--model.init_args.optim.schedule=linear"])
    assert trainer.global_step == 5 and trainer.lightning_module._run_length() == 5
    assert all(torch.isfinite(torch.tensor(Losses.losses)))


# -- resume --------------------------------------------------------------------------------------------
def test_resumed_run_continues_at_the_sample_where_it_stopped(caption_shards, tmp_path):
    """A run checkpointed mid-epoch (step 3 of 6 per epoch) and resumed draws the same batches,
    and logs the same losses, as the uninterrupted run, into the next epoch."""
    def data():
        return ShardDataModule(str(caption_shards), batch_size=8, image_size=32, shuffle_buffer=6, seed=5)

    full = Record()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1,
                                              filename="{step}")
    pl.seed_everything(0)
    fit("fromage_tiny.yaml", data(), tmp_path / "a", max_steps=8, callbacks=[full, checkpoint])
    resumed = Record()
    pl.seed_everything(0)
    fit("fromage_tiny.yaml", data(), tmp_path / "b", max_steps=8, callbacks=[resumed],
        ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert resumed.keys == full.keys[3:]
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[3:]))
    state = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=True)["loops"]
    assert "slot" in json.dumps(state, default=str) and "offset" in json.dumps(state, default=str)


# -- errors --------------------------------------------------------------------------------------------
def test_unknown_length_and_too_few_shards_are_clear_errors(caption_shards):
    pattern = str(caption_shards / "train-{00000..00007}.tar")
    with pytest.raises(ConfigError, match="epoch_size"):
        ShardDataModule(pattern).setup("fit")
    data = ShardDataModule(pattern, epoch_size=40, batch_size=4, image_size=8)
    assert len(data.train_dataloader()) == 10  # the declared length: the schedules know the run length
    with pytest.raises(ConfigError, match="8 shard.*for 16 readers"):
        stream = data.stream("train")
        stream.world = 16
        list(stream)
    with pytest.raises(DataError, match="shard not found"):
        ShardDataModule(str(caption_shards / "nope-{0..3}.tar"), epoch_size=8).setup("fit")


def test_damaged_shard_and_sample_name_the_file(caption_shards, tmp_path):
    bad = tmp_path / "bad-00000.tar"
    bad.write_bytes((caption_shards / "train-00000.tar").read_bytes()[:3000])  # cut short
    with pytest.raises(DataError, match="bad-00000.tar"):
        list(ShardStream([str(bad)], CaptionDecoder(8), train=False))
    no_caption = tmp_path / "nocap-00000.tar"
    with tarfile.open(no_caption, "w") as tar:
        payload = b"not an image"
        info = tarfile.TarInfo("000000001.jpg")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match=r"nocap-00000.tar, sample '000000001': no caption"):
        list(ShardStream([str(no_caption)], CaptionDecoder(8), train=False))


def test_two_ddp_processes_read_each_sample_once(caption_shards, tmp_path):
    """A real 2-process gloo DDP run (`mmgen fit`) over one epoch of the shards: the processes
    take the same number of steps and between them read every sample exactly once."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "mmgen.cli", "fit", "--config", "configs/fromage_tiny.yaml",
               "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.logger=false",
               "--trainer.max_epochs=1", "--trainer.max_steps=-1", "--trainer.limit_val_batches=0",
               f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=shard_probe.Keys",
               f"--trainer.callbacks.out_dir={tmp_path / 'keys'}",
               "--data=mmgen.data.shards.ShardDataModule", f"--data.train={caption_shards}",
               "--data.batch_size=4", "--data.image_size=32", "--data.shuffle_buffer=3"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "keys" / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == N_TRAIN // 2 // 4
    keys = [k for rank in ranks for batch in rank for k in batch]
    assert sorted(keys) == [f"{i:09d}" for i in range(N_TRAIN)]


def test_remote_style_urls_stream_through_webdataset(caption_shards):
    """URLs that are not local files (here `pipe:` commands with a brace pattern, as for
    `pipe:aws s3 cp s3://... -`) are opened by webdataset and streamed like local shards."""
    pattern = f"pipe:cat {caption_shards}/train-{{00000..00007}}.tar"
    data = ShardDataModule(pattern, epoch_size=N_TRAIN, batch_size=8, image_size=8, shuffle_buffer=0)
    keys = [k for batch in data.train_dataloader() for k in batch["keys"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(N_TRAIN)]
    index = json.loads((caption_shards / "shards.json").read_text())
    index["shards"][0]["url"] = "pipe:cat /etc/hostname"
    bad = caption_shards.parent / "bad-index.json"
    bad.write_text(json.dumps(index))
    with pytest.raises(DataError, match="pipe: command"):
        resolve_source(str(bad))
