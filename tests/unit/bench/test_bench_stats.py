"""Bench statistics, the overhead arithmetic, clocks, memory probes and engine wrappers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sd35trt.backends.engine import Engine
from sd35trt.bench.overhead import CallLog, InstantTransformer
from sd35trt.bench.probes import MemoryProbe, StageClock
from sd35trt.bench.report import STAGES
from sd35trt.bench.stats import stage_stats, step_overheads, summarize
from sd35trt.bench.subjects import TimedEngine
from sd35trt.components import Component, spec
from sd35trt.config import Architecture
from sd35trt.models.tiny import model_dims

DIMS = model_dims(Architecture.TINY)


# -- summaries ----------------------------------------------------------------------------------


def test_summarize_converts_units_and_one_slow_run_pulls_p90_not_the_median():
    s = summarize([0.001, 0.002, 0.003, 0.004, 0.100], unit="ms")
    assert s.unit == "ms" and s.n == 5
    assert s.median == pytest.approx(3.0)
    assert s.p90 == pytest.approx(4.0 + 0.6 * 96.0)  # linear interpolation between 4 and 100 ms
    assert s.min == pytest.approx(1.0) and s.max == pytest.approx(100.0) and s.mean == pytest.approx(22.0)
    assert summarize([0.000010, 0.000030], unit="us").median == pytest.approx(20.0)


def test_summarize_empty_gives_nones_and_bad_unit_is_refused():
    s = summarize([])
    assert s.n == 0 and s.median is None and s.p90 is None
    with pytest.raises(ValueError, match="unit"):
        summarize([1.0], unit="minutes")


def test_stage_stats_sums_calls_per_run_and_divides_transformer_by_steps():
    runs = [
        {
            "clip_l": [0.001, 0.003],
            "transformer": [0.010] * 4 + [0.020],
            "vae_decoder": [0.005],
            "total": [0.2],
        },
        {"clip_l": [0.002, 0.002], "transformer": [0.012] * 5, "vae_decoder": [0.007], "total": [0.3]},
    ]
    st = stage_stats(runs, num_inference_steps=4)
    assert st.clip_l.median == pytest.approx(4.0)  # both runs: 4 ms in two calls
    assert st.transformer_step.n == 2
    assert st.transformer_step.median == pytest.approx((60 / 4 + 60 / 4) / 2)
    assert st.transformer_call.n == 10
    assert st.total.median == pytest.approx(250.0)
    # host = total - every engine call: (200 - 4 - 60 - 5, 300 - 4 - 60 - 7) ms
    assert st.host.median == pytest.approx((131.0 + 229.0) / 2)
    assert st.t5.median is None  # never called: no samples, no invented zero
    assert all(st.get(s).unit == "ms" for s in STAGES)
    assert st.host_loop is None and st.get("host_loop").n == 0  # no loop span recorded


def test_host_loop_is_the_loop_span_minus_its_transformer_calls():
    """The whole-generation ``host`` bar holds tokenizing, checks, noise and images too; the
    denoising loop's own host time (what the overhead panel measures per step) is shown apart."""
    runs = [{"transformer": [0.010] * 4, "denoise": [0.0412], "vae_decoder": [0.005], "total": [0.1]}]
    st = stage_stats(runs, num_inference_steps=4)
    assert st.host_loop.median == pytest.approx(1.2)  # 41.2 - 40 ms
    assert st.host.median == pytest.approx(55.0)  # 100 - 40 - 5 ms: more than the loop's share


# -- the overhead arithmetic ----------------------------------------------------------------------


def test_step_overheads_groups_calls_by_timestep():
    us = 1000  # ns
    calls = [
        (0 * us, 100 * us, 1000.0),  # step 0: one call of 100 us
        (130 * us, 230 * us, 900.0),  # step 1: CFG call ...
        (250 * us, 300 * us, 900.0),  # ... and the skip-layer pass, 50 us
        (340 * us, 440 * us, 800.0),  # step 2 (last: no successor)
    ]
    got = [round(x * 1e6, 6) for x in step_overheads(calls)]
    assert got == [30.0, 60.0]  # 130 - 100; (340 - 130) - (100 + 50)


def test_step_overheads_needs_two_steps():
    assert step_overheads([]) == []
    assert step_overheads([(0, 10, 1.0)]) == []


# -- clocks, memory, engine wrappers --------------------------------------------------------------


def test_stage_clock_measures_sleep_and_clears():
    clock = StageClock("cpu")
    with clock.time("a"):
        time.sleep(0.02)
    with clock.time("a"):
        pass
    got = clock.collect()
    assert len(got["a"]) == 2 and got["a"][0] >= 0.019 and got["a"][1] < got["a"][0]
    assert clock.collect() == {}


def test_memory_probe_sees_an_allocation():
    probe = MemoryProbe("cpu")
    probe.reset()
    before = probe.read()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    after = probe.read()
    del block
    assert after.kind == "peak_rss" and after.peak_bytes == after.peak_rss_bytes
    if after.method.startswith("VmHWM"):
        assert after.peak_rss_bytes >= before.peak_rss_bytes + 48 * 2**20
    else:  # ru_maxrss cannot be reset: only monotonic
        assert after.peak_rss_bytes >= before.peak_rss_bytes


class _Echo(Engine):
    def _activate_impl(self):
        pass

    def _infer_impl(self, feeds):
        time.sleep(0.005)
        return {"noise_pred": feeds["hidden_states"] * 2}

    def _deactivate_impl(self):
        pass


def _feeds(sp, **given) -> dict:
    """Every input of ``sp`` (the engine base checks them all), ``given`` ones as passed."""
    return {n: given.get(n, torch.zeros(1)) for n in sp.input_names}


def test_timed_engine_times_each_call_and_delegates():
    sp = spec(Component.TRANSFORMER, DIMS)
    inner = _Echo(sp)
    clock = StageClock("cpu")
    timed = TimedEngine(inner, clock, "transformer")
    with timed:
        assert timed.active and inner.active
        out = timed.infer(_feeds(sp, hidden_states=torch.ones(1)))
        timed.infer(_feeds(sp, hidden_states=torch.ones(1)))
    assert not inner.active
    assert out["noise_pred"].item() == 2.0
    assert timed.spec is sp
    calls = clock.collect()["transformer"]
    assert len(calls) == 2 and all(c >= 0.004 for c in calls)


def test_instant_transformer_returns_preallocated_zeros_and_logs_timesteps():
    sp = spec(Component.TRANSFORMER, DIMS)
    log: CallLog = []
    engine = InstantTransformer(sp, log)
    x = torch.randn(2, 16, 8, 8)
    with engine:
        a = engine.infer(_feeds(sp, hidden_states=x, timestep=torch.full((2,), 900.0)))["noise_pred"]
        b = engine.infer(_feeds(sp, hidden_states=x, timestep=torch.full((2,), 800.0)))["noise_pred"]
        c = engine.infer(_feeds(sp, hidden_states=x[:1], timestep=torch.full((1,), 800.0)))["noise_pred"]
    assert a is b  # preallocated: the same tensor every call of a shape
    assert a.shape == x.shape and not a.any() and c.shape == (1, 16, 8, 8)
    assert [k for _, _, k in log] == [900.0, 800.0, 800.0]
    assert all(end >= start for start, end, _ in log)
