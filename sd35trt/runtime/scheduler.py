"""Flow-match Euler sampling with a sigma shift, as SD3.5 uses it (no diffusers import).

The schedule reproduces diffusers' ``FlowMatchEulerDiscreteScheduler`` bit for bit for the
options SD3.5 ships with (a static ``shift``, no dynamic shifting, no Karras / exponential / beta
sigmas), including one quirk worth knowing: the training sigmas are shifted once when the
scheduler is created, and the inference schedule then spans those *shifted* end points and
shifts again. Matching that exactly is what makes the runtime's images equal diffusers' for the
same seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sd35trt.errors import ManifestError
from sd35trt.user_files import read_json

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"

#: Options this implementation does not reproduce, with the value at which they are inert.
_INERT_OPTIONS = {
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}


@dataclass(frozen=True)
class Schedule:
    """The timesteps of one generation and the Euler update between them.

    Attributes:
        timesteps: ``[n]`` float32, the transformer's ``timestep`` input per step (sigma x 1000).
        sigmas: ``[n + 1]`` float32, the noise level before each step, then 0.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def step(self, index: int, velocity: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``sigmas[index]`` to ``sigmas[index + 1]``.

        Args:
            index: the step, ``0 <= index < len(self)``.
            velocity: the guided model output ``[B, C, h, w]``.
            latents: the current latents ``[B, C, h, w]``.

        Returns:
            The next latents, float32 ``[B, C, h, w]``.
        """
        dt = self.sigmas[index + 1] - self.sigmas[index]  # 0-d float32, negative
        # Same expression and operand order as diffusers, so the float32 rounding is identical.
        return latents.to(torch.float32) + dt * velocity.to(torch.float32)


@dataclass(frozen=True)
class FlowMatchEuler:
    """Flow-match Euler with a static sigma shift.

    Attributes:
        shift: the sigma shift (3.0 for SD3.5).
        num_train_timesteps: training timesteps (1000); timesteps are ``sigma * num_train_timesteps``.
    """

    shift: float = 3.0
    num_train_timesteps: int = 1000

    @classmethod
    def from_config(cls, path: str | Path) -> FlowMatchEuler:
        """Read a diffusers ``scheduler_config.json``.

        Raises:
            ManifestError: the file is missing or unreadable, names another scheduler class,
                enables an option this implementation does not reproduce, or has a bad shift or
                ``num_train_timesteps``.
        """
        path = Path(path)
        data = read_json(path, missing="is missing: the engines directory lacks its scheduler config")
        name = data.get("_class_name", SCHEDULER_CLASS)
        if name != SCHEDULER_CLASS:
            raise ManifestError(
                f"{path}: scheduler class {name!r} is not supported; sd35trt runs {SCHEDULER_CLASS}"
            )
        for key, inert in _INERT_OPTIONS.items():
            value = data.get(key, inert)
            if value != inert and not (inert is False and value is None):
                raise ManifestError(
                    f"{path}: {key} = {json.dumps(value)} is not supported; sd35trt's flow-match Euler "
                    f"needs {json.dumps(inert)} (SD3.5's setting)"
                )
        shift = data.get("shift", 1.0)
        steps = data.get("num_train_timesteps", 1000)
        if isinstance(shift, bool) or not isinstance(shift, int | float) or not shift > 0:
            raise ManifestError(f"{path}: shift = {shift!r} must be a positive number")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ManifestError(f"{path}: num_train_timesteps = {steps!r} must be an integer >= 2")
        return cls(shift=float(shift), num_train_timesteps=steps)

    def _shifted(self, sigmas):
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def _training_sigma_range(self) -> tuple[float, float]:
        """Shifted training sigmas at the first and last training timestep, in float32 like diffusers."""
        n = self.num_train_timesteps
        ends = np.linspace(1, n, n, dtype=np.float32)[[-1, 0]].copy()  # [n, 1]
        sigmas = self._shifted(torch.from_numpy(ends) / n)
        return sigmas[0].item(), sigmas[1].item()

    def schedule(self, steps: int) -> Schedule:
        """The timesteps and sigmas of a ``steps``-step generation.

        Args:
            steps: number of denoising steps, >= 1.

        Returns:
            The :class:`Schedule` (CPU float32 tensors).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        n = self.num_train_timesteps
        sigma_max, sigma_min = self._training_sigma_range()
        # float64 until the end, as diffusers' numpy code path computes it.
        sigmas = self._shifted(np.linspace(sigma_max * n, sigma_min * n, steps) / n)
        sigmas = torch.from_numpy(sigmas).to(torch.float32)  # [steps]
        timesteps = sigmas * n  # [steps]
        return Schedule(timesteps=timesteps, sigmas=torch.cat([sigmas, torch.zeros(1)]))
