"""Samplers: turn a score function into samples or densities.

Predictor-corrector sampling of the reverse-time SDE, the probability-flow ODE (adaptive and
fixed-step solvers through torchdiffeq, and DPM-Solver++), likelihoods by the instantaneous change of
variables, and inverse problems (inpainting, colorization), after Song et al. (2021).
"""

from .correctors import CORRECTORS, annealed_langevin, langevin
from .dpm_solver import TIME_GRIDS, dpm_solver_2m, solver_time_grid
from .generators import StackedGenerator
from .inverse import colorize, inpaint
from .likelihood import ESTIMATORS, Likelihood, bits_per_dim, likelihood
from .masked import masked_sample, masked_step, masked_time_steps
from .nfe import NFECounter, count_nfe
from .ode import ODE_METHODS, ode_encode, ode_sample, probability_flow
from .pc import pc_sample, pc_step
from .predictors import PREDICTORS, ancestral, euler_maruyama, reverse_diffusion

__all__ = [
    "pc_sample",
    "pc_step",
    "ode_sample",
    "ode_encode",
    "probability_flow",
    "ODE_METHODS",
    "dpm_solver_2m",
    "solver_time_grid",
    "TIME_GRIDS",
    "PREDICTORS",
    "CORRECTORS",
    "euler_maruyama",
    "reverse_diffusion",
    "ancestral",
    "langevin",
    "annealed_langevin",
    "inpaint",
    "colorize",
    "likelihood",
    "bits_per_dim",
    "Likelihood",
    "ESTIMATORS",
    "masked_sample",
    "masked_step",
    "masked_time_steps",
    "count_nfe",
    "NFECounter",
    "StackedGenerator",
]
