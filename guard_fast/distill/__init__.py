"""Distillation stages, each reading the previous stage's run folder and writing its own:

  squeeze.py   train the teacher (GUARD, plain SRe2L, gradient-norm or adversarial baselines)
  recover.py   SRe2L synthesis from the teacher's BatchNorm statistics (+ CDA's curriculum)
  relabel.py   FKD soft labels on stored, replayable views
  student.py   the student trained on the distilled set with those soft labels
  dc.py        dataset condensation by gradient matching (+ GUARD on the real gradient)
  experts.py   MTT's expert trajectories (+ GUARD- or gradient-norm-regularized experts)
  mtt.py       trajectory matching: MTT, TESLA (constant memory) and TESLA's exact variant

The algorithms only: what two stages share lives in guard_fast.runtime (device, torchrun,
run folders, checkpoints) or guard_fast.data (the distilled-set folder, data/distilled.py;
the soft-label views and the relabel folder's format, data/softlabels.py; the expert buffer,
data/trajectories.py; DSA, data/dsa.py). No stage imports
another.
"""
