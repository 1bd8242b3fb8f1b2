"""tfbackdoor: find and make backdoor triggers through the frequency domain.

A TensorFlow/Keras implementation of Zeng, Park, Mao & Jia, *Rethinking the Backdoor Attacks'
Triggers: A Frequency Perspective* (ICCV 2021).

    >>> from tfbackdoor import data, triggers, detector
    >>> x, y = data.load_arrays("cifar10:test", limit=500)
    >>> model = detector.load()                      # the shipped CIFAR-10 detector
    >>> rows = detector.evaluate_images(model, x, triggers.expand("all"))
"""

__version__ = "0.1.0"

from .errors import TfbdError  # noqa: E402,F401
