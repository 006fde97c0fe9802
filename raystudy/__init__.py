"""raystudy: a Ray Tune study of surrogate training for transfer attacks."""

__version__ = "0.2.0"
