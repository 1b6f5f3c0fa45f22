"""Request validation against the engines' profiles (faults.md cases 9 to 11)."""

import math

import pytest
from request_fakes import CONFIG, TINY, limits

from sd35trt.components import Component, ShapeRange, profile, spec
from sd35trt.config import Range
from sd35trt.errors import ManifestError, RequestError
from sd35trt.runtime.request import GenerationRequest, RequestLimits, resolve_request


def resolve(lim: RequestLimits | None = None, **fields):
    return resolve_request(
        GenerationRequest(**{"prompt": "a cat", **fields}), lim or limits(), CONFIG.runtime
    )


def test_limits_come_from_the_profiles():
    lim = limits()
    assert lim.height == (64, 256) and lim.width == (64, 192)
    assert lim.size_multiple == 16 and lim.t5_length == 256
    assert lim.images(cfg=True) == (1, 2)
    assert lim.images(cfg=False) == (1, 2)  # the VAE decodes at most 2
    assert limits(batch=Range(min=1, opt=2, max=4)).images(cfg=True) == (1, 4)


def test_defaults_come_from_the_engines():
    p = resolve(seed=5)
    assert (p.num_inference_steps, p.guidance_scale, p.height, p.width, p.seed) == (8, 4.5, 128, 128, 5)
    assert p.negative_prompt == "blurry" and p.cfg
    assert p.skip_layer_guidance == CONFIG.runtime.skip_layer_guidance


@pytest.mark.parametrize(
    ("fields", "field", "text"),
    [
        ({"height": 100}, "height", "height 100 is not a multiple of 16; these engines accept 64..256"),
        ({"width": 1000}, "width", "width 1000 is not a multiple of 16; these engines accept 64..192"),
        ({"height": 512}, "height", "height 512 is outside the engines' range; these engines accept 64..256"),
        ({"width": 48}, "width", "width 48 is outside the engines' range; these engines accept 64..192"),
        ({"width": 256}, "width", "64..192"),
        ({"num_images": 17}, "num_images", "num_images 17 is outside 1..16"),  # max_images, not the batch
        ({"num_images": 0}, "num_images", "num_images 0 is outside 1..16"),
        ({"num_images": 17, "guidance_scale": 1.0}, "num_images", "without classifier-free guidance"),
    ],
)
def test_size_and_batch_outside_the_profiles(fields, field, text):
    with pytest.raises(RequestError, match=text) as err:
        resolve(**fields)
    assert err.value.field == field
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("fields", "field", "text"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps", "num_inference_steps 0 is outside 1..500"),
        ({"num_inference_steps": -3}, "num_inference_steps", "num_inference_steps -3 is outside 1..500"),
        (
            {"num_inference_steps": 10_000},
            "num_inference_steps",
            "num_inference_steps 10000 is outside 1..500",
        ),
        ({"num_inference_steps": True}, "num_inference_steps", "num_inference_steps True is not an integer"),
        ({"num_inference_steps": 2.5}, "num_inference_steps", "num_inference_steps 2.5 is not an integer"),
        ({"guidance_scale": math.nan}, "guidance_scale", "guidance_scale nan is not a finite number"),
        ({"guidance_scale": math.inf}, "guidance_scale", "guidance_scale inf is not a finite number"),
        (
            {"guidance_scale": -1.0},
            "guidance_scale",
            r"guidance_scale -1 is outside 0\.\.100 \(at most 1 turns classifier-free guidance off\)",
        ),
        ({"guidance_scale": 1e9}, "guidance_scale", r"guidance_scale 1e\+09 is outside 0\.\.100"),
        ({"guidance_scale": "high"}, "guidance_scale", "'high' is not a number"),
        ({"seed": -1}, "seed", r"seed -1 is outside 0..9223372036854775807"),
        ({"seed": 2**63}, "seed", "seed 9223372036854775808 is outside"),
        ({"seed": "7"}, "seed", "seed '7' is not an integer"),
    ],
)
def test_num_inference_steps_guidance_and_seed(fields, field, text):
    with pytest.raises(RequestError, match=text) as err:
        resolve(**fields)
    assert err.value.field == field


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(prompt):
    with pytest.raises(RequestError, match="prompt is empty") as err:
        resolve(prompt=prompt)
    assert err.value.field == "prompt"


def test_prompt_must_be_text():
    with pytest.raises(RequestError, match="prompt must be text, got int"):
        resolve(prompt=5)


def test_edges_are_accepted():
    p = resolve(
        seed=2**63 - 2,  # image 1 uses 2^63 - 1
        num_inference_steps=500,
        guidance_scale=0.0,
        height=256,
        width=64,
        num_images=2,
        negative_prompt="",
    )
    assert p.seed == 2**63 - 2 and not p.cfg
    # Without CFG the negative prompt and skip-layer guidance are not used, and not recorded.
    assert p.negative_prompt is None and p.skip_layer_guidance is None
    assert p.warnings == ()  # an empty negative prompt changes nothing: no warning


def test_seed_is_drawn_when_omitted():
    seeds = {resolve().seed for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)


def test_drawn_seeds_survive_a_float64_round_trip():
    """faults.md 26: a client keeping numbers as float64 (JavaScript) reads a drawn seed back and
    resubmits it; with seeds drawn below 2^53 it gets the same seed (was: ~99.9% above 2^53)."""
    seeds = [resolve().seed for _ in range(2000)]
    assert all(0 <= s < 2**53 and int(float(s)) == s for s in seeds)
    assert max(seeds) > 2**50  # drawn over the whole range, not a small one
    assert resolve(seed=2**63 - 1).seed == 2**63 - 1  # explicit seeds keep the full range


@pytest.mark.parametrize(
    ("fields", "warned", "negative", "slg"),
    [
        ({"guidance_scale": 1.0, "negative_prompt": "blurry, low quality"}, ["negative_prompt"], None, None),
        ({"guidance_scale": 0.0, "skip_layer_guidance": True}, ["skip_layer_guidance"], None, None),
        (
            {"guidance_scale": 0.5, "negative_prompt": "fog", "skip_layer_guidance": True},
            ["negative_prompt", "skip_layer_guidance"],
            None,
            None,
        ),
        ({"guidance_scale": 1.0}, [], None, None),  # the engines' default negative prompt: no warning
        ({"guidance_scale": 1.0, "skip_layer_guidance": False}, [], None, None),
        ({"guidance_scale": 1.01, "negative_prompt": "fog"}, [], "fog", [1]),  # CFG on: both used
    ],
)
def test_settings_without_effect_are_warned_and_not_recorded(fields, warned, negative, slg):
    """faults.md 25: guidance <= 1 (large-turbo) turns CFG off, so the negative prompt and SLG have
    no effect; each one asked for is a warning, and the parameters record what was used."""
    p = resolve(**fields)
    assert [w.split(" ", 1)[0] for w in p.warnings] == warned
    assert all("has no effect" in w and "was not used" in w for w in p.warnings)
    recorded = p.to_json()
    assert "warnings" not in recorded
    assert recorded["negative_prompt"] == negative
    assert (recorded["skip_layer_guidance"] or {}).get("layers") == slg


def test_numpy_scalars_are_accepted_as_numbers():
    """A numpy integral seed and real guidance are numbers (was: "np.int64(5) is not an integer");
    they come back as plain Python numbers, so records and JSON hold ints and floats."""
    np = pytest.importorskip("numpy")
    p = resolve(
        seed=np.int64(5),
        num_inference_steps=np.int32(4),
        guidance_scale=np.float32(3.5),
        height=np.uint16(64),
        width=np.int64(128),
        num_images=np.int8(2),
        skip_layer_guidance=np.bool_(False),
    )
    assert (p.seed, p.num_inference_steps, p.guidance_scale, p.height, p.width, p.num_images) == (
        5,
        4,
        3.5,
        64,
        128,
        2,
    )
    assert type(p.seed) is int and type(p.num_inference_steps) is int and type(p.guidance_scale) is float
    assert p.skip_layer_guidance is None
    assert resolve(guidance_scale=np.float64(1.0), seed=1).guidance_scale == 1.0


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("seed", lambda np: np.bool_(True)),
        ("num_inference_steps", lambda np: np.bool_(False)),
        ("guidance_scale", lambda np: np.bool_(True)),
        ("seed", lambda np: np.float64(5.0)),
        ("num_images", lambda np: np.array([1, 2])),
        ("skip_layer_guidance", lambda np: np.array([True])),
        ("skip_layer_guidance", lambda np: np.int64(1)),
    ],
)
def test_numpy_bools_arrays_and_non_integral_values_are_refused(field, make):
    np = pytest.importorskip("numpy")
    with pytest.raises(RequestError) as err:
        resolve(**{field: make(np)})
    assert err.value.field == field


def test_skip_layer_guidance_switches():
    assert resolve(skip_layer_guidance=False).skip_layer_guidance is None
    assert resolve(lim=limits(slg=False)).skip_layer_guidance is None
    with pytest.raises(RequestError, match="built without it") as err:
        resolve(lim=limits(slg=False), skip_layer_guidance=True)
    assert err.value.field == "skip_layer_guidance"


def test_batch_key_groups_compatible_requests():
    a, b = resolve(seed=1, prompt="a"), resolve(seed=2, prompt="b", negative_prompt="x")
    assert a.batch_key == b.batch_key
    assert a.batch_key != resolve(seed=1, num_inference_steps=4).batch_key


def test_dynamic_t5_length_is_refused():
    specs = {c: spec(c, TINY) for c in Component}
    profiles = {c: profile(c, TINY, CONFIG.build) for c in Component}
    profiles[Component.T5] = {"input_ids": ShapeRange((1, 128), (1, 256), (4, 256))}
    with pytest.raises(ManifestError, match=r"128\.\.256"):
        RequestLimits.from_profiles(specs, profiles, TINY, None)


def test_to_json_lists_the_ranges():
    data = limits().to_json()
    assert data["height"] == [64, 256] and data["num_images"]["cfg"] == [1, 2]
    assert data["skip_layer_guidance"]["layers"] == [1]


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text", ["a\ud800b", "a\udcffb", "\udc80"])
def test_text_with_a_lone_surrogate_is_refused_naming_the_field(field, text):
    """faults.md case 18: JSON "\\ud800", or invalid UTF-8 on a command line (kept as surrogates)."""
    with pytest.raises(RequestError, match=r"not valid Unicode text.*lone surrogate") as err:
        resolve(**{field: text})
    assert err.value.field == field
    str(err.value).encode("utf-8")  # the message itself prints anywhere


def test_more_images_than_the_engine_batch_are_accepted_up_to_max_images():
    import dataclasses

    p = resolve(num_images=5, seed=10)
    assert p.num_images == 5 and limits().images(cfg=True) == (1, 2)
    few = dataclasses.replace(limits(), max_images=4)
    with pytest.raises(RequestError, match=r"num_images 5 is outside 1\.\.4") as err:
        resolve(few, num_images=5)
    assert err.value.field == "num_images"


def test_every_image_seed_stays_in_range():
    """Image i uses seed + i: the last image's seed must still be at most 2^63-1, and drawn seeds
    keep every image's seed below 2^53 (float64 clients)."""
    with pytest.raises(
        RequestError, match=r"seed 9223372036854775807 is outside 0\.\.9223372036854775806"
    ) as e:
        resolve(seed=2**63 - 1, num_images=2)
    assert e.value.field == "seed"
    assert all(resolve(num_images=16).seed + 15 < 2**53 for _ in range(50))


def test_parts_of_a_request_keep_each_image_seed_and_record_the_whole_request():
    from sd35trt.runtime.parts import engine_parts, image_seeds

    p = resolve(num_images=5, seed=100)
    parts = engine_parts(p, 2)
    assert [(q.seed, q.num_images, q.first_image) for q in parts] == [(100, 2, 0), (102, 2, 2), (104, 1, 4)]
    assert [s for q in parts for s in image_seeds(q)] == list(image_seeds(p)) == [100, 101, 102, 103, 104]
    assert all(q.to_json() == p.to_json() for q in parts)  # seed 100, num_images 5: the request's
    assert engine_parts(p, 5) == [p]
    # engines whose smallest batch is 2: a last part of 1 takes an image from the one before
    assert [q.num_images for q in engine_parts(p, 3, min_batch=2)] == [3, 2]
    assert [q.num_images for q in engine_parts(resolve(num_images=7, seed=0), 3, min_batch=2)] == [3, 2, 2]
