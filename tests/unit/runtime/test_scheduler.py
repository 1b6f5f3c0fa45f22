"""Flow-match Euler: the runtime's own scheduler against diffusers' FlowMatchEulerDiscreteScheduler."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sd35trt.errors import ManifestError
from sd35trt.runtime.scheduler import FlowMatchEuler


@pytest.mark.parametrize("shift", [3.0, 1.0, 2.5])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 28, 40])
def test_schedule_is_bit_identical_to_diffusers(shift, steps):
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(steps)
    ours = FlowMatchEuler(shift=shift).schedule(steps)
    assert len(ours) == steps
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert torch.equal(ours.sigmas, reference.sigmas)


@pytest.mark.parametrize("index", [0, 3, 7])
def test_step_matches_diffusers(index):
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(8)
    reference.set_begin_index(index)
    gen = torch.Generator().manual_seed(index)
    sample = torch.randn(2, 16, 8, 8, generator=gen)  # [B, C, h, w]
    velocity = torch.randn(2, 16, 8, 8, generator=gen)
    expected = reference.step(velocity, reference.timesteps[index], sample, return_dict=False)[0]
    got = FlowMatchEuler(shift=3.0).schedule(8).step(index, velocity, sample)
    assert torch.equal(got, expected)


def test_reads_a_diffusers_scheduler_config(tmp_path):
    FlowMatchEulerDiscreteScheduler(shift=2.0, num_train_timesteps=500).save_config(tmp_path)
    assert FlowMatchEuler.from_config(tmp_path / "scheduler_config.json") == FlowMatchEuler(2.0, 500)


@pytest.mark.parametrize(
    ("update", "named"),
    [
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ({"shift_terminal": 0.1}, "shift_terminal"),
        ({"_class_name": "EulerDiscreteScheduler"}, "EulerDiscreteScheduler"),
        ({"shift": -1.0}, "shift"),
    ],
)
def test_refuses_options_it_does_not_reproduce(tmp_path, update, named):
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **update}))
    with pytest.raises(ManifestError, match=named):
        FlowMatchEuler.from_config(path)


def test_missing_config_is_named(tmp_path):
    with pytest.raises(ManifestError, match=r"scheduler_config\.json is missing"):
        FlowMatchEuler.from_config(tmp_path / "scheduler_config.json")
