"""speechless: teach Gemma to understand speech in a low-resource language without recorded speech instructions."""

__version__ = "0.1.0"
