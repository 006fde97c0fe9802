"""The Ray wing: an experiment made once and run as phases (`experiment`), the Ray trainable
(`trainable`), the Optuna searcher on Ray's Searcher interface (`searcher`), the confirm phase,
trackers, the local Ray session, the search dashboard, and the reference endpoint on Ray Serve
(`serve`). The only package that imports Ray."""
