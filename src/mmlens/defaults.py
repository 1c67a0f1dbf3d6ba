"""Default settings shared by the library's functions and the study config schema.

They live in a module that imports nothing heavy, so that `mmlens study CONFIG --check` and a
config error answer without loading torch, while `probe_sweep`, `fit_logistic` and the data
loaders keep reading the very same values (they import them from here).
"""

# Penalty candidates cross-validated per site, and the folds of training images they are scored on.
RIDGE_ALPHAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LOGISTIC_L2S = (1e-4, 1e-3, 1e-2)
DEFAULT_FOLDS = 3

# L-BFGS runs until its tolerances stop it: a fit cut off by the iteration cap ends wherever the
# path happened to be, and moves with float rounding (batch size, thread count). On the embedded
# model's sites a fit converges in 300-400 iterations; the cap only guards against a runaway.
MAX_ITER = 2000

# The smallest square side a loader makes: below it the scenes' shapes are a few pixels across and a
# photo holds less than one patch of a vision encoder (14-16 px), so every token would see all of it.
MIN_IMAGE_SIZE = 16
