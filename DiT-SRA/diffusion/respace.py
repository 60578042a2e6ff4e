"""Respacing: run a diffusion process on a subset of its steps.

Keeping steps t_0 < t_1 < ... < t_{K-1} of a process with cumulative products abar defines a
K-step process with the same marginals q(x_{t_i} | x_0) at the kept steps:
    beta'_i = 1 - abar[t_i] / abar[t_{i-1}]     (abar[t_{-1}] = 1)
so that prod_{j <= i} (1 - beta'_j) = abar[t_i]. The network was trained on the original step
indices, so the respaced process hands it t_i instead of its own index i.
"""

import numpy as np

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original steps to keep.

    section_counts: "ddimK" -> range(0, num_timesteps, stride) for the integer stride giving
    exactly K steps; otherwise a comma-separated string ("10,15,20") or a list of ints. The steps
    are cut into len(section_counts) equal sections (the first num_timesteps % len sections one
    step longer), and section i keeps section_counts[i] steps evenly spaced from its first to its
    last step, rounded to integers (a count of 1 keeps the first step).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired_count} steps out of {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept = set()
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return kept


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps use_timesteps of the process built from kwargs.

    kwargs are GaussianDiffusion's (betas of the ORIGINAL process, model_mean_type, ...).
    timestep_map[i] is the original step of respaced step i; models given to p_mean_variance,
    the samplers and training_losses receive original steps.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = sorted(self.use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        alphas_cumprod = np.cumprod(1.0 - np.array(kwargs["betas"], dtype=np.float64))
        kept = alphas_cumprod[self.timestep_map]
        kwargs["betas"] = 1 - kept / np.append(1.0, kept[:-1])
        super().__init__(**kwargs)
        self.timestep_map_array = np.array(self.timestep_map, dtype=np.int64)

    def _wrap_model(self, model):
        return _TimestepMappedModel(model, lambda device: self._to_device("timestep_map_array", device))


class _TimestepMappedModel:
    """Calls model(x, timestep_map[t], **kwargs): respaced indices (N,) -> original steps (N,)."""

    def __init__(self, model, timestep_map_on):
        self.model = model
        self.timestep_map_on = timestep_map_on  # device -> the (T,) long map on that device

    def __call__(self, x, t, **kwargs):
        return self.model(x, self.timestep_map_on(t.device)[t].to(t.dtype), **kwargs)
