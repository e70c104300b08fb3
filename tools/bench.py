"""Speed, measured side by side with the reference implementations in one run.

    python -m tools.bench [--quick] [--device D] [--json FILE] [--amp] [--compile]

Each figure is the median of several repeats after a warm-up, beside its reference and the
ratio (higher is better for ours): 1. the full google/ddpm-cifar10-32 UNet's forward and
training step (forward + backward + AdamW) at batch 16 against diffusers' UNet2DModel, same
weights and input; 2. sampling cost per image, DDPM 1000 vs DDIM 50 and DPM-Solver++(2M) 20
vs DDIM 50; 3. FID features against pytorch-fid; 4. the DCGAN training step at 256 and 64 px,
batch 32; 5. the data path (cache vs decoding PNGs, data wait per step); 6. peak memory of a
fine-tuning step at batch 32; 7. with --compile, torch.compile against eager. A column whose
reference (diffusers, pytorch-fid: test-only) is not installed is skipped. docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plumbing.configs import CLIError
from plumbing.files import atomic_path
from plumbing.runtime import autocast, epoch_order, pick_device



@dataclass
class Row:
    name: str
    ours: float | None
    reference: float | None = None
    unit: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.reference is None:
            return None
        # "higher is better" units are throughputs; for times and memory the reference / ours
        return self.ours / self.reference if self.unit.endswith("/s") else self.reference / self.ours


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Median times of several functions timed in alternation, so that a machine
    that speeds up or slows down during the run affects all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- 1. UNet vs diffusers


def _diffusers_unet():
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256), norm_num_groups=32, norm_eps=1e-6,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
        act_fn="silu", resnet_time_scale_shift="default", add_attention=True)


def bench_unet(device, args, rows: list[Row]) -> None:
    import ddpm

    torch.manual_seed(0)
    ref = _diffusers_unet()
    ours = ddpm.UNet()
    if ref is not None:
        ours.load_state_dict(ddpm.convert_diffusers_state_dict(ref.state_dict(), ours))
        ref.to(device)
    ours.to(device)
    x = torch.randn(16, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (16,), device=device)
    fast = ddpm.fast_inference(ours) if hasattr(ddpm, "fast_inference") else ours
    if ref is not None:
        with torch.inference_mode():
            diff = (fast(x, t) - ref(x, t).sample).abs().max().item()
    run_ours = torch.compile(fast) if args.compile else fast

    def fwd(model, unwrap_sample):
        def f():
            with torch.inference_mode(), autocast(device, args.amp):
                y = model(x, t)
                return y.sample if unwrap_sample else y
        return f

    fns = {"ours": fwd(run_ours, False)}
    if ref is not None:
        fns["diffusers"] = fwd(ref, True)
    r = interleaved(fns, device, args.repeats)
    rows.append(Row("UNet forward, batch 16", 16 / r["ours"], 16 / r["diffusers"] if ref is not None else None, "img/s",
                    f"max |ours - diffusers| = {diff:.2e}" if ref is not None else "diffusers not installed"))

    def train_step(model, unwrap_sample):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        target = torch.randn_like(x)

        def f():
            with autocast(device, args.amp):
                y = model(x, t)
                y = y.sample if unwrap_sample else y
            loss = torch.nn.functional.mse_loss(y.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return f

    ours_train = torch.compile(ours) if args.compile else ours
    fns = {"ours": train_step(ours_train, False)}
    if ref is not None:
        fns["diffusers"] = train_step(ref, True)
    r = interleaved(fns, device, max(2, args.repeats - 1))
    rows.append(Row("UNet training step, batch 16", 16 / r["ours"], 16 / r["diffusers"] if ref is not None else None,
                    "img/s", f"{r['ours']:.2f} s/step ours" + (f", {r['diffusers']:.2f} s/step diffusers" if ref is not None else "")))


# --------------------------------------------------------------------------- 2. sampling cost


def bench_sampling(device, args, rows: list[Row]) -> None:
    """DDIM 50 steps in full; DDPM 1000 steps timed over a slice of its chain and scaled
    (every ancestral step costs one network call of the same size), unless --full."""
    import ddpm

    model = ddpm.UNet().to(device).eval()
    diffusion = ddpm.GaussianDiffusion().to(device)
    batch = 4 if args.quick and device.type == "cpu" else 16
    shape = (batch, 3, 32, 32)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, device=device)
    with torch.inference_mode():
        model(x, torch.zeros(batch, dtype=torch.long, device=device))  # warm-up: one network call

    def run(sampler: str):
        return lambda: diffusion.sample(model, shape, sampler, ddpm.DEFAULT_STEPS[sampler], generator=g, progress=False)

    r = interleaved({s: run(s) for s in ("ddim", "dpmpp")}, device, 1 if args.quick else 3, warmup=0)
    ddim_s, dpmpp_s = r["ddim"], r["dpmpp"]
    k = 1000 if args.full else (10 if args.quick else 50)

    @torch.inference_mode()
    def ddpm_slice():
        y = x
        for i in range(k - 1, -1, -1):
            t = torch.full((batch,), i, device=device, dtype=torch.long)
            y = diffusion.p_sample(model, y, t, torch.randn(shape, generator=g, device=device))
        return y

    ddpm_s = median_time(ddpm_slice, device, repeats=1 if args.quick else 3, warmup=0) * 1000 / k
    note = "" if args.full else f"; DDPM timed over {k} of its 1000 steps and scaled"
    per_image = {"ddpm_s_per_image": ddpm_s / batch, "ddim_s_per_image": ddim_s / batch,
                 "dpmpp_s_per_image": dpmpp_s / batch}
    rows.append(Row(f"sampling, s per image: DDIM 50 vs DDPM 1000 (batch {batch})", ddim_s / batch, ddpm_s / batch,
                    "s/img", f"network calls 50 vs 1000{note}", per_image))
    rows.append(Row(f"sampling, s per image: DPM-Solver++ 20 vs DDIM 50 (batch {batch})", dpmpp_s / batch,
                    ddim_s / batch, "s/img", "network calls 20 vs 50"))


def bench_guidance(device, args, rows: list[Row]) -> None:
    """Classifier-free guidance: one DDIM step guided at w = 3 against the unguided step (w = 1) of a
    conditional UNet (random weights, 32 px), as `sample` runs it (ddpm.Guided, pieces of at most
    ddpm.CPU_MAX_BATCH rows on a CPU) and as ONE forward of 2B; the goal is under 2.1x."""
    import dataclasses
    import ddpm

    preset, batch = ("tiny", 16) if args.quick else ("small", 64)
    model = ddpm.UNet(dataclasses.replace(ddpm.PRESETS[preset], num_classes=2)).to(device).eval()
    diffusion = ddpm.GaussianDiffusion().to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    t, t_prev = (torch.full((batch,), i, device=device) for i in (500, 480))
    y = torch.zeros(batch, dtype=torch.long, device=device)
    cap = ddpm.CPU_MAX_BATCH if device.type == "cpu" else None
    nets = {"unguided": ddpm.Guided(model, y, 1.0, 2), "sample": ddpm.Guided(model, y, 3.0, 2, cap),
            "one forward": ddpm.Guided(model, y, 3.0, 2)}
    with torch.inference_mode():
        r = interleaved({k: (lambda g=g: diffusion.ddim_step(g, x, t, t_prev)) for k, g in nets.items()},
                        device, args.repeats)
    rows.append(Row(f"guided DDIM step (w 3) vs unguided, s ({preset}, batch {batch})", r["sample"], r["unguided"],
                    "s", f"{r['sample'] / r['unguided']:.2f}x an unguided step; one forward of 2B: "
                         f"{r['one forward'] / r['unguided']:.2f}x",
                    {"guided_over_unguided": r["sample"] / r["unguided"],
                     "one_forward_over_unguided": r["one forward"] / r["unguided"]}))


# --------------------------------------------------------------------------- 7. torch.compile against eager


def bench_compile(device, args, rows: list[Row]) -> None:
    """The full UNet, eager and torch.compile'd (same weights), timed in alternation after a first
    compiled call that compiles (its time is in the note): a training step, and DPM-Solver++ 20 steps.
    Train and eval mode are the same network here (dropout 0), so both parts use the one module."""
    import copy

    import ddpm

    if not args.compile:
        return
    batch = 4 if args.quick else 16
    torch.manual_seed(0)
    eager = ddpm.UNet().to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    diffusion = ddpm.GaussianDiffusion().to(device)
    x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1

    def train_step(net, params):
        opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

        def f():
            with autocast(device, args.amp):
                loss = diffusion.training_loss(net, x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return f

    def sample(net):
        return lambda: diffusion.sample(net, x0.shape, "dpmpp", 20, generator=torch.Generator(device).manual_seed(0),
                                        progress=False)

    for what, fns, unit, per in (
            (f"UNet training step, batch {batch}", {"eager": train_step(eager, eager.parameters()),
                                                    "compile": train_step(compiled, compiled_model.parameters())},
             "s/step", 1),
            (f"DPM-Solver++ 20 steps, batch {batch}", {"eager": sample(eager), "compile": sample(compiled)},
             "s/img", batch)):
        t0 = time.perf_counter()
        fns["compile"]()  # compiles (the inference graph is another compilation)
        compile_s = time.perf_counter() - t0
        r = interleaved(fns, device, 2 if args.quick else 3)
        rows.append(Row(f"torch.compile vs eager: {what}", r["compile"] / per, r["eager"] / per, unit,
                        f"first compiled call (compilation) {compile_s:.0f} s"))


# --------------------------------------------------------------------------- 3. FID features


def bench_fid(device, args, rows: list[Row], tmp: Path) -> None:
    import fid

    n = 100 if args.quick else 250
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 64, 64), dtype=torch.uint8)
    weights = Path(fid.default_weights_path())
    if not weights.is_file():  # random weights of the right shapes: speed does not depend on the values
        weights = tmp / "inception_random.pth"
        net = fid.FIDInceptionV3()
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.02)
        torch.save(net.state_dict(), weights)
    ours = fid.load_inception(weights, device)
    fns = {"ours": lambda: fid.inception_features(ours, images, batch_size=50, progress=False)}
    try:
        from pytorch_fid.inception import InceptionV3
        import pytorch_fid.inception as pfi

        original = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = lambda *a, **k: torch.load(weights, weights_only=True)
        try:
            ref = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
        finally:
            pfi.load_state_dict_from_url = original
        rgb = images[:, None].expand(-1, 3, -1, -1).float().div(255)

        @torch.no_grad()
        def ref_run():  # pytorch-fid's own loop: no_grad, batches of 50
            for i in range(0, n, 50):
                ref(rgb[i:i + 50].to(device))[0].squeeze(3).squeeze(2).cpu()

        fns["pytorch-fid"] = ref_run
    except ImportError:
        pass
    r = interleaved(fns, device, max(1, args.repeats - 1))
    rows.append(Row("FID features, batch 50 (64 px images)", n / r["ours"],
                    n / r["pytorch-fid"] if "pytorch-fid" in r else None, "img/s",
                    "" if "pytorch-fid" in r else "pytorch-fid not installed"))


# --------------------------------------------------------------------------- 4. DCGAN step


def bench_dcgan(device, args, rows: list[Row]) -> None:
    import dcgan
    from training import gan_run

    for size in (256, 64):
        torch.manual_seed(0)
        cfg = dcgan.DCGANConfig(size=size)
        G, D = dcgan.Generator(cfg).to(device), dcgan.Discriminator(cfg).to(device)
        opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(D.parameters(), 1e-4, betas=(0.5, 0.999))
        tcfg = dcgan.TrainConfig(data=Path(), out=Path(), amp=args.amp, preset="original")  # 1 D + 2 G updates
        step = dcgan.make_step(G, D, opt_g, opt_d, cfg, tcfg, device, gan_run.augmentation(tcfg.settings().augment))
        real = torch.rand(32, cfg.channels, size, size, device=device) * 2 - 1
        s = median_time(lambda: step(real), device, repeats=max(1, args.repeats - (2 if size == 256 else 0)))
        rows.append(Row(f"DCGAN training step {size}x{size}, batch 32", s, None, "s/step", "1 D + 2 G updates"))


# --------------------------------------------------------------------------- 5. data path


def bench_data(device, args, rows: list[Row], tmp: Path) -> None:
    import data
    from tools import phantoms

    folder = tmp / "pngs"
    n = 64 if args.quick else 256
    phantoms.write_phantoms(n, folder, size=256, seed=0)
    files = data.list_images(folder)
    decode_s = median_time(lambda: [data.center_crop_resize(data.load_grey(p), 32) for p in files], device, 1, 0)
    cache_dir = tmp / "cache"
    data.load_folder(folder, 32, cache_dir=cache_dir, progress=False)  # builds the cache
    t0 = time.perf_counter()
    images = data.load_folder(folder, 32, cache_dir=cache_dir, progress=False).images
    load_s = time.perf_counter() - t0

    # What train_loop does per step: index a batch of the in-memory tensor and convert it.
    order = epoch_order(len(images), 0, 0)

    def fetch():
        for i in range(0, len(images) - 31, 32):
            data.to_rgb_range(images[order[i:i + 32]]).to(device)
    steps = max(1, len(images) // 32)
    fetch_s = median_time(fetch, device, 5) / steps
    rows.append(Row("data: images/s from cache vs decoding PNGs", len(files) / (load_s + fetch_s * steps),
                    len(files) / decode_s, "img/s", f"cache read {load_s * 1e3:.1f} ms for {len(files)} images"))
    rows.append(Row("data: seconds to fetch a batch of 32 from cache", fetch_s, None, "s/batch", "",
                    {"fetch_s": fetch_s}))


# --------------------------------------------------------------------------- 6. peak memory (own process)


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Unlike getrusage's ru_maxrss,
    which a child inherits from the parent that forked it, VmHWM starts afresh at exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not Linux: the portable, less exact figure

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)


def finetune_step_memory(device_name: str, amp: bool) -> dict:
    """One fine-tuning step at batch 32; run in a fresh process so the peak is its own."""
    base = _peak_rss_mib()  # Python + torch, no model yet
    import ddpm

    device = pick_device(device_name)
    model = ddpm.UNet().to(device)
    diffusion = ddpm.GaussianDiffusion().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    x0 = torch.rand(32, 3, 32, 32, device=device) * 2 - 1
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with autocast(device, amp):
            loss = diffusion.training_loss(model, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    out = {"peak_rss_mib": _peak_rss_mib(), "rss_before_mib": base, "step_s": times[-1]}
    if device.type == "cuda":
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def bench_memory(device, args, rows: list[Row]) -> dict:
    cmd = [sys.executable, "-m", "tools.bench", "--_memory-probe", "--device", str(device)] + (["--amp"] if args.amp else [])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if res.returncode != 0:
        rows.append(Row("peak memory, fine-tuning step batch 32", None, None, "MiB", "probe failed: " +
                        (res.stderr.strip().splitlines() or ["?"])[-1]))
        return {}
    probe = json.loads(res.stdout.strip().splitlines()[-1])
    key = "peak_allocated_mib" if "peak_allocated_mib" in probe else "peak_rss_mib"
    rows.append(Row(f"peak memory, fine-tuning step batch 32 ({'GPU allocated' if key != 'peak_rss_mib' else 'RSS'})",
                    probe[key], None, "MiB", f"of which {probe['rss_before_mib']:.0f} MiB is Python + torch before the model", probe))
    return probe


# --------------------------------------------------------------------------- main


def print_table(rows: list[Row]) -> None:
    print(f"\n{'measure':52s} {'ours':>12s} {'reference':>12s} {'ratio':>7s}  unit / note")
    for r in rows:
        fmt = lambda v: "-" if v is None else (f"{v:.4g}")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        print(f"{r.name:52s} {fmt(r.ours):>12s} {fmt(r.reference):>12s} {ratio:>7s}  {r.unit}  {r.note}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and images: under 3 minutes on a 2-core CPU")
    p.add_argument("--full", action="store_true", help="time the DDPM sampler over all 1000 steps (slow on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for our paths")
    p.add_argument("--compile", action="store_true", help="torch.compile our UNet, and time it against eager")
    p.add_argument("--only", default="unet,sampling,guidance,fid,dcgan,data,memory,compile", help="comma-separated parts to run")
    p.add_argument("--_memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args._memory_probe:
        print(json.dumps(finetune_step_memory(str(device), args.amp)))
        return 0
    args.repeats = 3 if args.quick else 7
    parts = set(args.only.split(","))
    rows: list[Row] = []
    t_start = time.perf_counter()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fn in (("unet", lambda: bench_unet(device, args, rows)),
                         ("sampling", lambda: bench_sampling(device, args, rows)),
                         ("guidance", lambda: bench_guidance(device, args, rows)),
                         ("fid", lambda: bench_fid(device, args, rows, tmp)),
                         ("dcgan", lambda: bench_dcgan(device, args, rows)),
                         ("data", lambda: bench_data(device, args, rows, tmp)),
                         ("memory", lambda: bench_memory(device, args, rows)),
                         ("compile", lambda: bench_compile(device, args, rows))):
            if name in parts:
                t0 = time.perf_counter()
                fn()
                print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    # the fraction of a fine-tuning step at batch 32 spent waiting for data
    fetch = next((r.extra["fetch_s"] for r in rows if "fetch_s" in r.extra), None)
    step = next((r.extra["step_s"] for r in rows if "step_s" in r.extra), None)
    if fetch is not None and step is not None:
        rows.append(Row("data wait as a fraction of a batch-32 fine-tuning step", fetch / (fetch + step), None,
                        "fraction", f"fetch {fetch * 1e3:.2f} ms, step {step:.2f} s"))
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        payload = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "quick": args.quick, "amp": args.amp, "compile": args.compile,
                   "rows": [{"name": r.name, "ours": r.ours, "reference": r.reference, "ratio": r.ratio,
                             "unit": r.unit, "note": r.note, **r.extra} for r in rows]}
        with atomic_path(args.json) as tmp_json:
            tmp_json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
