"""A surrogate's training and one whole trial: the epoch loop (`loop`), the LGV ensemble phase
(`lgv_ensemble`), and a trial run end to end from its plan (`trial.run_one_trial`: train or load,
then the trial-end hook, reporting through a callback). No Ray, no Optuna."""
