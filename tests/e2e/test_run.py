"""The run stage end to end on the tiny model (ONNX Runtime on the CPU).

Parity: engines built from a non-quantized export must reproduce diffusers'
``StableDiffusion3Pipeline`` (same weights, seed and settings: CFG, skip-layer guidance,
batch 2) to within 2/255 per pixel; the PyTorch backend must agree with it to float rounding.
FP8 engines are compared with the non-quantized ones by PSNR. Then determinism, the faults of
faults.md cases 9 to 11 and 13, and the timings report.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sd35trt.backends.load import verify_engines
from sd35trt.backends.onnxruntime import OrtEngine
from sd35trt.components import Component
from sd35trt.errors import NonFiniteError, RequestError
from sd35trt.metrics import psnr
from sd35trt.models.reference import reference_images
from sd35trt.run import run
from sd35trt.runtime.pipeline import GenerationRequest, Sd35Runtime
from sd35trt.runtime.png import read_png_parameters

pytestmark = pytest.mark.slow

PROMPT = "a red fox in the snow, watercolor"
MAX_PIXEL_DIFF = 2  # of 255


@pytest.fixture(scope="module")
def engines_dir(unquantized_run):
    return unquantized_run / "engines"


@pytest.fixture(scope="module")
def runtime(engines_dir):
    with Sd35Runtime.load(engines_dir) as rt:
        yield rt


@pytest.fixture(scope="module")
def pipe(reference_pipe):
    """diffusers' pipeline on the same weights, on the CPU in float32."""
    return reference_pipe


def _max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize(("height", "width"), [(128, 128), (64, 128)])
def test_onnxruntime_engines_match_diffusers(runtime, pipe, tiny_config, height, width):
    assert tiny_config.runtime.skip_layer_guidance is not None and tiny_config.runtime.guidance_scale > 1
    theirs = reference_images(pipe, tiny_config.runtime, [PROMPT] * 2, height=height, width=width, seed=11)
    ours = runtime.generate(GenerationRequest(PROMPT, height=height, width=width, seed=11, num_images=2))
    assert ours.params.cfg and ours.params.skip_layer_guidance is not None
    assert [im.size for im in ours.images] == [(width, height)] * 2
    diffs = [_max_diff(a, b) for a, b in zip(theirs, ours.images, strict=True)]
    print(f"\nparity {width}x{height} batch 2: max pixel difference vs diffusers {max(diffs)}/255")
    assert max(diffs) <= MAX_PIXEL_DIFF
    # The two images of a batch come from different noise: a mixed-up batch would still "match".
    assert _max_diff(ours.images[0], ours.images[1]) > 10


@pytest.mark.parametrize(("guidance", "num_images"), [(4.5, 2), (1.0, 1)])
def test_pytorch_backend_matches_diffusers_to_float_rounding(
    pipe, tiny_config, unquantized_run, guidance, num_images
):
    from sd35trt.runtime.pytorch import torch_runtime

    rt = torch_runtime(unquantized_run / "model", tiny_config, pipe=pipe, device="cpu")
    decoded = []
    vae = rt.engines.engines[Component.VAE_DECODER]
    infer = vae.infer
    vae.infer = lambda feeds: decoded.append(infer(feeds)) or decoded[-1]  # keep the float image
    req = GenerationRequest(
        PROMPT, height=64, width=128, seed=5, guidance_scale=guidance, num_images=num_images
    )
    result = rt.generate(req)
    theirs = reference_images(
        pipe,
        tiny_config.runtime,
        [PROMPT] * num_images,
        height=64,
        width=128,
        seed=5,
        guidance_scale=guidance,
        output_type="np",
    )  # [N, H, W, 3] float
    ours = decoded[0]["image"].permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - theirs).max() <= 1e-5
    assert len(result.images) == num_images


def test_fp8_engines_psnr_against_unquantized(built_run, runtime):
    request = GenerationRequest(PROMPT, seed=21, num_images=2)
    reference = runtime.generate(request)
    assert verify_engines(built_run / "engines").record(Component.TRANSFORMER).fp8
    with Sd35Runtime.load(built_run / "engines") as fp8:
        quantized = fp8.generate(request)
    values = [
        psnr(np.asarray(a), np.asarray(b)) for a, b in zip(reference.images, quantized.images, strict=True)
    ]
    shown = ", ".join(f"{v:.1f}" for v in values)
    print(f"\nFP8 vs non-quantized engines (tiny, 128x128, 8 steps, batch 2): PSNR {shown} dB")
    assert min(values) > 35.0  # broken FP8 scales give ~10 dB; the tiny model measures ~52 dB


def test_same_seed_gives_byte_identical_png_and_records_parameters(engines_dir, tmp_path):
    first = run(engines_dir, PROMPT, seed=7, out=tmp_path / "a.png")
    again = run(engines_dir, PROMPT, seed=7, out=tmp_path / "b.png", low_vram=True)
    other = run(engines_dir, PROMPT, seed=8, out=tmp_path / "c.png")
    a, b, c = (o.paths[0].read_bytes() for o in (first, again, other))
    assert a == b
    assert a != c
    meta = read_png_parameters(first.paths[0])
    assert meta["prompt"] == PROMPT and meta["seed"] == 7 and meta["num_inference_steps"] == 8
    assert (meta["width"], meta["height"]) == (128, 128) and meta["guidance_scale"] == 4.5
    assert meta["negative_prompt"] == "" and meta["engine_digest"] == first.result.engine_digest
    assert meta["skip_layer_guidance"]["layers"] == [1]

    report = first.report(timings=True)
    for line in ("text encoding", "denoising", "per step", "decode", "total", "peak memory"):
        assert line in report
    t = first.result.timings
    assert len(t.step_s) == 8 and t.peak_memory_bytes > 0
    assert 0 < t.text_encoding_s + t.denoise_s + t.decode_s <= t.total_s


def test_five_images_on_batch_2_engines_each_reproduce_alone_from_their_recorded_seed(engines_dir, tmp_path):
    """``--num-images 5`` on engines built for batch 2 (CFG: 2 images per engine batch) runs as
    engine batches of 2, 2 and 1; each PNG records its own seed (30 + i), and one image with that
    seed is the same image: the same bytes for image 4 (alone both times), within ~1/255 for the
    others (another engine batch size); two images from seed 32 are images 2 and 3 exactly."""
    from typer.testing import CliRunner

    from sd35trt.cli import app

    out = tmp_path / "five.png"
    args = ["run", "--engines", str(engines_dir), PROMPT, "--seed", "30", "--num-images", "5", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    paths = [tmp_path / f"five-{i}.png" for i in range(5)]
    assert "seeds 30..34" in result.output and "in 3 engine batches" in result.output
    metas = [read_png_parameters(p) for p in paths]
    assert [(m["seed"], m["image_index"], m["num_images"]) for m in metas] == [
        (30 + i, i, 5) for i in range(5)
    ]
    assert [m["engine_batch"]["images"] for m in metas] == [2, 2, 2, 2, 1]
    images = [Image.open(p).convert("RGB") for p in paths]
    for i, meta in enumerate(metas):
        alone = run(engines_dir, PROMPT, seed=meta["seed"], out=tmp_path / f"alone-{i}.png")
        assert _max_diff(alone.result.images[0], images[i]) <= (0 if i == 4 else 1)
    pair = run(engines_dir, PROMPT, seed=32, num_images=2, out=tmp_path / "pair.png")
    assert [_max_diff(a, b) for a, b in zip(pair.result.images, images[2:4], strict=True)] == [0, 0]
    assert _max_diff(images[0], images[1]) > 10  # different noise per image


def test_images_saved_through_the_python_api_record_their_parameters(runtime, engines_dir, tmp_path):
    """``result.images[i].save(path)`` writes the PNG ``sd35trt run`` writes (parameters chunk included)."""
    result = runtime.generate(GenerationRequest(PROMPT, seed=12, num_images=2))
    result.images[1].save(tmp_path / "api.png")
    written = run(engines_dir, PROMPT, seed=12, num_images=2, out=tmp_path / "cli.png")
    assert (tmp_path / "api.png").read_bytes() == written.paths[1].read_bytes()
    assert read_png_parameters(tmp_path / "api.png")["seed"] == 13
    assert result.save(tmp_path / "saved.png", 1).read_bytes() == written.paths[1].read_bytes()


def test_several_images_get_numbered_files(engines_dir, tmp_path):
    out = run(engines_dir, PROMPT, seed=3, num_images=2, out=tmp_path / "cat.png")
    assert [p.name for p in out.paths] == ["cat-0.png", "cat-1.png"]
    assert [read_png_parameters(p)["image_index"] for p in out.paths] == [0, 1]


@pytest.mark.parametrize(
    "stage", [Component.CLIP_G, Component.T5, Component.TRANSFORMER, Component.VAE_DECODER]
)
def test_nan_after_a_stage_is_named_and_writes_nothing(engines_dir, tmp_path, monkeypatch, stage):
    real = OrtEngine.infer

    def poisoned(self, feeds):
        out = real(self, feeds)
        if self.spec.component is stage:
            name = self.spec.output_names[0]
            out[name] = out[name].clone()
            out[name].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(OrtEngine, "infer", poisoned)
    with pytest.raises(NonFiniteError, match=f"^{stage.value} produced") as err:
        run(engines_dir, PROMPT, seed=1, out=tmp_path / "x.png")
    assert err.value.stage == stage.value
    assert "no image was written" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"height": 100}, "height"),  # not a multiple of 16
        ({"width": 512}, "width"),  # above the profile's 256
        ({"num_images": 0}, "num_images"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_bad_requests_fail_before_any_engine_loads(engines_dir, tmp_path, monkeypatch, options, field):
    def refuse(self):
        raise AssertionError(f"engine {self.name} was loaded for an invalid request")

    monkeypatch.setattr(OrtEngine, "activate", refuse)
    with pytest.raises(RequestError) as err:
        run(engines_dir, PROMPT, out=tmp_path / "x.png", **options)
    assert err.value.field == field
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt_is_refused(runtime):
    with pytest.raises(RequestError, match="prompt is empty") as err:
        runtime.generate(GenerationRequest("  "))
    assert err.value.field == "prompt"


def test_long_prompt_is_truncated_and_reported(runtime):
    # The tiny CLIP vocabulary has "a" and "fox" as tokens: 40 x 2 + start and end = 82.
    result = runtime.generate(GenerationRequest("a fox " * 40, seed=2))
    assert len(result.images) == 1
    assert "prompt is 82 clip_l tokens, over its limit of 77: dropped 'fox a fox a fox'" in result.warnings
    assert any(w.startswith("prompt is 82 clip_g tokens") for w in result.warnings)


def test_requests_batched_together_match_each_alone(runtime):
    a = runtime.validate(GenerationRequest(PROMPT, seed=4))
    b = runtime.validate(GenerationRequest("a castle on a hill", negative_prompt="fog", seed=9))
    together = runtime.generate_batch([a, b])
    alone = [runtime.generate_batch([p])[0] for p in (a, b)]
    for batched, single in zip(together, alone, strict=True):
        assert _max_diff(batched.images[0], single.images[0]) <= 1
    assert _max_diff(together[0].images[0], together[1].images[0]) > 10


def test_runtime_imports_no_diffusers_onnx_or_modelopt(engines_dir, tmp_path):
    code = (
        "import sys\n"
        "from sd35trt.run import run\n"
        f"run({str(engines_dir)!r}, 'a cat', seed=1, out={str(tmp_path / 'a.png')!r})\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(done.stdout.strip().splitlines()[-1]))
    assert "onnxruntime" in loaded  # the backend ran
    assert not loaded & {"diffusers", "modelopt", "onnx", "onnx_graphsurgeon", "polygraphy", "tensorrt"}


def test_cli_with_invalid_utf8_in_the_prompt_is_one_line_and_exit_1(engines_dir, tmp_path):
    """faults.md case 18: the bytes of an invalid UTF-8 argument reach Python as lone surrogates;
    the tokenizer failed on them with a 54-line traceback."""
    out = tmp_path / "x.png"
    argv = [
        sys.executable,
        "-m",
        "sd35trt.cli",
        "run",
        b"a \xff cat",
        "--engines",
        str(engines_dir),
        "-o",
        str(out),
    ]
    proc = subprocess.run(argv, capture_output=True, timeout=300)
    err = proc.stderr.decode("utf-8", "replace").strip()
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.count("\n") == 0 and err.startswith("error: prompt is not valid Unicode text")
    assert "\\udcff" in err and not out.exists()
