"""Gaussian diffusion for DiT-SRA: DiT's DDPM (1000 linear-beta steps, epsilon prediction,
learned-range variance, loss = MSE + variational-bound term), respaced for sampling.

    create_diffusion("")     # training: all 1000 steps
    create_diffusion("250")  # sampling: 250 evenly spaced steps
"""

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False, diffusion_steps=1000):
    """Build the (respaced) diffusion process.

    timestep_respacing: None or "" for all diffusion_steps steps; "250" for 250 evenly spaced
    steps; "10,15,20" for per-section counts; "ddim50" for an even integer stride giving 50 steps
    (see space_timesteps). noise_schedule: "linear" or "squaredcos_cap_v2".
    Loss: RESCALED_KL if use_kl, else RESCALED_MSE if rescale_learned_sigmas, else MSE.
    Mean: x_0 if predict_xstart, else epsilon. Variance: learned range if learn_sigma, else
    btilde_t (sigma_small) or beta_t.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE
    if not timestep_respacing:
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )
