"""arv-wrap: run the tools of an unmodified pipeline as jobs, by exec interception."""
__version__ = "0.1.0"
