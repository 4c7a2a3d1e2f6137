"""Measure what an annotator waits for: volume inference, an incremental update, the adapter on disk.

    .venv/bin/python scripts/benchmark.py --backbone tiny
    .venv/bin/python scripts/benchmark.py --backbone litemedsam --slices 100 --skip-update
    .venv/bin/python scripts/benchmark.py --backbone litemedsam --slices 100 --skip-update --quantize int8
    .venv/bin/python scripts/benchmark.py --backbone vit_b --slices 100 --skip-update
    .venv/bin/python scripts/benchmark.py --model fgnet --backbone tiny --slices 32

Runs the app's own code paths (infer task, trainer, engine) on a copy of the sample datastore (brain MRI; EM for fgnet),
with random weights in the official layout when no SAM/SAM2 checkpoint is given (speed does not depend on them);
LiteMedSAM's own weights come with its wheel. A pretrained backbone's automatic task answers only once an adapter is
served, so the run first publishes the untrained adapter (version 1) when none is.
The SAM models segment a volume of ``--slices`` axial slices of 512 x 512 voxels (``--in-plane``) made from the
sample brain_003; fgnet the EM sample em_003 as it is.
For the SAM models the same run also measures the reference path (segment_anything's unmodified encoder, or the
official TinyViT for LiteMedSAM, prompt encoder and decoder, fp32, one slice at a time, at the model size) in turns
with the app's network, counts the network's FLOPs per slice with torch's FlopCounterMode and measures the
machine's fp32 and bf16 matmul throughput, so every speed is also a fraction of the hardware limit. When the image encoder runs on OpenVINO
(``--engine``, default auto as the server), the same run also segments the volume with torch at the app's precision
and at fp32: the engine's conversion time, both warm volume times and the label agreement with fp32 torch.
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "apps", "samfewshot")
sys.path.insert(0, APP)
os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak resident memory of this process so far and, on CUDA, peak GPU memory allocated by torch."""
    peaks = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        import torch

        peaks["gpu_memory"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


def synthetic_volume(path: str, reference: str, slices: int, air_slices: int = 0, in_plane: int | None = None) -> None:
    """``slices`` axial slices through the reference volume's centre (tiled when it has fewer), with ``air_slices``
    empty slices added above and below (what slab skipping leaves out); resampled to ``in_plane`` x ``in_plane``
    voxels per slice when given (a CT-sized 512 x 512 grid; the field of view stays the reference's)."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import Resize

    ref = nib.load(reference)
    data = np.asarray(ref.dataobj, dtype=np.float32)
    affine = ref.affine.copy()
    if in_plane:
        factors = [data.shape[0] / in_plane, data.shape[1] / in_plane]
        data = Resize((in_plane, in_plane, data.shape[2]), mode="trilinear")(data[None])[0].numpy()
        affine[:3, :2] *= factors
    reps = -(-slices // data.shape[2])
    tiled = np.concatenate([data] * reps, axis=2)
    first = max(0, (data.shape[2] - slices) // 2)
    air = np.zeros((*data.shape[:2], air_slices), data.dtype)
    nib.save(nib.Nifti1Image(np.concatenate([air, tiled[..., first : first + slices], air], axis=2), affine), path)


def random_official_checkpoint(backbone: str, directory: str) -> str:
    """segment_anything's own architecture with random weights, saved like an official file (speed only)."""
    import torch
    from segment_anything import sam_model_registry

    path = os.path.join(directory, f"random_sam_{backbone}.pth")
    torch.save(sam_model_registry[backbone]().state_dict(), path)
    return path


def random_official_sam2_checkpoint(variant: str, directory: str) -> str:
    """sam2's own SAM 2.1 model with random weights, saved like an official file (speed only)."""
    import torch
    from sam2.build_sam import build_sam2

    config = {"hiera_t": "t", "hiera_s": "s", "hiera_b+": "b+", "hiera_l": "l"}[variant]
    path = os.path.join(directory, f"random_sam2_{variant}.pt")
    model = build_sam2(f"configs/sam2.1/sam2.1_hiera_{config}.yaml", None, device="cpu", apply_postprocessing=False)
    torch.save({"model": model.state_dict()}, path)
    return path


def propagation_step_seconds(model, device: str, repeats: int = 5) -> float:
    """Seconds per slice of one propagation step as the interactive task runs it: SAM's prompted decoding of two
    slices (the walks up and down) with a box and a mask prompt, fp32, one CPU thread, embeddings given (the
    cache); the best of ``repeats``. A click costs about this times the slices the structure spans."""
    import torch

    from lib.compute import torch_threads
    from lib.transforms.prompts import batch_prompts

    network, _ = model.resident(device)
    size = model.img_size
    with torch.no_grad():
        embedding, features = network.prepare(torch.rand(2, 1, size, size, device=device))
        grid = network.prompt_encoder.mask_input_size
        box = {"points": [], "box": (size / 4, size / 4, 3 * size / 4, 3 * size / 4)}
        prompts = batch_prompts([box, box], device, masks=torch.randn(2, 1, *grid, device=device))
        times = []
        with torch_threads(1 if device.startswith("cpu") else torch.get_num_threads()):
            for _ in range(repeats + 1):
                start = time.perf_counter()
                network.object_logit(network.decode_prompted(embedding, features, prompts), torch.ones(2, device=device))
                times.append(time.perf_counter() - start)
    return min(times[1:]) / 2


def matmul_flops_per_s(dtype, device: str, n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of an n x n matrix product in ``dtype``: the machine's practical limit for dense layers."""
    import torch

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * done / (time.perf_counter() - start)


def flops_per_slice(network, img_size: int, device: str) -> float:
    """FLOPs of one forward of ``network`` on a (1, 1, S, S) slice, counted by torch (with autograd on: the
    counter's module hooks reject parameter views made under no_grad)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        network(torch.rand(1, 1, img_size, img_size, device=device))
    return float(counter.get_total_flops())


@contextlib.contextmanager
def torch_only(task, precision: str | None = None):
    """``task`` served by torch (at ``precision``, default its own) for the block."""
    engine, previous = task.engine, getattr(task, "precision", None)
    task.engine = None
    if previous:
        task.precision = precision or previous
    try:
        yield
    finally:
        task.engine = engine
        if previous:
            task.precision = previous


def warm_seconds(app, request: dict, repeats: int) -> tuple[float, dict]:
    """Best of ``repeats`` inferences, each from empty embedding and prepared-volume caches (a volume seen for the
    first time)."""
    from lib.monailabel_compat import forget_prepared_volumes

    embeddings = getattr(app._infers[request["model"]], "embeddings", None)
    times = []
    for _ in range(repeats):
        forget_prepared_volumes()
        if embeddings:
            embeddings.clear()
        start = time.perf_counter()
        out = app.infer(request)
        times.append(time.perf_counter() - start)
    return min(times), out


def label_of(result: dict):
    import nibabel as nib
    import numpy as np

    return np.asarray(nib.load(result["label"]).dataobj)


def paired_seconds_per_slice(network, backbone: str, device: str, batch_size: int, precision: str, rounds: int = 3, encode=None):
    """Seconds per slice of the reference path and of ``network`` (``batch_size`` slices per forward under
    ``precision``; its image encoder replaced by ``encode`` when given, an engine's), timed in turns in one process so
    that a host whose speed drifts slows both alike; medians of ``rounds`` after one warm-up call of each.

    The reference is segment_anything's own ImageEncoderViT (LiteMedSAM: the official TinyViT) + PromptEncoder +
    MaskDecoder at the model size, fp32, one slice per call (as SAMed-style pipelines run a volume), without prompts.
    """
    import statistics

    import torch
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    from lib.compute import autocast
    from lib.networks.sam_backbone import SamEncoderSpec, build_image_encoder, build_prompt_encoder, get_encoder_spec

    spec = get_encoder_spec(backbone)
    official = build_image_encoder(spec, fused_attention=False) if isinstance(spec, SamEncoderSpec) else spec.build_encoder()
    encoder = official.to(device).eval()
    prompts = build_prompt_encoder(spec).to(device).eval()
    decoder = (
        MaskDecoder(
            transformer_dim=spec.prompt_dim,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=spec.prompt_dim, mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_heads
            ),
        )
        .to(device)
        .eval()
    )
    reference_image = torch.rand(1, 3, spec.img_size, spec.img_size, device=device)
    slices = torch.rand(batch_size, 1, spec.img_size, spec.img_size, device=device)

    def reference():
        sparse, dense = prompts(points=None, boxes=None, masks=None)
        decoder(encoder(reference_image), prompts.get_dense_pe(), sparse, dense, multimask_output=True)
        return 1

    def ours():
        with autocast(precision, device):
            network(slices, encode=encode)
        return batch_size

    times = {reference: [], ours: []}
    with torch.no_grad():
        for round in range(rounds + 1):
            for path in (reference, ours):
                start = time.perf_counter()
                count = path()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if round:
                    times[path].append((time.perf_counter() - start) / count)
    return statistics.median(times[reference]), statistics.median(times[ours])


def main(argv: list[str] | None = None) -> int:
    from lib.compute import ENGINES, PRECISIONS, QUANTIZATIONS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--model", default="hf_sam")
    parser.add_argument("--slices", type=int, default=100, help="axial slices through the sample volume's centre")
    parser.add_argument("--air-slices", type=int, default=0, help="empty slices added above and below them")
    parser.add_argument(
        "--in-plane", type=int, default=512, help="voxels per slice side of the benchmark volume, 0 = the sample's own (SAM models)"
    )
    parser.add_argument("--sam-checkpoint", default=None, help="official SAM file; default: random weights in its layout")
    parser.add_argument("--sam2-variant", default="hiera_t", help="fgnet's SAM2 encoder when the backbone is not tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="inference precision")
    parser.add_argument("--engine", default="auto", choices=ENGINES, help="image-encoder engine")
    parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS, help="the SAM models' OpenVINO encoder")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per forward (default: the app's)")
    parser.add_argument("--repeats", type=int, default=3, help="warm inference repeats")
    parser.add_argument("--update-epochs", type=int, default=5)
    parser.add_argument("--skip-update", action="store_true", help="do not measure the incremental update")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)

    import nibabel as nib
    import torch

    from lib.adapters import publish_adapter
    from lib.networks.lora import adapter_state_dict
    from main import SamFewShotApp

    work = tempfile.mkdtemp(prefix="samfewshot-bench-")
    try:
        app_dir, studies = os.path.join(work, "app"), os.path.join(work, "studies")
        shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
        em = args.model == "fgnet"
        dataset, reference = ("em-neurons", "em_003") if em else ("brain-mri", "brain_003")
        shutil.copytree(
            os.path.join(REPO, "sample-datasets", dataset), studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock")
        )
        synthetic_volume(
            os.path.join(studies, "bench.nii.gz"),
            os.path.join(studies, f"{reference}.nii.gz"),
            args.slices,
            args.air_slices,
            None if em else args.in_plane or None,
        )

        conf = {
            "models": args.model,
            "backbone": args.backbone,
            "device": args.device,
            "auto_scoring": "false",
            "precision": args.precision,
        }
        conf["engine"] = args.engine
        if not em:
            conf["quantize"] = args.quantize
        if args.backbone != "tiny" and em:
            conf["sam2_variant"] = args.sam2_variant
            conf["sam2_checkpoint"] = random_official_sam2_checkpoint(args.sam2_variant, work)
        elif args.backbone not in ("tiny", "litemedsam"):
            conf["sam_checkpoint"] = args.sam_checkpoint or random_official_checkpoint(args.backbone, work)
        app = SamFewShotApp(app_dir, studies, conf)
        served = app.models[args.model].model
        if served.labels and served.pretrained and not served.served_version():
            publish_adapter(served.adapter_path, adapter_state_dict(served.build_network()), served.adapter_config())
        request = {"model": args.model, "image": "bench", "device": args.device}
        if args.batch_size:
            request["batch_size"] = args.batch_size
        results: dict = {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "config": vars(args),
        }

        # Every timed inference but the re-inference and the click starts from empty embedding and prepared-volume
        # caches: a volume seen for the first time. The cold one is served by torch while the engine, if any, builds.
        task = app._infers[args.model]
        results["precision"] = getattr(task, "precision", "fp32")
        embeddings = getattr(task, "embeddings", None)
        start = time.perf_counter()
        app.infer(request)
        results["infer_cold_s"] = time.perf_counter() - start
        engine = task.engine
        results["engine"] = f"torch-{results['precision']}"
        if engine:
            engine.wait()
            results["engine"] = engine.label
            results["engine_choice"] = engine.status().get("choice", {})
            results["engine_conversion_s"] = engine.last_build_s
            results["engine_failure"] = engine.failure or ""
            with torch_only(task):
                results["torch_infer_warm_s"], torch_out = warm_seconds(app, request, args.repeats)
            if not em:
                with torch_only(task, "fp32"):
                    fp32 = label_of(app.infer(request))
        warm, out = warm_seconds(app, request, args.repeats)
        if engine and not em:
            results["label_agreement_with_fp32_torch"] = float((label_of(out) == fp32).mean())
            results["torch_label_agreement_with_fp32_torch"] = float((label_of(torch_out) == fp32).mean())
        skipped = out["params"].get("skipped_slices", 0)
        results["infer_warm_s"] = warm
        total = args.slices + 2 * args.air_slices
        results["infer_warm_slices_per_s"] = total / warm
        results["skipped_slices"] = skipped
        results["network_slices_per_s"] = (total - skipped) / warm
        results["infer_latencies"] = out["params"]["latencies"]
        if embeddings:
            start = time.perf_counter()
            app.infer(request)
            results["reinfer_cached_embeddings_s"] = time.perf_counter() - start
            # One click at the volume's centre on the interactive task, the volume just segmented (its embeddings and
            # the prepared volume cached).
            centre = [n // 2 for n in nib.load(os.path.join(studies, "bench.nii.gz")).shape]
            label = next(iter(app.models[args.model].model.labels))
            click = {**request, "model": f"{args.model}_interactive", "foreground": [centre], "label": label}
            start = time.perf_counter()
            clicked = app.infer(click)
            results["click_on_inferred_s"] = time.perf_counter() - start
            results["click_decoded_slices"] = len(clicked["params"]["found_slices"])
            os.remove(clicked["file"])
            results["click_decoder_s_per_slice"] = propagation_step_seconds(app.models[args.model].model, args.device)

        results.update({f"peak_{kind}_infer_mb": mb for kind, mb in peak_memory_mb(args.device).items()})
        if not args.skip_update:
            start = time.perf_counter()
            app.train({"model": args.model, "max_epochs": args.update_epochs, "device": args.device})
            results["update_s"] = time.perf_counter() - start
            results["update_epochs"] = args.update_epochs
            start = time.perf_counter()
            out = app.infer(request)
            results["infer_after_update_s"] = time.perf_counter() - start
            results["adapter_version_served"] = out["params"]["adapter_version"]
            adapter = os.path.join(app_dir, "model", f"{args.model}.pt")
            results["adapter_bytes"] = os.path.getsize(adapter)
        network, _ = app.models[args.model].model.resident(args.device)
        results["trainable_parameters"] = sum(p.numel() for p in network.parameters() if p.requires_grad)
        results["all_parameters"] = sum(p.numel() for p in network.parameters())
        results.update({f"peak_{kind}_mb": mb for kind, mb in peak_memory_mb(args.device).items()})
        if not em:
            size = app.models[args.model].model.img_size
            results["gflop_per_slice"] = flops_per_slice(network, size, args.device) / 1e9
            results["fp32_matmul_gflops"] = matmul_flops_per_s(torch.float32, args.device) / 1e9
            results["bf16_matmul_gflops"] = matmul_flops_per_s(torch.bfloat16, args.device) / 1e9
            achieved = results["gflop_per_slice"] * results["network_slices_per_s"]
            results["achieved_gflops"] = achieved
            results["fraction_of_fp32_peak"] = achieved / results["fp32_matmul_gflops"]
            results["fraction_of_bf16_peak"] = achieved / results["bf16_matmul_gflops"]
            # The hardware limit is the faster of the two: some CPUs with bf16 instructions run bf16 slower.
            results["fraction_of_peak"] = achieved / max(results["fp32_matmul_gflops"], results["bf16_matmul_gflops"])
            reference, ours = paired_seconds_per_slice(
                network,
                args.backbone,
                args.device,
                args.batch_size or task.batch_size,
                results["precision"],
                encode=engine.encoder(app.models[args.model].model.loaded_stamp(args.device)) if engine else None,
            )
            results["reference_s_per_slice"] = reference
            results["paired_network_s_per_slice"] = ours
            results["paired_network_speedup"] = reference / ours
            results["speedup_over_reference"] = results["infer_warm_slices_per_s"] * reference
            results["network_speedup_over_reference"] = results["network_slices_per_s"] * reference
            if engine:
                results["torch_speedup_over_reference"] = total / results["torch_infer_warm_s"] * reference
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'measure':32s} value")
    for key, value in results.items():
        if isinstance(value, (int, float, str)):
            print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
