"""The one exception type for errors a user can cause (bad spec, missing file, wrong shape...).

The CLI prints ``TfbdError`` messages on one line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""


class TfbdError(Exception):
    """A user-caused error whose message names the item and the problem."""


def dataset_hint(spec: str) -> str:
    """``": did you mean dir:PATH?"`` when an unknown dataset spec is an existing folder
    (``npz:`` for a ``.npz`` file), else ``""``."""
    import os

    s = str(spec).strip()
    if s and os.path.isdir(s):
        return f": did you mean dir:{s}?"
    if s.lower().endswith(".npz") and os.path.isfile(s):
        return f": did you mean npz:{s}?"
    return ""


def model_load_error(path, exc: BaseException) -> TfbdError:
    """The one-line error for a ``.keras`` file that Keras (safe mode) would not load: a refused
    ``Lambda`` layer is named as such; other messages are kept whole (cut only at a sentence end)."""
    text = str(exc)
    if "Lambda" in text and ("safe_mode" in text or "arbitrary code" in text):
        return TfbdError(f"{path}: refused: the model contains a Lambda layer (arbitrary Python code, which "
                         "could run anything when loaded); tfbd loads models in Keras safe mode only, so "
                         "rebuild it with built-in layers")
    return TfbdError(f"{path}: cannot load as a Keras model ({type(exc).__name__}: {short_message(exc)})")


def short_message(exc: BaseException, limit: int = 400) -> str:
    """``exc``'s message on one line, cut only at a sentence end (never mid-sentence) when longer
    than ``limit`` characters; its type name when empty."""
    text = " ".join(str(exc).split())
    if len(text) <= limit:
        return text or type(exc).__name__
    cut = max(text.rfind(". ", 0, limit), text.rfind("; ", 0, limit))
    return text[:cut + 1] + " [...]" if cut > 0 else text
