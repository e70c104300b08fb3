"""hub.py: our safetensors writer against the safetensors package, the exported
folder against diffusers (UNet2DModel, DDPMScheduler, DDPMPipeline; used here
only as oracles), the export's refusals, and the Hub-cache lookup (weightfiles.find_cached_snapshot,
used by ddpm.load_pretrained) on a fake cache."""

import json
import os
from dataclasses import asdict, make_dataclass

import pytest
import torch

import ddpm
from tools import export as hub
import main
from plumbing import weightfiles
from plumbing.configs import CLIError
from plumbing.files import save_checkpoint

diffusers = pytest.importorskip("diffusers")
safetensors = pytest.importorskip("safetensors")
safetensors_torch = pytest.importorskip("safetensors.torch")


def ddpm_checkpoint(preset: str = "tiny", image_size: int = 16, ema: bool = True, diffusion: dict | None = None) -> dict:
    """A checkpoint as ddpm.cmd_train's state_fn writes it, with random weights and an
    EMA that differs from them (so a test can tell which one was exported)."""
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.PRESETS[preset])
    sd = model.state_dict()
    ckpt = {"kind": "ddpm", "config": asdict(model.config), "image_size": image_size,
            "diffusion": diffusion if diffusion is not None else ddpm.GaussianDiffusion().config(),
            "model": sd, "ema": {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()} if ema else None,
            "step": 123, "epoch": 2, "args": {"data": "data/nih/train", "class_name": "infiltration", "finetune": True}}
    return ckpt


def export(tmp_path, ckpt: dict, out_name: str = "exported", **kw):
    save_checkpoint(ckpt, tmp_path / "run" / "checkpoint.pt")
    return hub.export(hub.ExportConfig(checkpoint=tmp_path / "run" / "checkpoint.pt", out=tmp_path / out_name, **kw))


def our_unet(ckpt: dict, weights: str = "ema") -> ddpm.UNet:
    model = ddpm.UNet(ddpm.UNetConfig(**ckpt["config"]))
    model.load_state_dict(ckpt[weights])
    return model.eval()


# --------------------------------------------------------------------------- safetensors writer


def test_safetensors_writer_read_back_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f64": torch.randn(4, generator=g, dtype=torch.float64),
               "f16": torch.randn(7, generator=g).half(), "bf16": torch.randn(2, 3, generator=g).bfloat16(),
               "i64": torch.arange(-3, 3), "i32": torch.arange(5, dtype=torch.int32), "i16": torch.arange(3, dtype=torch.int16),
               "i8": torch.tensor([-128, 0, 127], dtype=torch.int8), "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "transposed": torch.randn(4, 6, generator=g).t(), "name with ü": torch.ones(1)}
    path = tmp_path / "t.safetensors"
    hub.write_safetensors(tensors, path, metadata={"format": "pt"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8:9] == b"{"
    for reader in (safetensors_torch.load_file, weightfiles.read_safetensors):
        back = reader(path)
        assert back.keys() == tensors.keys()
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_safetensors_writer_gives_the_reference_bytes(tmp_path):
    # one dtype (as a UNet's weights): the reference orders by name, pads with spaces, writes compact JSON
    sd = ddpm.UNet(ddpm.PRESETS["tiny"]).state_dict()
    hub.write_safetensors(sd, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == safetensors_torch.save(sd, metadata={"format": "pt"})


# --------------------------------------------------------------------------- UNet config and keys


@pytest.mark.parametrize("preset", ["tiny", "small", "cifar10"])
def test_unet_config_is_the_inverse_of_the_loader(preset):
    cfg = ddpm.PRESETS[preset]
    config = hub.unet_config_to_diffusers(cfg)
    assert ddpm.UNetConfig(**ddpm.unet_config(config)) == cfg
    assert config["_class_name"] == "UNet2DModel" and config["attention_head_dim"] is None
    if preset == "cifar10":  # the released model's block types (REFERENCE.md section 1)
        assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
        assert config["up_block_types"] == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    # diffusers builds exactly the tensors we write, under the names we write them
    with torch.device("meta"):
        theirs = diffusers.UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        ours = ddpm.UNet(cfg).state_dict()
    converted = hub.state_dict_to_diffusers(ours, cfg)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_unknown_unet_config_fields_are_refused():
    Future = make_dataclass("Future", [("num_classes", int, None), ("cross_attention", bool, False)], bases=(ddpm.UNetConfig,))
    with pytest.raises(CLIError, match="cross_attention"):
        hub.unet_config_to_diffusers(Future(block_out_channels=(16, 32), norm_groups=8))
    Conditional = make_dataclass("Conditional", [("num_classes", int, None)], bases=(ddpm.UNetConfig,))
    assert hub.unet_config_to_diffusers(Conditional(num_classes=2))["num_class_embeds"] == 3  # and "no label"
    assert hub.unet_config_to_diffusers(ddpm.UNetConfig())["num_class_embeds"] is None
    with pytest.raises(CLIError, match="attention_levels"):
        hub.unet_config_to_diffusers(ddpm.UNetConfig(attention_levels=(4,)))


def test_state_dict_shape_and_key_checks():
    cfg = ddpm.PRESETS["tiny"]
    sd = ddpm.UNet(cfg).state_dict()
    assert "mid_block.attentions.0.to_out.0.weight" in hub.state_dict_to_diffusers(sd, cfg)
    with pytest.raises(CLIError, match="shape mismatch for conv_in.weight"):
        hub.state_dict_to_diffusers({**sd, "conv_in.weight": torch.zeros(1)}, cfg)
    with pytest.raises(CLIError, match="lack conv_out.bias"):
        hub.state_dict_to_diffusers({k: v for k, v in sd.items() if k != "conv_out.bias"}, cfg)
    with pytest.raises(CLIError, match="unexpected key"):
        hub.state_dict_to_diffusers({**sd, "extra.weight": torch.zeros(1)}, cfg)


# --------------------------------------------------------------------------- export against diffusers


@pytest.mark.parametrize("preset,size", [("tiny", 16), pytest.param("cifar10", 32, marks=pytest.mark.slow)])
def test_export_matches_diffusers_and_loads_back_bit_exactly(tmp_path, preset, size):
    ckpt = ddpm_checkpoint(preset, size)
    out = export(tmp_path, ckpt)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(hub.EXPORT_FILES)
    theirs = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    ours = our_unet(ckpt, "ema")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, size, size, generator=g), torch.randint(0, 1000, (2,), generator=g)
    with torch.no_grad():
        diff = (ours(x, t) - theirs(x, t).sample).abs().max().item()
    print(f"{preset}: max |ours - diffusers| = {diff:.3g}")
    assert diff < 1e-5
    back = ddpm.load_pretrained(out / "unet", download=False)  # what `ddpm --finetune --pretrained OUT/unet` loads
    assert back.config == ddpm.UNetConfig(**{**ckpt["config"], "sample_size": size})
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ckpt["ema"].items())


def test_pipeline_loads_and_runs_two_steps(tmp_path):
    out = export(tmp_path, ddpm_checkpoint("tiny", 16))
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and (images >= 0).all() and (images <= 1).all()


@pytest.mark.parametrize("diffusion", [
    dict(num_timesteps=1000, beta_schedule="linear", variance_type="fixed_large", clip_sample=True),
    dict(num_timesteps=500, beta_schedule="cosine", variance_type="fixed_small", clip_sample=False),
    {}])  # an old checkpoint without settings: ddpm's defaults
def test_scheduler_matches_our_schedule(diffusion):
    config = hub.scheduler_config(diffusion)
    theirs = diffusers.DDPMScheduler.from_config(config)
    ours = ddpm.GaussianDiffusion(**diffusion)
    assert torch.allclose(theirs.betas, ours.betas, rtol=1e-6, atol=1e-9)
    assert theirs.config.variance_type == ours.variance_type and theirs.config.clip_sample == ours.clip_sample


def test_export_falls_back_to_model_weights_and_writes_a_model_card(tmp_path, capsys):
    ckpt = ddpm_checkpoint("tiny", 16, ema=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "distances.json").write_text(json.dumps(
        {"ddpm/infiltration": {"n_real": 500, "classifier": {"fd": 12.345678}}, "inception_missing": "offline"}))
    out = export(tmp_path, ckpt)
    assert "exported the model weights (step 123)" in capsys.readouterr().out
    back = weightfiles.read_safetensors(out / hub.WEIGHTS_FILE)
    assert torch.equal(back["conv_in.weight"], ckpt["model"]["conv_in.weight"])
    card = (out / "README.md").read_text()
    for text in ("must not be used for diagnosis", "`data/nih/train`, class infiltration", "123 training steps",
                 "16x16", "| ddpm/infiltration/classifier/fd | 12.35 |", "library_name: diffusers"):
        assert text in card, text
    assert json.loads((out / "model_index.json").read_text()) == {
        "_class_name": "DDPMPipeline", "_diffusers_version": hub.DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    hub.export(hub.ExportConfig(checkpoint=tmp_path / "run" / "checkpoint.pt", out=tmp_path / "third"), distances={"kid": 0.5})
    assert "| kid | 0.5 |" in (tmp_path / "third" / "README.md").read_text()


# --------------------------------------------------------------------------- refusals, each before anything is written


def test_export_refuses_bad_checkpoints(tmp_path):
    out = tmp_path / "out"

    def refused(ckpt, match):
        path = tmp_path / "bad.pt"
        if isinstance(ckpt, bytes):
            path.write_bytes(ckpt)
        else:
            save_checkpoint(ckpt, path)
        with pytest.raises(CLIError, match=match) as e:
            hub.export(hub.ExportConfig(checkpoint=path, out=out))
        assert "\n" not in str(e.value) and not out.exists()

    good = ddpm_checkpoint()
    refused({"kind": "dcgan", "generator": {}}, "only DDPM checkpoints export")
    refused(b"not a checkpoint", "cannot read checkpoint")
    refused({"weights": torch.zeros(1)}, "not a DDPM checkpoint")
    refused({**good, "ema": {**good["ema"], "conv_out.bias": torch.full((3,), float("nan"))}}, "conv_out.bias holds NaN")
    refused({**good, "config": {**good["config"], "cross_attention": True}}, "malformed DDPM checkpoint.*cross_attention")
    refused({**good, "config": {**good["config"], "num_classes": 3}}, "lack class_embedding.weight")  # conditional config
    refused({**good, "diffusion": {**good["diffusion"], "prediction": "v"}}, "diffusion setting prediction='v'")
    refused({**good, "diffusion": {"beta_schedule": "laplace"}}, "malformed diffusion settings")
    refused({**good, "ema": {**good["ema"], "conv_in.weight": torch.zeros(2)}}, "shape mismatch for conv_in.weight")
    with pytest.raises(CLIError, match="checkpoint not found"):
        hub.export(hub.ExportConfig(checkpoint=tmp_path / "missing.pt", out=out))


def test_export_folder_rules(tmp_path):
    ckpt = ddpm_checkpoint()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CLIError, match="is a file"):
        export(tmp_path, ckpt, "file")
    (tmp_path / "empty").mkdir()
    export(tmp_path, ckpt, "empty")  # an empty folder is fine
    with pytest.raises(CLIError, match="not empty.*--force"):
        export(tmp_path, ckpt, "empty")
    out = tmp_path / "empty"
    stale = out / "unet" / ".config.json.abcd1234.json"  # left by an export killed mid-write
    stale.write_text("{")
    before = (out / hub.WEIGHTS_FILE).stat().st_mtime_ns
    export(tmp_path, ckpt, "empty", force=True)  # only our own files there: replaced
    assert not stale.exists() and (out / hub.WEIGHTS_FILE).stat().st_mtime_ns >= before
    (out / "unet" / "notes.txt").write_text("mine")
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CLIError, match="holds unet/notes.txt, which export does not write"):
        export(tmp_path, ckpt, "empty", force=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot  # nothing touched


def test_export_command_line(tmp_path, capsys):
    save_checkpoint(ddpm_checkpoint(), tmp_path / "run" / "checkpoint.pt")
    argv = ["export", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "out")]
    assert main.main(argv) == 0 and (tmp_path / "out" / "model_index.json").is_file()
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err
    assert main.main(argv + ["--force"]) == 0


# --------------------------------------------------------------------------- the Hub cache


REPO_DIR = "models--google--ddpm-cifar10-32"


def fake_snapshot(cache, revision: str, files: dict[str, bytes], ref: bool = False):
    """A snapshot as huggingface_hub lays it out: blobs/<hash> holding the bytes,
    snapshots/<revision>/<name> a relative symlink to it, refs/main naming the revision."""
    root = cache / REPO_DIR
    snap = root / "snapshots" / revision
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        blob = root / "blobs" / f"{revision}-{name}"
        blob.write_bytes(content)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture
def no_hf_env(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


UNET_FILES = {"config.json": b"{}", "diffusion_pytorch_model.safetensors": b"weights"}


def cached():
    return weightfiles.find_cached_snapshot()


def test_cache_prefers_refs_main_else_the_newest(tmp_path, monkeypatch, no_hf_env):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert cached() is None  # no cache at all
    old = fake_snapshot(cache, "a" * 40, UNET_FILES, ref=True)
    new = fake_snapshot(cache, "b" * 40, UNET_FILES)
    os.utime(old, (1, 1))
    assert cached() == old  # refs/main wins over the newer folder
    (cache / REPO_DIR / "refs" / "main").unlink()
    assert cached() == new
    (cache / REPO_DIR / "refs" / "main").write_text("../../elsewhere")  # not a revision name: ignored
    assert cached() == new


def test_cache_locations_and_their_precedence(tmp_path, monkeypatch, no_hf_env):
    home_cache = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    fake_snapshot(home_cache, "c" * 40, UNET_FILES)
    assert cached() == home_cache / REPO_DIR / "snapshots" / ("c" * 40)  # ~/.cache by default
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert cached() is None  # HF_HOME replaces ~/.cache/huggingface
    fake_snapshot(tmp_path / "hf_home" / "hub", "d" * 40, UNET_FILES)
    assert cached().name == "d" * 40
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    fake_snapshot(tmp_path / "hub_cache", "e" * 40, UNET_FILES)
    assert cached().name == "e" * 40  # HF_HUB_CACHE beats HF_HOME


def test_cache_broken_or_incomplete_snapshot_is_not_used(tmp_path, monkeypatch, no_hf_env, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    snap = fake_snapshot(tmp_path / "cache", "f" * 40, UNET_FILES, ref=True)
    next((tmp_path / "cache" / REPO_DIR / "blobs").glob("*safetensors")).unlink()  # a dangling link
    assert cached() is None
    assert f"{snap} is broken" in capsys.readouterr().out
    (snap / "diffusion_pytorch_model.safetensors").unlink()  # config.json alone: incomplete
    assert cached() is None


def test_cached_snapshot_loads_through_its_symlinks(tmp_path, monkeypatch, no_hf_env):
    ckpt = ddpm_checkpoint()
    unet = export(tmp_path, ckpt) / "unet"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    fake_snapshot(tmp_path / "hf" / "hub", "0" * 40, {p.name: p.read_bytes() for p in unet.iterdir()}, ref=True)
    model = ddpm.load_pretrained(cached(), download=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["ema"].items())


def test_load_pretrained_uses_the_cache_before_downloading(tmp_path, monkeypatch, no_hf_env, capsys):
    ckpt = ddpm_checkpoint()
    unet = export(tmp_path, ckpt) / "unet"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    snap = fake_snapshot(tmp_path / "cache", "1" * 40, {p.name: p.read_bytes() for p in unet.iterdir()}, ref=True)

    def no_network(*a, **k):
        raise AssertionError("load_pretrained went to the network although the cache holds the model")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    folder = tmp_path / "models" / "ddpm-cifar10-32"  # the default folder's shape: missing, so a download was due
    model = ddpm.load_pretrained(folder)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["ema"].items())
    assert f"using the Hugging Face cache's {weightfiles.HF_REPO} at {snap}" in capsys.readouterr().out
    assert not folder.exists()  # nothing downloaded, nothing made
