"""Upper bounds of the settings whose natural range is open-ended.

Far above any real run (ImageNet-1K: 1.28M images at 224 px, hundreds of epochs, batches of
a few thousand), low enough that a typo (an extra "000", a pasted 1e30) is refused where the
configuration is resolved instead of allocating without end or running for ever. A field
whose range is closed by its meaning (a fraction, a probability, an eps in [0, 1] pixel
units) declares that range itself.
"""
SEED = 2**32 - 1        # numpy's global seed range (runtime.seed_all seeds numpy too)
EPOCHS = 100_000
STEPS = 10_000_000       # iterations, attack steps, queries, checkpoint intervals
IMAGES = 1_000_000_000   # subset sizes, evaluated images
BATCH = 1_000_000        # batches and chunks, in images (or classes, views)
IPC = 100_000            # images per class (and the evaluation networks of DC)
SIDE = 16_384            # image sides, pixel shifts, channel widths
DEPTH = 1_000            # network blocks
WORKERS = 1_024          # data-loading processes
WEIGHT = 1e6             # loss weights (lambda, beta, r_bn, ...)
H = 1e3                  # GUARD's finite-difference step h (paper: 3)
LR = 100.0               # learning rates, per step (SGD/Adam on weights or on images)
TEMPERATURE = 1e3        # KD temperature (the public code: 20 or 30)
ALPHA = 1e3              # Beta(alpha, alpha) parameters of CutMix / Mixup
