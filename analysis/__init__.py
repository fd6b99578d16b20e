"""Log readers and figure scripts over training runs (run each as ``python analysis/<name>.py``).

Nothing in the training code imports from this package.
"""
